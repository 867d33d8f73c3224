//! Before declaring `needs_reauth`, try what else is alive (invariants 1 and 5): when the
//! current grant's refresh token is refused, the connection's other refresh tokens that were
//! never used are tried, newest first; the one that works rescues the connection, and when none
//! does, the diagnosis lists what was tried.
//!
//! The refusal is real: another client of the same Notion integration (an old integration
//! still running beside tokenkeeper) spends the current refresh token at the simulator first.

use notion_sim::{PreviousPairPolicy, SimConfig};
use serde_json::{json, Value};

use crate::both_backends;
use crate::support::app::{Options, TestApp};
use crate::support::db::Backend;

both_backends!(
    an_older_unused_refresh_token_rescues_a_connection_whose_current_one_was_spent,
    when_no_unused_refresh_token_works_the_diagnosis_lists_what_was_tried,
);

/// Spends the connection's current refresh token at the simulator, behind tokenkeeper's back.
async fn spend_current_refresh_token(app: &TestApp, id: &str) {
    let (status, token) = app
        .get_json(&format!(
            "/v1/connections/{id}/access-token?include_refresh_token=true"
        ))
        .await;
    assert_eq!(status, 200, "{token}");
    let config = app.sim.config();
    let r = app
        .http
        .post(format!("{}/v1/oauth/token", app.sim.base_url()))
        .basic_auth(&config.client_id, Some(&config.client_secret))
        .json(&json!({"grant_type": "refresh_token", "refresh_token": token["refresh_token"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200, "the other client's refresh");
}

async fn an_older_unused_refresh_token_rescues_a_connection_whose_current_one_was_spent(
    backend: Backend,
) {
    let app = TestApp::start(backend).await;
    let (id, status) = app.connect("user-1").await;
    assert_eq!(status, "connected");
    let first = app.current_grant(&id).await;
    // Since 2026-06-08 a re-authorization mints a fresh pair; the first pair stays alive.
    let (again, status) = app.connect("user-1").await;
    assert_eq!(
        (again.as_str(), status.as_str()),
        (id.as_str(), "reconnected")
    );
    let second = app.current_grant(&id).await;
    assert_ne!(first, second);
    spend_current_refresh_token(&app, &id).await;

    let (status, body) = app.refresh(&id, &second).await;
    assert_eq!(status, 200, "{body}");
    let rescued = body["grant_id"].as_str().unwrap().to_owned();
    assert_ne!(rescued, second);
    let connection = app.connection(&id).await;
    assert_eq!(connection["status"], "active");
    assert_eq!(connection["grant_id"], rescued.as_str());
    let grants = app.grants(&id).await;
    let new = grants.iter().find(|g| g["id"] == rescued.as_str()).unwrap();
    assert_eq!(
        new["parent_grant_id"],
        first.as_str(),
        "the first pair rescued it"
    );
    assert_eq!(new["origin"], "refresh");
    let (_, events) = app.get_json(&format!("/v1/connections/{id}/events")).await;
    let rescue_event = events["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "rescued")
        .expect("a rescued event");
    assert_eq!(rescue_event["detail"]["refused_grant_id"], second.as_str());
    assert_eq!(
        rescue_event["detail"]["rescued_by_grant_id"],
        first.as_str()
    );
    // tokenkeeper's refused refresh, the other client's, and the rescue.
    assert_eq!(app.sim_refreshes().await, 3);

    // The rescued pair works at Notion, and refreshes normally from now on.
    let r = app
        .api(reqwest::Method::GET, &format!("/v1/proxy/{id}/v1/users/me"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    // Once its access token dies (revoked here), it refreshes as any grant does.
    let (_, token) = app
        .get_json(&format!("/v1/connections/{id}/access-token"))
        .await;
    app.revoke_at_notion(&token["access_token"]).await;
    let (status, body) = app.refresh(&id, &rescued).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(app.sim_refreshes().await, 4);
    assert_eq!(app.connection(&id).await["status"], "active");
}

async fn when_no_unused_refresh_token_works_the_diagnosis_lists_what_was_tried(backend: Backend) {
    // This Notion kills earlier refresh tokens when it mints a new pair.
    let mut options = Options::default();
    options.sim = SimConfig {
        previous_pair: PreviousPairPolicy::KillRefresh,
        ..options.sim
    };
    let app = TestApp::with(backend, options).await;
    let (id, _) = app.connect("user-1").await;
    let first = app.current_grant(&id).await;
    app.connect("user-1").await;
    let second = app.current_grant(&id).await;
    spend_current_refresh_token(&app, &id).await;

    let (status, body) = app.refresh(&id, &second).await;
    assert_eq!(status, 424, "{body}");
    let diagnosis: &Value = &body["error"]["diagnosis"];
    assert_eq!(diagnosis["grant_id"], second.as_str());
    let tried = diagnosis["tried"].as_array().expect("what was tried");
    assert_eq!(tried.len(), 1, "{diagnosis}");
    assert_eq!(tried[0]["grant_id"], first.as_str());
    assert_eq!(tried[0]["origin"], "authorization");
    assert_eq!(tried[0]["outcome"], "invalid_grant");
    let connection = app.connection(&id).await;
    assert_eq!(connection["status"], "needs_reauth");
    assert_eq!(connection["diagnosis"]["tried"], json!(tried));
    // The first pair's refresh token was tried once, and is never tried again.
    let before = app.sim_refreshes().await;
    let (status, _) = app.refresh(&id, &second).await;
    assert_eq!(status, 424);
    assert_eq!(
        app.sim_refreshes().await,
        before,
        "a needs_reauth connection is not refreshed"
    );
}
