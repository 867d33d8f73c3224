//! The control API: stats, the request log, bots, workspaces, config, reset.

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::Sim;

#[tokio::test]
async fn stats_count_requests_and_token_requests_per_grant_and_bot() {
    let sim = Sim::start().await;
    let pair = sim.connect().await;
    sim.refreshed(&pair.refresh).await;
    sim.refresh("nrt_unknown").await;
    // A faulted token request still counts, and still names its bot.
    let second = sim.connect().await;
    sim.control_post(
        "/_sim/faults",
        json!({"endpoint": "oauth.token", "kind": "status", "status": 500, "count": 1}),
    )
    .await;
    assert_eq!(sim.refresh(&second.refresh).await.status.as_u16(), 500);
    for _ in 0..3 {
        sim.me(&pair.access).await;
    }
    sim.me("ntn_dead").await;

    let stats = sim.control_get("/_sim/stats").await;
    assert_eq!(stats["requests"]["oauth.authorize"], 2);
    assert_eq!(stats["requests"]["oauth.token"], 5);
    assert_eq!(stats["requests"]["users.me"], 4, "errors count too");
    assert_eq!(stats["requests"]["pages.create"], 0);
    assert_eq!(
        stats["token_requests"]["total"],
        json!({"authorization_code": 2, "refresh_token": 3})
    );
    assert_eq!(
        stats["token_requests"]["by_bot"],
        json!({pair.bot_id.clone(): {"authorization_code": 2, "refresh_token": 2}}),
        "the unknown refresh token is in the total only"
    );
}

#[tokio::test]
async fn the_request_log_shows_calls_with_superseded_tokens() {
    let sim = Sim::start().await;
    let first = sim.connect().await;
    sim.me(&first.access).await;
    let second = sim.refreshed(&first.refresh).await;
    sim.me(&first.access).await;
    sim.me(&second.access).await;

    let log = sim.control_get("/_sim/requests").await;
    let me_calls: Vec<&Value> = log["requests"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["endpoint"] == "users.me")
        .collect();
    assert_eq!(me_calls.len(), 3);
    let fp = |t: &str| json!(notion_sim::fingerprint(t));
    assert_eq!(me_calls[0]["token_fingerprint"], fp(&first.access));
    assert_eq!(me_calls[0]["token_is_newest_live"], true);
    assert_eq!(me_calls[1]["token_fingerprint"], fp(&first.access));
    assert_eq!(
        me_calls[1]["token_is_newest_live"], false,
        "superseded but still live"
    );
    assert_eq!(me_calls[1]["status"], 200);
    assert_eq!(me_calls[2]["token_is_newest_live"], true);
    for call in &me_calls {
        assert_eq!(call["bot_id"], first.bot_id.as_str());
        assert_eq!(call["method"], "GET");
        assert_eq!(call["path"], "/v1/users/me");
        assert!(call["time"].is_string());
    }
    let text = log.to_string();
    assert!(
        !text.contains(&first.access) && !text.contains(&first.refresh),
        "never tokens"
    );

    let limited = sim.control_get("/_sim/requests?limit=1").await;
    assert_eq!(limited["requests"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn the_request_log_is_a_bounded_ring() {
    let sim = Sim::with(|c| c.request_log_capacity = 5).await;
    let pair = sim.connect().await;
    for _ in 0..10 {
        sim.me(&pair.access).await;
    }
    let log = sim.control_get("/_sim/requests").await;
    let entries = log["requests"].as_array().unwrap();
    assert_eq!(entries.len(), 5);
    assert!(entries.iter().all(|e| e["endpoint"] == "users.me"));
}

#[tokio::test]
async fn bots_list_fingerprints_of_live_tokens_never_tokens() {
    let sim = Sim::start().await;
    let first = sim.connect().await;
    let second = sim.refreshed(&first.refresh).await;
    let bots = sim.control_get("/_sim/bots").await;
    let text = bots.to_string();
    assert!(!text.contains(&first.access) && !text.contains(&second.refresh));
    let bot = sim.bot(&first.bot_id).await;
    assert_eq!(bot["status"], "installed");
    assert_eq!(bot["workspace_id"], first.workspace_id.as_str());
    assert!(bot["user_id"].is_string());
    assert_eq!(
        bot["live_access_token_fingerprints"],
        json!([
            notion_sim::fingerprint(&first.access),
            notion_sim::fingerprint(&second.access)
        ])
    );
    assert_eq!(
        bot["live_refresh_token_fingerprints"],
        json!([notion_sim::fingerprint(&second.refresh)])
    );
    assert_eq!(
        bot["newest_access_token_fingerprint"],
        json!(notion_sim::fingerprint(&second.access))
    );
    assert_eq!(bot["shared_page_ids"].as_array().unwrap().len(), 2);
    let unknown = sim
        .send(sim.http.post(sim.url("/_sim/bots/no-such-bot/revoke")))
        .await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn workspaces_show_pages_and_who_sees_them() {
    let sim = Sim::start().await;
    let pair = sim.connect().await;
    let listing = sim.control_get("/_sim/workspaces").await;
    let ws = &listing["workspaces"][0];
    assert_eq!(ws["workspace_id"], pair.workspace_id.as_str());
    assert_eq!(ws["bot_ids"], json!([pair.bot_id]));
    let pages = ws["pages"].as_array().unwrap();
    assert_eq!(pages.len(), 3);
    let unshared: Vec<&Value> = pages
        .iter()
        .filter(|p| p["shared_with_bot_ids"] == json!([]))
        .collect();
    assert_eq!(unshared.len(), 1);
    assert_eq!(ws["unshared_page_ids"], json!([unshared[0]["page_id"]]));
}

#[tokio::test]
async fn config_can_be_read_and_patched_at_run_time() {
    let sim = Sim::start().await;
    let config = sim.control_get("/_sim/config").await;
    assert_eq!(config["reauth"], "fresh");
    assert_eq!(config["previous_pair"], "keep");
    assert_eq!(config["refresh_reuse"], "reject");
    assert_eq!(config["access_token_ttl"], Value::Null);

    let patched = sim
        .control_post(
            "/_sim/config",
            json!({"reauth": "legacy", "refresh_grace": "2s", "latency": {"users.me": 5}}),
        )
        .await;
    assert_eq!(patched["reauth"], "legacy");
    assert_eq!(patched["refresh_grace"], 2000);
    assert_eq!(
        sim.control_get("/_sim/config").await["latency"]["users.me"],
        5
    );
    // The patch takes effect: legacy re-authorization returns the active pair.
    let first = sim.connect().await;
    assert_eq!(sim.connect().await.access, first.access);

    for bad in [
        json!({"no_such_setting": true}),
        json!({"reauth": "sometimes"}),
        json!([1]),
    ] {
        let answer = sim
            .send(sim.http.post(sim.url("/_sim/config")).json(&bad))
            .await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{bad}");
    }
    assert_eq!(
        sim.control_get("/_sim/config").await["reauth"],
        "legacy",
        "bad patches change nothing"
    );
}

#[tokio::test]
async fn reset_clears_counters_and_with_state_everything() {
    let sim = Sim::start().await;
    let pair = sim.connect().await;
    sim.me(&pair.access).await;
    sim.control_post("/_sim/reset", json!({})).await;
    let stats = sim.control_get("/_sim/stats").await;
    assert_eq!(stats["requests"]["users.me"], 0);
    assert_eq!(stats["token_requests"]["total"], json!({}));
    assert_eq!(
        sim.control_get("/_sim/requests").await["requests"],
        json!([])
    );
    assert_eq!(
        sim.me(&pair.access).await.status,
        StatusCode::OK,
        "tokens survive"
    );

    sim.control_post("/_sim/reset", json!({"state": true}))
        .await;
    assert_eq!(sim.me(&pair.access).await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(sim.control_get("/_sim/bots").await["bots"], json!([]));
}

/// A manual clock moves only when told, and everything that ages reads it: here an access
/// token's lifetime and its `iat`.
#[tokio::test]
async fn a_manual_clock_is_read_and_advanced_over_the_control_api() {
    let sim = Sim::manual(|c| c.access_token_ttl = Some(std::time::Duration::from_secs(1))).await;
    let pair = sim.connect().await;
    let clock = sim.control_get("/_sim/clock").await;
    assert_eq!(clock["manual"], true);
    assert_eq!(clock["advanced_ms"], 0);
    let start = clock["now_ms"].as_i64().unwrap();
    assert!(clock["now"].is_string());
    assert_eq!(
        sim.introspect(&pair.access).await.body["iat"],
        start,
        "minted at the simulator's now"
    );

    let clock = sim
        .control_post("/_sim/clock/advance", json!({"ms": 999}))
        .await;
    assert_eq!(clock["advanced_ms"], 999);
    assert_eq!(clock["now_ms"], start + 999);
    assert_eq!(sim.me(&pair.access).await.status, StatusCode::OK);
    sim.control_post("/_sim/clock/advance", json!({"ms": 1}))
        .await;
    assert_eq!(sim.me(&pair.access).await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(sim.clock().advanced(), std::time::Duration::from_secs(1));

    // A reset leaves time alone: tokens keep their age.
    sim.control_post("/_sim/reset", json!({})).await;
    assert_eq!(sim.control_get("/_sim/clock").await["advanced_ms"], 1000);
}

#[tokio::test]
async fn the_system_clock_cannot_be_advanced() {
    let sim = Sim::start().await;
    assert_eq!(sim.control_get("/_sim/clock").await["manual"], false);
    let answer = sim
        .send(
            sim.http
                .post(sim.url("/_sim/clock/advance"))
                .json(&json!({"ms": 1000})),
        )
        .await;
    assert_eq!(answer.status, StatusCode::CONFLICT, "{}", answer.text);
    assert_eq!(answer.body["error"], "system_clock");
}
