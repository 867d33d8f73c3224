//! One throttle per connection and per workspace, shared by every process (issue 14 §4): once
//! Notion answered a proxied call 429, every process holds further calls of that connection (or
//! workspace) until `Retry-After` passes, within each caller's budget, instead of letting each
//! call collect its own 429. Counted at the simulator, which runs on a manual clock so that its
//! rate-limit windows stay open for as long as the test needs.

use std::time::{Duration, Instant};

use notion_sim::{SimClock, SimConfig};
use serde_json::{json, Value};

use crate::both_backends;
use crate::support::app::{Api, Options, TestApp, TOKENS_KEY};
use crate::support::db::Backend;

/// A proxied `users.me`: status, the proxy's own error code (if it is the proxy's answer), and
/// `Retry-After`.
async fn users_me(api: &Api, id: &str, budget_ms: Option<u64>) -> (u16, Option<String>, Value) {
    let mut request = api
        .http
        .get(format!("{}/v1/proxy/{id}/v1/users/me", api.url))
        .bearer_auth(TOKENS_KEY)
        .header("notion-version", "2026-03-11");
    if let Some(ms) = budget_ms {
        request = request.header("tokenkeeper-retry-budget-ms", ms.to_string());
    }
    let r = request.send().await.unwrap();
    let status = r.status().as_u16();
    let ours = r
        .headers()
        .get("tokenkeeper-error")
        .map(|v| v.to_str().unwrap().to_owned());
    let retry_after = r
        .headers()
        .get("retry-after")
        .map(|v| json!(v.to_str().unwrap()))
        .unwrap_or(Value::Null);
    (status, ours, retry_after)
}

/// What the simulator saw: `users.me` calls, and 429s by `rate_limit_reason`.
async fn sim_counts(app: &TestApp) -> (u64, Value) {
    let stats = app
        .sim_json(reqwest::Method::GET, "/_sim/stats", None)
        .await;
    (
        stats["requests"]["users.me"].as_u64().unwrap(),
        stats["rate_limited"].clone(),
    )
}

fn throttled_app_options(per_connection: u32, per_workspace: u32) -> Options {
    Options {
        sim: SimConfig {
            auto_approve: true,
            rate_limit_per_connection: per_connection,
            rate_limit_per_workspace: per_workspace,
            rate_limit_window: Duration::from_secs(60),
            ..SimConfig::default()
        },
        sim_clock: SimClock::manual(),
        ..Options::default()
    }
}

/// Connects `user` in workspace `ws` (several users of one workspace are several bots there).
async fn connect_in(app: &TestApp, ws: &str, user: &str) -> String {
    app.sim_json(
        reqwest::Method::POST,
        "/_sim/next-authorization",
        Some(json!({"workspace_id": ws, "user_id": user})),
    )
    .await;
    let (id, status) = app.connect(user).await;
    assert_eq!(status, "connected");
    id
}

/// Calls through `api` until the proxy answers `notion_throttled` itself, within a bound: the
/// other process learns of the throttle through the change feed.
async fn until_held(api: &Api, id: &str) {
    let start = Instant::now();
    loop {
        let (status, ours, _) = users_me(api, id, None).await;
        if ours.as_deref() == Some("notion_throttled") {
            assert_eq!(status, 429);
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the throttle reaches the other process: {status} {ours:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

both_backends!(
    a_429_holds_that_connections_calls_in_every_process,
    a_workspace_429_holds_every_connection_of_the_workspace_in_every_process,
);

async fn a_429_holds_that_connections_calls_in_every_process(backend: Backend) {
    let app = TestApp::with(backend, throttled_app_options(3, 0)).await;
    let peer = app.spawn_peer(&[]).await;
    let id = connect_in(&app, "ws-one", "user-1").await;
    let other = connect_in(&app, "ws-one", "user-2").await;
    for _ in 0..3 {
        assert_eq!(users_me(&app, &id, None).await.0, 200);
    }
    // Notion's 429: its Retry-After (the rest of the 60 s window) does not fit the default
    // 10 s budget, so it goes back as Notion sent it.
    let (status, ours, retry_after) = users_me(&app, &id, None).await;
    assert_eq!((status, ours), (429, None), "Notion's own 429");
    assert_eq!(retry_after, json!("60"));
    let (_, limited) = sim_counts(&app).await;
    assert_eq!(limited["public_api_request_rate_limit"], 1);

    // From now on this process answers for Notion, without calling it ...
    let (status, ours, retry_after) = users_me(&app, &id, None).await;
    assert_eq!(status, 429);
    assert_eq!(ours.as_deref(), Some("notion_throttled"));
    let secs: u64 = retry_after.as_str().unwrap().parse().unwrap();
    assert!((59..=60).contains(&secs), "{secs}");
    // ... and so does the other process once it has heard (through the change feed; a call
    // it made before, if any, met a 429 of its own, which it then shares too).
    until_held(&peer, &id).await;
    let (before, limited_before) = sim_counts(&app).await;
    assert!(
        limited_before["public_api_request_rate_limit"]
            .as_u64()
            .unwrap()
            <= 2,
        "{limited_before}"
    );
    for _ in 0..10 {
        let (status, ours, _) = users_me(&peer, &id, None).await;
        assert_eq!((status, ours.as_deref()), (429, Some("notion_throttled")));
        let (status, ours, _) = users_me(&app, &id, None).await;
        assert_eq!((status, ours.as_deref()), (429, Some("notion_throttled")));
    }
    let (after, limited) = sim_counts(&app).await;
    assert_eq!(after, before, "no held call reached Notion");
    assert_eq!(limited, limited_before, "no 429 more");

    // The connection's own budget holds only that connection.
    assert_eq!(users_me(&peer, &other, None).await.0, 200);
    assert_eq!(users_me(&app, &other, None).await.0, 200);
}

async fn a_workspace_429_holds_every_connection_of_the_workspace_in_every_process(
    backend: Backend,
) {
    let app = TestApp::with(backend, throttled_app_options(0, 2)).await;
    let peer = app.spawn_peer(&[]).await;
    let x = connect_in(&app, "ws-shared", "user-x").await;
    let y = connect_in(&app, "ws-shared", "user-y").await;
    let elsewhere = connect_in(&app, "ws-elsewhere", "user-z").await;
    assert_eq!(users_me(&app, &x, None).await.0, 200);
    assert_eq!(users_me(&peer, &y, None).await.0, 200);
    let (status, ours, _) = users_me(&app, &x, None).await;
    assert_eq!((status, ours), (429, None), "Notion's workspace 429");
    let (_, limited) = sim_counts(&app).await;
    assert_eq!(limited["public_api_space_request_rate_limit"], 1);

    // The workspace's other connection is held too, in both processes.
    let (status, ours, _) = users_me(&app, &y, None).await;
    assert_eq!((status, ours.as_deref()), (429, Some("notion_throttled")));
    until_held(&peer, &y).await;
    until_held(&peer, &x).await;
    let (_, limited) = sim_counts(&app).await;
    assert!(
        limited["public_api_space_request_rate_limit"]
            .as_u64()
            .unwrap()
            <= 2,
        "{limited}"
    );
    // Another workspace is not.
    assert_eq!(users_me(&peer, &elsewhere, None).await.0, 200);
}

both_backends!(a_held_call_waits_within_its_budget_and_is_sent_when_the_throttle_ends);

/// A throttle that ends within the caller's budget holds the call, which is then sent; one that
/// does not is answered at once. The simulator's clock is moved to the end of its window so that
/// its `Retry-After` is one second.
async fn a_held_call_waits_within_its_budget_and_is_sent_when_the_throttle_ends(backend: Backend) {
    let app = TestApp::with(backend, throttled_app_options(1, 0)).await;
    let id = connect_in(&app, "ws-wait", "user-w").await;
    assert_eq!(users_me(&app, &id, None).await.0, 200);
    app.sim.clock().advance(Duration::from_millis(59_500));
    // No retries at all: Notion's 429 (Retry-After 1) goes back, and is shared.
    let (status, ours, retry_after) = users_me(&app, &id, Some(0)).await;
    assert_eq!((status, ours), (429, None));
    assert_eq!(retry_after, json!("1"));
    // A budget of 0 does not wait for the throttle either.
    let (status, ours, _) = users_me(&app, &id, Some(0)).await;
    assert_eq!((status, ours.as_deref()), (429, Some("notion_throttled")));
    // Within the budget the call waits out the second, then goes to Notion, whose window the
    // test ends meanwhile.
    let (calls, _) = sim_counts(&app).await;
    let waiting = tokio::spawn({
        let (http, url, sim_url) = (app.http.clone(), app.url.clone(), app.sim_url.clone());
        let id = id.clone();
        async move {
            let api = Api { url, sim_url, http };
            let start = Instant::now();
            (users_me(&api, &id, Some(5_000)).await, start.elapsed())
        }
    });
    app.sim.clock().advance(Duration::from_secs(1));
    let ((status, ours, _), took) = waiting.await.unwrap();
    assert_eq!((status, ours), (200, None));
    assert!(took >= Duration::from_millis(500), "it was held: {took:?}");
    let (after, limited) = sim_counts(&app).await;
    assert_eq!(after, calls + 1, "sent once, after the hold");
    assert_eq!(limited["public_api_request_rate_limit"], 1);
}

both_backends!(when_a_throttle_ends_held_calls_go_to_notion_one_at_a_time);

/// Calls held by a throttle are not all sent the moment it ends: until the subject has
/// recovered, a process sends its calls one at a time, so that a window Notion has just opened
/// meets one call too many, not every call that was held. Ten calls wait out a one-second
/// throttle; Notion's new window lets two through; the third meets Notion's 429 (for the rest
/// of the window, past every budget), and the seven behind it are answered by the proxy
/// without calling Notion. Sent all at once, Notion would have answered eight of them 429.
async fn when_a_throttle_ends_held_calls_go_to_notion_one_at_a_time(backend: Backend) {
    let app = TestApp::with(backend, throttled_app_options(2, 0)).await;
    let id = connect_in(&app, "ws-burst", "user-b").await;
    for _ in 0..2 {
        assert_eq!(users_me(&app, &id, None).await.0, 200);
    }
    app.sim.clock().advance(Duration::from_millis(59_500));
    let (status, ours, retry_after) = users_me(&app, &id, Some(0)).await;
    assert_eq!((status, ours, retry_after), (429, None, json!("1")));
    let (calls_before, limited_before) = sim_counts(&app).await;

    let held: Vec<_> = (0..10)
        .map(|_| {
            let api = Api {
                url: app.url.clone(),
                sim_url: app.sim_url.clone(),
                http: app.http.clone(),
            };
            let id = id.clone();
            tokio::spawn(async move { users_me(&api, &id, Some(5_000)).await })
        })
        .collect();
    // Notion's next window opens while the calls are held.
    app.sim.clock().advance(Duration::from_secs(1));
    let mut answers = Vec::new();
    for call in held {
        let (status, ours, _) = call.await.unwrap();
        answers.push((status, ours));
    }

    let (calls_after, limited_after) = sim_counts(&app).await;
    let new_429s = limited_after["public_api_request_rate_limit"]
        .as_u64()
        .unwrap()
        - limited_before["public_api_request_rate_limit"]
            .as_u64()
            .unwrap();
    assert_eq!(
        (calls_after - calls_before, new_429s),
        (3, 1),
        "Notion saw the held calls one at a time: two answered, one throttled, the rest never sent"
    );
    let ok = answers.iter().filter(|(s, _)| *s == 200).count();
    let ours = answers
        .iter()
        .filter(|(s, o)| *s == 429 && o.as_deref() == Some("notion_throttled"))
        .count();
    let notions = answers
        .iter()
        .filter(|(s, o)| *s == 429 && o.is_none())
        .count();
    assert_eq!((ok, notions, ours), (2, 1, 7), "{answers:?}");
}
