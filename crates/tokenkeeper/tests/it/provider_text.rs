//! Provider text is data, not trusted (issue 11 §6).
//!
//! The test plays a hostile "Notion" (or whatever answers at a misconfigured base URL): a small
//! server that echoes everything it received, request headers and body, into its error bodies,
//! its `error_description`, `message`, `request_id` and even `error` itself. tokenkeeper runs as
//! a process at `TOKENKEEPER_LOG=trace` (with every HTTP library asked for `trace` too) while a
//! refresh, a code exchange and a revocation meet that server. Then the captured log, the
//! database at rest and every answer are searched for the tokens, the code, the client secret
//! and the Basic credential: none may appear.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde_json::{json, Value};

use crate::both_backends;
use crate::support::app::{Browser, Options, TestApp, ADMIN_KEY};
use crate::support::db::{self, Backend};
use tokenkeeper::ids::{AccessToken, RefreshToken};

both_backends!(
    a_provider_that_echoes_what_it_received_leaks_no_secret_into_logs_storage_or_answers
);

/// How the hostile provider answers, switched by the test between steps.
#[derive(Clone, Copy)]
#[repr(u8)]
enum Mode {
    /// 400 with the echo as `error` itself (no OAuth code at all), `error_description` and
    /// `request_id`.
    EchoAsCode,
    /// 429 with `Retry-After: 1`, the echo as `message` and the secret as `request_id`.
    Throttled,
    /// 500 with the echo as a plain-text body.
    Failing,
    /// 400 `invalid_grant` in both of Notion's shapes, the echo as `error_description` and
    /// `message`, the secret as `request_id`.
    InvalidGrant,
}

#[derive(Clone)]
struct Hostile {
    mode: Arc<AtomicU8>,
    /// Every request, as echoed: proof that the secrets were sent to it.
    received: Arc<Mutex<Vec<String>>>,
}

impl Hostile {
    fn set(&self, mode: Mode) {
        self.mode.store(mode as u8, Ordering::SeqCst);
    }
}

async fn echo(
    axum::extract::State(hostile): axum::extract::State<Hostile>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut seen = format!("{method} {uri}\n");
    for (name, value) in &headers {
        seen.push_str(&format!("{name}: {}\n", value.to_str().unwrap_or("?")));
    }
    // A hostile provider decodes what it can, too.
    if let Some(basic) = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
    {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(basic)
            .unwrap_or_default();
        seen.push_str(&format!(
            "decoded credentials: {}\n",
            String::from_utf8_lossy(&decoded)
        ));
    }
    let text = String::from_utf8_lossy(&body).into_owned();
    seen.push_str(&text);
    hostile.received.lock().unwrap().push(seen.clone());
    // The secret the request carried, as the request id.
    let sent: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    let secret = ["refresh_token", "code", "token"]
        .iter()
        .find_map(|k| sent.get(k).and_then(Value::as_str))
        .unwrap_or_default()
        .to_owned();
    let mode = hostile.mode.load(Ordering::SeqCst);
    if mode == Mode::EchoAsCode as u8 {
        (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"error": seen, "error_description": seen, "request_id": seen})),
        )
            .into_response()
    } else if mode == Mode::Throttled as u8 {
        (
            StatusCode::TOO_MANY_REQUESTS,
            [("retry-after", "1")],
            axum::Json(json!({"object": "error", "status": 429, "code": "rate_limited", "message": seen, "request_id": secret})),
        )
            .into_response()
    } else if mode == Mode::Failing as u8 {
        (StatusCode::INTERNAL_SERVER_ERROR, seen).into_response()
    } else {
        (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({
                "object": "error", "status": 400, "code": "invalid_grant", "message": seen,
                "error": "invalid_grant", "error_description": seen, "request_id": secret,
            })),
        )
            .into_response()
    }
}

async fn hostile_provider() -> (String, Hostile) {
    let hostile = Hostile {
        mode: Arc::new(AtomicU8::new(Mode::InvalidGrant as u8)),
        received: Arc::default(),
    };
    let app = axum::Router::new()
        .fallback(echo)
        .with_state(hostile.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, hostile)
}

async fn a_provider_that_echoes_what_it_received_leaks_no_secret_into_logs_storage_or_answers(
    backend: Backend,
) {
    let (provider_url, hostile) = hostile_provider().await;
    let mut options = Options {
        refresh_budget: Duration::from_millis(1500),
        notion_base_url: Some(provider_url.clone()),
        ..Options::default()
    };
    let client_secret = format!("tk-client-{}", tokenkeeper::ids::random_token(18));
    options.sim.client_secret = client_secret.clone();
    let client_id = options.sim.client_id.clone();
    let app = TestApp::with(backend, options).await;
    let basic =
        base64::engine::general_purpose::STANDARD.encode(format!("{client_id}:{client_secret}"));

    // Tokens of realistic shapes; the refresh token deliberately without Notion's prefix, so
    // that only what tokenkeeper knows it sent, and the shape of a long random run, give it away.
    let access = format!("ntn_{}", tokenkeeper::ids::random_token(30));
    let refresh = tokenkeeper::ids::random_token(30);
    let code = uuid::Uuid::new_v4().to_string();
    // Failure messages say where a secret went without printing it: test output is a log too.
    let secrets = [
        ("<the refresh token>", refresh.clone()),
        ("<the code>", code.clone()),
        ("<the access token>", access.clone()),
        ("<the Basic credential>", basic.clone()),
        ("<the client secret>", client_secret.clone()),
    ];
    let hide = |text: &str| {
        secrets.iter().fold(text.to_owned(), |t, (name, secret)| {
            t.replace(secret.as_str(), name)
        })
    };
    let clock = app.db.clock.clone();
    let mut pair = db::minted("bot-echo", "echo", &clock);
    pair.access_token = AccessToken::new(access.clone());
    pair.refresh_token = Some(RefreshToken::new(refresh.clone()));
    let id = app
        .db
        .store
        .record_authorization(db::connect("user-1", pair))
        .await
        .unwrap()
        .connection
        .id
        .to_string();
    let grant = app.current_grant(&id).await;

    // tokenkeeper as users run it, talking to the hostile provider, asked for everything.
    let mut peer = app
        .spawn_logged_peer(&[
            ("TOKENKEEPER_NOTION_BASE_URL", provider_url.as_str()),
            (
                "TOKENKEEPER_LOG",
                "trace,hyper=trace,hyper_util=trace,reqwest=trace,h2=trace,rustls=trace,\
                 tokio_postgres=trace,hyper::proto::h1=trace",
            ),
        ])
        .await;
    let http = reqwest::Client::new();
    let mut answers: Vec<String> = Vec::new();
    let refresh_once = || async {
        let r = http
            .post(format!("{}/v1/connections/{id}/refresh", peer.url))
            .bearer_auth(ADMIN_KEY)
            .json(&json!({"if_grant": grant}))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    };

    // Refreshes meeting each kind of hostile answer.
    hostile.set(Mode::EchoAsCode);
    let (status, body) = refresh_once().await;
    assert_eq!(status, 502, "{}", hide(&body.to_string()));
    let rejected: Value = serde_json::from_str(&body).unwrap();
    answers.push(body);
    hostile.set(Mode::Throttled);
    let (status, body) = refresh_once().await;
    assert_eq!(status, 503, "{}", hide(&body.to_string()));
    answers.push(body);
    hostile.set(Mode::Failing);
    let (status, body) = refresh_once().await;
    assert_eq!(status, 503, "{}", hide(&body.to_string()));
    answers.push(body);
    hostile.set(Mode::InvalidGrant);
    let (status, body) = refresh_once().await;
    assert_eq!(status, 424, "{}", hide(&body.to_string()));
    let needs_reauth: Value = serde_json::from_str(&body).unwrap();
    answers.push(body);

    // A code exchange meeting it, in a browser that followed the link on this process.
    let (status, session) = {
        let r = http
            .post(format!("{}/v1/connect-sessions", peer.url))
            .bearer_auth(ADMIN_KEY)
            .json(&json!({"provider": "notion", "end_user_id": "user-2", "return_to": format!("{}/done", app.url)}))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    };
    assert_eq!(status, 201, "{}", hide(&session.to_string()));
    let link = session["url"]
        .as_str()
        .unwrap()
        .replacen(&app.url, &peer.url, 1);
    let browser = Browser::new();
    let authorize = url::Url::parse(&browser.redirect(&link).await).unwrap();
    let state = authorize
        .query_pairs()
        .find(|(k, _)| k == "state")
        .unwrap()
        .1
        .into_owned();
    let mut callback = url::Url::parse(&format!("{}/oauth/callback", peer.url)).unwrap();
    callback
        .query_pairs_mut()
        .append_pair("code", &code)
        .append_pair("state", &state);
    let r = browser.get(callback.as_str()).await;
    assert_eq!(r.status(), 502);
    let page = r.text().await.unwrap();
    assert!(
        page.contains("invalid_grant"),
        "{}",
        hide(&page.to_string())
    );
    answers.push(page);

    // A revocation meeting it.
    let r = http
        .delete(format!("{}/v1/connections/{id}", peer.url))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body = r.text().await.unwrap();
    assert!(
        body.contains("\"upstream_revoked\":false"),
        "{}",
        hide(&body.to_string())
    );
    answers.push(body);

    // What the app and an admin can read afterwards.
    for path in [
        format!("/v1/connections/{id}"),
        format!("/v1/connections/{id}/grants"),
        format!("/v1/connections/{id}/events"),
    ] {
        let (status, body) = app.get_json(&path).await;
        assert_eq!(status, 200, "{}", hide(&body.to_string()));
        answers.push(body.to_string());
    }
    let events = answers.last().unwrap().clone();

    // The provider did receive every secret: the test exposed them.
    let received = hostile.received.lock().unwrap().join("\n");
    for (name, secret) in [
        ("the refresh token", refresh.as_str()),
        ("the code", code.as_str()),
        ("the access token", access.as_str()),
        ("the Basic credential", basic.as_str()),
        ("the client secret", client_secret.as_str()),
    ] {
        assert!(received.contains(secret), "{name} reached the provider");
    }

    peer.kill().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let log = without_colours(&peer.output.lock().unwrap());
    assert!(
        log.contains("code exchange failed"),
        "the log was captured:\n{}",
        hide(&log)
    );
    let at_rest = String::from_utf8_lossy(&app.db.bytes_at_rest().await).into_owned();
    for (name, secret) in [
        ("the refresh token", refresh.as_str()),
        ("the code", code.as_str()),
        ("the access token", access.as_str()),
        ("the Basic credential", basic.as_str()),
        ("the client secret", client_secret.as_str()),
    ] {
        for (place, text) in [("the log", &log), ("the database at rest", &at_rest)] {
            assert!(!text.contains(secret), "{name} is in {place}");
        }
        for answer in &answers {
            assert!(
                !answer.contains(secret),
                "{name} is in an answer: {}",
                hide(answer)
            );
        }
    }

    // The HTTP and database libraries were asked for `trace` and held at `info`; the rest of
    // the process did log at `trace`.
    let level_and_target = |line: &str| {
        let mut words = line.split_whitespace().skip(1);
        (
            words.next().unwrap_or("").to_owned(),
            words.next().unwrap_or("").to_owned(),
        )
    };
    let mut traced = false;
    for line in log.lines() {
        let (level, target) = level_and_target(line);
        let capped = tokenkeeper::logging::CAPPED_TARGETS
            .iter()
            .any(|t| target == format!("{t}:") || target.starts_with(&format!("{t}::")));
        assert!(
            !(capped && (level == "DEBUG" || level == "TRACE")),
            "a capped library logged below info: {line}"
        );
        traced |= level == "TRACE";
    }
    assert!(traced, "the process logged at trace:\n{}", hide(&log));

    // What the provider said is kept as data: its code when it is shaped like one, its text
    // scrubbed.
    assert_eq!(
        rejected["error"]["provider_code"],
        "unrecognized_error",
        "{}",
        hide(&rejected.to_string())
    );
    let diagnosis = &needs_reauth["error"]["diagnosis"];
    assert_eq!(
        diagnosis["code"],
        "invalid_grant",
        "{}",
        hide(&diagnosis.to_string())
    );
    assert!(
        diagnosis["message"]
            .as_str()
            .unwrap()
            .contains("[redacted]"),
        "the provider's text is kept, scrubbed: {}",
        hide(&diagnosis.to_string())
    );
    assert!(
        events.contains("refresh_failed") && events.contains("[redacted]"),
        "the provider's text reached the trail, scrubbed: {}",
        hide(&events)
    );
}

/// The log without its ANSI colour codes.
fn without_colours(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
