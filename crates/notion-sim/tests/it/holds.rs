//! Holds: answers that leave only when the test says so, from Rust and over the control API.

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::{Pair, Sim};

fn live(bot: &Value) -> usize {
    bot["live_access_token_fingerprints"]
        .as_array()
        .unwrap()
        .len()
}

/// A held refresh is a slow Notion whose answer is in flight: the token has already rotated.
#[tokio::test]
async fn a_held_refresh_has_rotated_and_answers_when_released() {
    let sim = Sim::start().await;
    let pair = sim.connect().await;
    let hold = sim.server.hold("oauth.token:refresh_token");

    let pending = tokio::spawn({
        let request = sim
            .http
            .post(sim.url("/v1/oauth/token"))
            .basic_auth("tokenkeeper-dev", Some("dev-secret-not-for-production"))
            .json(&json!({"grant_type": "refresh_token", "refresh_token": pair.refresh}));
        async move { request.send().await.unwrap().json::<Value>().await.unwrap() }
    });
    hold.arrived(1).await;
    assert_eq!(hold.held(), 1);
    assert_eq!(
        live(&sim.bot(&pair.bot_id).await),
        2,
        "a new pair was minted"
    );
    assert_eq!(
        sim.introspect(&pair.refresh).await.body["active"],
        false,
        "the refresh token was used"
    );
    assert!(!pending.is_finished(), "no answer while held");
    // The hold names one grant: a code exchange passes.
    sim.connect().await;

    assert_eq!(hold.release(1), 1);
    let answer = Pair::from_response(&pending.await.unwrap());
    assert_eq!(sim.me(&answer.access).await.status, StatusCode::OK);

    // The hold stays until lifted: the next refresh waits too, and lifting lets it go.
    let next = tokio::spawn({
        let request = sim
            .http
            .post(sim.url("/v1/oauth/token"))
            .basic_auth("tokenkeeper-dev", Some("dev-secret-not-for-production"))
            .json(&json!({"grant_type": "refresh_token", "refresh_token": answer.refresh}));
        async move { request.send().await.unwrap().status() }
    });
    hold.arrived(2).await;
    assert_eq!((hold.held(), hold.arrivals()), (1, 2));
    hold.release_all();
    assert_eq!(next.await.unwrap(), StatusCode::OK);
    assert_eq!(
        sim.control_get("/_sim/holds").await,
        json!({"holds": []}),
        "a lifted hold is gone"
    );
}

#[tokio::test]
async fn dropping_a_hold_releases_what_it_holds() {
    let sim = Sim::start().await;
    let pair = sim.connect().await;
    let hold = sim.server.hold("users.me");
    let pending = tokio::spawn({
        let request = sim
            .http
            .get(sim.url("/v1/users/me"))
            .bearer_auth(&pair.access)
            .header("Notion-Version", "2026-03-11");
        async move { request.send().await.unwrap().status() }
    });
    hold.arrived(1).await;
    drop(hold);
    assert_eq!(pending.await.unwrap(), StatusCode::OK);
    assert_eq!(sim.me(&pair.access).await.status, StatusCode::OK);
}

#[tokio::test]
#[should_panic(expected = "unknown endpoint")]
async fn a_hold_on_an_unknown_endpoint_is_refused() {
    let sim = Sim::start().await;
    let _hold = sim.server.hold("users.you");
}

/// The same gate for tests in other processes: make, wait, release, lift.
#[tokio::test]
async fn holds_over_the_control_api() {
    let sim = Sim::start().await;
    let pair = sim.connect().await;
    let hold = sim
        .control_post("/_sim/holds", json!({"endpoint": "users.me"}))
        .await;
    let id = hold["id"].as_u64().expect("an id");
    assert_eq!(hold["endpoint"], "users.me");
    assert_eq!((&hold["held"], &hold["arrived"]), (&json!(0), &json!(0)));
    let me = || {
        let request = sim
            .http
            .get(sim.url("/v1/users/me"))
            .bearer_auth(&pair.access)
            .header("Notion-Version", "2026-03-11");
        tokio::spawn(async move { request.send().await.unwrap().status() })
    };

    let first = me();
    let waited = sim
        .control_post(&format!("/_sim/holds/{id}/wait"), json!({"arrived": 1}))
        .await;
    assert_eq!(
        (&waited["held"], &waited["arrived"]),
        (&json!(1), &json!(1))
    );
    assert_eq!(sim.control_get("/_sim/holds").await["holds"][0], waited);
    let released = sim
        .control_post(&format!("/_sim/holds/{id}/release"), json!({"count": 1}))
        .await;
    assert_eq!(released["released"], 1);
    assert_eq!(first.await.unwrap(), StatusCode::OK);

    // A wait that cannot be met answers 408 when its timeout passes.
    let answer = sim
        .send(
            sim.http
                .post(sim.url(&format!("/_sim/holds/{id}/wait")))
                .json(&json!({"arrived": 5, "timeout_ms": 20})),
        )
        .await;
    assert_eq!(
        answer.status,
        StatusCode::REQUEST_TIMEOUT,
        "{}",
        answer.text
    );
    assert_eq!(answer.body["arrived"], 1);

    let second = me();
    sim.control_post(&format!("/_sim/holds/{id}/wait"), json!({"arrived": 2}))
        .await;
    let answer = sim
        .send(sim.http.delete(sim.url(&format!("/_sim/holds/{id}"))))
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    assert_eq!(second.await.unwrap(), StatusCode::OK, "lifting releases");
    assert_eq!(sim.control_get("/_sim/holds").await, json!({"holds": []}));
    assert_eq!(
        me().await.unwrap(),
        StatusCode::OK,
        "and holds nothing more"
    );

    // A reset lifts every hold.
    let id = sim
        .control_post("/_sim/holds", json!({"endpoint": "users.me"}))
        .await["id"]
        .as_u64()
        .unwrap();
    let third = me();
    sim.control_post(&format!("/_sim/holds/{id}/wait"), json!({"arrived": 1}))
        .await;
    sim.control_post("/_sim/reset", json!({})).await;
    assert_eq!(third.await.unwrap(), StatusCode::OK);

    for bad in [
        json!({"endpoint": "users.you"}),
        json!({"endpoint": "users.me:refresh_token"}),
        json!({}),
    ] {
        let answer = sim
            .send(sim.http.post(sim.url("/_sim/holds")).json(&bad))
            .await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{bad}");
    }
}
