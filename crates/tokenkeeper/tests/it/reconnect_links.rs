//! Reads never write (issue 11 §4): every 424 of a connection that needs its user back carries
//! the same reconnect link until it is used or expires, however many callers read at once.

use std::sync::Arc;
use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};

use crate::both_backends;
use crate::support::app::{Options, TestApp, TOKENS_KEY};
use crate::support::db::{self, Backend, TestDb};
use tokenkeeper::ids::{ConnectionId, SessionId};
use tokenkeeper::ledger::{ConnectSession, Provider};
use tokenkeeper::store::SessionLookup;

both_backends!(
    two_hundred_concurrent_reads_of_a_needs_reauth_connection_create_one_reconnect_session,
    a_reconnect_link_is_replaced_only_once_it_expires,
    the_store_keeps_one_sealed_reconnect_link_per_connection_until_used_expired_or_unopenable,
);

/// Connects a user, then uninstalls the bot at Notion and lets a refresh find out: the
/// connection is `needs_reauth`. Returns its id and the first 424's reconnect link.
async fn dead_connection(app: &TestApp) -> (String, String) {
    let (id, _) = app.connect("user-1").await;
    revoke_at_notion(app, &id).await;
    let grant = app.current_grant(&id).await;
    let (status, body) = app.refresh(&id, &grant).await;
    assert_eq!(status, 424, "{body}");
    let link = body["error"]["reconnect_url"].as_str().unwrap().to_owned();
    (id, link)
}

async fn revoke_at_notion(app: &TestApp, id: &str) {
    let bot = app.connection(id).await["bot_id"]
        .as_str()
        .unwrap()
        .to_owned();
    app.sim_json(Method::POST, &format!("/_sim/bots/{bot}/revoke"), None)
        .await;
}

async fn reconnect_sessions(app: &TestApp, id: &str) -> i64 {
    app.db
        .count(&format!(
            "SELECT count(*) FROM connect_sessions WHERE connection_id = '{id}'"
        ))
        .await
}

/// One read with a `tokens` key, by one of the three calls that answer 424.
async fn read(http: reqwest::Client, url: String, id: String, i: usize) -> (u16, Value) {
    let request = match i % 3 {
        0 => http.get(format!("{url}/v1/connections/{id}/access-token")),
        1 => http
            .post(format!("{url}/v1/connections/{id}/refresh"))
            .json(&json!({})),
        _ => http
            .get(format!("{url}/v1/proxy/{id}/v1/users/me"))
            .header("Notion-Version", "2026-03-11"),
    };
    let r = request.bearer_auth(TOKENS_KEY).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

async fn two_hundred_concurrent_reads_of_a_needs_reauth_connection_create_one_reconnect_session(
    backend: Backend,
) {
    let app = TestApp::start(backend).await;
    let (id, first) = dead_connection(&app).await;
    assert_eq!(reconnect_sessions(&app, &id).await, 1);

    // Another connection's 424s all race for its link: it is marked dead directly, so that no
    // session exists yet when the reads start.
    let (id, _) = app.connect("user-2").await;
    revoke_at_notion(&app, &id).await;
    app.db
        .execute(&format!(
            "UPDATE connections SET status = 'needs_reauth' WHERE id = '{id}'"
        ))
        .await;
    assert_eq!(reconnect_sessions(&app, &id).await, 0);
    const READS: usize = 200;
    let start = Arc::new(tokio::sync::Barrier::new(READS));
    let mut tasks = Vec::new();
    for i in 0..READS {
        let (http, url, id, start) = (app.http.clone(), app.url.clone(), id.clone(), start.clone());
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            read(http, url, id, i).await
        }));
    }
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.unwrap());
    }
    assert_eq!(
        reconnect_sessions(&app, &id).await,
        1,
        "{READS} reads made exactly one session"
    );
    let mut links = std::collections::HashSet::new();
    for (status, body) in &answers {
        assert_eq!(*status, 424, "{body}");
        links.insert(body["error"]["reconnect_url"].as_str().unwrap().to_owned());
        assert!(
            body["error"]["reconnect_url_expires_at"].is_string(),
            "{body}"
        );
    }
    assert_eq!(links.len(), 1, "every read got the same link: {links:?}");
    assert_ne!(
        links.iter().next().unwrap(),
        &first,
        "one link per connection"
    );

    // The shared link works, once; the next time the connection dies, a new one is made.
    let link = links.into_iter().next().unwrap();
    let landing = app.follow(&link).await;
    assert_eq!(
        (landing.connection_id.as_deref(), landing.status.as_str()),
        (Some(id.as_str()), "reconnected")
    );
    revoke_at_notion(&app, &id).await;
    let grant = app.current_grant(&id).await;
    let (status, body) = app.refresh(&id, &grant).await;
    assert_eq!(status, 424, "{body}");
    let next = body["error"]["reconnect_url"].as_str().unwrap();
    assert_ne!(next, link, "a used link is not handed out again");
    assert_eq!(reconnect_sessions(&app, &id).await, 2);
}

async fn a_reconnect_link_is_replaced_only_once_it_expires(backend: Backend) {
    let options = Options {
        session_ttl: Duration::from_secs(2),
        ..Options::default()
    };
    let app = TestApp::with(backend, options).await;
    let (id, first) = dead_connection(&app).await;
    let (status, body) = app
        .get_json(&format!("/v1/connections/{id}/access-token"))
        .await;
    assert_eq!(status, 424, "{body}");
    assert_eq!(
        body["error"]["reconnect_url"], first,
        "a live link is handed out again"
    );
    assert_eq!(reconnect_sessions(&app, &id).await, 1);

    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (status, body) = app
        .get_json(&format!("/v1/connections/{id}/access-token"))
        .await;
    assert_eq!(status, 424, "{body}");
    let second = body["error"]["reconnect_url"].as_str().unwrap().to_owned();
    assert_ne!(second, first, "an expired link is replaced");
    assert_eq!(reconnect_sessions(&app, &id).await, 2);
    let expired = app.http.get(&first).send().await.unwrap();
    assert_eq!(expired.status(), 410);
    let landing = app.follow(&second).await;
    assert_eq!(landing.status, "reconnected");
}

/// A reconnect session for `connection` as the API makes one, keeping only its state's hash.
fn candidate(db: &TestDb, connection: &ConnectionId, state: &str) -> ConnectSession {
    ConnectSession {
        id: SessionId::generate(),
        provider: Provider::Notion,
        state_hash: {
            use sha2::Digest;
            sha2::Sha256::digest(state.as_bytes())
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect()
        },
        end_user_id: "user-1".into(),
        return_to: "https://app.example/".into(),
        connection_id: Some(connection.clone()),
        created_at: db.clock.now(),
        expires_at: db.clock.now() + chrono::Duration::minutes(10),
        used_at: None,
    }
}

/// The store's side of the shared link, with a clock the test moves: one per connection,
/// handed out with its state until it is used or expires, replaced when the key ring can no
/// longer open its state, and never stored in plaintext.
async fn the_store_keeps_one_sealed_reconnect_link_per_connection_until_used_expired_or_unopenable(
    backend: Backend,
) {
    let (keys, _) = db::key_ring();
    let db = TestDb::new(backend, keys, db::manual_clock()).await;
    let s = &*db.store;
    let one = s
        .record_authorization(db::connect("user-1", db::minted("bot-a", "a", &db.clock)))
        .await
        .unwrap()
        .connection
        .id;
    let two = s
        .record_authorization(db::connect("user-2", db::minted("bot-b", "b", &db.clock)))
        .await
        .unwrap()
        .connection
        .id;
    let states: Vec<String> = (0..6)
        .map(|i| format!("state-{i}-{}", tokenkeeper::ids::random_token(16)))
        .collect();

    let (first, state) = s
        .reconnect_link(&candidate(&db, &one, &states[0]), &states[0])
        .await
        .unwrap();
    assert_eq!(state, states[0]);
    let (again, state) = s
        .reconnect_link(&candidate(&db, &one, &states[1]), &states[1])
        .await
        .unwrap();
    assert_eq!(
        (again.id.clone(), state.as_str()),
        (first.id.clone(), states[0].as_str()),
        "the live link and its state are handed out again"
    );
    let (other, _) = s
        .reconnect_link(&candidate(&db, &two, &states[2]), &states[2])
        .await
        .unwrap();
    assert_ne!(other.id, first.id, "each connection has its own");

    // Used: replaced.
    assert!(matches!(
        s.consume_session(&first.state_hash).await.unwrap(),
        SessionLookup::Consumed(_)
    ));
    let (after_use, state) = s
        .reconnect_link(&candidate(&db, &one, &states[3]), &states[3])
        .await
        .unwrap();
    assert_ne!(after_use.id, first.id);
    assert_eq!(state, states[3]);

    // Expired: replaced.
    db.clock.advance(chrono::Duration::minutes(10));
    let (after_expiry, _) = s
        .reconnect_link(&candidate(&db, &one, &states[4]), &states[4])
        .await
        .unwrap();
    assert_ne!(after_expiry.id, after_use.id);

    // A process whose key ring cannot open the state makes a new link instead of failing.
    let (strangers_keys, _) = db::key_ring();
    let stranger = db.open_another(strangers_keys, db.clock.clone()).await;
    let (theirs, state) = stranger
        .reconnect_link(&candidate(&db, &one, &states[5]), &states[5])
        .await
        .unwrap();
    assert_ne!(theirs.id, after_expiry.id);
    assert_eq!(state, states[5]);

    let at_rest = String::from_utf8_lossy(&db.bytes_at_rest().await).into_owned();
    for state in &states {
        assert!(
            !at_rest.contains(state.as_str()),
            "a state is stored in plaintext"
        );
    }
}
