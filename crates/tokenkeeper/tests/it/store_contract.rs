//! The store contract: the same cases on SQLite and PostgreSQL, covering every `Store` method
//! and the ledger rules of DESIGN.md (invariants 1, 2, 3, 5, 7 and 8 as the store keeps them).

use std::time::Duration;

use chrono::SecondsFormat;
use serde_json::json;
use tokenkeeper::ids::{BotId, ConnectionId, GrantId, RefreshToken, SessionId};
use tokenkeeper::ledger::{
    AuthorizationKind, ConnectSession, ConnectionFilter, ConnectionStatus, EventKind,
    FailureOutcome, Fence, GrantOrigin, LeaseHolder, LeaseOutcome, Provider, RefreshCommit,
    RefreshFailure,
};
use tokenkeeper::seal::{KeyRing, SealError};
use tokenkeeper::store::{SessionLookup, Store, StoreError};

use crate::both_backends;
use crate::support::db::{connect, key_ring, manual_clock, minted, reconnect, Backend, TestDb};

const LEASE: Duration = Duration::from_secs(30);

async fn fresh(backend: Backend) -> TestDb {
    TestDb::new(backend, key_ring().0, manual_clock()).await
}

async fn kinds(store: &Store, id: &ConnectionId) -> Vec<EventKind> {
    store
        .list_events(id)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect()
}

/// Takes the lease or fails the test.
async fn acquire(
    store: &Store,
    id: &ConnectionId,
    holder: &str,
    lease: Duration,
) -> (
    Fence,
    tokenkeeper::ids::AttemptId,
    GrantId,
    Option<tokenkeeper::ledger::InterruptedAttempt>,
) {
    match store
        .begin_refresh(id, None, &LeaseHolder::new(holder), lease)
        .await
        .unwrap()
    {
        LeaseOutcome::Acquired {
            fence,
            attempt_id,
            grant,
            interrupted,
        } => (fence, attempt_id, grant.record.id, interrupted),
        other => panic!("{holder} expected the lease, got {other:?}"),
    }
}

fn invalid_grant() -> RefreshFailure {
    RefreshFailure {
        auth_failure: true,
        code: Some("invalid_grant".into()),
        message: "The refresh token is invalid or was already used.".into(),
        provider_request_id: Some("req-failed".into()),
        outcome_unknown: false,
        tried: vec![],
    }
}

both_backends!(
    first_authorization_creates_a_connection_with_one_open_grant,
    reauthorization_with_a_new_pair_supersedes_and_keeps_the_old_grant,
    reauthorization_with_the_same_pair_is_a_confirmation_without_a_grant,
    a_new_refresh_token_with_the_old_access_token_is_a_new_grant,
    reconnect_with_another_bot_keeps_the_id_and_records_bot_changed,
    reconnect_onto_another_live_connections_bot_conflicts_and_stores_nothing,
    reconnect_of_an_unknown_connection_is_refused,
    a_revoked_connections_bot_connects_anew_and_a_reconnect_reactivates_it,
    a_refresh_of_the_current_grant_becomes_current,
    a_refresh_that_lost_to_a_reauthorization_is_superseded_at_birth,
    leases_exclude_expire_and_name_the_interrupted_attempt,
    begin_refresh_refuses_what_cannot_be_refreshed,
    a_fenced_failure_changes_nothing,
    a_fenced_success_is_still_recorded_and_leaves_the_new_lease_alone,
    invalid_grant_on_the_current_grant_needs_reauth_with_a_diagnosis,
    invalid_grant_on_a_superseded_grant_is_already_rotated,
    a_transient_failure_leaves_the_connection_active,
    sessions_are_single_use_and_expire,
    list_connections_filters_and_pages,
    schema_versions_are_checked_and_a_newer_schema_is_refused,
    concurrent_migrations_apply_each_migration_once,
    key_rotation_reseals_every_grant_and_all_still_open,
    a_sealed_value_moved_to_another_place_does_not_open,
    tokens_never_reach_the_database_or_the_trail_in_plaintext,
    sixty_four_readers_during_writes_each_see_one_consistent_grant,
    a_bulk_import_records_each_authorization_as_record_authorization_does,
    recording_a_refresh_or_an_authorization_twice_writes_it_once,
    a_late_refresh_of_the_current_grant_recovers_a_connection_judged_dead,
);

async fn first_authorization_creates_a_connection_with_one_open_grant(backend: Backend) {
    let db = fresh(backend).await;
    let s = &*db.store;
    let pair = minted("bot-a", "first", &db.clock);
    let out = s
        .record_authorization(connect("user-1", pair.clone()))
        .await
        .unwrap();
    assert_eq!(out.kind, AuthorizationKind::Connected);
    assert!(!out.recovered);
    let c = &out.connection;
    assert_eq!(c.bot_id, BotId("bot-a".into()));
    assert_eq!(c.workspace_id, "ws-bot-a");
    assert_eq!(c.workspace_name.as_deref(), Some("Workspace of bot-a"));
    assert_eq!(c.end_user_id, "user-1");
    assert_eq!(c.provider, Provider::Notion);
    assert_eq!(c.status, ConnectionStatus::Active);
    assert_eq!(c.grant_id.as_ref(), Some(&out.grant_id));
    assert_eq!(c.created_at, db.clock.now());

    let (conn, grant) = s
        .current_grant(&c.id)
        .await
        .unwrap()
        .expect("the connection exists");
    assert_eq!(conn.id, c.id);
    let grant = grant.expect("a current grant");
    assert_eq!(grant.access_token, pair.access_token);
    assert_eq!(grant.refresh_token, pair.refresh_token);
    assert_eq!(grant.record.id, out.grant_id);
    assert_eq!(grant.record.origin, GrantOrigin::Authorization);
    assert_eq!(grant.record.obtained_at, pair.obtained_at);
    assert_eq!(
        grant.record.access_token_fingerprint,
        pair.access_token.fingerprint()
    );
    assert_eq!(
        grant.record.refresh_token_fingerprint,
        pair.refresh_token.as_ref().map(RefreshToken::fingerprint)
    );
    assert_eq!(grant.record.key_id, db.keys.active_key_id());
    assert_eq!(
        grant.record.provider_request_id.as_deref(),
        Some("req-first")
    );
    assert!(grant.record.superseded_at.is_none() && !grant.record.stale_at_birth);

    let fetched = s
        .get_connection(&c.id)
        .await
        .unwrap()
        .expect("get_connection finds it");
    assert_eq!(fetched.grant_id, c.grant_id);
    assert_eq!(s.list_grants(&c.id).await.unwrap().len(), 1);
    let events = s.list_events(&c.id).await.unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].kind, EventKind::Authorized);
    assert_eq!(events[0].grant_id.as_ref(), Some(&out.grant_id));
    assert_eq!(events[0].provider_request_id.as_deref(), Some("req-first"));

    let unknown = ConnectionId::generate();
    assert!(s.current_grant(&unknown).await.unwrap().is_none());
    assert!(s.get_connection(&unknown).await.unwrap().is_none());
    assert!(
        s.get_grant(&unknown, &out.grant_id)
            .await
            .unwrap()
            .is_none(),
        "a grant is found only under its connection"
    );
    s.ping().await.unwrap();
    assert_eq!(
        s.backend().as_str(),
        match backend {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    );
}

async fn reauthorization_with_a_new_pair_supersedes_and_keeps_the_old_grant(backend: Backend) {
    let db = fresh(backend).await;
    let s = &*db.store;
    let first = minted("bot-a", "one", &db.clock);
    let a = s
        .record_authorization(connect("user-1", first.clone()))
        .await
        .unwrap();
    db.clock.advance(chrono::Duration::seconds(5));
    let second = minted("bot-a", "two", &db.clock);
    let b = s
        .record_authorization(connect("someone-else", second.clone()))
        .await
        .unwrap();

    assert_eq!(b.kind, AuthorizationKind::Reauthorized);
    assert_eq!(
        b.connection.id, a.connection.id,
        "the same bot is the same connection"
    );
    assert_eq!(
        b.connection.end_user_id, "user-1",
        "the connection keeps its end user"
    );
    assert_ne!(b.grant_id, a.grant_id);
    let (_, current) = s.current_grant(&a.connection.id).await.unwrap().unwrap();
    assert_eq!(current.unwrap().access_token, second.access_token);

    let grants = s.list_grants(&a.connection.id).await.unwrap();
    assert_eq!(grants.len(), 2);
    assert_eq!(grants[0].id, a.grant_id);
    assert_eq!(grants[0].superseded_at, Some(db.clock.now()));
    assert_eq!(grants[1].origin, GrantOrigin::Reauthorization);
    assert!(grants[1].superseded_at.is_none());
    let old = s
        .get_grant(&a.connection.id, &a.grant_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        old.access_token, first.access_token,
        "a superseded grant still opens"
    );
    assert_eq!(old.refresh_token, first.refresh_token);

    let events = s.list_events(&a.connection.id).await.unwrap();
    let kinds: Vec<_> = events.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [
            EventKind::Authorized,
            EventKind::Reauthorized,
            EventKind::Superseded
        ]
    );
    assert_eq!(events[1].related_grant_id.as_ref(), Some(&a.grant_id));
    assert_eq!(events[2].grant_id.as_ref(), Some(&a.grant_id));
    assert_eq!(events[2].related_grant_id.as_ref(), Some(&b.grant_id));
}

async fn reauthorization_with_the_same_pair_is_a_confirmation_without_a_grant(backend: Backend) {
    let db = fresh(backend).await;
    let s = &*db.store;
    let pair = minted("bot-legacy", "legacy", &db.clock);
    let a = s
        .record_authorization(connect("user-1", pair.clone()))
        .await
        .unwrap();
    let again = s
        .record_authorization(connect("user-1", pair.clone()))
        .await
        .unwrap();
    assert_eq!(again.kind, AuthorizationKind::Confirmed);
    assert_eq!(again.grant_id, a.grant_id);
    assert_eq!(again.connection.id, a.connection.id);
    assert_eq!(
        s.list_grants(&a.connection.id).await.unwrap().len(),
        1,
        "no duplicate grant"
    );
    assert_eq!(
        kinds(s, &a.connection.id).await,
        [EventKind::Authorized, EventKind::ReauthorizationConfirmed]
    );
    let again = s
        .record_authorization(reconnect(&a.connection.id, pair))
        .await
        .unwrap();
    assert_eq!(again.kind, AuthorizationKind::Confirmed);
    assert_eq!(s.list_grants(&a.connection.id).await.unwrap().len(), 1);
}

async fn a_new_refresh_token_with_the_old_access_token_is_a_new_grant(backend: Backend) {
    let db = fresh(backend).await;
    let s = &*db.store;
    let pair = minted("bot-a", "one", &db.clock);
    let a = s
        .record_authorization(connect("user-1", pair.clone()))
        .await
        .unwrap();
    let mut half_new = pair.clone();
    half_new.refresh_token = Some(RefreshToken::new("nrt_only_the_refresh_token_changed"));
    let b = s
        .record_authorization(connect("user-1", half_new.clone()))
        .await
        .unwrap();
    assert_eq!(
        b.kind,
        AuthorizationKind::Reauthorized,
        "dropping the new refresh token would lose it"
    );
    let (_, current) = s.current_grant(&a.connection.id).await.unwrap().unwrap();
    assert_eq!(current.unwrap().refresh_token, half_new.refresh_token);
}

async fn reconnect_with_another_bot_keeps_the_id_and_records_bot_changed(backend: Backend) {
    let db = fresh(backend).await;
    let s = &*db.store;
    let a = s
        .record_authorization(connect("user-1", minted("bot-old", "old", &db.clock)))
        .await
        .unwrap();
    let id = a.connection.id.clone();
    let new_pair = minted("bot-new", "new", &db.clock);
    let b = s
        .record_authorization(reconnect(&id, new_pair.clone()))
        .await
        .unwrap();
    assert_eq!(b.kind, AuthorizationKind::Reauthorized);
    assert_eq!(
        b.connection.id, id,
        "a reconnect lands on its connection whatever bot comes back"
    );
    assert_eq!(b.connection.bot_id, BotId("bot-new".into()));
    assert_eq!(b.connection.workspace_id, "ws-bot-new");
    assert_eq!(b.connection.end_user_id, "user-1");
    let events = s.list_events(&id).await.unwrap();
    let changed = events
        .iter()
        .find(|e| e.kind == EventKind::BotChanged)
        .expect("a bot_changed event");
    assert_eq!(changed.detail["from_bot_id"], "bot-old");
    assert_eq!(changed.detail["to_bot_id"], "bot-new");
    assert_eq!(
        s.list_grants(&id).await.unwrap().len(),
        2,
        "the history stays with the connection"
    );

    // The new bot is this connection's now; the old bot is free for a new connection.
    let again = s
        .record_authorization(connect("user-2", minted("bot-new", "new2", &db.clock)))
        .await
        .unwrap();
    assert_eq!(again.connection.id, id);
    let fresh_old = s
        .record_authorization(connect("user-3", minted("bot-old", "old2", &db.clock)))
        .await
        .unwrap();
    assert_eq!(fresh_old.kind, AuthorizationKind::Connected);
    assert_ne!(fresh_old.connection.id, id);
}

async fn reconnect_onto_another_live_connections_bot_conflicts_and_stores_nothing(
    backend: Backend,
) {
    let db = fresh(backend).await;
    let s = &*db.store;
    let a = s
        .record_authorization(connect("user-1", minted("bot-a", "a", &db.clock)))
        .await
        .unwrap();
    let b = s
        .record_authorization(connect("user-2", minted("bot-b", "b", &db.clock)))
        .await
        .unwrap();
    let before = s.list_events(&a.connection.id).await.unwrap().len();
    let err = s
        .record_authorization(reconnect(
            &a.connection.id,
            minted("bot-b", "clash", &db.clock),
        ))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    let after = s.get_connection(&a.connection.id).await.unwrap().unwrap();
    assert_eq!(after.bot_id, BotId("bot-a".into()));
    assert_eq!(after.grant_id.as_ref(), Some(&a.grant_id));
    assert_eq!(s.list_grants(&a.connection.id).await.unwrap().len(), 1);
    assert_eq!(s.list_events(&a.connection.id).await.unwrap().len(), before);
    assert_eq!(s.list_grants(&b.connection.id).await.unwrap().len(), 1);
}

async fn reconnect_of_an_unknown_connection_is_refused(backend: Backend) {
    let db = fresh(backend).await;
    let unknown = ConnectionId::generate();
    let err = db
        .store
        .record_authorization(reconnect(&unknown, minted("bot-a", "a", &db.clock)))
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::UnknownConnection(ref id) if *id == unknown),
        "{err:?}"
    );
    assert!(db
        .store
        .list_connections(&ConnectionFilter::default())
        .await
        .unwrap()
        .is_empty());
}

async fn a_revoked_connections_bot_connects_anew_and_a_reconnect_reactivates_it(backend: Backend) {
    let db = fresh(backend).await;
    let s = &*db.store;
    let first = minted("bot-a", "a1", &db.clock);
    let a = s
        .record_authorization(connect("user-1", first.clone()))
        .await
        .unwrap();
    let id = a.connection.id.clone();
    db.clock.advance(chrono::Duration::seconds(1));
    let revoked = s.mark_revoked(&id, "user asked").await.unwrap();
    assert_eq!(revoked.status, ConnectionStatus::Revoked);
    let grants = s.list_grants(&id).await.unwrap();
    assert_eq!(grants[0].revoked_at, Some(db.clock.now()));
    assert!(matches!(
        s.begin_refresh(&id, None, &LeaseHolder::new("h"), LEASE)
            .await
            .unwrap(),
        LeaseOutcome::NotRefreshable {
            status: ConnectionStatus::Revoked,
            ..
        }
    ));
    let opened = s.get_grant(&id, &a.grant_id).await.unwrap().unwrap();
    assert_eq!(
        opened.access_token, first.access_token,
        "revocation keeps the history readable"
    );
    let again = s.mark_revoked(&id, "twice").await.unwrap();
    assert_eq!(again.status, ConnectionStatus::Revoked);
    assert_eq!(
        kinds(s, &id).await,
        [EventKind::Authorized, EventKind::Revoked],
        "revoking twice is one event"
    );

    // A revoked connection is not live: the same bot connects anew.
    let b = s
        .record_authorization(connect("user-1", minted("bot-a", "a2", &db.clock)))
        .await
        .unwrap();
    assert_eq!(b.kind, AuthorizationKind::Connected);
    assert_ne!(b.connection.id, id);
    // While that one is live, reviving the old one with the same bot would make two.
    let err = s
        .record_authorization(reconnect(&id, minted("bot-a", "a3", &db.clock)))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");

    s.mark_revoked(&b.connection.id, "gone").await.unwrap();
    let revived_pair = minted("bot-a", "a4", &db.clock);
    let revived = s
        .record_authorization(reconnect(&id, revived_pair.clone()))
        .await
        .unwrap();
    assert_eq!(revived.kind, AuthorizationKind::Reauthorized);
    assert!(revived.recovered);
    assert_eq!(revived.connection.id, id);
    assert_eq!(revived.connection.status, ConnectionStatus::Active);
    let (_, current) = s.current_grant(&id).await.unwrap().unwrap();
    assert_eq!(current.unwrap().access_token, revived_pair.access_token);
    assert_eq!(kinds(s, &id).await.last(), Some(&EventKind::Recovered));
}

async fn a_refresh_of_the_current_grant_becomes_current(backend: Backend) {
    let db = fresh(backend).await;
    let s = &*db.store;
    let a = s
        .record_authorization(connect("user-1", minted("bot-a", "a", &db.clock)))
        .await
        .unwrap();
    let id = a.connection.id.clone();
    let (fence, attempt, parent, interrupted) = acquire(s, &id, "h1", LEASE).await;
    assert_eq!(fence, Fence(1));
    assert_eq!(parent, a.grant_id);
    assert!(interrupted.is_none());
    db.clock.advance(chrono::Duration::seconds(1));
    let pair = minted("bot-a", "refreshed", &db.clock);
    let rec = s
        .record_refresh(
            &id,
            &parent,
            fence,
            &attempt,
            &GrantId::generate(),
            pair.clone(),
        )
        .await
        .unwrap();
    assert_eq!(rec.commit, RefreshCommit::Current);
    assert_eq!(rec.current, rec.grant_id);

    let (conn, current) = s.current_grant(&id).await.unwrap().unwrap();
    let current = current.unwrap();
    assert_eq!(conn.grant_id.as_ref(), Some(&rec.grant_id));
    assert_eq!(current.access_token, pair.access_token);
    assert_eq!(current.record.origin, GrantOrigin::Refresh);
    assert_eq!(current.record.parent_grant_id.as_ref(), Some(&a.grant_id));
    let grants = s.list_grants(&id).await.unwrap();
    assert_eq!(grants.len(), 2);
    assert!(grants[0].superseded_at.is_some());
    assert_eq!(
        kinds(s, &id).await,
        [
            EventKind::Authorized,
            EventKind::RefreshStarted,
            EventKind::Refreshed,
            EventKind::Superseded
        ]
    );
    // The lease was released: the next refresh starts at once, from the new grant.
    let (fence2, _, parent2, _) = acquire(s, &id, "h2", LEASE).await;
    assert_eq!(fence2, Fence(2));
    assert_eq!(parent2, rec.grant_id);
}

async fn a_refresh_that_lost_to_a_reauthorization_is_superseded_at_birth(backend: Backend) {
    let db = fresh(backend).await;
    let s = &*db.store;
    let a = s
        .record_authorization(connect("user-1", minted("bot-a", "a", &db.clock)))
        .await
        .unwrap();
    let id = a.connection.id.clone();
    let (fence, attempt, parent, _) = acquire(s, &id, "h1", LEASE).await;
    let reauth_pair = minted("bot-a", "reauth", &db.clock);
    let reauth = s
        .record_authorization(connect("user-1", reauth_pair.clone()))
        .await
        .unwrap();
    assert_eq!(
        reauth.kind,
        AuthorizationKind::Reauthorized,
        "an authorization wins even during a lease"
    );
    let late = minted("bot-a", "late", &db.clock);
    let rec = s
        .record_refresh(
            &id,
            &parent,
            fence,
            &attempt,
            &GrantId::generate(),
            late.clone(),
        )
        .await
        .unwrap();
    assert_eq!(rec.commit, RefreshCommit::SupersededAtBirth);
    assert_eq!(rec.current, reauth.grant_id);

    let (_, current) = s.current_grant(&id).await.unwrap().unwrap();
    assert_eq!(current.unwrap().access_token, reauth_pair.access_token);
    let stale = s
        .get_grant(&id, &rec.grant_id)
        .await
        .unwrap()
        .expect("the late pair is kept");
    assert_eq!(stale.access_token, late.access_token);
    assert_eq!(stale.refresh_token, late.refresh_token);
    assert!(stale.record.stale_at_birth);
    assert_eq!(stale.record.superseded_at, Some(late.obtained_at));
    assert_eq!(stale.record.parent_grant_id.as_ref(), Some(&parent));
    let events = s.list_events(&id).await.unwrap();
    let last = events.last().unwrap();
    assert_eq!(last.kind, EventKind::Superseded);
    assert_eq!(last.grant_id.as_ref(), Some(&rec.grant_id));
    assert_eq!(last.detail["reason"], "parent_superseded");
    assert!(!events.iter().any(|e| e.kind == EventKind::Refreshed));
    // The lease was ours and is released.
    acquire(s, &id, "h2", LEASE).await;
}

async fn leases_exclude_expire_and_name_the_interrupted_attempt(backend: Backend) {
    let db = fresh(backend).await;
    let s = &*db.store;
    let a = s
        .record_authorization(connect("user-1", minted("bot-a", "a", &db.clock)))
        .await
        .unwrap();
    let id = a.connection.id.clone();
    let started = db.clock.now();
    let (f1, attempt1, _, _) = acquire(s, &id, "h1", LEASE).await;
    match s
        .begin_refresh(&id, None, &LeaseHolder::new("h2"), LEASE)
        .await
        .unwrap()
    {
        LeaseOutcome::Busy { until } => assert_eq!(until, started + chrono::Duration::seconds(30)),
        other => panic!("expected Busy, got {other:?}"),
    }
    match s
        .begin_refresh(
            &id,
            Some(&GrantId::generate()),
            &LeaseHolder::new("h2"),
            LEASE,
        )
        .await
        .unwrap()
    {
        LeaseOutcome::AlreadyRotated { current } => assert_eq!(current, a.grant_id),
        other => panic!("expected AlreadyRotated, got {other:?}"),
    }
    db.clock.advance(chrono::Duration::seconds(29));
    assert!(matches!(
        s.begin_refresh(&id, Some(&a.grant_id), &LeaseHolder::new("h2"), LEASE)
            .await
            .unwrap(),
        LeaseOutcome::Busy { .. }
    ));
    db.clock.advance(chrono::Duration::seconds(2));
    let (f2, _, parent, interrupted) = acquire(s, &id, "h2", LEASE).await;
    assert_eq!(f2, f1.next(), "every lease bumps the fence");
    assert_eq!(parent, a.grant_id);
    let interrupted = interrupted.expect("h1 never reported back");
    assert_eq!(interrupted.attempt_id, attempt1);
    assert_eq!(interrupted.holder, LeaseHolder::new("h1"));
    assert_eq!(interrupted.started_at, started);
    assert_eq!(interrupted.grant_id, a.grant_id);
}

async fn begin_refresh_refuses_what_cannot_be_refreshed(backend: Backend) {
    let db = fresh(backend).await;
    let s = &*db.store;
    let mut no_refresh = minted("bot-legacy", "legacy", &db.clock);
    no_refresh.refresh_token = None;
    let a = s
        .record_authorization(connect("user-1", no_refresh))
        .await
        .unwrap();
    match s
        .begin_refresh(&a.connection.id, None, &LeaseHolder::new("h"), LEASE)
        .await
        .unwrap()
    {
        LeaseOutcome::NotRefreshable { status, reason } => {
            assert_eq!(status, ConnectionStatus::Active);
            assert!(reason.contains("refresh token"), "{reason}");
        }
        other => panic!("expected NotRefreshable, got {other:?}"),
    }
    let err = s
        .begin_refresh(
            &ConnectionId::generate(),
            None,
            &LeaseHolder::new("h"),
            LEASE,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::UnknownConnection(_)), "{err:?}");
}

async fn a_fenced_failure_changes_nothing(backend: Backend) {
    let db = fresh(backend).await;
    let s = &*db.store;
    let a = s
        .record_authorization(connect("user-1", minted("bot-a", "a", &db.clock)))
        .await
        .unwrap();
    let id = a.connection.id.clone();
    let (f1, attempt1, parent, _) = acquire(s, &id, "h1", Duration::from_secs(10)).await;
    db.clock.advance(chrono::Duration::seconds(11));
    let (f2, _, _, _) = acquire(s, &id, "h2", LEASE).await;
    let outcome = s
        .record_refresh_failure(&id, &parent, f1, &attempt1, &invalid_grant())
        .await
        .unwrap();
    assert_eq!(outcome, FailureOutcome::Fenced);
    let conn = s.get_connection(&id).await.unwrap().unwrap();
    assert_eq!(conn.status, ConnectionStatus::Active);
    assert!(conn.diagnosis.is_none());
    assert!(
        matches!(
            s.begin_refresh(&id, None, &LeaseHolder::new("h3"), LEASE)
                .await
                .unwrap(),
            LeaseOutcome::Busy { .. }
        ),
        "h2's lease (fence {f2}) is untouched"
    );
    let last = s.list_events(&id).await.unwrap().pop().unwrap();
    assert_eq!(last.kind, EventKind::RefreshFailed);
    assert_eq!(last.detail["fenced"], true);
}

async fn a_fenced_success_is_still_recorded_and_leaves_the_new_lease_alone(backend: Backend) {
    let db = fresh(backend).await;
    let s = &*db.store;
    let a = s
        .record_authorization(connect("user-1", minted("bot-a", "a", &db.clock)))
        .await
        .unwrap();
    let id = a.connection.id.clone();
    let (f1, attempt1, p1, _) = acquire(s, &id, "h1", Duration::from_secs(10)).await;
    db.clock.advance(chrono::Duration::seconds(11));
    let (f2, attempt2, p2, _) = acquire(s, &id, "h2", LEASE).await;
    assert_eq!(p1, p2);

    // h1 was slow, not dead: its pair arrives while h2 holds the lease. Its parent is still
    // current, so it becomes current; the fence only decides who releases the lease.
    let pair1 = minted("bot-a", "slow-h1", &db.clock);
    let r1 = s
        .record_refresh(&id, &p1, f1, &attempt1, &GrantId::generate(), pair1.clone())
        .await
        .unwrap();
    assert_eq!(r1.commit, RefreshCommit::Current);
    assert!(matches!(
        s.begin_refresh(&id, None, &LeaseHolder::new("h3"), LEASE)
            .await
            .unwrap(),
        LeaseOutcome::Busy { .. }
    ));
    let pair2 = minted("bot-a", "h2", &db.clock);
    let r2 = s
        .record_refresh(&id, &p2, f2, &attempt2, &GrantId::generate(), pair2.clone())
        .await
        .unwrap();
    assert_eq!(r2.commit, RefreshCommit::SupersededAtBirth);
    assert_eq!(r2.current, r1.grant_id);
    for (grant, pair) in [(&r1.grant_id, &pair1), (&r2.grant_id, &pair2)] {
        let open = s
            .get_grant(&id, grant)
            .await
            .unwrap()
            .expect("nothing minted is lost");
        assert_eq!(open.access_token, pair.access_token);
        assert_eq!(open.refresh_token, pair.refresh_token);
    }
    let (_, _, parent, _) = acquire(s, &id, "h3", LEASE).await;
    assert_eq!(
        parent, r1.grant_id,
        "the lease was released by its holder, h2"
    );
}

async fn invalid_grant_on_the_current_grant_needs_reauth_with_a_diagnosis(backend: Backend) {
    let db = fresh(backend).await;
    let s = &*db.store;
    let pair = minted("bot-a", "a", &db.clock);
    let a = s
        .record_authorization(connect("user-1", pair.clone()))
        .await
        .unwrap();
    let id = a.connection.id.clone();
    let crashed_at = db.clock.now();
    let (_, attempt1, _, _) = acquire(s, &id, "crashed-holder", Duration::from_secs(10)).await;
    db.clock.advance(chrono::Duration::seconds(11));
    let (f2, attempt2, parent, interrupted) = acquire(s, &id, "h2", LEASE).await;
    assert_eq!(interrupted.unwrap().attempt_id, attempt1);
    let outcome = s
        .record_refresh_failure(&id, &parent, f2, &attempt2, &invalid_grant())
        .await
        .unwrap();
    let FailureOutcome::NeedsReauth { diagnosis } = outcome else {
        panic!("expected NeedsReauth, got {outcome:?}");
    };
    let typed = diagnosis;
    let diagnosis = json!(typed);
    assert_eq!(diagnosis["reason"], "refresh_rejected");
    assert_eq!(diagnosis["code"], "invalid_grant");
    assert_eq!(diagnosis["grant_id"], json!(a.grant_id));
    assert_eq!(
        diagnosis["grant_obtained_at"],
        pair.obtained_at
            .to_rfc3339_opts(SecondsFormat::Micros, true)
    );
    assert_eq!(diagnosis["provider_request_id"], "req-failed");
    assert_eq!(diagnosis["message"], invalid_grant().message);
    assert_eq!(
        diagnosis["interrupted_attempt"]["attempt_id"],
        json!(attempt1)
    );
    assert_eq!(diagnosis["interrupted_attempt"]["holder"], "crashed-holder");
    assert_eq!(
        diagnosis["interrupted_attempt"]["started_at"],
        crashed_at.to_rfc3339_opts(SecondsFormat::Micros, true)
    );

    let conn = s.get_connection(&id).await.unwrap().unwrap();
    assert_eq!(conn.status, ConnectionStatus::NeedsReauth);
    assert_eq!(conn.diagnosis.as_ref(), Some(&*typed));
    let k = kinds(s, &id).await;
    assert_eq!(
        &k[k.len() - 2..],
        [EventKind::RefreshFailed, EventKind::NeedsReauth]
    );
    assert!(matches!(
        s.begin_refresh(&id, None, &LeaseHolder::new("h3"), LEASE)
            .await
            .unwrap(),
        LeaseOutcome::NotRefreshable {
            status: ConnectionStatus::NeedsReauth,
            ..
        }
    ));
    let (_, still) = s.current_grant(&id).await.unwrap().unwrap();
    assert_eq!(still.unwrap().access_token, pair.access_token);

    // A reconnect recovers it.
    let back = s
        .record_authorization(reconnect(&id, minted("bot-a", "back", &db.clock)))
        .await
        .unwrap();
    assert!(back.recovered);
    assert_eq!(back.connection.status, ConnectionStatus::Active);
    assert!(back.connection.diagnosis.is_none());
    assert_eq!(kinds(s, &id).await.last(), Some(&EventKind::Recovered));

    // Without an interrupted attempt, the diagnosis says so.
    let (f, attempt, parent, _) = acquire(s, &id, "h4", LEASE).await;
    let FailureOutcome::NeedsReauth { diagnosis } = s
        .record_refresh_failure(&id, &parent, f, &attempt, &invalid_grant())
        .await
        .unwrap()
    else {
        panic!("expected NeedsReauth");
    };
    let diagnosis = json!(diagnosis);
    assert!(diagnosis["interrupted_attempt"].is_null());
    assert_eq!(diagnosis["grant_id"], json!(back.grant_id));
}

async fn invalid_grant_on_a_superseded_grant_is_already_rotated(backend: Backend) {
    let db = fresh(backend).await;
    let s = &*db.store;
    let a = s
        .record_authorization(connect("user-1", minted("bot-a", "a", &db.clock)))
        .await
        .unwrap();
    let id = a.connection.id.clone();
    let (f, attempt, parent, _) = acquire(s, &id, "h1", LEASE).await;
    let reauth = s
        .record_authorization(connect("user-1", minted("bot-a", "b", &db.clock)))
        .await
        .unwrap();
    let outcome = s
        .record_refresh_failure(&id, &parent, f, &attempt, &invalid_grant())
        .await
        .unwrap();
    assert_eq!(
        outcome,
        FailureOutcome::AlreadyRotated {
            current: reauth.grant_id.clone()
        }
    );
    let conn = s.get_connection(&id).await.unwrap().unwrap();
    assert_eq!(conn.status, ConnectionStatus::Active);
    assert!(conn.diagnosis.is_none());
    assert!(!kinds(s, &id).await.contains(&EventKind::NeedsReauth));
    acquire(s, &id, "h2", LEASE).await;
}

async fn a_transient_failure_leaves_the_connection_active(backend: Backend) {
    let db = fresh(backend).await;
    let s = &*db.store;
    let a = s
        .record_authorization(connect("user-1", minted("bot-a", "a", &db.clock)))
        .await
        .unwrap();
    let id = a.connection.id.clone();
    for code in ["rate_limited", "internal_server_error", "timeout"] {
        let (f, attempt, parent, interrupted) = acquire(s, &id, "h", LEASE).await;
        assert!(
            interrupted.is_none(),
            "a reported failure is not an interrupted attempt"
        );
        let failure = RefreshFailure {
            auth_failure: false,
            code: Some(code.into()),
            message: format!("{code} from the token endpoint"),
            provider_request_id: None,
            outcome_unknown: false,
            tried: vec![],
        };
        let outcome = s
            .record_refresh_failure(&id, &parent, f, &attempt, &failure)
            .await
            .unwrap();
        assert_eq!(outcome, FailureOutcome::Recorded);
        let conn = s.get_connection(&id).await.unwrap().unwrap();
        assert_eq!(
            conn.status,
            ConnectionStatus::Active,
            "{code} must not change auth state"
        );
        assert_eq!(conn.grant_id.as_ref(), Some(&a.grant_id));
    }
    assert_eq!(s.list_grants(&id).await.unwrap().len(), 1);
}

fn session(
    state_hash: &str,
    ttl: chrono::Duration,
    db: &TestDb,
    connection: Option<ConnectionId>,
) -> ConnectSession {
    ConnectSession {
        id: SessionId::generate(),
        provider: Provider::Notion,
        state_hash: state_hash.into(),
        end_user_id: "user-1".into(),
        return_to: "https://app.example/done".into(),
        connection_id: connection,
        created_at: db.clock.now(),
        expires_at: db.clock.now() + ttl,
        used_at: None,
    }
}

async fn sessions_are_single_use_and_expire(backend: Backend) {
    let db = fresh(backend).await;
    let s = &*db.store;
    let one = session("hash-one", chrono::Duration::minutes(10), &db, None);
    s.create_session(&one).await.unwrap();
    let got = s
        .get_session(&one.id)
        .await
        .unwrap()
        .expect("the session is stored");
    assert_eq!(got.state_hash, "hash-one");
    assert_eq!(got.expires_at, one.expires_at);
    assert!(got.used_at.is_none());
    match s.consume_session("hash-one").await.unwrap() {
        SessionLookup::Consumed(c) => {
            assert_eq!(c.id, one.id);
            assert_eq!(c.used_at, Some(db.clock.now()));
        }
        other => panic!("expected Consumed, got {other:?}"),
    }
    assert!(matches!(
        s.consume_session("hash-one").await.unwrap(),
        SessionLookup::AlreadyUsed(_)
    ));
    assert!(matches!(
        s.consume_session("no-such-hash").await.unwrap(),
        SessionLookup::Unknown
    ));
    assert!(s
        .get_session(&one.id)
        .await
        .unwrap()
        .unwrap()
        .used_at
        .is_some());

    let a = s
        .record_authorization(connect("user-1", minted("bot-a", "a", &db.clock)))
        .await
        .unwrap();
    let two = session(
        "hash-two",
        chrono::Duration::minutes(1),
        &db,
        Some(a.connection.id.clone()),
    );
    s.create_session(&two).await.unwrap();
    assert_eq!(
        s.get_session(&two.id).await.unwrap().unwrap().connection_id,
        Some(a.connection.id.clone())
    );
    db.clock.advance(chrono::Duration::minutes(1));
    assert!(matches!(
        s.consume_session("hash-two").await.unwrap(),
        SessionLookup::Expired(_)
    ));
    assert!(matches!(
        s.consume_session("hash-two").await.unwrap(),
        SessionLookup::Expired(_)
    ));

    // Many consumers at once: exactly one wins.
    let three = session("hash-three", chrono::Duration::minutes(10), &db, None);
    s.create_session(&three).await.unwrap();
    let tries = (0..8).map(|_| {
        let store = db.store.clone();
        tokio::spawn(async move { store.consume_session("hash-three").await.unwrap() })
    });
    let results = futures::future::join_all(tries).await;
    let won = results
        .iter()
        .filter(|r| matches!(r.as_ref().unwrap(), SessionLookup::Consumed(_)))
        .count();
    assert_eq!(won, 1);
}

async fn list_connections_filters_and_pages(backend: Backend) {
    let db = fresh(backend).await;
    let s = &*db.store;
    let mut ids = Vec::new();
    for (i, user) in ["u1", "u1", "u1", "u2", "u2"].iter().enumerate() {
        let out = s
            .record_authorization(connect(
                user,
                minted(&format!("bot-{i}"), &format!("t{i}"), &db.clock),
            ))
            .await
            .unwrap();
        ids.push(out.connection.id);
    }
    s.mark_revoked(&ids[0], "test").await.unwrap();
    let list = |f: ConnectionFilter| async move { s.list_connections(&f).await.unwrap() };
    assert_eq!(list(ConnectionFilter::default()).await.len(), 5);
    let u1 = list(ConnectionFilter {
        end_user_id: Some("u1".into()),
        ..Default::default()
    })
    .await;
    assert_eq!(u1.len(), 3);
    assert!(u1.iter().all(|c| c.end_user_id == "u1"));
    let revoked = list(ConnectionFilter {
        status: Some(ConnectionStatus::Revoked),
        ..Default::default()
    })
    .await;
    assert_eq!(revoked.iter().map(|c| &c.id).collect::<Vec<_>>(), [&ids[0]]);
    let active_u1 = list(ConnectionFilter {
        end_user_id: Some("u1".into()),
        status: Some(ConnectionStatus::Active),
        provider: Some(Provider::Notion),
        ..Default::default()
    })
    .await;
    assert_eq!(active_u1.len(), 2);

    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = list(ConnectionFilter {
            after: after.clone(),
            limit: 2,
            ..Default::default()
        })
        .await;
        assert!(page.len() <= 2);
        if page.is_empty() {
            break;
        }
        after = Some(page.last().unwrap().id.clone());
        seen.extend(page.into_iter().map(|c| c.id));
    }
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(
        seen, sorted,
        "keyset pages cover every connection once, in id order"
    );
}

async fn schema_versions_are_checked_and_a_newer_schema_is_refused(backend: Backend) {
    let db = TestDb::unmigrated(backend, key_ring().0, manual_clock()).await;
    let s = &*db.store;
    match s.check_schema().await {
        Err(StoreError::SchemaBehind {
            found: 0,
            supported,
        }) => assert!(supported >= 1),
        other => panic!("expected SchemaBehind, got {other:?}"),
    }
    let version = s.migrate().await.unwrap();
    assert!(version >= 1);
    assert_eq!(s.check_schema().await.unwrap(), version);
    assert_eq!(
        s.migrate().await.unwrap(),
        version,
        "migrating again changes nothing"
    );

    let newer = version + 100;
    let applied_at = match backend {
        Backend::Sqlite => "'2030-01-01T00:00:00.000000Z'",
        Backend::Postgres => "now()",
    };
    db.execute(&format!(
        "INSERT INTO schema_migrations (version, applied_at) VALUES ({newer}, {applied_at})"
    ))
    .await;
    match s.migrate().await {
        Err(StoreError::SchemaTooNew { found, supported }) => {
            assert_eq!(found, newer);
            assert_eq!(supported, version);
        }
        other => panic!("expected SchemaTooNew from migrate, got {other:?}"),
    }
    assert!(matches!(
        s.check_schema().await,
        Err(StoreError::SchemaTooNew { found, .. }) if found == newer
    ));
}

async fn concurrent_migrations_apply_each_migration_once(backend: Backend) {
    let db = TestDb::unmigrated(backend, key_ring().0, manual_clock()).await;
    let others: Vec<_> = futures::future::join_all(
        (0..3).map(|_| db.open_another(db.keys.clone(), db.clock.clone())),
    )
    .await;
    let mut all = vec![db.store.clone()];
    all.extend(others);
    let results = futures::future::join_all(all.iter().map(|s| s.migrate())).await;
    let versions: Vec<i64> = results
        .into_iter()
        .map(|r| r.expect("every migrate succeeds"))
        .collect();
    assert!(versions.windows(2).all(|w| w[0] == w[1]));
    for s in &all {
        assert_eq!(s.check_schema().await.unwrap(), versions[0]);
    }
}

async fn key_rotation_reseals_every_grant_and_all_still_open(backend: Backend) {
    let old_entry = KeyRing::generate_entry();
    let old = std::sync::Arc::new(KeyRing::parse(&old_entry).unwrap());
    let db = TestDb::new(backend, old.clone(), manual_clock()).await;
    let s = &*db.store;
    let mut expected = Vec::new();
    for bot in ["bot-a", "bot-b"] {
        let p1 = minted(bot, &format!("{bot}-1"), &db.clock);
        let a = s
            .record_authorization(connect("u", p1.clone()))
            .await
            .unwrap();
        expected.push((a.connection.id.clone(), a.grant_id.clone(), p1));
        let p2 = minted(bot, &format!("{bot}-2"), &db.clock);
        let b = s
            .record_authorization(connect("u", p2.clone()))
            .await
            .unwrap();
        expected.push((a.connection.id.clone(), b.grant_id.clone(), p2));
        let (f, attempt, parent, _) = acquire(s, &a.connection.id, "h", LEASE).await;
        let mut p3 = minted(bot, &format!("{bot}-3"), &db.clock);
        p3.refresh_token = None;
        let r = s
            .record_refresh(
                &a.connection.id,
                &parent,
                f,
                &attempt,
                &GrantId::generate(),
                p3.clone(),
            )
            .await
            .unwrap();
        expected.push((a.connection.id.clone(), r.grant_id, p3));
    }

    let new_entry = KeyRing::generate_entry();
    let both = std::sync::Arc::new(KeyRing::parse(&format!("{new_entry}\n{old_entry}")).unwrap());
    let rotating = db.open_another(both.clone(), db.clock.clone()).await;
    let mut total = 0;
    let mut rounds = 0;
    loop {
        let progress = rotating.rotate_keys(4).await.unwrap();
        assert!(progress.resealed <= 4);
        total += progress.resealed;
        rounds += 1;
        if progress.remaining == 0 {
            break;
        }
        assert!(rounds < 10, "rotation makes progress");
    }
    assert_eq!(total, expected.len() as u64);
    assert_eq!(rotating.rotate_keys(4).await.unwrap().resealed, 0);

    let new_only = std::sync::Arc::new(KeyRing::parse(&new_entry).unwrap());
    let reader = db.open_another(new_only.clone(), db.clock.clone()).await;
    for (conn, grant, pair) in &expected {
        let open = reader
            .get_grant(conn, grant)
            .await
            .unwrap()
            .expect("the grant exists");
        assert_eq!(open.record.key_id, new_only.active_key_id());
        assert_eq!(&open.access_token, &pair.access_token);
        assert_eq!(&open.refresh_token, &pair.refresh_token);
    }
    // The old key alone no longer opens anything.
    let (conn, grant, _) = &expected[0];
    let err = s.get_grant(conn, grant).await.unwrap_err();
    assert!(
        matches!(err, StoreError::Seal(SealError::UnknownKey(_))),
        "{err:?}"
    );
}

async fn a_sealed_value_moved_to_another_place_does_not_open(backend: Backend) {
    let db = fresh(backend).await;
    let s = &*db.store;
    let a = s
        .record_authorization(connect("u", minted("bot-a", "a", &db.clock)))
        .await
        .unwrap();
    let b = s
        .record_authorization(connect("u", minted("bot-b", "b", &db.clock)))
        .await
        .unwrap();
    let moved = db
        .execute(&format!(
            "UPDATE grants SET access_token = (SELECT access_token FROM grants WHERE id = '{}') WHERE id = '{}'",
            b.grant_id, a.grant_id
        ))
        .await;
    assert_eq!(moved, 1);
    let err = s
        .get_grant(&a.connection.id, &a.grant_id)
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Seal(SealError::Forged)),
        "{err:?}"
    );
    let err = s.current_grant(&a.connection.id).await.unwrap_err();
    assert!(
        matches!(err, StoreError::Seal(SealError::Forged)),
        "{err:?}"
    );

    // The refresh token in the access token's column of its own row does not open either.
    let swapped = db
        .execute(&format!(
            "UPDATE grants SET access_token = refresh_token WHERE id = '{}'",
            b.grant_id
        ))
        .await;
    assert_eq!(swapped, 1);
    let err = s
        .get_grant(&b.connection.id, &b.grant_id)
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Seal(SealError::Forged)),
        "{err:?}"
    );
}

async fn tokens_never_reach_the_database_or_the_trail_in_plaintext(backend: Backend) {
    let db = fresh(backend).await;
    let s = &*db.store;
    let mut tokens: Vec<String> = Vec::new();
    let mut fingerprints = Vec::new();
    let mut remember = |p: &tokenkeeper::ledger::MintedPair| {
        tokens.push(p.access_token.expose_secret().to_owned());
        tokens.extend(p.refresh_token.iter().map(|r| r.expose_secret().to_owned()));
        fingerprints.push(p.access_token.fingerprint());
    };
    let p1 = minted("bot-secret", "SECRETone9f8e7", &db.clock);
    remember(&p1);
    let a = s.record_authorization(connect("u", p1)).await.unwrap();
    let id = a.connection.id.clone();
    let p2 = minted("bot-secret", "SECRETtwo6d5c4", &db.clock);
    remember(&p2);
    s.record_authorization(connect("u", p2)).await.unwrap();
    let (f, attempt, parent, _) = acquire(s, &id, "h", LEASE).await;
    let p3 = minted("bot-secret", "SECRETthree3b2a1", &db.clock);
    remember(&p3);
    s.record_refresh(&id, &parent, f, &attempt, &GrantId::generate(), p3)
        .await
        .unwrap();
    let (f, attempt, parent, _) = acquire(s, &id, "h", LEASE).await;
    s.record_refresh_failure(&id, &parent, f, &attempt, &invalid_grant())
        .await
        .unwrap();

    let at_rest = db.bytes_at_rest().await;
    let contains = |needle: &[u8]| at_rest.windows(needle.len()).any(|w| w == needle);
    // The scan sees the rows: the fingerprints are stored in the clear, by design.
    for fp in &fingerprints {
        assert!(
            contains(fp.as_bytes()),
            "the scan should find fingerprint {fp}"
        );
    }
    for token in &tokens {
        assert!(
            !contains(token.as_bytes()),
            "a token is stored in plaintext"
        );
        let hex: String = token.bytes().map(|b| format!("{b:02x}")).collect();
        assert!(!contains(hex.as_bytes()), "a token is stored as hex");
    }

    let trail = serde_json::to_string(&(
        s.list_events(&id).await.unwrap(),
        s.list_grants(&id).await.unwrap(),
        s.get_connection(&id).await.unwrap(),
    ))
    .unwrap();
    for token in &tokens {
        assert!(
            !trail.contains(token.as_str()),
            "a token leaked into events or grant records"
        );
    }
    // Debug output of what callers receive redacts tokens.
    let (_, open) = s.current_grant(&id).await.unwrap().unwrap();
    let debug = format!("{open:?}");
    assert!(tokens.iter().all(|t| !debug.contains(t.as_str())));
}

async fn sixty_four_readers_during_writes_each_see_one_consistent_grant(backend: Backend) {
    let db = fresh(backend).await;
    let a = db
        .store
        .record_authorization(connect("u", minted("bot-hot", "hot-0", &db.clock)))
        .await
        .unwrap();
    let id = a.connection.id.clone();
    let writer = {
        let (store, id, clock) = (db.store.clone(), id.clone(), db.clock.clone());
        tokio::spawn(async move {
            for i in 1..=10 {
                let pair = minted("bot-hot", &format!("hot-{i}"), &clock);
                store
                    .record_authorization(reconnect(&id, pair))
                    .await
                    .unwrap();
            }
        })
    };
    let readers: Vec<_> = (0..64)
        .map(|_| {
            let (store, id) = (db.store.clone(), id.clone());
            tokio::spawn(async move {
                for _ in 0..5 {
                    let (conn, grant) = store.current_grant(&id).await.unwrap().unwrap();
                    let grant = grant.unwrap();
                    // One read, one snapshot: the pointer and the grant it points at agree.
                    assert_eq!(conn.grant_id.as_ref(), Some(&grant.record.id));
                    assert!(grant.record.superseded_at.is_none());
                    assert!(grant
                        .access_token
                        .expose_secret()
                        .starts_with("ntn_access_hot-"));
                }
            })
        })
        .collect();
    writer.await.unwrap();
    for r in readers {
        r.await.unwrap();
    }
    assert_eq!(db.store.list_grants(&id).await.unwrap().len(), 11);
}

async fn a_bulk_import_records_each_authorization_as_record_authorization_does(backend: Backend) {
    let db = fresh(backend).await;
    let s = &*db.store;
    let batch = (0..40)
        .map(|i| {
            connect(
                &format!("user-{i}"),
                minted(&format!("bot-{i}"), &format!("imp-{i}"), &db.clock),
            )
        })
        .collect();
    let ids = s.import_authorizations(batch).await.unwrap();
    assert_eq!(ids.len(), 40);
    for (i, id) in ids.iter().enumerate() {
        let (c, grant) = s.current_grant(id).await.unwrap().unwrap();
        assert_eq!(
            c.end_user_id,
            format!("user-{i}"),
            "the result keeps the batch's order"
        );
        assert_eq!(c.bot_id, BotId(format!("bot-{i}")));
        assert_eq!(c.status, ConnectionStatus::Active);
        let grant = grant.unwrap();
        assert_eq!(grant.record.origin, GrantOrigin::Authorization);
        assert_eq!(
            grant.access_token.expose_secret(),
            format!("ntn_access_imp-{i}_Zq7Xv")
        );
        assert_eq!(
            grant
                .refresh_token
                .as_ref()
                .map(|t| t.expose_secret().to_owned()),
            Some(format!("nrt_refresh_imp-{i}_Kp3Wm"))
        );
        assert_eq!(kinds(s, id).await, vec![EventKind::Authorized]);
    }

    // A batch that names one bot twice is refused whole.
    let twice = vec![
        connect("x", minted("bot-twice", "t1", &db.clock)),
        connect("y", minted("bot-twice", "t2", &db.clock)),
    ];
    assert!(matches!(
        s.import_authorizations(twice).await,
        Err(StoreError::Conflict(_))
    ));
    // A batch with one authorization that record_authorization would refuse (a reconnect onto
    // another live connection's bot) stores nothing of the batch.
    let refused = vec![
        connect("z", minted("bot-fresh", "f1", &db.clock)),
        reconnect(&ids[1], minted("bot-2", "steal", &db.clock)),
    ];
    assert!(s.import_authorizations(refused).await.is_err());
    let all = s
        .list_connections(&ConnectionFilter {
            limit: 1000,
            ..ConnectionFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(all.len(), 40);

    // A known bot is re-authorized, exactly as record_authorization would do it.
    let again = s
        .import_authorizations(vec![connect(
            "user-0",
            minted("bot-0", "imp-again", &db.clock),
        )])
        .await
        .unwrap();
    assert_eq!(again, vec![ids[0].clone()]);
    assert_eq!(s.list_grants(&ids[0]).await.unwrap().len(), 2);
    assert_eq!(
        kinds(s, &ids[0]).await,
        vec![
            EventKind::Authorized,
            EventKind::Reauthorized,
            EventKind::Superseded
        ]
    );
}

/// A retried commit whose first answer was lost, or a replay from the spill journal, finds the
/// grant it already wrote (invariant 1 without duplicates).
async fn recording_a_refresh_or_an_authorization_twice_writes_it_once(backend: Backend) {
    let db = fresh(backend).await;
    let s = &*db.store;
    let auth = connect("user-1", minted("bot-a", "a", &db.clock));
    let first = s.record_authorization(auth.clone()).await.unwrap();
    let again = s.record_authorization(auth).await.unwrap();
    assert_eq!(again.connection.id, first.connection.id);
    assert_eq!(again.grant_id, first.grant_id);
    assert_eq!(again.kind, AuthorizationKind::Connected);
    let id = first.connection.id.clone();
    assert_eq!(s.list_grants(&id).await.unwrap().len(), 1);
    assert_eq!(kinds(s, &id).await, [EventKind::Authorized]);

    let (fence, attempt, parent, _) = acquire(s, &id, "h1", LEASE).await;
    let grant = GrantId::generate();
    let pair = minted("bot-a", "refreshed", &db.clock);
    let rec = s
        .record_refresh(&id, &parent, fence, &attempt, &grant, pair.clone())
        .await
        .unwrap();
    let events = kinds(s, &id).await.len();
    let replayed = s
        .record_refresh(&id, &parent, fence, &attempt, &grant, pair)
        .await
        .unwrap();
    assert_eq!(replayed.grant_id, grant);
    assert_eq!(replayed.commit, rec.commit);
    assert_eq!(replayed.current, grant);
    assert_eq!(s.list_grants(&id).await.unwrap().len(), 2);
    assert_eq!(kinds(s, &id).await.len(), events, "a replay writes nothing");
}

/// A refresh whose commit came after its lease ended (an outage, a spill journal) and after
/// another holder, finding the refresh token spent, judged the connection dead: the late pair is
/// proof the connection is alive, so it becomes current and the connection recovers.
async fn a_late_refresh_of_the_current_grant_recovers_a_connection_judged_dead(backend: Backend) {
    let db = fresh(backend).await;
    let s = &*db.store;
    let a = s
        .record_authorization(connect("user-1", minted("bot-a", "a", &db.clock)))
        .await
        .unwrap();
    let id = a.connection.id.clone();
    let (f1, attempt1, parent, _) = acquire(s, &id, "slow", Duration::from_secs(10)).await;
    db.clock.advance(chrono::Duration::seconds(11));
    let (f2, attempt2, _, interrupted) = acquire(s, &id, "h2", LEASE).await;
    assert_eq!(interrupted.unwrap().attempt_id, attempt1);
    let outcome = s
        .record_refresh_failure(&id, &parent, f2, &attempt2, &invalid_grant())
        .await
        .unwrap();
    assert!(matches!(outcome, FailureOutcome::NeedsReauth { .. }));

    let late = minted("bot-a", "late", &db.clock);
    let rec = s
        .record_refresh(
            &id,
            &parent,
            f1,
            &attempt1,
            &GrantId::generate(),
            late.clone(),
        )
        .await
        .unwrap();
    assert_eq!(rec.commit, RefreshCommit::Current);
    assert!(rec.recovered);
    assert_eq!(rec.status, ConnectionStatus::Active);
    let (conn, current) = s.current_grant(&id).await.unwrap().unwrap();
    assert_eq!(conn.status, ConnectionStatus::Active);
    assert!(conn.diagnosis.is_none());
    assert_eq!(current.unwrap().access_token, late.access_token);
    assert_eq!(kinds(s, &id).await.last(), Some(&EventKind::Recovered));
}
