//! A fresh token that is refused is a finding, not a reason to refresh again (issue 11 §3):
//! when Notion answers 401 even to a token it issued moments ago, tokenkeeper does not refresh
//! again and again (each refresh mints a pair); it asks Notion's introspection whether the token
//! is active, records what it learned once, and caps refreshes per connection whatever the
//! caller does.

use std::time::Duration;

use serde_json::json;
use tokenkeeper::refresh::RefreshRate;

use crate::both_backends;
use crate::support::app::{metric, Options, TestApp};
use crate::support::db::Backend;

both_backends!(
    a_401_on_every_call_mints_no_pair_and_the_answers_say_why,
    refreshes_per_connection_are_capped_whatever_the_caller_does,
);

async fn proxied_users_me(app: &TestApp, id: &str) -> (u16, Option<String>) {
    let r = app
        .api(reqwest::Method::GET, &format!("/v1/proxy/{id}/v1/users/me"))
        .send()
        .await
        .unwrap();
    let marker = r
        .headers()
        .get("tokenkeeper-error")
        .map(|v| v.to_str().unwrap().to_owned());
    (r.status().as_u16(), marker)
}

async fn a_401_on_every_call_mints_no_pair_and_the_answers_say_why(backend: Backend) {
    let app = TestApp::start(backend).await;
    let (id, _) = app.connect("user-1").await;
    // Refreshed once, so the current grant was obtained by a refresh moments ago.
    let first = app.current_grant(&id).await;
    let (status, _) = app.refresh(&id, &first).await;
    assert_eq!(status, 200);
    // This path refuses every token, however fresh; the tokens themselves are fine.
    app.sim_fault(json!({"endpoint": "users.me", "kind": "status", "status": 401}))
        .await;
    for call in 0..20 {
        let (status, marker) = proxied_users_me(&app, &id).await;
        assert_eq!(status, 401, "call {call}");
        assert_eq!(
            marker.as_deref(),
            Some("token_rejected_after_refresh"),
            "call {call}: the 401 is marked as the proxy's verdict"
        );
    }
    assert_eq!(app.sim_refreshes().await, 1, "twenty calls, no new pair");
    assert_eq!(app.grants(&id).await.len(), 2);
    assert_eq!(app.connection(&id).await["status"], "active");
    let kinds = app.event_kinds(&id).await;
    assert_eq!(
        kinds.iter().filter(|k| *k == "token_rejected").count(),
        1,
        "recorded once: {kinds:?}"
    );
    // An app reporting the fresh grant as failing gets the verdict too, not a refresh.
    let fresh = app.current_grant(&id).await;
    let (status, body) = app.refresh(&id, &fresh).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "token_rejected_after_refresh");
    assert_eq!(body["error"]["introspection"], "active");
    assert_eq!(app.sim_refreshes().await, 1);
    // Each refusal is counted where an operator looks (and logged as op=refresh).
    assert_eq!(
        metric(
            &app,
            "refreshes_total{outcome=\"token_rejected_after_refresh\"}"
        )
        .await,
        21.0
    );
}

async fn refreshes_per_connection_are_capped_whatever_the_caller_does(backend: Backend) {
    let options = Options {
        refresh_rate: RefreshRate {
            limit: 3,
            window: Duration::from_secs(600),
        },
        ..Options::default()
    };
    let app = TestApp::with(backend, options).await;
    let (id, _) = app.connect("user-1").await;
    for n in 0..3 {
        let (status, body) = app
            .post_json(&format!("/v1/connections/{id}/refresh"), json!({}))
            .await;
        assert_eq!(status, 200, "refresh {n}: {body}");
    }
    let r = app
        .api(
            reqwest::Method::POST,
            &format!("/v1/connections/{id}/refresh"),
        )
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 429);
    assert!(r.headers().contains_key("retry-after"));
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "refresh_rate_limited");
    assert_eq!(app.sim_refreshes().await, 3);
    assert_eq!(app.connection(&id).await["status"], "active");
    assert_eq!(
        metric(&app, "refreshes_total{outcome=\"rate_limited\"}").await,
        1.0
    );
}
