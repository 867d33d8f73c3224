//! The proxy (`ANY /v1/proxy/{id}/{path…}`, issue 5) against notion-sim, and against a small
//! upstream of the test's own where the sim cannot show something (echoing what arrived,
//! multi-MiB bodies). Each test is named after what it proves; all run on both backends.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::StreamExt;
use notion_sim::SimClock;
use reqwest::Method;
use serde_json::{json, Value};

use crate::both_backends;
use crate::support::app::{Options, TestApp, ADMIN_KEY};
use crate::support::db::{self, Backend};

both_backends!(
    concurrent_401s_cause_exactly_one_refresh_and_every_request_succeeds,
    an_uninstall_answers_424_with_a_reconnect_link_and_later_calls_never_reach_notion,
    throttling_is_retried_within_the_budget_and_never_touches_auth,
    server_errors_are_retried_for_reads_only_and_a_dropped_connection_is_the_proxys_own_error,
    forbidden_and_not_found_pass_through_unchanged_and_leave_the_connection_active,
    the_proxy_sets_the_token_and_a_default_version_and_marks_its_own_errors,
    requests_and_answers_pass_through_unchanged_except_for_the_credentials,
    large_bodies_stream_both_ways_without_being_held_whole,
    a_body_within_the_replay_limit_is_sent_again_after_a_401_and_a_larger_one_is_not,
);

/// A request through the proxy, with the admin API key.
fn proxy(app: &TestApp, id: &str, method: Method, path: &str) -> reqwest::RequestBuilder {
    app.http
        .request(method, format!("{}/v1/proxy/{id}{path}", app.url))
        .bearer_auth(ADMIN_KEY)
}

async fn sent(request: reqwest::RequestBuilder) -> (u16, reqwest::header::HeaderMap, Bytes) {
    let response = request.send().await.expect("tokenkeeper answers");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    (
        status,
        headers,
        response.bytes().await.expect("the whole body arrives"),
    )
}

fn json_of(body: &Bytes) -> Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|_| panic!("JSON body, got {:?}", String::from_utf8_lossy(body)))
}

fn header<'h>(headers: &'h reqwest::header::HeaderMap, name: &str) -> Option<&'h str> {
    headers.get(name).map(|v| v.to_str().unwrap())
}

/// How many requests the sim counted for an endpoint (`users.me`, `search`, …).
async fn sim_count(app: &TestApp, endpoint: &str) -> u64 {
    let stats = app.sim_json(Method::GET, "/_sim/stats", None).await;
    stats["requests"][endpoint]
        .as_u64()
        .expect("a counted endpoint")
}

async fn grant_of(app: &TestApp, id: &str) -> String {
    app.connection(id).await["grant_id"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// The connection is active on the grant it had, and nothing refreshed or failed.
async fn assert_untouched(app: &TestApp, id: &str, grant: &str) {
    let connection = app.connection(id).await;
    assert_eq!(connection["status"], "active", "{connection}");
    assert_eq!(connection["grant_id"], grant, "the grant is unchanged");
    assert_eq!(app.sim_refreshes().await, 0, "no refresh was attempted");
    let kinds = app.event_kinds(id).await;
    for never in ["refresh_failed", "needs_reauth", "refreshed"] {
        assert!(
            !kinds.iter().any(|k| k == never),
            "no {never} event: {kinds:?}"
        );
    }
}

async fn concurrent_401s_cause_exactly_one_refresh_and_every_request_succeeds(backend: Backend) {
    let app = TestApp::with(
        backend,
        Options {
            sim_clock: SimClock::manual(),
            ..Options::default()
        },
    )
    .await;
    let (id, _) = app.connect("user-1").await;
    let before = grant_of(&app, &id).await;
    // The token dies 1 s after it was minted on the sim's clock, which then stands still: the
    // refreshed token outlives the test.
    app.sim
        .update_config(|c| c.access_token_ttl = Some(Duration::from_secs(1)));
    app.sim.clock().advance(Duration::from_secs(1));

    // Notion holds all fifty 401s. Half are let go together and race into one refresh; the
    // other half only once that refresh was committed (its callers' retries have arrived), so
    // those 401s for the old grant surely arrive after the commit: without `if_grant`, each of
    // them would refresh again. The hold replaces a latency and staggered starts, which made
    // the same overlap likely but not certain.
    let notion = app.sim.hold("users.me");
    let calls = (0..50).map(|_| sent(proxy(&app, &id, Method::GET, "/v1/users/me")));
    let (results, ()) = tokio::join!(futures::future::join_all(calls), async {
        notion.arrived(50).await;
        assert_eq!(notion.release(25), 25);
        notion.arrived(75).await;
        assert_ne!(
            grant_of(&app, &id).await,
            before,
            "the refresh committed while the other 25 401s are still on their way"
        );
        notion.release_all();
    });

    let after = grant_of(&app, &id).await;
    assert_ne!(after, before, "the connection moved to a refreshed grant");
    for (status, headers, body) in &results {
        assert_eq!(*status, 200, "{}", String::from_utf8_lossy(body));
        assert_eq!(json_of(body)["object"], "user");
        assert_eq!(
            header(headers, "tokenkeeper-grant-id"),
            Some(after.as_str())
        );
    }
    assert_eq!(app.sim_refreshes().await, 1, "fifty 401s, one refresh");
    let kinds = app.event_kinds(&id).await;
    assert_eq!(
        kinds.iter().filter(|k| *k == "refreshed").count(),
        1,
        "{kinds:?}"
    );
    assert_eq!(app.connection(&id).await["status"], "active");
}

async fn an_uninstall_answers_424_with_a_reconnect_link_and_later_calls_never_reach_notion(
    backend: Backend,
) {
    let app = TestApp::start(backend).await;
    let (id, _) = app.connect("user-1").await;
    let connection = app.connection(&id).await;
    let grant = connection["grant_id"].as_str().unwrap().to_owned();
    let bot = connection["bot_id"].as_str().unwrap().to_owned();
    app.sim_json(Method::POST, &format!("/_sim/bots/{bot}/revoke"), None)
        .await;

    let (status, headers, body) = sent(proxy(&app, &id, Method::GET, "/v1/users/me")).await;
    assert_eq!(status, 424, "{}", String::from_utf8_lossy(&body));
    assert_eq!(header(&headers, "tokenkeeper-error"), Some("needs_reauth"));
    let error = &json_of(&body)["error"];
    assert_eq!(error["code"], "needs_reauth");
    let link = error["reconnect_url"].as_str().expect("a reconnect link");
    assert!(link.starts_with(&format!("{}/connect/", app.url)), "{link}");
    assert_eq!(error["diagnosis"]["grant_id"], grant.as_str());
    assert_eq!(error["diagnosis"]["code"], "invalid_grant");
    assert_eq!(app.connection(&id).await["status"], "needs_reauth");

    // The trail says why: the refresh of that grant failed with invalid_grant.
    let (status, events) = app.get_json(&format!("/v1/connections/{id}/events")).await;
    assert_eq!(status, 200);
    let events = events["data"].as_array().unwrap();
    let failed = events
        .iter()
        .find(|e| e["kind"] == "refresh_failed")
        .expect("a refresh_failed event");
    assert!(failed.to_string().contains("invalid_grant"), "{failed}");
    assert!(
        events.iter().any(|e| e["kind"] == "needs_reauth"),
        "{events:?}"
    );

    // From now on the answer comes from the database alone.
    let stats = app.sim_json(Method::GET, "/_sim/stats", None).await;
    let (status, headers, _) = sent(proxy(&app, &id, Method::GET, "/v1/users/me")).await;
    assert_eq!(status, 424);
    assert_eq!(header(&headers, "tokenkeeper-error"), Some("needs_reauth"));
    let (status, _, body) =
        sent(proxy(&app, &id, Method::POST, "/v1/search").json(&json!({}))).await;
    assert_eq!(status, 424);
    assert!(json_of(&body)["error"]["reconnect_url"].is_string());
    assert_eq!(
        app.sim_json(Method::GET, "/_sim/stats", None).await,
        stats,
        "Notion was not called"
    );
}

async fn throttling_is_retried_within_the_budget_and_never_touches_auth(backend: Backend) {
    // Each call's own budget, on its own: with the shared throttle, the first 429 would hold
    // the calls after it (`shared_throttle.rs` tests that).
    let app = TestApp::with(
        backend,
        Options {
            shared_throttle: false,
            ..Options::default()
        },
    )
    .await;
    let (id, _) = app.connect("user-1").await;
    let grant = grant_of(&app, &id).await;
    let me = || proxy(&app, &id, Method::GET, "/v1/users/me");

    // A 429, then a 529, each waited out per Retry-After and retried.
    for status in [429, 529] {
        app.sim_fault(json!({"endpoint": "users.me", "kind": "status", "status": status, "count": 1, "retry_after": 1}))
            .await;
        let count = sim_count(&app, "users.me").await;
        let started = Instant::now();
        let (answer, _, body) = sent(me()).await;
        assert_eq!(
            answer,
            200,
            "{status} retried: {}",
            String::from_utf8_lossy(&body)
        );
        assert!(
            started.elapsed() >= Duration::from_secs(1),
            "Retry-After was honoured"
        );
        assert_eq!(sim_count(&app, "users.me").await, count + 2);
    }

    // Retries off: Notion's 429 comes back as it was, Retry-After included.
    app.sim_fault(json!({"endpoint": "users.me", "kind": "status", "status": 429, "count": 1, "retry_after": 1}))
        .await;
    let count = sim_count(&app, "users.me").await;
    let (status, headers, body) = sent(me().header("Tokenkeeper-Retries", "0")).await;
    assert_eq!(status, 429);
    assert_eq!(header(&headers, "retry-after"), Some("1"));
    assert_eq!(
        header(&headers, "tokenkeeper-error"),
        None,
        "Notion's answer, not ours"
    );
    assert!(header(&headers, "x-notion-request-id").is_some());
    assert_eq!(json_of(&body)["code"], "rate_limited");
    assert_eq!(sim_count(&app, "users.me").await, count + 1);

    // A Retry-After beyond the budget (10 s by default) is not waited for at all.
    app.sim_fault(json!({"endpoint": "users.me", "kind": "status", "status": 429, "count": 1, "retry_after": 30}))
        .await;
    let count = sim_count(&app, "users.me").await;
    let started = Instant::now();
    let (status, headers, _) = sent(me()).await;
    assert_eq!(status, 429);
    assert_eq!(header(&headers, "retry-after"), Some("30"));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "answered at once, not after waiting: {:?}",
        started.elapsed()
    );
    assert_eq!(sim_count(&app, "users.me").await, count + 1);

    // The same with a budget set per request.
    app.sim_fault(json!({"endpoint": "users.me", "kind": "status", "status": 429, "count": 1, "retry_after": 2}))
        .await;
    let started = Instant::now();
    let (status, _, _) = sent(me().header("Tokenkeeper-Retry-Budget-Ms", "1500")).await;
    assert_eq!(status, 429);
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );

    // A blocked request is never retried, whatever the budget.
    app.sim_fault(json!({
        "endpoint": "users.me", "kind": "status", "status": 429, "count": 2, "retry_after": 1,
        "rate_limit_reason": "public_api_request_blocked"
    }))
    .await;
    let count = sim_count(&app, "users.me").await;
    let (status, _, body) = sent(me()).await;
    assert_eq!(status, 429);
    assert_eq!(
        json_of(&body)["additional_data"]["rate_limit_reason"],
        "public_api_request_blocked"
    );
    assert_eq!(sim_count(&app, "users.me").await, count + 1, "not retried");
    app.sim_json(Method::DELETE, "/_sim/faults", None).await;

    // Budget headers are checked before anything is sent.
    let count = sim_count(&app, "users.me").await;
    let (status, headers, _) = sent(me().header("Tokenkeeper-Retries", "many")).await;
    assert_eq!(status, 400);
    assert_eq!(
        header(&headers, "tokenkeeper-error"),
        Some("invalid_request")
    );
    assert_eq!(sim_count(&app, "users.me").await, count);

    assert_untouched(&app, &id, &grant).await;
}

async fn server_errors_are_retried_for_reads_only_and_a_dropped_connection_is_the_proxys_own_error(
    backend: Backend,
) {
    let app = TestApp::start(backend).await;
    let (id, _) = app.connect("user-1").await;
    let grant = grant_of(&app, &id).await;

    // Two 500s on a GET: retried twice (the default), then it succeeds.
    app.sim_fault(json!({"endpoint": "users.me", "kind": "status", "status": 500, "count": 2}))
        .await;
    let count = sim_count(&app, "users.me").await;
    let (status, _, body) = sent(proxy(&app, &id, Method::GET, "/v1/users/me")).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(sim_count(&app, "users.me").await, count + 3);

    // On a POST, a 500 or a 503 goes back untouched: Notion may have applied the write.
    for (fault, code) in [(500, "internal_server_error"), (503, "service_unavailable")] {
        app.sim_fault(json!({"endpoint": "search", "kind": "status", "status": fault, "count": 1}))
            .await;
        let count = sim_count(&app, "search").await;
        let (status, headers, body) =
            sent(proxy(&app, &id, Method::POST, "/v1/search").json(&json!({}))).await;
        assert_eq!(status, fault);
        assert_eq!(json_of(&body)["code"], code);
        assert_eq!(header(&headers, "tokenkeeper-error"), None);
        assert_eq!(
            sim_count(&app, "search").await,
            count + 1,
            "a write is never retried"
        );
    }

    // A connection Notion drops without answering: retried on a GET, then our own 502.
    app.sim_fault(json!({"endpoint": "users.me", "kind": "drop"}))
        .await;
    let count = sim_count(&app, "users.me").await;
    let (status, headers, body) = sent(proxy(&app, &id, Method::GET, "/v1/users/me")).await;
    assert_eq!(status, 502);
    assert_eq!(
        header(&headers, "tokenkeeper-error"),
        Some("upstream_unreachable")
    );
    assert_eq!(json_of(&body)["error"]["code"], "upstream_unreachable");
    assert_eq!(sim_count(&app, "users.me").await, count + 3);
    // On a POST it is not retried.
    app.sim_fault(json!({"endpoint": "search", "kind": "drop"}))
        .await;
    let count = sim_count(&app, "search").await;
    let (status, headers, _) =
        sent(proxy(&app, &id, Method::POST, "/v1/search").json(&json!({}))).await;
    assert_eq!(status, 502);
    assert_eq!(
        header(&headers, "tokenkeeper-error"),
        Some("upstream_unreachable")
    );
    assert_eq!(sim_count(&app, "search").await, count + 1);
    app.sim_json(Method::DELETE, "/_sim/faults", None).await;

    assert_untouched(&app, &id, &grant).await;
}

async fn forbidden_and_not_found_pass_through_unchanged_and_leave_the_connection_active(
    backend: Backend,
) {
    let app = TestApp::start(backend).await;
    let (id, _) = app.connect("user-1").await;
    let grant = grant_of(&app, &id).await;

    // What an edge in front of Notion may send: not JSON. It comes back byte for byte.
    let html = "<html><body><h1>403 Forbidden</h1>\n<p>cf-ray: 8a1b</p></body></html>";
    app.sim_fault(
        json!({"endpoint": "search", "kind": "non_json", "status": 403, "count": 1,
        "content_type": "text/html", "body": html}),
    )
    .await;
    let (status, headers, body) =
        sent(proxy(&app, &id, Method::POST, "/v1/search").json(&json!({}))).await;
    assert_eq!(status, 403);
    assert_eq!(header(&headers, "content-type"), Some("text/html"));
    assert_eq!(body, Bytes::from(html));
    assert_eq!(header(&headers, "tokenkeeper-error"), None);

    let text = "404 page not found, says a plain-text edge";
    app.sim_fault(json!({"endpoint": "users.me", "kind": "non_json", "status": 404, "count": 1, "body": text}))
        .await;
    let (status, _, body) = sent(proxy(&app, &id, Method::GET, "/v1/users/me")).await;
    assert_eq!(status, 404);
    assert_eq!(body, Bytes::from(text));

    // Notion's own answers: a page not shared with the connection, a missing capability.
    let workspaces = app.sim_json(Method::GET, "/_sim/workspaces", None).await;
    let unshared = workspaces["workspaces"][0]["unshared_page_ids"][0]
        .as_str()
        .expect("the sim's workspace has an unshared page")
        .to_owned();
    let (status, headers, body) = sent(proxy(
        &app,
        &id,
        Method::GET,
        &format!("/v1/pages/{unshared}"),
    ))
    .await;
    assert_eq!(status, 404);
    let error = json_of(&body);
    assert_eq!(error["code"], "object_not_found");
    assert_eq!(
        header(&headers, "x-notion-request-id"),
        error["request_id"].as_str(),
        "Notion's headers come with Notion's body"
    );
    app.sim
        .update_config(|c| c.capabilities = vec!["read_user_with_email".into()]);
    let (status, _, body) =
        sent(proxy(&app, &id, Method::POST, "/v1/search").json(&json!({}))).await;
    assert_eq!(status, 403);
    assert_eq!(json_of(&body)["code"], "restricted_resource");

    assert_untouched(&app, &id, &grant).await;
}

async fn the_proxy_sets_the_token_and_a_default_version_and_marks_its_own_errors(backend: Backend) {
    let app = TestApp::start(backend).await;
    let (id, _) = app.connect("user-1").await;
    let grant = grant_of(&app, &id).await;
    let (_, token) = app
        .get_json(&format!("/v1/connections/{id}/access-token"))
        .await;
    let token = token["access_token"].as_str().unwrap().to_owned();

    // No Notion-Version from the caller: the sim would answer 400 missing_version, so a 200
    // proves the default was set.
    let (status, headers, body) = sent(proxy(&app, &id, Method::GET, "/v1/users/me")).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(
        header(&headers, "tokenkeeper-grant-id"),
        Some(grant.as_str())
    );
    // Notion saw the connection's token, not our API key.
    let log = app
        .sim_json(Method::GET, "/_sim/requests?limit=1", None)
        .await;
    let seen = log["requests"][0]["token_fingerprint"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(seen, notion_sim::fingerprint(&token));
    assert_ne!(seen, notion_sim::fingerprint(ADMIN_KEY));
    // A caller's Notion-Version passes (the sim accepts older versions).
    let (status, _, _) =
        sent(proxy(&app, &id, Method::GET, "/v1/users/me").header("Notion-Version", "2022-06-28"))
            .await;
    assert_eq!(status, 200);

    // The proxy's own errors: our envelope and a Tokenkeeper-Error header, Notion not called.
    let count = sim_count(&app, "users.me").await;
    let unknown = tokenkeeper::ids::ConnectionId::generate();
    let (status, headers, body) =
        sent(proxy(&app, unknown.as_str(), Method::GET, "/v1/users/me")).await;
    assert_eq!(status, 404);
    assert_eq!(header(&headers, "tokenkeeper-error"), Some("not_found"));
    assert_eq!(json_of(&body)["error"]["code"], "not_found");
    let (status, headers, body) =
        sent(proxy(&app, "not-a-connection", Method::GET, "/v1/users/me")).await;
    assert_eq!(status, 400);
    assert_eq!(
        header(&headers, "tokenkeeper-error"),
        Some("invalid_request")
    );
    assert_eq!(json_of(&body)["error"]["code"], "invalid_request");
    // A wrong API key must not look like Notion's 401.
    let (status, headers, _) = sent(
        app.http
            .get(format!("{}/v1/proxy/{id}/v1/users/me", app.url))
            .bearer_auth("not-our-key"),
    )
    .await;
    assert_eq!(status, 401);
    assert_eq!(header(&headers, "tokenkeeper-error"), Some("unauthorized"));
    assert_eq!(sim_count(&app, "users.me").await, count);

    // A revoked connection is answered without calling Notion.
    let (status, body) = {
        let r = app
            .api(Method::DELETE, &format!("/v1/connections/{id}"))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    };
    assert_eq!(status, 200, "{body}");
    let count = sim_count(&app, "users.me").await;
    let (status, headers, _) = sent(proxy(&app, &id, Method::GET, "/v1/users/me")).await;
    assert_eq!(status, 410);
    assert_eq!(
        header(&headers, "tokenkeeper-error"),
        Some("connection_revoked")
    );
    assert_eq!(sim_count(&app, "users.me").await, count);
}

// A Notion of the test's own: echoes what arrived, streams large answers, mints tokens.

const BOT: &str = "bot-upstream";
const MIB: usize = 1024 * 1024;
const CHUNK: usize = 64 * 1024;

struct Upstream {
    url: String,
    state: Arc<UpstreamState>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

#[derive(Default)]
struct UpstreamState {
    /// The one access token accepted; anything else gets Notion's 401.
    valid_token: Mutex<String>,
    /// Bytes of the current request body received so far.
    received: tokio::sync::watch::Sender<usize>,
    /// Lets `/v1/download` send the rest of its body.
    release: tokio::sync::Notify,
    api_requests: AtomicU64,
    token_requests: AtomicU64,
}

/// A byte of a body whose content depends on its position, so that a lost, repeated or
/// reordered chunk shows.
fn pattern(i: usize) -> u8 {
    (i % 251) as u8
}

fn checksum(bytes: &[u8], offset: usize) -> bool {
    bytes
        .iter()
        .enumerate()
        .all(|(i, b)| *b == pattern(offset + i))
}

impl Upstream {
    async fn start() -> Upstream {
        let state = Arc::new(UpstreamState::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let app = axum::Router::new()
            .fallback(upstream)
            .with_state(state.clone());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await;
        });
        Upstream {
            url,
            state,
            _stop: stop,
        }
    }

    fn accept_only(&self, token: &str) {
        *self.state.valid_token.lock().unwrap() = token.to_owned();
    }

    fn api_requests(&self) -> u64 {
        self.state.api_requests.load(Ordering::SeqCst)
    }

    fn token_requests(&self) -> u64 {
        self.state.token_requests.load(Ordering::SeqCst)
    }
}

async fn upstream(State(state): State<Arc<UpstreamState>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    // Read the whole body, counting as it arrives, whatever the answer will be.
    let mut stream = body.into_data_stream();
    let mut size = 0usize;
    let mut intact = true;
    let mut kept = Vec::new();
    state.received.send_replace(0);
    while let Some(chunk) = stream.next().await {
        let Ok(chunk) = chunk else {
            return (axum::http::StatusCode::BAD_REQUEST, "the body broke off").into_response();
        };
        intact &= checksum(&chunk, size);
        size += chunk.len();
        if parts.uri.path() == "/v1/oauth/token" {
            kept.extend_from_slice(&chunk);
        }
        state.received.send_replace(size);
    }

    if parts.uri.path() == "/v1/oauth/token" {
        let n = state.token_requests.fetch_add(1, Ordering::SeqCst) + 1;
        let request: Value = serde_json::from_slice(&kept).unwrap_or(Value::Null);
        assert_eq!(request["grant_type"], "refresh_token");
        let access = format!("ntn_upstream_fresh_{n}");
        *state.valid_token.lock().unwrap() = access.clone();
        return axum::Json(json!({
            "access_token": access, "token_type": "bearer", "refresh_token": format!("nrt_upstream_fresh_{n}"),
            "bot_id": BOT, "workspace_id": format!("ws-{BOT}"), "workspace_name": null, "workspace_icon": null,
            "owner": {"type": "workspace", "workspace": true}, "duplicated_template_id": null,
        }))
        .into_response();
    }

    state.api_requests.fetch_add(1, Ordering::SeqCst);
    let bearer = parts
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    if bearer != format!("Bearer {}", state.valid_token.lock().unwrap()) {
        let mut response = axum::Json(json!({
            "object": "error", "status": 401, "code": "unauthorized", "message": "API token is invalid.",
            "request_id": "upstream-401",
        }))
        .into_response();
        *response.status_mut() = axum::http::StatusCode::UNAUTHORIZED;
        return response;
    }

    if parts.uri.path() == "/v1/download" {
        // The first chunk, then nothing until the client says it has it (bounded).
        let (tx, rx) = futures::channel::mpsc::channel::<Result<Bytes, std::io::Error>>(2);
        let state = state.clone();
        tokio::spawn(async move {
            let mut tx = tx;
            let chunk = |n: usize| {
                Bytes::from(
                    (n * CHUNK..(n + 1) * CHUNK)
                        .map(pattern)
                        .collect::<Vec<u8>>(),
                )
            };
            use futures::SinkExt;
            if tx.send(Ok(chunk(0))).await.is_err() {
                return;
            }
            if tokio::time::timeout(Duration::from_secs(10), state.release.notified())
                .await
                .is_err()
            {
                let _ = tx
                    .send(Err(std::io::Error::other(
                        "the client never got the first chunk",
                    )))
                    .await;
                return;
            }
            for n in 1..(8 * MIB / CHUNK) {
                if tx.send(Ok(chunk(n))).await.is_err() {
                    return;
                }
            }
        });
        let mut response = Response::new(Body::from_stream(rx));
        response
            .headers_mut()
            .insert("content-type", "application/octet-stream".parse().unwrap());
        return response;
    }

    let mut headers = serde_json::Map::new();
    for (name, value) in &parts.headers {
        let values = headers.entry(name.as_str()).or_insert_with(|| json!([]));
        values
            .as_array_mut()
            .unwrap()
            .push(json!(value.to_str().unwrap_or("<binary>")));
    }
    let mut response = axum::Json(json!({
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "headers": headers,
        "body_len": size,
        "body_intact": intact,
    }))
    .into_response();
    response
        .headers_mut()
        .insert("x-notion-request-id", "upstream-echo".parse().unwrap());
    response
        .headers_mut()
        .insert("x-upstream-extra", "kept".parse().unwrap());
    response
}

/// A TestApp whose Notion is `upstream`, with one connection on a token `upstream` accepts.
async fn app_on(backend: Backend, upstream: &Upstream) -> (TestApp, String, String) {
    let app = TestApp::with(
        backend,
        Options {
            notion_base_url: Some(upstream.url.clone()),
            ..Options::default()
        },
    )
    .await;
    let pair = db::minted(BOT, "upstream", &app.db.clock);
    upstream.accept_only(pair.access_token.expose_secret());
    let outcome = app
        .db
        .store
        .record_authorization(db::connect("user-1", pair))
        .await
        .unwrap();
    let id = outcome.connection.id.to_string();
    let grant = outcome.grant_id.to_string();
    (app, id, grant)
}

/// A body of `len` pattern bytes.
fn pattern_body(len: usize) -> Vec<u8> {
    (0..len).map(pattern).collect()
}

async fn requests_and_answers_pass_through_unchanged_except_for_the_credentials(backend: Backend) {
    let upstream = Upstream::start().await;
    let (app, id, grant) = app_on(backend, &upstream).await;
    let token = upstream.state.valid_token.lock().unwrap().clone();

    let (status, headers, body) = sent(
        proxy(
            &app,
            &id,
            Method::GET,
            "/v1/echo/a%20b/c%2Fd?filter=x%3Dy&page_size=2&flag",
        )
        .header("Notion-Version", "2022-06-28")
        .header("X-Custom", "hello")
        .header("Accept", "application/json")
        .header("Connection", "x-hop-secret")
        .header("X-Hop-Secret", "only for tokenkeeper")
        .header("Tokenkeeper-Retries", "1"),
    )
    .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let seen = json_of(&body);
    assert_eq!(seen["method"], "GET");
    assert_eq!(
        seen["path"], "/v1/echo/a%20b/c%2Fd",
        "the path as given, still encoded"
    );
    assert_eq!(seen["query"], "filter=x%3Dy&page_size=2&flag");
    let sent_headers = &seen["headers"];
    assert_eq!(
        sent_headers["authorization"],
        json!([format!("Bearer {token}")])
    );
    assert_eq!(sent_headers["notion-version"], json!(["2022-06-28"]));
    assert_eq!(sent_headers["x-custom"], json!(["hello"]));
    assert_eq!(sent_headers["accept"], json!(["application/json"]));
    assert!(
        sent_headers.get("x-hop-secret").is_none(),
        "a header named in Connection stays here: {seen}"
    );
    assert!(
        !sent_headers
            .as_object()
            .unwrap()
            .keys()
            .any(|k| k.starts_with("tokenkeeper-")),
        "{seen}"
    );
    assert!(
        !body
            .windows(ADMIN_KEY.len())
            .any(|w| w == ADMIN_KEY.as_bytes()),
        "the API key never leaves"
    );
    // The answer: Notion's headers, and the grant used.
    assert_eq!(header(&headers, "x-upstream-extra"), Some("kept"));
    assert_eq!(
        header(&headers, "x-notion-request-id"),
        Some("upstream-echo")
    );
    assert_eq!(
        header(&headers, "tokenkeeper-grant-id"),
        Some(grant.as_str())
    );

    // A write without Notion-Version gets the configured default; its body arrives whole.
    let payload = json!({"parent": {"page_id": "x"}, "properties": {}});
    let (status, _, body) =
        sent(proxy(&app, &id, Method::PATCH, "/v1/pages/abc").json(&payload)).await;
    assert_eq!(status, 200);
    let seen = json_of(&body);
    assert_eq!(seen["method"], "PATCH");
    assert_eq!(seen["headers"]["notion-version"], json!(["2026-03-11"]));
    assert_eq!(seen["headers"]["content-type"], json!(["application/json"]));
    assert_eq!(
        seen["body_len"],
        serde_json::to_vec(&payload).unwrap().len()
    );

    // `/v1/proxy/{id}` alone is Notion's root.
    let (status, _, body) = sent(proxy(&app, &id, Method::DELETE, "")).await;
    assert_eq!(status, 200);
    assert_eq!(json_of(&body)["path"], "/");
    assert_eq!(json_of(&body)["method"], "DELETE");
}

async fn large_bodies_stream_both_ways_without_being_held_whole(backend: Backend) {
    let upstream = Upstream::start().await;
    let (app, id, _) = app_on(backend, &upstream).await;

    // Up: 8 MiB whose last chunk is only produced once the upstream has 2 MiB of it, which
    // cannot happen if the proxy waits for the whole body.
    let total = 8 * MIB;
    let (mut tx, rx) = futures::channel::mpsc::channel::<Result<Bytes, std::io::Error>>(2);
    let mut received = upstream.state.received.subscribe();
    let producer = tokio::spawn(async move {
        use futures::SinkExt;
        let chunks = total / CHUNK;
        for n in 0..chunks {
            if n == chunks - 1 {
                let waited = tokio::time::timeout(
                    Duration::from_secs(10),
                    received.wait_for(|r| *r >= 2 * MIB),
                )
                .await
                .is_ok_and(|r| r.is_ok());
                if !waited {
                    let _ = tx
                        .send(Err(std::io::Error::other("upstream never saw 2 MiB")))
                        .await;
                    return false;
                }
            }
            let chunk = Bytes::from(
                (n * CHUNK..(n + 1) * CHUNK)
                    .map(pattern)
                    .collect::<Vec<u8>>(),
            );
            if tx.send(Ok(chunk)).await.is_err() {
                return false;
            }
        }
        true
    });
    let response = tokio::time::timeout(
        Duration::from_secs(30),
        sent(proxy(&app, &id, Method::POST, "/v1/upload").body(reqwest::Body::wrap_stream(rx))),
    )
    .await
    .expect("the upload finishes");
    assert!(
        producer.await.unwrap(),
        "the upstream had 2 MiB before the last chunk was sent: the body streams"
    );
    let (status, _, body) = response;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let seen = json_of(&body);
    assert_eq!(seen["body_len"], total);
    assert_eq!(seen["body_intact"], true);

    // Down: the upstream sends its first chunk and waits for us to have it before the rest.
    let response = proxy(&app, &id, Method::GET, "/v1/download")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut stream = response.bytes_stream();
    let mut got = Vec::new();
    while got.len() < CHUNK {
        let chunk = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("the first chunk arrives while the upstream holds the rest: the answer streams")
            .expect("more body")
            .expect("no error");
        got.extend_from_slice(&chunk);
    }
    upstream.state.release.notify_one();
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(30), stream.next())
        .await
        .expect("the rest arrives")
    {
        got.extend_from_slice(&chunk.expect("the body is complete"));
    }
    assert_eq!(got.len(), 8 * MIB);
    assert!(checksum(&got, 0), "the bytes arrive unchanged and in order");
}

async fn a_body_within_the_replay_limit_is_sent_again_after_a_401_and_a_larger_one_is_not(
    backend: Backend,
) {
    let upstream = Upstream::start().await;
    let (app, id, grant) = app_on(backend, &upstream).await;

    // The token dies; a 512 KiB write gets a 401, a refresh, and is sent again whole.
    upstream.accept_only("a token nobody has");
    let small = 512 * 1024;
    let (status, headers, body) =
        sent(proxy(&app, &id, Method::POST, "/v1/echo").body(pattern_body(small))).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let seen = json_of(&body);
    assert_eq!(
        (seen["body_len"].as_u64(), seen["body_intact"].as_bool()),
        (Some(small as u64), Some(true))
    );
    assert_eq!(upstream.api_requests(), 2, "the 401, then the retry");
    assert_eq!(upstream.token_requests(), 1);
    let refreshed = grant_of(&app, &id).await;
    assert_ne!(refreshed, grant);
    assert_eq!(
        header(&headers, "tokenkeeper-grant-id"),
        Some(refreshed.as_str())
    );

    // Above the limit (1 MiB) the body is gone once sent: Notion's 401 comes back as it was.
    upstream.accept_only("another token nobody has");
    let large = 2 * MIB;
    let (status, headers, body) =
        sent(proxy(&app, &id, Method::POST, "/v1/echo").body(pattern_body(large))).await;
    assert_eq!(status, 401);
    assert_eq!(
        header(&headers, "tokenkeeper-error"),
        None,
        "Notion's 401, not ours"
    );
    assert_eq!(json_of(&body)["code"], "unauthorized");
    assert_eq!(json_of(&body)["request_id"], "upstream-401");
    assert_eq!(upstream.api_requests(), 3, "not retried");
    assert_eq!(
        upstream.token_requests(),
        1,
        "no refresh for a request that cannot be retried"
    );
    let connection = app.connection(&id).await;
    assert_eq!(connection["status"], "active");
    assert_eq!(connection["grant_id"], refreshed.as_str());
}
