//! What an operator sees (issue 12 §2 and §3): the JSON log of a whole flow, and `/metrics`
//! read by Prometheus's own Python parser after flows whose every count the test knows.

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};

use crate::both_backends;
use crate::support::app::{Api, Browser, Landing, TestApp, ADMIN_KEY, TOKENS_KEY};
use crate::support::db::Backend;
use crate::support::python::{parse_metrics, Scrape};

both_backends!(
    metrics_count_a_flow_as_prometheus_reads_them,
    a_refresh_that_waits_for_another_process_is_counted_as_a_lease_wait_there,
    the_json_log_of_a_whole_flow_has_every_operation_and_no_secret,
);

/// A workspace and user of the simulator's that no other authorization in the test uses, so
/// that the next connect makes a new connection rather than re-authorizing one.
async fn next_authorization_is_a_new_user(api: &Api, n: u8, outcome: &str) {
    api.sim_json(
        Method::POST,
        "/_sim/next-authorization",
        Some(json!({
            "workspace_id": format!("c0ffee00-0000-4000-8000-0000000000{n:02}"),
            "user_id": format!("c0ffee00-0000-4000-8000-0000000001{n:02}"),
            "outcome": outcome,
        })),
    )
    .await;
}

/// `/metrics` read with `key`, parsed by Prometheus's parser.
pub async fn scrape(api: &Api, key: &str) -> Scrape {
    let r = api
        .http
        .get(format!("{}/metrics", api.url))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    parse_metrics(&r.text().await.unwrap()).await
}

async fn metrics_count_a_flow_as_prometheus_reads_them(backend: Backend) {
    let app = TestApp::start(backend).await;
    // Any API key reads the metrics, and only an API key.
    let refused = app
        .http
        .get(format!("{}/metrics", app.url))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    let refused = app
        .http
        .get(format!("{}/v1/connections", app.url))
        .bearer_auth("not-a-key-of-this-tokenkeeper")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);

    let (id, _) = app.connect("user-1").await;
    for _ in 0..3 {
        let (status, body) = app
            .get_json(&format!("/v1/connections/{id}/access-token"))
            .await;
        assert_eq!(status, 200, "{body}");
    }
    let grant = app.current_grant(&id).await;
    let (status, body) = app.refresh(&id, &grant).await;
    assert_eq!((status, &body["refreshed"]), (200, &json!(true)), "{body}");
    let (status, body) = app.refresh(&id, &grant).await;
    assert_eq!((status, &body["refreshed"]), (200, &json!(false)), "{body}");

    // Through the proxy: one call answered at once, one throttled once and then answered.
    let proxied = |app: &TestApp| {
        app.http
            .get(format!("{}/v1/proxy/{id}/v1/users/me", app.url))
            .bearer_auth(ADMIN_KEY)
            .send()
    };
    assert_eq!(proxied(&app).await.unwrap().status(), 200);
    app.sim_fault(json!({"endpoint": "users.me", "kind": "status", "status": 429, "count": 1, "retry_after": 1}))
        .await;
    assert_eq!(proxied(&app).await.unwrap().status(), 200);

    // A second connection, revoked.
    next_authorization_is_a_new_user(&app, 2, "approve").await;
    let (revoked, _) = app.connect("user-2").await;
    assert_ne!(revoked, id);
    let r = app
        .api(Method::DELETE, &format!("/v1/connections/{revoked}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let revocation: Value = r.json().await.unwrap();
    let tokens_revoked = revocation["tokens_revoked"].as_f64().unwrap();
    assert!(tokens_revoked >= 2.0, "{revocation}");

    let m = scrape(&app, TOKENS_KEY).await;
    assert_eq!(
        m.family_type("tokenkeeper_http_request_duration_seconds"),
        Some("histogram")
    );
    assert_eq!(m.family_type("tokenkeeper_refreshes"), Some("counter"));
    assert_eq!(m.family_type("tokenkeeper_connections"), Some("gauge"));
    let http = |route: &str, method: &str, status: &str| {
        m.value(
            "tokenkeeper_http_request_duration_seconds_count",
            &[("route", route), ("method", method), ("status", status)],
        )
    };
    assert_eq!(http("/v1/connections/{id}/access-token", "GET", "200"), 3.0);
    assert_eq!(http("/v1/connections/{id}/refresh", "POST", "200"), 2.0);
    assert_eq!(http("/v1/proxy/{id}/{*path}", "GET", "200"), 2.0);
    assert_eq!(http("/metrics", "GET", "401"), 1.0);
    assert_eq!(http("/v1/connections", "GET", "401"), 1.0);
    assert_eq!(http("/oauth/callback", "GET", "303"), 2.0);
    // No path of its own reaches a label: connection ids would make a series per connection.
    assert!(
        m.samples
            .iter()
            .all(|s| s.labels.iter().all(|(_, v)| !v.contains("con_"))),
        "a label holds a connection id"
    );
    assert_eq!(
        m.value("tokenkeeper_token_reads_total", &[("outcome", "served")]),
        3.0
    );
    assert_eq!(
        m.value("tokenkeeper_refreshes_total", &[("outcome", "refreshed")]),
        1.0
    );
    assert_eq!(
        m.value(
            "tokenkeeper_refreshes_total",
            &[("outcome", "already_rotated")]
        ),
        1.0
    );
    let provider = |endpoint: &str| {
        m.value_or_zero(
            "tokenkeeper_provider_request_duration_seconds_count",
            &[("endpoint", endpoint), ("status_class", "2xx")],
        )
    };
    assert_eq!(provider("token_exchange"), 2.0);
    assert_eq!(provider("token_refresh"), 1.0);
    assert_eq!(provider("revoke"), tokens_revoked);
    assert_eq!(
        m.value(
            "tokenkeeper_proxy_upstream_answers_total",
            &[("status", "200")]
        ),
        2.0
    );
    assert_eq!(
        m.value(
            "tokenkeeper_proxy_upstream_answers_total",
            &[("status", "429")]
        ),
        1.0
    );
    assert_eq!(
        m.value(
            "tokenkeeper_proxy_retries_total",
            &[("reason", "throttled")]
        ),
        1.0
    );
    assert_eq!(
        m.value(
            "tokenkeeper_api_key_rejections_total",
            &[("reason", "missing")]
        ),
        1.0
    );
    assert_eq!(
        m.value(
            "tokenkeeper_api_key_rejections_total",
            &[("reason", "unknown")]
        ),
        1.0
    );
    assert_eq!(
        m.value(
            "tokenkeeper_authorizations_total",
            &[("outcome", "connected")]
        ),
        2.0
    );
    assert_eq!(m.value("tokenkeeper_revocations_total", &[]), 1.0);
    // The database-wide gauges.
    let connections = |status| m.value("tokenkeeper_connections", &[("status", status)]);
    assert_eq!(connections("active"), 1.0);
    assert_eq!(connections("revoked"), 1.0);
    assert_eq!(connections("needs_reauth"), 0.0);
    let jobs = |status| {
        m.value(
            "tokenkeeper_jobs",
            &[("kind", "revoke_token"), ("status", status)],
        )
    };
    assert_eq!(jobs("done"), tokens_revoked);
    assert_eq!(
        jobs("pending"),
        revocation["tokens_pending"].as_f64().unwrap()
    );
    assert_eq!(m.value("tokenkeeper_database_up", &[]), 1.0);
    assert!(m.value("tokenkeeper_http_connections_open", &[]) >= 1.0);
    assert_eq!(
        m.value("tokenkeeper_proxy_upstream_timeouts_total", &[]),
        0.0
    );
    assert_eq!(
        m.value(
            "tokenkeeper_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
}

async fn a_refresh_that_waits_for_another_process_is_counted_as_a_lease_wait_there(
    backend: Backend,
) {
    let app = TestApp::start(backend).await;
    // The peer logs text at info to a pipe, which is no terminal: no colour codes.
    let peer = app.spawn_logged_peer(&[("TOKENKEEPER_LOG", "info")]).await;
    let (id, _) = app.connect("user-1").await;
    let grant = app.current_grant(&id).await;
    // The peer has served a call before the race, so that its first call is not slow.
    assert_eq!(peer.get_json(&format!("/v1/connections/{id}")).await.0, 200);

    // This process's refresh holds the lease while Notion holds its answer; the peer's refresh
    // of the same grant, started meanwhile, finds the lease held and waits for its result. A
    // refresh reaches the lease within milliseconds; should the peer's take longer than the
    // second the hold lasts, it would find the grant replaced without waiting, and the
    // assertions below would fail rather than pass.
    let notion = app.sim.hold("oauth.token:refresh_token");
    let (here, there) = tokio::join!(app.refresh(&id, &grant), async {
        notion.arrived(1).await;
        let (there, ()) = tokio::join!(peer.refresh(&id, &grant), async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            assert_eq!(notion.release(1), 1);
        });
        there
    });
    drop(notion);
    assert_eq!(here.0, 200, "{}", here.1);
    assert_eq!(there.0, 200, "{}", there.1);
    assert_eq!(here.1["grant_id"], there.1["grant_id"]);
    assert_eq!(app.sim_refreshes().await, 1, "one refresh reached Notion");

    let m = scrape(&peer, ADMIN_KEY).await;
    assert_eq!(
        m.value("tokenkeeper_refresh_lease_wait_seconds_count", &[]),
        1.0
    );
    assert!(m.value("tokenkeeper_refresh_lease_wait_seconds_sum", &[]) >= 0.5);
    assert_eq!(
        m.value(
            "tokenkeeper_refreshes_total",
            &[("outcome", "already_rotated")]
        ),
        1.0
    );
    assert_eq!(
        m.value_or_zero("tokenkeeper_refreshes_total", &[("outcome", "refreshed")]),
        0.0
    );
    let log = peer.output.lock().unwrap().clone();
    assert!(
        !log.contains('\u{1b}'),
        "colour codes in a log that is not a terminal's"
    );
    assert!(
        log.contains(r#"op="refresh" outcome="already_rotated""#),
        "the peer's refresh line: {log}"
    );
    let here = scrape(&app, ADMIN_KEY).await;
    assert_eq!(
        here.value("tokenkeeper_refreshes_total", &[("outcome", "refreshed")]),
        1.0
    );
    assert_eq!(
        here.value("tokenkeeper_refresh_lease_wait_seconds_count", &[]),
        0.0
    );
}

/// Follows a connect link in a fresh browser and returns where it landed, with the `code` and
/// `state` it carried (secrets the log must never hold).
async fn follow_keeping_secrets(link: &str) -> (Landing, Vec<String>) {
    let browser = Browser::new();
    let to_sim = browser.redirect(link).await;
    let to_callback = browser.redirect(&to_sim).await;
    let callback = url::Url::parse(&to_callback).unwrap();
    let secrets = callback
        .query_pairs()
        .filter(|(k, _)| k == "code" || k == "state")
        .map(|(_, v)| v.into_owned())
        .filter(|v| !v.is_empty())
        .collect();
    (Landing::of(&browser.redirect(&to_callback).await), secrets)
}

/// Every token in a JSON answer (`access_token`, `refresh_token`), for the leak check.
fn tokens_in(body: &Value, into: &mut Vec<String>) {
    for field in ["access_token", "refresh_token"] {
        if let Some(t) = body[field].as_str() {
            into.push(t.to_owned());
        }
    }
}

async fn the_json_log_of_a_whole_flow_has_every_operation_and_no_secret(backend: Backend) {
    let app = TestApp::start(backend).await;
    // A process of its own with its own public URL (so connect links and the callback are its
    // own), logging JSON at debug.
    let mut spec = app.broker_spec();
    spec.public_url = None;
    spec.capture_output = true;
    spec.env.extend([
        ("TOKENKEEPER_LOG_FORMAT".to_owned(), "json".to_owned()),
        ("TOKENKEEPER_LOG".to_owned(), "debug".to_owned()),
        // Short enough that a throttled refresh gives up at once, long enough for the rest.
        ("TOKENKEEPER_REFRESH_BUDGET".to_owned(), "5s".to_owned()),
    ]);
    let tk = spec.start().await;
    let mut secrets = vec![
        ADMIN_KEY.to_owned(),
        TOKENS_KEY.to_owned(),
        spec.client_secret.clone(),
        app.key_ring.clone(),
    ];
    // The key ring's entry is `<id>:<key>`: the key alone must not appear either.
    secrets.push(app.key_ring.split_once(':').unwrap().1.to_owned());

    // Connect, re-authorize, and a user who cancels at Notion.
    let (landing, seen) = follow_keeping_secrets(&tk.connect_link("user-1").await).await;
    secrets.extend(seen);
    assert_eq!(landing.status, "connected");
    let id = landing.connection_id.unwrap();
    let (landing, seen) = follow_keeping_secrets(&tk.connect_link("user-1").await).await;
    secrets.extend(seen);
    assert_eq!(landing.status, "reconnected");
    next_authorization_is_a_new_user(&tk, 3, "deny").await;
    let (landing, seen) = follow_keeping_secrets(&tk.connect_link("user-3").await).await;
    secrets.extend(seen);
    assert_eq!(landing.status, "denied");

    let (status, body) = tk
        .get_json(&format!(
            "/v1/connections/{id}/access-token?include_refresh_token=true"
        ))
        .await;
    assert_eq!(status, 200, "{body}");
    tokens_in(&body, &mut secrets);

    // Refreshed, then already rotated.
    let grant = body["grant_id"].as_str().unwrap().to_owned();
    let (status, body) = tk.refresh(&id, &grant).await;
    assert_eq!((status, &body["refreshed"]), (200, &json!(true)), "{body}");
    tokens_in(&body, &mut secrets);
    let (status, body) = tk.refresh(&id, &grant).await;
    assert_eq!((status, &body["refreshed"]), (200, &json!(false)), "{body}");

    // Joined: a second caller arrives while the first one's refresh is held at Notion. (These
    // calls name no grant: the current one was refreshed moments ago, and naming it would ask
    // whether Notion refused a fresh token, which is another story.)
    let notion = app.sim.hold("oauth.token:refresh_token");
    let (first, second) = tokio::join!(refresh_now(&tk, &id), async {
        notion.arrived(1).await;
        let (second, ()) = tokio::join!(refresh_now(&tk, &id), async {
            wait_for_line(&tk, r#""outcome":"joined""#).await;
            notion.release(1);
        });
        second
    });
    drop(notion);
    assert_eq!((first.0, second.0), (200, 200));
    assert_eq!(first.1["grant_id"], second.1["grant_id"]);
    tokens_in(&first.1, &mut secrets);

    // Throttled past the budget, then failed (an answer that cannot be read), then needs_reauth.
    app.sim_fault(json!({"endpoint": "oauth.token", "kind": "status", "status": 429, "count": 1, "retry_after": 60}))
        .await;
    let (status, body) = refresh_now(&tk, &id).await;
    assert_eq!(status, 503, "{body}");
    app.sim_fault(json!({"endpoint": "oauth.token", "kind": "non_json", "status": 200, "count": 1, "body": "not json"}))
        .await;
    let (status, body) = refresh_now(&tk, &id).await;
    assert_eq!(status, 503, "{body}");
    let bot = tk.connection(&id).await["bot_id"]
        .as_str()
        .unwrap()
        .to_owned();
    app.sim_json(Method::POST, &format!("/_sim/bots/{bot}/revoke"), None)
        .await;
    let (status, body) = refresh_now(&tk, &id).await;
    assert_eq!(status, 424, "{body}");

    // A rejected API key, then a revocation.
    let r = tk
        .http
        .get(format!("{}/v1/connections", tk.url))
        .bearer_auth("a-wrong-key-0123456789")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    secrets.push("a-wrong-key-0123456789".to_owned());
    let r = tk
        .api(Method::DELETE, &format!("/v1/connections/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    wait_for_line(&tk, r#""op":"revocation""#).await;

    let output = tk.output.lock().unwrap().clone();
    // Secrets first, and a failure names which secret, never the secret itself.
    secrets.retain(|s| s.len() >= 8);
    for (i, secret) in secrets.iter().enumerate() {
        assert!(
            !output.contains(secret.as_str()),
            "secret #{i} of {} appears in the log",
            secrets.len()
        );
    }
    // Every line on standard error is one JSON object with the stable fields; what is not JSON
    // is the banner `serve` prints on standard output.
    let mut lines = Vec::new();
    for line in output.lines() {
        if !line.starts_with('{') {
            assert!(
                !line.contains("op=") && !line.contains("INFO"),
                "a log line that is not JSON: {line}"
            );
            continue;
        }
        let value: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("a log line that is not one JSON object ({e}): {line}"));
        for field in ["timestamp", "level", "target"] {
            assert!(value[field].is_string(), "{field} in {line}");
        }
        lines.push(value);
    }
    let with = |op: &str, outcome: Option<&str>| -> Vec<&Value> {
        lines
            .iter()
            .filter(|l| l["op"] == op && outcome.is_none_or(|o| l["outcome"] == o))
            .collect()
    };
    let one = |op: &str, outcome: Option<&str>| -> &Value {
        let found = with(op, outcome);
        assert_eq!(found.len(), 1, "one {op} {outcome:?} line: {found:?}");
        found[0]
    };
    let connected = one("authorization", Some("connected"));
    assert_eq!(connected["connection"], id.as_str());
    assert_eq!(connected["bot"], bot.as_str());
    assert_eq!(connected["end_user"], "user-1");
    assert!(connected["grant"].as_str().unwrap().starts_with("grt_"));
    assert_eq!(connected["level"], "INFO");
    assert!(connected["message"].is_string());
    let reauthorized = one("authorization", Some("reauthorized"));
    assert_eq!(reauthorized["connection"], id.as_str());
    assert_eq!(one("authorization", Some("denied"))["end_user"], "user-3");
    let refreshed = with("refresh", Some("refreshed"));
    assert_eq!(refreshed.len(), 2, "{refreshed:?}");
    assert!(refreshed
        .iter()
        .all(|l| l["connection"] == id.as_str() && l["new_grant"].is_string()));
    one("refresh", Some("already_rotated"));
    assert_eq!(one("refresh", Some("joined"))["connection"], id.as_str());
    one("refresh", Some("throttled"));
    let failed = one("refresh", Some("failed"));
    assert_eq!(failed["cause"], "provider_unavailable");
    assert_eq!(failed["level"], "WARN");
    one("refresh", Some("needs_reauth"));
    let rejected = one("api_key_rejected", None);
    assert_eq!(
        (&rejected["reason"], &rejected["route"]),
        (&json!("unknown"), &json!("/v1/connections"))
    );
    let revocation = one("revocation", None);
    assert_eq!(revocation["connection"], id.as_str());
    assert!(revocation["tokens_revoked"].is_u64());
    // A request line at debug for each answer, by route template, with status and latency.
    let reads: Vec<_> = with("request", None)
        .into_iter()
        .filter(|l| l["route"] == "/v1/connections/{id}/access-token")
        .collect();
    assert_eq!(reads.len(), 1, "{reads:?}");
    assert_eq!(reads[0]["status"], 200);
    assert_eq!(reads[0]["level"], "DEBUG");
    assert!(reads[0]["latency_ms"].as_f64().unwrap() > 0.0);
    for line in with("request", None) {
        let route = line["route"].as_str().unwrap();
        assert!(
            !route.contains("con_") && line.get("path").is_none() && line.get("uri").is_none(),
            "request lines name routes, not paths: {line}"
        );
    }
}

/// `POST /v1/connections/{id}/refresh` naming no grant: refresh the current one.
async fn refresh_now(api: &Api, id: &str) -> (u16, Value) {
    api.post_json(&format!("/v1/connections/{id}/refresh"), json!({}))
        .await
}

/// Waits (at most 30 s) until the process's captured output holds `needle`.
async fn wait_for_line(tk: &crate::support::process::Broker, needle: &str) {
    let waited = tokio::time::timeout(Duration::from_secs(30), async {
        while !tk.output.lock().unwrap().contains(needle) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "no log line with {needle} within 30 s");
}
