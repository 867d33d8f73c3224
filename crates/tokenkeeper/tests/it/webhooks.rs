//! Webhooks (invariant 9): the app is told once per change, durably, signed the Standard
//! Webhooks way, and verified here by the official `standardwebhooks` package from npm (not by
//! our own code). The receiver is a real HTTP server in the test, which can fail, hang, and
//! count what it got.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use serde_json::{json, Value};
use tokenkeeper::webhooks::{WebhookSecret, WebhookSettings};

use crate::both_backends;
use crate::support::app::{Options, TestApp};
use crate::support::db::Backend;

both_backends!(
    every_event_type_is_delivered_once_signed_and_verified_by_standardwebhooks,
    a_receiver_that_fails_and_times_out_gets_the_event_later_with_the_same_id,
    a_delivery_cut_by_kill_9_is_made_again_with_the_same_id_after_a_restart,
    imported_connections_are_announced_once,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_processes_on_postgres_deliver_each_event_once_per_endpoint() {
    three_processes_deliver_each_event_once(Backend::Postgres).await
}

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Delivery {
    headers: HashMap<String, String>,
    body: String,
}

impl Delivery {
    fn id(&self) -> &str {
        &self.headers["webhook-id"]
    }

    fn event(&self) -> Value {
        serde_json::from_str(&self.body).unwrap()
    }
}

#[derive(Default)]
struct Behaviour {
    /// Answer 500 to this many requests first.
    fail: AtomicUsize,
    /// Then hold this many requests without answering (longer than any timeout).
    hang: AtomicUsize,
}

struct Receiver {
    url: String,
    got: Arc<Mutex<Vec<Delivery>>>,
    behaviour: Arc<Behaviour>,
    arrived: Arc<tokio::sync::Notify>,
}

type ReceiverState = (
    Arc<Mutex<Vec<Delivery>>>,
    Arc<Behaviour>,
    Arc<tokio::sync::Notify>,
);

async fn receive(
    State((got, behaviour, arrived)): State<ReceiverState>,
    headers: HeaderMap,
    body: String,
) -> StatusCode {
    let headers = headers
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
        .collect();
    got.lock().unwrap().push(Delivery { headers, body });
    arrived.notify_waiters();
    let take = |n: &AtomicUsize| {
        n.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| v.checked_sub(1))
            .is_ok()
    };
    if take(&behaviour.fail) {
        return StatusCode::INTERNAL_SERVER_ERROR;
    }
    if take(&behaviour.hang) {
        // Never answers in time: the sender's attempt times out, or the sender dies.
        tokio::time::sleep(Duration::from_secs(120)).await;
    }
    StatusCode::NO_CONTENT
}

impl Receiver {
    async fn start() -> Receiver {
        let got = Arc::new(Mutex::new(Vec::new()));
        let behaviour = Arc::new(Behaviour::default());
        let arrived = Arc::new(tokio::sync::Notify::new());
        let app = axum::Router::new()
            .route("/hooks", axum::routing::post(receive))
            .with_state((got.clone(), behaviour.clone(), arrived.clone()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hooks", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Receiver {
            url,
            got,
            behaviour,
            arrived,
        }
    }

    fn got(&self) -> Vec<Delivery> {
        self.got.lock().unwrap().clone()
    }

    /// Waits (at most 30 s) until `done` holds of what arrived.
    async fn until(&self, what: &str, done: impl Fn(&[Delivery]) -> bool) -> Vec<Delivery> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let notified = self.arrived.notified();
            let got = self.got();
            if done(&got) {
                return got;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "{what}: got {:#?}", got);
            let _ = tokio::time::timeout(left.min(Duration::from_millis(500)), notified).await;
        }
    }
}

fn types(got: &[Delivery]) -> Vec<String> {
    got.iter()
        .map(|d| d.event()["type"].as_str().unwrap().to_owned())
        .collect()
}

/// Verifies every delivery with the `standardwebhooks` package (tests/node).
fn verify_with_standardwebhooks(secret: &str, got: &[Delivery]) {
    let file = tempfile::NamedTempFile::new().unwrap();
    let deliveries: Vec<Value> = got
        .iter()
        .map(|d| json!({"headers": d.headers, "body": d.body}))
        .collect();
    std::fs::write(
        file.path(),
        serde_json::to_vec(&json!({"secret": secret, "deliveries": deliveries})).unwrap(),
    )
    .unwrap();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/node/verify-webhooks.mjs"
    );
    let out = std::process::Command::new("node")
        .arg(script)
        .arg(file.path())
        .output()
        .expect(
            "node runs (the webhook signatures are verified by the npm package; run `npm ci` \
             in tests/node, as scripts/test does)",
        );
    assert!(
        out.status.success(),
        "standardwebhooks refused a delivery: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn settings(receiver: &Receiver, secret: &str, timeout: Duration) -> WebhookSettings {
    WebhookSettings {
        endpoints: vec![url::Url::parse(&receiver.url).unwrap()],
        secret: WebhookSecret::parse(secret).unwrap(),
        timeout,
    }
}

async fn app_with_webhooks(backend: Backend, receiver: &Receiver, secret: &str) -> TestApp {
    TestApp::with(
        backend,
        Options {
            webhooks: Some(settings(receiver, secret, Duration::from_secs(1))),
            ..Options::default()
        },
    )
    .await
}

async fn every_event_type_is_delivered_once_signed_and_verified_by_standardwebhooks(
    backend: Backend,
) {
    let receiver = Receiver::start().await;
    let secret = WebhookSecret::generate();
    let app = app_with_webhooks(backend, &receiver, &secret).await;

    let (id, _) = app.connect("user-1").await;
    app.connect("user-1").await;
    // The user uninstalls at Notion; the next refresh finds the connection dead.
    let bot = app.connection(&id).await["bot_id"]
        .as_str()
        .unwrap()
        .to_owned();
    app.sim_json(
        reqwest::Method::POST,
        &format!("/_sim/bots/{bot}/revoke"),
        None,
    )
    .await;
    let grant = app.current_grant(&id).await;
    let (status, _) = app.refresh(&id, &grant).await;
    assert_eq!(status, 424);
    let landing = app.reconnect(&id).await;
    assert_eq!(landing.status, "reconnected");
    let r = app
        .api(reqwest::Method::DELETE, &format!("/v1/connections/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);

    let expected = [
        "connection.created",
        "connection.reauthorized",
        "connection.needs_reauth",
        "connection.reauthorized",
        "connection.recovered",
        "connection.revoked",
    ];
    let got = receiver
        .until("every event", |got| got.len() >= expected.len())
        .await;
    let mut in_order = got.clone();
    in_order.sort_by_key(|d| d.id().to_owned());
    assert_eq!(types(&in_order), expected, "one event per change, in order");
    let ids: std::collections::HashSet<_> = got.iter().map(Delivery::id).collect();
    assert_eq!(ids.len(), got.len(), "no event twice");
    for delivery in &got {
        let event = delivery.event();
        assert_eq!(event["data"]["connection"]["id"], id.as_str(), "{event}");
        assert!(event["timestamp"].is_string());
        assert!(!delivery.body.contains("ntn_") && !delivery.body.contains("nrt_"));
    }
    let needs_reauth = in_order[2].event();
    assert_eq!(
        needs_reauth["data"]["diagnosis"]["reason"],
        "refresh_rejected"
    );
    let link = needs_reauth["data"]["reconnect_url"].as_str().unwrap();
    assert!(link.starts_with(&format!("{}/connect/", app.url)), "{link}");
    let expires = needs_reauth["data"]["reconnect_url_expires_at"]
        .as_str()
        .unwrap();
    assert!(
        chrono::DateTime::parse_from_rfc3339(expires).is_ok(),
        "{expires}"
    );
    verify_with_standardwebhooks(&secret, &got);

    // Once every delivery is recorded as delivered, nothing can be sent again: each change was
    // told once.
    all_delivered(&app, expected.len()).await;
    assert_eq!(receiver.got().len(), expected.len());
}

/// Waits (at most 30 s) until `n` deliveries are recorded as delivered and none is pending.
async fn all_delivered(api: &crate::support::app::Api, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, delivered) = api
            .get_json("/v1/webhook-deliveries?status=delivered")
            .await;
        assert_eq!(status, 200, "{delivered}");
        let (_, pending) = api.get_json("/v1/webhook-deliveries?status=pending").await;
        let count = |v: &Value| v["data"].as_array().map_or(0, Vec::len);
        if count(&delivered) == n && count(&pending) == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{n} delivered: {delivered} pending: {pending}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn a_receiver_that_fails_and_times_out_gets_the_event_later_with_the_same_id(
    backend: Backend,
) {
    let receiver = Receiver::start().await;
    receiver.behaviour.fail.store(2, Ordering::SeqCst);
    receiver.behaviour.hang.store(1, Ordering::SeqCst);
    let secret = WebhookSecret::generate();
    let app = app_with_webhooks(backend, &receiver, &secret).await;
    app.connect("user-1").await;

    // Two 500s, one attempt that times out (1 s), then the delivery.
    let got = receiver.until("four attempts", |got| got.len() >= 4).await;
    let ids: std::collections::HashSet<_> = got.iter().map(Delivery::id).collect();
    assert_eq!(ids.len(), 1, "every attempt carries the same webhook-id");
    verify_with_standardwebhooks(&secret, &got);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, body) = app.get_json("/v1/webhook-deliveries").await;
        let delivery = &body["data"][0];
        if delivery["status"] == "delivered" {
            assert_eq!(delivery["attempts"], 4, "{delivery}");
            break;
        }
        assert!(Instant::now() < deadline, "{delivery}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Each attempt is counted, as Prometheus's parser reads /metrics.
    let scrape = crate::observability::scrape(&app, crate::support::app::ADMIN_KEY).await;
    let attempts = |outcome| {
        scrape.value_or_zero(
            "tokenkeeper_webhook_deliveries_total",
            &[("outcome", outcome)],
        )
    };
    assert_eq!((attempts("retry"), attempts("delivered")), (3.0, 1.0));

    // An operator can send it again: the same webhook-id once more.
    let (_, body) = app.get_json("/v1/webhook-deliveries").await;
    let job = body["data"][0]["id"].as_str().unwrap().to_owned();
    let (status, retried) = app
        .post_json(&format!("/v1/webhook-deliveries/{job}/retry"), json!({}))
        .await;
    assert_eq!(status, 200, "{retried}");
    let got = receiver.until("the retry", |got| got.len() >= 5).await;
    assert_eq!(got[4].id(), got[0].id());
    let (status, _) = app
        .post_json("/v1/webhook-deliveries/job_nope/retry", json!({}))
        .await;
    assert_eq!(status, 404);
}

async fn a_delivery_cut_by_kill_9_is_made_again_with_the_same_id_after_a_restart(backend: Backend) {
    let receiver = Receiver::start().await;
    // The first attempt is held open while its sender is killed.
    receiver.behaviour.hang.store(1, Ordering::SeqCst);
    let secret = WebhookSecret::generate();
    let app = TestApp::start(backend).await;
    let mut spec = app.broker_spec();
    spec.public_url = None;
    spec.provider_timeout = Duration::from_secs(1);
    spec.env = vec![
        ("TOKENKEEPER_WEBHOOK_URLS".into(), receiver.url.clone()),
        ("TOKENKEEPER_WEBHOOK_SECRET".into(), secret.clone()),
        ("TOKENKEEPER_WEBHOOK_TIMEOUT".into(), "2s".into()),
    ];
    let mut peer = spec.start().await;
    let (id, _) = peer.connect("user-1").await;
    let got = receiver
        .until("the first attempt", |got| !got.is_empty())
        .await;
    peer.kill().await;
    let first = got[0].id().to_owned();

    // A new process takes the delivery up once the dead one's claim runs out.
    let _peer = spec.start().await;
    let got = receiver
        .until("the attempt after the restart", |got| got.len() >= 2)
        .await;
    assert_eq!(got[1].id(), first, "the same webhook-id after the restart");
    assert_eq!(got[1].event()["data"]["connection"]["id"], id.as_str());
    verify_with_standardwebhooks(&secret, &got);
}

async fn three_processes_deliver_each_event_once(backend: Backend) {
    let receiver = Receiver::start().await;
    let secret = WebhookSecret::generate();
    let app = app_with_webhooks(backend, &receiver, &secret).await;
    let mut spec = app.broker_spec();
    spec.public_url = None;
    spec.env = vec![
        ("TOKENKEEPER_WEBHOOK_URLS".into(), receiver.url.clone()),
        ("TOKENKEEPER_WEBHOOK_SECRET".into(), secret.clone()),
    ];
    let peers = [spec.start().await, spec.start().await];
    let events = 12;
    for n in 0..events {
        // Each connect lands on one of the three processes.
        let user = format!("user-{n}");
        match n % 3 {
            0 => app.connect(&user).await,
            1 => peers[0].connect(&user).await,
            _ => peers[1].connect(&user).await,
        };
    }
    let got = receiver
        .until("every event", |got| got.len() >= events)
        .await;
    // Once every delivery is recorded as delivered, none can be sent again: count then.
    all_delivered(&app, events).await;
    let got_now = receiver.got();
    let mut per_id: HashMap<&str, usize> = HashMap::new();
    for d in &got_now {
        *per_id.entry(d.id()).or_default() += 1;
    }
    assert_eq!(per_id.len(), events, "{got:#?}");
    assert!(
        per_id.values().all(|n| *n == 1),
        "each event once per endpoint: {per_id:?}"
    );
}

/// An import makes connections too (invariant 9): each new one is announced, and one imported
/// with nothing alive is announced as needing its user; importing the same rows again changes
/// nothing and announces nothing.
async fn imported_connections_are_announced_once(backend: Backend) {
    let receiver = Receiver::start().await;
    let secret = WebhookSecret::generate();
    let app = app_with_webhooks(backend, &receiver, &secret).await;
    let body = json!({"connections": [
        {"bot_id": "bot-imported-live", "access_token": "ntn_imported_live_access", "refresh_token": "nrt_imported_live_refresh", "end_user_id": "u-1"},
        {"bot_id": "bot-imported-dead", "access_token": "ntn_imported_dead_access", "end_user_id": "u-2", "revoked_at": "2026-06-02T10:00:00Z"},
    ]});
    let (status, answer) = app.post_json("/v1/connections/import", body.clone()).await;
    assert_eq!(status, 200, "{answer}");
    let live = answer["results"][0]["connection_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let dead = answer["results"][1]["connection_id"]
        .as_str()
        .unwrap()
        .to_owned();

    let got = receiver.until("three events", |got| got.len() >= 3).await;
    let mut in_order = got.clone();
    in_order.sort_by_key(|d| d.id().to_owned());
    let told: Vec<(String, String)> = in_order
        .iter()
        .map(|d| {
            let event = d.event();
            (
                event["type"].as_str().unwrap().to_owned(),
                event["data"]["connection"]["id"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
            )
        })
        .collect();
    // Bots are imported in bot-id order; per connection, events come in the order of change.
    let of = |id: &str| -> Vec<&str> {
        told.iter()
            .filter(|(_, c)| c == id)
            .map(|(t, _)| t.as_str())
            .collect()
    };
    assert_eq!(of(&live), ["connection.created"], "{told:?}");
    assert_eq!(
        of(&dead),
        ["connection.created", "connection.needs_reauth"],
        "{told:?}"
    );
    for delivery in &in_order {
        let event = delivery.event();
        match event["type"].as_str().unwrap() {
            "connection.created" => assert_eq!(event["data"]["imported"], true, "{event}"),
            _ => assert_eq!(
                event["data"]["diagnosis"]["reason"], "imported_dead",
                "{event}"
            ),
        }
    }
    for delivery in &got {
        assert!(!delivery.body.contains("ntn_imported") && !delivery.body.contains("nrt_imported"));
    }
    verify_with_standardwebhooks(&secret, &got);
    all_delivered(&app, 3).await;

    let (status, again) = app.post_json("/v1/connections/import", body).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["results"][0]["result"], "already_imported", "{again}");
    let (_, deliveries) = app.get_json("/v1/webhook-deliveries").await;
    assert_eq!(
        deliveries["data"].as_array().unwrap().len(),
        3,
        "nothing new to tell"
    );
}
