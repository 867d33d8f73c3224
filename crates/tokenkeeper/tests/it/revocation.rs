//! Revocation is complete (issue 11 §5): `DELETE` revokes upstream every token of the connection
//! that may still be alive, not only the current access token, and a refresh that commits
//! after the connection was revoked is revoked upstream at once and never handed out.
//! Whether a token is alive is asked of the simulator, which knows every token it minted.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::both_backends;
use crate::support::app::TestApp;
use crate::support::db::Backend;

both_backends!(
    delete_revokes_every_live_token_of_every_grant,
    a_refresh_that_lands_after_a_delete_is_revoked_and_never_handed_out,
    revocations_that_fail_are_retried_in_the_background_until_done,
);

/// Waits (with a deadline) until Notion knows no live token of the connection.
async fn until_nothing_lives(app: &TestApp, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while live_tokens(app, id).await != (0, 0) {
        assert!(
            Instant::now() < deadline,
            "every token is revoked upstream: {:?} still live",
            live_tokens(app, id).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The simulator's bot of this connection: its live tokens' fingerprints.
async fn live_tokens(app: &TestApp, id: &str) -> (usize, usize) {
    let bot = app.connection(id).await["bot_id"].clone();
    let bots = app.sim_json(reqwest::Method::GET, "/_sim/bots", None).await;
    let bot = bots["bots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["bot_id"] == bot)
        .expect("the simulator knows the bot")
        .clone();
    let count = |key: &str| bot[key].as_array().map_or(0, Vec::len);
    (
        count("live_access_token_fingerprints"),
        count("live_refresh_token_fingerprints"),
    )
}

async fn delete(app: &TestApp, id: &str) -> Value {
    let r = app
        .api(reqwest::Method::DELETE, &format!("/v1/connections/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    r.json().await.unwrap()
}

async fn delete_revokes_every_live_token_of_every_grant(backend: Backend) {
    let app = TestApp::start(backend).await;
    let (id, _) = app.connect("user-1").await;
    app.connect("user-1").await;
    app.connect("user-1").await;
    let current = app.current_grant(&id).await;
    let (status, body) = app.refresh(&id, &current).await;
    assert_eq!(status, 200, "{body}");
    // Three authorizations and a refresh: four access tokens and three refresh tokens alive
    // (the refreshed grant's refresh token was spent).
    assert_eq!(live_tokens(&app, &id).await, (4, 3));

    let body = delete(&app, &id).await;
    assert_eq!(body["connection"]["status"], "revoked");
    assert_eq!(body["tokens_revoked"], 7, "{body}");
    assert_eq!(body["tokens_pending"], 0, "{body}");
    assert_eq!(body["upstream_revoked"], true);
    assert_eq!(
        live_tokens(&app, &id).await,
        (0, 0),
        "nothing of it works at Notion"
    );
    let kinds = app.event_kinds(&id).await;
    assert_eq!(
        kinds.iter().filter(|k| *k == "upstream_revocation").count(),
        7,
        "each outcome is recorded: {kinds:?}"
    );
    // A second DELETE revokes nothing twice.
    let again = delete(&app, &id).await;
    assert_eq!(again["tokens_revoked"], 7);
    assert_eq!(app.event_kinds(&id).await.len(), kinds.len());
}

async fn a_refresh_that_lands_after_a_delete_is_revoked_and_never_handed_out(backend: Backend) {
    let app = TestApp::start(backend).await;
    let (id, _) = app.connect("user-1").await;
    let grant = app.current_grant(&id).await;
    let hold = app.sim.hold("oauth.token:refresh_token");
    let refresh = {
        let (http, url, id, grant) = (app.http.clone(), app.url.clone(), id.clone(), grant.clone());
        tokio::spawn(async move {
            let r = http
                .post(format!("{url}/v1/connections/{id}/refresh"))
                .bearer_auth(crate::support::app::ADMIN_KEY)
                .json(&serde_json::json!({ "if_grant": grant }))
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        })
    };
    hold.arrived(1).await;
    let body = delete(&app, &id).await;
    assert_eq!(body["tokens_pending"], 0, "{body}");
    // Notion answers the refresh now, with a pair minted after the DELETE.
    hold.release_all();
    let (status, body) = refresh.await.unwrap();
    assert_eq!(status, 410, "the new pair is never handed out: {body}");
    assert!(!body.contains("ntn_") && !body.contains("nrt_"), "{body}");

    let grants = app.grants(&id).await;
    assert_eq!(grants.len(), 2, "the late pair is kept in the ledger");
    assert!(grants[1]["revoked_at"].is_string(), "{:?}", grants[1]);
    // Its tokens are revoked upstream by the worker, without anyone asking.
    until_nothing_lives(&app, &id).await;
}

async fn revocations_that_fail_are_retried_in_the_background_until_done(backend: Backend) {
    let app = TestApp::start(backend).await;
    let (id, _) = app.connect("user-1").await;
    app.connect("user-1").await;
    assert_eq!(live_tokens(&app, &id).await, (2, 2));
    // Notion's revoke endpoint fails the first four calls.
    app.sim_fault(serde_json::json!({"endpoint": "oauth.revoke", "kind": "status", "status": 503, "count": 4}))
        .await;
    let body = delete(&app, &id).await;
    assert_eq!(body["connection"]["status"], "revoked");
    assert_eq!(body["tokens_pending"], 4, "{body}");
    assert_eq!(body["upstream_revoked"], false);
    until_nothing_lives(&app, &id).await;
    let again = delete(&app, &id).await;
    assert_eq!(
        (
            again["tokens_revoked"].clone(),
            again["tokens_pending"].clone()
        ),
        (serde_json::json!(4), serde_json::json!(0))
    );
}
