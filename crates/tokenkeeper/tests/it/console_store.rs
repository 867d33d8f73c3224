//! The store's reads behind the admin console, on each backend: the list's filters and search
//! with keyset pages, a connection's bounded history, its webhook deliveries, the health
//! check's progress and the key ids in use. (That each filter reads an index in id order is
//! the SQLite unit test `every_console_filter_reads_an_index_in_id_order`.)

use chrono::Duration;
use tokenkeeper::ids::ConnectionId;
use tokenkeeper::ledger::{CheckResult, ConnectionFilter, ConnectionStatus, JobKind};
use tokenkeeper::store::Store;

use crate::both_backends;
use crate::support::db::{connect, key_ring, manual_clock, minted, reconnect, Backend, TestDb};

both_backends!(
    the_list_filters_by_workspace_and_bot_and_searches_every_way_a_connection_is_named,
    a_search_pages_by_id_without_repeats,
    history_deliveries_check_progress_and_key_usage_are_bounded_and_newest_first,
);

async fn fresh(backend: Backend) -> TestDb {
    TestDb::new(backend, key_ring().0, manual_clock()).await
}

async fn ids(store: &Store, filter: ConnectionFilter) -> Vec<String> {
    store
        .list_connections(&filter)
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.id.to_string())
        .collect()
}

fn sorted(mut ids: Vec<&ConnectionId>) -> Vec<String> {
    ids.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    ids.into_iter().map(ToString::to_string).collect()
}

async fn the_list_filters_by_workspace_and_bot_and_searches_every_way_a_connection_is_named(
    backend: Backend,
) {
    let db = fresh(backend).await;
    let s = &*db.store;
    // Four connections: two bots share a workspace ("Acme Corp"); one end user's id is
    // another connection's bot id, so one text names two connections in two ways.
    let mut made = Vec::new();
    for (bot, user, workspace, name) in [
        ("bot-a", "alice", "ws-shared", "Acme Corp"),
        ("bot-b", "bob", "ws-shared", "Acme Corp"),
        ("bot-c", "bot-a", "ws-c", "Other"),
        ("bot-d", "dora", "ws-d", "Dora's"),
    ] {
        let mut pair = minted(bot, bot, &db.clock);
        pair.workspace_id = workspace.into();
        pair.workspace_name = Some(name.into());
        made.push(
            s.record_authorization(connect(user, pair))
                .await
                .unwrap()
                .connection
                .id,
        );
    }
    let [a, b, c, d] = [&made[0], &made[1], &made[2], &made[3]];
    s.mark_revoked(d, "test").await.unwrap();

    let filter = |f: fn(&mut ConnectionFilter)| {
        let mut filter = ConnectionFilter::default();
        f(&mut filter);
        filter
    };
    assert_eq!(
        ids(s, filter(|f| f.workspace_id = Some("ws-shared".into()))).await,
        sorted(vec![a, b])
    );
    // A revoked connection's bot is found too (the live-bot index does not cover it).
    assert_eq!(
        ids(s, filter(|f| f.bot_id = Some("bot-d".into()))).await,
        sorted(vec![d])
    );
    assert_eq!(
        ids(
            s,
            filter(|f| {
                f.workspace_id = Some("ws-shared".into());
                f.bot_id = Some("bot-b".into());
            })
        )
        .await,
        sorted(vec![b])
    );
    let search = |text: &str, status: Option<ConnectionStatus>| ConnectionFilter {
        search: Some(text.to_owned()),
        status,
        ..ConnectionFilter::default()
    };
    // Each way a connection is named: its id, bot, workspace, end user, workspace name in any
    // case; surrounding spaces do not count.
    assert_eq!(ids(s, search(c.as_str(), None)).await, sorted(vec![c]));
    assert_eq!(ids(s, search("bot-b", None)).await, sorted(vec![b]));
    assert_eq!(ids(s, search("ws-c", None)).await, sorted(vec![c]));
    assert_eq!(ids(s, search(" dora ", None)).await, sorted(vec![d]));
    assert_eq!(ids(s, search("ACME corp", None)).await, sorted(vec![a, b]));
    // One text naming two connections (a's bot, c's end user): both, once each, by id.
    assert_eq!(ids(s, search("bot-a", None)).await, sorted(vec![a, c]));
    // Exact matches only: a part of a name finds nothing.
    assert!(ids(s, search("Acme", None)).await.is_empty());
    // With a status.
    assert_eq!(
        ids(s, search("dora", Some(ConnectionStatus::Active))).await,
        Vec::<String>::new()
    );
    assert_eq!(
        ids(s, search("dora", Some(ConnectionStatus::Revoked))).await,
        sorted(vec![d])
    );
    // A blank search is no search.
    assert_eq!(ids(s, search("  ", None)).await.len(), 4);
}

async fn a_search_pages_by_id_without_repeats(backend: Backend) {
    let db = fresh(backend).await;
    let s = &*db.store;
    let mut made = Vec::new();
    for i in 0..5 {
        let mut pair = minted(&format!("many-{i}"), &format!("m{i}"), &db.clock);
        // Every connection is named "many" twice: by its end user and its workspace's name.
        pair.workspace_name = Some("many".into());
        made.push(
            s.record_authorization(connect("many", pair))
                .await
                .unwrap()
                .connection
                .id,
        );
    }
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = s
            .list_connections(&ConnectionFilter {
                search: Some("many".into()),
                after: after.clone(),
                limit: 2,
                ..ConnectionFilter::default()
            })
            .await
            .unwrap();
        assert!(page.len() <= 2);
        let Some(last) = page.last() else { break };
        after = Some(last.id.clone());
        seen.extend(page.into_iter().map(|c| c.id.to_string()));
    }
    assert_eq!(seen, sorted(made.iter().collect()));
}

async fn history_deliveries_check_progress_and_key_usage_are_bounded_and_newest_first(
    backend: Backend,
) {
    let db = fresh(backend).await;
    let s = &*db.store;
    s.set_webhook_endpoints(vec!["http://127.0.0.1:9/hook".into()]);
    let first = s
        .record_authorization(connect("u", minted("bot-h", "h1", &db.clock)))
        .await
        .unwrap();
    let id = first.connection.id.clone();
    for tag in ["h2", "h3"] {
        db.clock.advance(Duration::seconds(1));
        s.record_authorization(reconnect(&id, minted("bot-h", tag, &db.clock)))
            .await
            .unwrap();
    }
    let grants = s.list_grants(&id).await.unwrap();
    let events = s.list_events(&id).await.unwrap();
    assert_eq!(grants.len(), 3);

    let history = s.history(&id, 2).await.unwrap();
    assert_eq!(history.grant_count, 3);
    assert_eq!(history.event_count, events.len() as i64);
    let newest_grants: Vec<_> = grants.iter().rev().take(2).map(|g| g.id.clone()).collect();
    assert_eq!(
        history
            .grants
            .iter()
            .map(|g| g.id.clone())
            .collect::<Vec<_>>(),
        newest_grants
    );
    let newest_events: Vec<_> = events.iter().rev().take(2).map(|e| e.id.clone()).collect();
    assert_eq!(
        history
            .events
            .iter()
            .map(|e| e.id.clone())
            .collect::<Vec<_>>(),
        newest_events
    );

    // One delivery per event that is announced: created, then two re-authorizations.
    let all = s.jobs_of_connection(&id, JobKind::Webhook).await.unwrap();
    assert_eq!(all.len(), 3);
    let recent = s
        .recent_jobs_of_connection(&id, JobKind::Webhook, 2)
        .await
        .unwrap();
    assert_eq!(
        recent.iter().map(|j| j.id.clone()).collect::<Vec<_>>(),
        all.iter()
            .rev()
            .take(2)
            .map(|j| j.id.clone())
            .collect::<Vec<_>>()
    );

    // The health check's progress: four active connections (one more revoked), two checked at
    // t0, one checked two hours later, one never.
    let t0 = db.clock.now();
    let mut active = vec![(id.clone(), s.get_connection(&id).await.unwrap().unwrap())];
    for bot in ["bot-p", "bot-q", "bot-r", "bot-x"] {
        let c = s
            .record_authorization(connect("u", minted(bot, bot, &db.clock)))
            .await
            .unwrap()
            .connection;
        active.push((c.id.clone(), c));
    }
    let (revoked, _) = active.pop().unwrap();
    s.mark_revoked(&revoked, "test").await.unwrap();
    let active = &active;
    let grant_of = |i: usize| async move {
        s.get_connection(&active[i].0)
            .await
            .unwrap()
            .unwrap()
            .grant_id
            .unwrap()
    };
    for i in [0, 1] {
        let g = grant_of(i).await;
        s.record_check(&active[i].0, &g, CheckResult::Active)
            .await
            .unwrap();
    }
    db.clock.advance(Duration::hours(2));
    let g = grant_of(2).await;
    s.record_check(&active[2].0, &g, CheckResult::Active)
        .await
        .unwrap();
    let progress = s.check_progress(t0 + Duration::hours(1)).await.unwrap();
    assert_eq!(progress.active, 4);
    assert_eq!(progress.checked_since, 1);
    assert_eq!(progress.never_checked, 1);
    assert_eq!(progress.oldest_check, Some(t0));

    let usage = s.key_usage().await.unwrap();
    assert_eq!(
        usage.sealing_grants.into_iter().collect::<Vec<_>>(),
        vec![s.keys().active_key_id().to_owned()]
    );
}
