//! Faults on demand: statuses, fractions, non-JSON bodies, delays and dropped connections.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::json;

use crate::{assert_notion_error, Sim};

#[tokio::test]
async fn a_status_fault_answers_the_next_n_requests_then_disappears() {
    let sim = Sim::start().await;
    let pair = sim.connect().await;
    sim.control_post(
        "/_sim/faults",
        json!({"endpoint": "oauth.token", "kind": "status", "status": 503, "count": 2}),
    )
    .await;
    for _ in 0..2 {
        let answer = sim.refresh(&pair.refresh).await;
        assert_notion_error(&answer, 503, "service_unavailable");
    }
    // The faulted requests were not processed: the refresh token is still unused.
    assert_eq!(sim.refresh(&pair.refresh).await.status, StatusCode::OK);
    assert_eq!(sim.control_get("/_sim/faults").await["faults"], json!([]));
    assert_eq!(
        sim.control_get("/_sim/stats").await["requests"]["oauth.token"],
        4
    );
}

#[tokio::test]
async fn every_transient_status_has_its_notion_code() {
    let sim = Sim::start().await;
    let pair = sim.connect().await;
    for (status, code) in [
        (500, "internal_server_error"),
        (502, "bad_gateway"),
        (503, "service_unavailable"),
        (504, "gateway_timeout"),
        (529, "service_overload"),
    ] {
        sim.control_post(
            "/_sim/faults",
            json!({"endpoint": "users.me", "kind": "status", "status": status, "count": 1, "retry_after": 2}),
        )
        .await;
        let answer = sim.me(&pair.access).await;
        assert_notion_error(&answer, status, code);
        assert_eq!(answer.headers["retry-after"], "2");
    }
    assert_eq!(sim.me(&pair.access).await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_429_fault_carries_the_chosen_reason() {
    let sim = Sim::start().await;
    let pair = sim.connect().await;
    sim.control_post(
        "/_sim/faults",
        json!({"endpoint": "search", "kind": "status", "status": 429, "count": 1,
               "retry_after": 7, "rate_limit_reason": "public_api_request_blocked"}),
    )
    .await;
    let answer = sim
        .rest(reqwest::Method::POST, "/v1/search", &pair.access, None)
        .await;
    assert_notion_error(&answer, 429, "rate_limited");
    assert_eq!(answer.headers["retry-after"], "7");
    assert_eq!(
        answer.body["additional_data"]["rate_limit_reason"],
        "public_api_request_blocked"
    );
    assert_eq!(answer.body["additional_data"]["retry_after"], "7");
}

#[tokio::test]
async fn a_fraction_fault_hits_about_that_share_of_requests() {
    let sim = Sim::start().await;
    let pair = sim.connect().await;
    sim.control_post(
        "/_sim/faults",
        json!({"endpoint": "users.me", "kind": "status", "status": 529, "retry_after": 1, "fraction": 0.5}),
    )
    .await;
    let mut overloaded = 0;
    for _ in 0..200 {
        match sim.me(&pair.access).await.status.as_u16() {
            529 => overloaded += 1,
            200 => {}
            other => panic!("unexpected status {other}"),
        }
    }
    assert!(
        (60..=140).contains(&overloaded),
        "{overloaded} of 200 at 0.5"
    );
}

#[tokio::test]
async fn a_non_json_fault_sends_plain_text_or_html() {
    let sim = Sim::start().await;
    let pair = sim.connect().await;
    sim.control_post(
        "/_sim/faults",
        json!({"endpoint": "users.me", "kind": "non_json", "count": 1}),
    )
    .await;
    let answer = sim.me(&pair.access).await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_eq!(answer.headers["content-type"], "text/plain");
    assert_eq!(answer.text, "400 Bad Request");
    assert!(answer.headers.contains_key("x-notion-request-id"));
    assert!(serde_json::from_str::<serde_json::Value>(&answer.text).is_err());

    sim.control_post(
        "/_sim/faults",
        json!({"endpoint": "*", "kind": "non_json", "status": 403, "content_type": "text/html", "count": 1}),
    )
    .await;
    let answer = sim.introspect(&pair.access).await;
    assert_eq!(answer.status, StatusCode::FORBIDDEN);
    assert!(answer.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    assert!(answer.text.starts_with("<html>"));
}

/// A `delay` is real time by design (it models a slow network), so this test measures real
/// time, and only in ways a loaded machine cannot break: the answer takes at least the delay (a
/// lower bound), and "nothing changed during the delay" is checked against a delay far longer
/// than the check, right after the request was seen to arrive.
#[tokio::test]
async fn a_delay_fault_stalls_then_processes_normally() {
    let sim = Sim::start().await;
    let pair = sim.connect().await;
    let live = |bot: serde_json::Value| {
        bot["live_access_token_fingerprints"]
            .as_array()
            .unwrap()
            .len()
    };
    let before = live(sim.bot(&pair.bot_id).await);
    sim.control_post(
        "/_sim/faults",
        json!({"endpoint": "oauth.token", "kind": "delay", "delay_ms": 300, "count": 1}),
    )
    .await;
    let started = Instant::now();
    let answer = sim.refresh(&pair.refresh).await;
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(
        live(sim.bot(&pair.bot_id).await),
        before + 1,
        "processed after the delay"
    );

    // The delay comes before processing: while it lasts, nothing has changed.
    let next = crate::Pair::from_response(&answer.body);
    sim.control_post(
        "/_sim/faults",
        json!({"endpoint": "oauth.token", "kind": "delay", "delay_ms": 60_000, "count": 1}),
    )
    .await;
    let before = live(sim.bot(&next.bot_id).await);
    let counted = sim.count("oauth.token").await;
    let pending = tokio::spawn(
        sim.http
            .post(sim.url("/v1/oauth/token"))
            .basic_auth("tokenkeeper-dev", Some("dev-secret-not-for-production"))
            .json(&json!({"grant_type": "refresh_token", "refresh_token": next.refresh}))
            .send(),
    );
    // Counted means arrived: the request is in its delay now, not on its way.
    sim.until_counted("oauth.token", counted + 1).await;
    assert_eq!(
        live(sim.bot(&next.bot_id).await),
        before,
        "not processed during the delay"
    );
    assert_eq!(
        sim.introspect(&next.refresh).await.body["active"],
        true,
        "the refresh token is not rotated yet"
    );
    assert!(!pending.is_finished(), "no answer during the delay");
    pending.abort();
}

#[tokio::test]
async fn a_drop_fault_closes_the_connection_without_an_answer() {
    let sim = Sim::start().await;
    let pair = sim.connect().await;
    sim.control_post(
        "/_sim/faults",
        json!({"endpoint": "users.me", "kind": "drop", "count": 1}),
    )
    .await;
    let error = sim
        .http
        .get(sim.url("/v1/users/me"))
        .bearer_auth(&pair.access)
        .header("Notion-Version", "2026-03-11")
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .expect_err("no response");
    assert!(
        !error.is_timeout(),
        "the connection was closed, not left hanging: {error}"
    );

    // At the TCP level: the peer closes and not one byte of HTTP comes back.
    sim.control_post(
        "/_sim/faults",
        json!({"endpoint": "users.me", "kind": "drop", "count": 1}),
    )
    .await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(sim.server.addr())
        .await
        .unwrap();
    let request = format!(
        "GET /v1/users/me HTTP/1.1\r\nHost: sim\r\nAuthorization: Bearer {}\r\nNotion-Version: 2026-03-11\r\n\r\n",
        pair.access
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut received = Vec::new();
    let read =
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut received)).await;
    assert!(read.is_ok(), "closed promptly");
    assert!(
        received.is_empty(),
        "got {:?}",
        String::from_utf8_lossy(&received)
    );

    assert_eq!(sim.me(&pair.access).await.status, StatusCode::OK);
}

#[tokio::test]
async fn faults_are_validated_and_cleared_by_reset() {
    let sim = Sim::start().await;
    for bad in [
        json!({"endpoint": "nope", "kind": "status", "status": 500}),
        json!({"endpoint": "users.me", "kind": "status"}),
        json!({"endpoint": "users.me", "kind": "delay"}),
        json!({"endpoint": "users.me", "kind": "drop", "count": 0}),
        json!({"endpoint": "users.me", "kind": "teleport"}),
        json!({"endpoint": "users.me", "kind": "status", "status": 500, "fraction": 2.0}),
    ] {
        let answer = sim
            .send(sim.http.post(sim.url("/_sim/faults")).json(&bad))
            .await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{bad}");
    }
    let pair = sim.connect().await;
    sim.control_post(
        "/_sim/faults",
        json!({"endpoint": "users.me", "kind": "status", "status": 500}),
    )
    .await;
    assert_eq!(sim.me(&pair.access).await.status.as_u16(), 500);
    assert_eq!(
        sim.me(&pair.access).await.status.as_u16(),
        500,
        "no count: until reset"
    );
    sim.control_post("/_sim/reset", json!({})).await;
    assert_eq!(
        sim.me(&pair.access).await.status,
        StatusCode::OK,
        "state survives a plain reset"
    );
}
