//! Rate limits: per connection and per workspace, with Notion's 429 shape.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::{assert_notion_error, Answer, Sim};

fn assert_rate_limited(answer: &Answer, reason: &str, max_retry_after: u64) {
    assert_notion_error(answer, 429, "rate_limited");
    let header: u64 = answer.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .expect("Retry-After is an integer number of seconds");
    assert!((1..=max_retry_after).contains(&header), "{header}");
    assert_eq!(
        answer.body["additional_data"]["retry_after"],
        header.to_string()
    );
    assert_eq!(answer.body["additional_data"]["rate_limit_reason"], reason);
}

#[tokio::test]
async fn the_connection_budget_answers_429_then_recovers_in_the_next_window() {
    let sim = Sim::manual(|c| {
        c.rate_limit_per_connection = 3;
        c.rate_limit_window = Duration::from_millis(2000);
    })
    .await;
    let pair = sim.connect().await;
    for _ in 0..3 {
        assert_eq!(sim.me(&pair.access).await.status, StatusCode::OK);
    }
    let limited = sim.me(&pair.access).await;
    assert_rate_limited(&limited, "public_api_request_rate_limit", 2);
    // Another connection has its own budget.
    sim.server.update_config(|c| c.new_bot_id_on_reauth = true);
    let other = sim.connect().await;
    assert_ne!(other.bot_id, pair.bot_id);
    assert_eq!(sim.me(&other.access).await.status, StatusCode::OK);
    // OAuth endpoints are not rate limited.
    for _ in 0..5 {
        assert_eq!(sim.introspect(&pair.access).await.status, StatusCode::OK);
    }
    // The window is fixed: a moment before it ends the budget is still spent, and then it is
    // whole again.
    sim.clock().advance(Duration::from_millis(1999));
    assert_rate_limited(
        &sim.me(&pair.access).await,
        "public_api_request_rate_limit",
        1,
    );
    sim.clock().advance(Duration::from_millis(1));
    assert_eq!(sim.me(&pair.access).await.status, StatusCode::OK);
}

#[tokio::test]
async fn the_default_budget_is_180_per_minute() {
    let sim = Sim::with(|c| {
        c.rate_limit_per_connection = notion_sim::SimConfig::default().rate_limit_per_connection
    })
    .await;
    let pair = sim.connect().await;
    for _ in 0..180 {
        assert_eq!(sim.me(&pair.access).await.status, StatusCode::OK);
    }
    assert_rate_limited(
        &sim.me(&pair.access).await,
        "public_api_request_rate_limit",
        60,
    );
}

#[tokio::test]
async fn the_workspace_budget_is_shared_by_its_connections() {
    let sim = Sim::with(|c| c.rate_limit_per_workspace = 4).await;
    let alice = sim.connect().await;
    sim.control_post(
        "/_sim/next-authorization",
        json!({"workspace_id": alice.workspace_id, "user_id": "bob"}),
    )
    .await;
    let bob = sim.connect().await;
    assert_eq!(alice.workspace_id, bob.workspace_id);
    for token in [&alice.access, &bob.access, &alice.access, &bob.access] {
        assert_eq!(
            sim.rest(Method::POST, "/v1/search", token, None)
                .await
                .status,
            StatusCode::OK
        );
    }
    assert_rate_limited(
        &sim.me(&bob.access).await,
        "public_api_space_request_rate_limit",
        60,
    );
    // A connection in another workspace is not affected.
    sim.control_post(
        "/_sim/next-authorization",
        json!({"workspace_id": "elsewhere"}),
    )
    .await;
    let carol = sim.connect().await;
    assert_eq!(sim.me(&carol.access).await.status, StatusCode::OK);
}

#[tokio::test]
async fn zero_means_unlimited_and_limits_change_at_run_time() {
    let sim = Sim::start().await;
    let pair = sim.connect().await;
    for _ in 0..300 {
        assert_eq!(sim.me(&pair.access).await.status, StatusCode::OK);
    }
    sim.control_post("/_sim/config", json!({"rate_limit_per_connection": 1}))
        .await;
    assert_eq!(sim.me(&pair.access).await.status, StatusCode::OK);
    assert_eq!(
        sim.me(&pair.access).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
}
