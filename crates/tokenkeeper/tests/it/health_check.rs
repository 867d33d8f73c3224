//! The health check (issue 13 §3): dead connections are found before the app meets them,
//! paced across every process, and introspection's own trouble changes nothing.
//!
//! Intervals here are seconds, not a day; every wait is bounded.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use tokenkeeper::clock::parse_rate;
use tokenkeeper::config::HealthSettings;

use crate::both_backends;
use crate::support::app::{Options, TestApp};
use crate::support::db::Backend;

both_backends!(
    an_uninstalled_connection_is_marked_needs_reauth_within_one_interval_without_any_app_call,
    a_dead_access_token_whose_refresh_token_works_is_refreshed_by_the_health_check,
    introspection_failures_and_throttling_never_change_a_connection,
    checks_are_spread_evenly_over_the_interval,
    one_sweeper_at_a_time_keeps_the_global_rate_across_processes,
);

fn with_health(interval: Duration, rate: &str) -> Options {
    Options {
        health_check: Some(HealthSettings {
            interval,
            rate: parse_rate(rate).unwrap(),
        }),
        ..distinct_bots()
    }
}

/// Every connect is a new bot (by default the simulator's repeated authorizations are
/// re-authorizations of one bot).
fn distinct_bots() -> Options {
    let mut options = Options::default();
    options.sim.fresh_identity = true;
    options
}

/// Polls the connection until `done` says so, at most `within`; answers it and how long it took.
async fn wait_for(
    app: &TestApp,
    id: &str,
    within: Duration,
    done: impl Fn(&Value) -> bool,
) -> (Value, Duration) {
    let start = Instant::now();
    loop {
        let connection = app.connection(id).await;
        if done(&connection) {
            return (connection, start.elapsed());
        }
        assert!(
            start.elapsed() < within,
            "not within {within:?}: {connection}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn sim_requests(app: &TestApp, endpoint: &str) -> u64 {
    let stats = app
        .sim_json(reqwest::Method::GET, "/_sim/stats", None)
        .await;
    stats["requests"][endpoint].as_u64().unwrap_or(0)
}

async fn an_uninstalled_connection_is_marked_needs_reauth_within_one_interval_without_any_app_call(
    backend: Backend,
) {
    let interval = Duration::from_secs(2);
    let app = TestApp::with(backend, with_health(interval, "50/s")).await;
    let (id, _) = app.connect("user-1").await;
    // The first check comes at once: a connection never checked is due.
    let (checked, _) = wait_for(&app, &id, Duration::from_secs(10), |c| {
        !c["last_checked_at"].is_null()
    })
    .await;
    assert_eq!(checked["last_check_result"], "active");
    assert_eq!(checked["status"], "active");

    let bot = checked["bot_id"].as_str().unwrap().to_owned();
    app.sim_json(
        reqwest::Method::POST,
        &format!("/_sim/bots/{bot}/revoke"),
        Some(json!({})),
    )
    .await;
    let (dead, took) = wait_for(&app, &id, interval + Duration::from_secs(8), |c| {
        c["status"] == "needs_reauth"
    })
    .await;
    // One interval, and the time a refresh takes to be refused.
    assert!(
        took <= interval + Duration::from_secs(2),
        "found after {took:?}, interval {interval:?}"
    );
    assert_eq!(
        dead["diagnosis"]["reason"], "introspection_inactive",
        "{dead}"
    );
    assert!(dead["diagnosis"]["message"]
        .as_str()
        .unwrap()
        .starts_with("introspection found the token inactive"));
    assert_eq!(dead["last_check_result"], "inactive");
    // The app never called: no proxied call, no token read; the coordinator judged one
    // refresh, refused.
    assert_eq!(sim_requests(&app, "users.me").await, 0);
    assert_eq!(app.sim_refreshes().await, 1);
    let kinds = app.event_kinds(&id).await;
    let inactive = kinds
        .iter()
        .position(|k| k == "token_inactive")
        .expect("token_inactive");
    let reauth = kinds
        .iter()
        .position(|k| k == "needs_reauth")
        .expect("needs_reauth");
    assert!(inactive < reauth, "{kinds:?}");
    // A needs_reauth connection is not checked again.
    let introspections = sim_requests(&app, "oauth.introspect").await;
    tokio::time::sleep(interval * 2).await;
    assert_eq!(sim_requests(&app, "oauth.introspect").await, introspections);
}

async fn a_dead_access_token_whose_refresh_token_works_is_refreshed_by_the_health_check(
    backend: Backend,
) {
    let interval = Duration::from_secs(2);
    let app = TestApp::with(backend, with_health(interval, "50/s")).await;
    let (id, _) = app.connect("user-1").await;
    let first = app.current_grant(&id).await;
    wait_for(&app, &id, Duration::from_secs(10), |c| {
        !c["last_checked_at"].is_null()
    })
    .await;
    // Notion kills the access token alone (as when it expires); the refresh token still works.
    let (_, token) = app
        .get_json(&format!("/v1/connections/{id}/access-token"))
        .await;
    app.revoke_at_notion(&token["access_token"]).await;
    let (after, _) = wait_for(&app, &id, interval + Duration::from_secs(8), |c| {
        c["grant_id"] != first.as_str()
    })
    .await;
    assert_eq!(after["status"], "active");
    assert_eq!(app.sim_refreshes().await, 1);
    let r = app
        .api(reqwest::Method::GET, &format!("/v1/proxy/{id}/v1/users/me"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200, "the refreshed token works");
}

async fn introspection_failures_and_throttling_never_change_a_connection(backend: Backend) {
    let interval = Duration::from_secs(1);
    let app = TestApp::with(backend, with_health(interval, "50/s")).await;
    let (id, _) = app.connect("user-1").await;
    let grant = app.current_grant(&id).await;
    let bot = app.connection(&id).await["bot_id"]
        .as_str()
        .unwrap()
        .to_owned();
    // The connection is dead at Notion, but Notion's introspection throttles or fails.
    app.sim_json(
        reqwest::Method::POST,
        &format!("/_sim/bots/{bot}/revoke"),
        Some(json!({})),
    )
    .await;
    for fault in [
        json!({"endpoint": "oauth.introspect", "kind": "status", "status": 429, "retry_after": 1, "fraction": 0.5}),
        json!({"endpoint": "oauth.introspect", "kind": "status", "status": 503}),
    ] {
        app.sim_fault(fault).await;
    }
    let (checked, _) = wait_for(&app, &id, Duration::from_secs(10), |c| {
        c["last_check_result"] == "unknown"
    })
    .await;
    assert_eq!(checked["status"], "active");
    // Several more checks, all failing: still nothing changes.
    let seen = sim_requests(&app, "oauth.introspect").await;
    let start = Instant::now();
    while sim_requests(&app, "oauth.introspect").await < seen + 2 {
        assert!(start.elapsed() < Duration::from_secs(15), "no more checks");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let connection = app.connection(&id).await;
    assert_eq!(connection["status"], "active", "{connection}");
    assert_eq!(connection["grant_id"], grant.as_str());
    assert_eq!(connection["last_check_result"], "unknown");
    assert_eq!(app.sim_refreshes().await, 0, "nothing was refreshed");
    // Once introspection answers again, the dead connection is found.
    app.sim_json(reqwest::Method::DELETE, "/_sim/faults", None)
        .await;
    let (dead, _) = wait_for(&app, &id, Duration::from_secs(10), |c| {
        c["status"] == "needs_reauth"
    })
    .await;
    assert_eq!(dead["diagnosis"]["reason"], "introspection_inactive");
}

/// The times (ms on the simulator's clock) of its introspections, oldest first.
async fn introspection_times(app: &TestApp) -> Vec<i64> {
    let log = app
        .sim_json(reqwest::Method::GET, "/_sim/requests?limit=10000", None)
        .await;
    log["requests"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["endpoint"] == "oauth.introspect")
        .map(|r| {
            chrono::DateTime::parse_from_rfc3339(r["time"].as_str().unwrap())
                .unwrap()
                .timestamp_millis()
        })
        .collect()
}

async fn checks_are_spread_evenly_over_the_interval(backend: Backend) {
    // Four connections, checked every 4 s: one check a second, not four at once.
    let interval = Duration::from_secs(4);
    let options = with_health(interval, "100/s");
    let app = TestApp::with(backend, options).await;
    let mut ids = Vec::new();
    for i in 0..4 {
        ids.push(app.connect(&format!("user-{i}")).await.0);
    }
    let start = Instant::now();
    while introspection_times(&app).await.len() < 8 {
        assert!(start.elapsed() < Duration::from_secs(30), "too few checks");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let times = introspection_times(&app).await;
    // The first check may come at once (the sweeper had not counted the connections yet);
    // from then on the gaps are at least interval / N, give or take the clock's rounding.
    for pair in times[1..].windows(2) {
        assert!(pair[1] - pair[0] >= 900, "checks in a burst: {times:?}");
    }
    for id in &ids {
        assert_eq!(app.connection(id).await["last_check_result"], "active");
    }
}

async fn one_sweeper_at_a_time_keeps_the_global_rate_across_processes(backend: Backend) {
    let app = TestApp::with(backend, distinct_bots()).await;
    // Twelve connections checked every second would be 12 checks a second; the rate allows 4,
    // across both processes.
    for i in 0..12 {
        app.connect(&format!("user-{i}")).await;
    }
    assert_eq!(app.db.count("SELECT count(*) FROM connections").await, 12);
    let env = [
        ("TOKENKEEPER_HEALTH_CHECK_INTERVAL", "1s"),
        ("TOKENKEEPER_HEALTH_CHECK_RATE", "4/s"),
    ];
    let _a = app.spawn_peer(&env).await;
    let _b = app.spawn_peer(&env).await;
    // Let both start and one take the lease.
    let start = Instant::now();
    while sim_requests(&app, "oauth.introspect").await < 4 {
        assert!(start.elapsed() < Duration::from_secs(30), "no checks");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = sim_requests(&app, "oauth.introspect").await;
    let window = Instant::now();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let checks = sim_requests(&app, "oauth.introspect").await - before;
    let secs = window.elapsed().as_secs_f64();
    // At most 4 a second over the window (and one in flight at each end); two sweepers
    // without the lease would make about twice as many.
    assert!(
        (checks as f64) <= 4.0 * secs + 2.0,
        "{checks} checks in {secs:.1} s"
    );
    assert!(
        checks >= 4,
        "{checks} checks in {secs:.1} s: the sweeper stalled"
    );
    assert_eq!(
        app.db
            .count("SELECT count(*) FROM sweeper_leases WHERE holder IS NOT NULL")
            .await,
        1
    );
}
