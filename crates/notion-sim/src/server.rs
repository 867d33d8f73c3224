//! Accepting connections and routing requests.
//!
//! Connections are served with hyper directly (not through a framework's `serve`) so that a
//! `drop` fault can close a TCP connection without writing any response: each connection task
//! races the connection against a per-connection signal, and dropping the connection future
//! closes the socket.
//!
//! Every simulated request goes through [`handle`]: count it, apply a fault, process it, log it,
//! wait at a hold and spend the configured latency, answer.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::Notify;

use crate::clock::{Moment, SimClock};
use crate::config::SimConfig;
use crate::endpoint::Endpoint;
use crate::faults::{FaultAction, FaultKind, FaultSpec, Faults};
use crate::hold::{Holds, HOLD_DEADLINE};
use crate::limits::RateLimiter;
use crate::observe::{LoggedRequest, RequestLog, Stats};
use crate::world::{Id, World};
use crate::{control, oauth, rest, token};

pub(crate) type Body = Full<Bytes>;

/// Requests larger than this are refused; nothing in the simulated API needs more.
const MAX_BODY: usize = 1 << 20;

/// Everything the request handlers share.
pub(crate) struct Shared {
    /// Swapped whole on update, so a request reads one consistent snapshot without holding a
    /// lock.
    config: Mutex<Arc<SimConfig>>,
    pub world: Mutex<World>,
    pub stats: Stats,
    pub log: RequestLog,
    pub faults: Faults,
    pub limits: RateLimiter,
    pub holds: Holds,
    /// Every time-dependent decision reads this, never `Instant::now()` or `Utc::now()`.
    pub clock: SimClock,
}

impl Shared {
    pub fn new(config: SimConfig, clock: SimClock) -> Shared {
        Shared {
            config: Mutex::new(Arc::new(config)),
            world: Mutex::new(World::default()),
            stats: Stats::default(),
            log: RequestLog::default(),
            faults: Faults::default(),
            limits: RateLimiter::default(),
            holds: Holds::default(),
            clock,
        }
    }

    pub fn config(&self) -> Arc<SimConfig> {
        self.config.lock().expect("config lock").clone()
    }

    pub fn set_config(&self, config: SimConfig) {
        *self.config.lock().expect("config lock") = Arc::new(config);
    }

    pub fn update_config(&self, f: impl FnOnce(&mut SimConfig)) {
        let mut slot = self.config.lock().expect("config lock");
        let mut config = SimConfig::clone(&slot);
        f(&mut config);
        *slot = Arc::new(config);
    }

    pub fn world(&self) -> std::sync::MutexGuard<'_, World> {
        self.world.lock().expect("world lock")
    }
}

/// Serves connections from `listener` until `shutdown` completes, then gives open connections
/// a moment to finish.
pub(crate) async fn run(
    listener: TcpListener,
    shared: Arc<Shared>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let graceful = GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new());
    tokio::pin!(shutdown);
    loop {
        let (stream, _peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Running out of file descriptors under load is transient: back off a little.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let drop_signal = Arc::new(Notify::new());
        let service = {
            let shared = shared.clone();
            let drop_signal = drop_signal.clone();
            hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                let drop_signal = drop_signal.clone();
                async move { Ok::<_, Infallible>(handle(shared, drop_signal, req).await) }
            })
        };
        let connection = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            tokio::select! {
                _ = connection => {}
                () = drop_signal.notified() => {}
            }
        });
    }
    drop(listener);
    // Held answers would keep their connections open past the grace period below.
    shared.holds.lift_all();
    let _ = tokio::time::timeout(Duration::from_secs(2), graceful.shutdown()).await;
    Ok(())
}

/// A simulated request after routing, with what its handler needs.
pub(crate) struct Call {
    pub endpoint: Endpoint,
    pub method: hyper::Method,
    pub headers: hyper::HeaderMap,
    pub query: Option<String>,
    /// The `{id}` of `/v1/pages/{id}`.
    pub path_id: Option<String>,
    pub body: Bytes,
    pub config: Arc<SimConfig>,
    pub request_id: String,
    /// The simulator's clock when processing started.
    pub now: Moment,
}

/// A handler's answer, with what the request log records about it.
pub(crate) struct Reply {
    pub response: Response<Body>,
    pub bot_id: Option<Id>,
    /// The token presented (bearer or body token), for the log's fingerprint.
    pub token: Option<String>,
    pub token_is_newest_live: Option<bool>,
    /// The grant type of a token request: it selects a grant-specific latency.
    pub grant_type: Option<&'static str>,
}

impl Reply {
    pub fn plain(response: Response<Body>) -> Reply {
        Reply {
            response,
            bot_id: None,
            token: None,
            token_is_newest_live: None,
            grant_type: None,
        }
    }
}

async fn handle(
    shared: Arc<Shared>,
    drop_signal: Arc<Notify>,
    req: Request<Incoming>,
) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_owned();
    let body = match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => Bytes::new(),
    };
    if path == "/_sim" || path.starts_with("/_sim/") {
        return control::handle(&shared, &parts.method, &path, parts.uri.query(), &body).await;
    }
    let config = shared.config();
    let request_id = token::uuid();
    let now = shared.clock.moment();
    let Some((endpoint, path_id)) = Endpoint::route(&parts.method, &path) else {
        shared.log.push(
            config.request_log_capacity,
            LoggedRequest {
                seq: 0,
                time: log_time(&shared.clock),
                endpoint: None,
                method: parts.method.to_string(),
                path,
                status: 400,
                bot_id: None,
                token_fingerprint: None,
                token_is_newest_live: None,
                grant_type: None,
            },
        );
        return notion_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_url",
            "Invalid request URL.",
            &request_id,
        );
    };
    shared.stats.count(endpoint);
    let mut call = Call {
        endpoint,
        path_id: path_id.map(str::to_owned),
        method: parts.method.clone(),
        headers: parts.headers,
        query: parts.uri.query().map(str::to_owned),
        body,
        config: config.clone(),
        request_id,
        now,
    };
    let peeked =
        (endpoint == Endpoint::OauthToken).then(|| oauth::count_token_request(&shared, &call));

    let reply = match shared.faults.fire(endpoint) {
        Some(FaultAction::Drop) => {
            drop_signal.notify_one();
            // The connection task drops this future together with the connection.
            std::future::pending::<()>().await;
            unreachable!("a dropped connection is never answered")
        }
        Some(FaultAction::Respond(spec)) => {
            let mut reply = Reply::plain(fault_response(&spec, &call.request_id));
            reply.grant_type = peeked.flatten();
            reply
        }
        Some(FaultAction::Delay(delay)) => {
            // Real time, even on a manual clock: the delay models a slow network, which a client
            // only notices on its own clock. Processing then sees the simulator's time after it.
            tokio::time::sleep(delay).await;
            call.now = shared.clock.moment();
            process(&shared, &call).await
        }
        None => process(&shared, &call).await,
    };

    let status = reply.response.status().as_u16();
    shared.log.push(
        config.request_log_capacity,
        LoggedRequest {
            seq: 0,
            time: log_time(&shared.clock),
            endpoint: Some(endpoint.name()),
            method: parts.method.to_string(),
            path,
            status,
            bot_id: reply.bot_id,
            token_fingerprint: reply.token.as_deref().map(token::fingerprint),
            token_is_newest_live: reply.token_is_newest_live,
            grant_type: reply.grant_type,
        },
    );
    // A hold and the latency are spent after the state changed and before the answer leaves: a
    // slow answer on the way back, the case that makes a token broker lose a rotated refresh
    // token. The hold comes first, so that a test learns of the arrival as soon as the request
    // was processed.
    if let Some(released) = shared.holds.catch(endpoint, reply.grant_type) {
        // Released, lifted, or past the deadline: answer in every case.
        let _ = tokio::time::timeout(HOLD_DEADLINE, released).await;
    }
    // Real time, even on a manual clock, for the reason given at the `delay` fault above.
    if let Some(latency) = config.latency_for(endpoint.name(), reply.grant_type) {
        tokio::time::sleep(latency).await;
    }
    reply.response
}

fn log_time(clock: &SimClock) -> String {
    clock
        .utc()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

async fn process(shared: &Shared, call: &Call) -> Reply {
    match call.endpoint {
        Endpoint::OauthAuthorize => oauth::authorize(shared, call),
        Endpoint::OauthToken => oauth::token(shared, call),
        Endpoint::OauthIntrospect => oauth::introspect(shared, call),
        Endpoint::OauthRevoke => oauth::revoke(shared, call),
        _ => rest::handle(shared, call),
    }
}

/// A JSON answer; `request_id` is added to the body and sent as `x-notion-request-id`.
pub(crate) fn json_response(
    status: StatusCode,
    mut body: Value,
    request_id: &str,
) -> Response<Body> {
    if let Value::Object(map) = &mut body {
        map.insert(
            "request_id".to_owned(),
            Value::String(request_id.to_owned()),
        );
    }
    let mut response = plain_json(status, &body);
    if let Ok(value) = HeaderValue::from_str(request_id) {
        response.headers_mut().insert("x-notion-request-id", value);
    }
    response
}

/// A JSON answer as is.
pub(crate) fn plain_json(status: StatusCode, body: &Value) -> Response<Body> {
    let bytes = serde_json::to_vec(body).expect("JSON values serialize");
    let mut response = Response::new(Full::new(Bytes::from(bytes)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    response
}

/// Notion's REST error envelope.
pub(crate) fn notion_error(
    status: StatusCode,
    code: &str,
    message: &str,
    request_id: &str,
) -> Response<Body> {
    json_response(
        status,
        json!({"object": "error", "status": status.as_u16(), "code": code, "message": message}),
        request_id,
    )
}

/// A 429 as Notion sends it: the header and `additional_data` agree.
pub(crate) fn rate_limited(reason: &str, retry_after: u64, request_id: &str) -> Response<Body> {
    let mut response = json_response(
        StatusCode::TOO_MANY_REQUESTS,
        json!({
            "object": "error",
            "status": 429,
            "code": "rate_limited",
            "message": "You have been rate limited. Please try again in a few minutes.",
            "additional_data": {
                "retry_after": retry_after.to_string(),
                "rate_limit_reason": reason,
            },
        }),
        request_id,
    );
    response
        .headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from(retry_after));
    response
}

/// The Notion error code that goes with a status.
fn code_for(status: u16) -> (&'static str, &'static str) {
    match status {
        400 => ("invalid_request", "This request is not supported."),
        401 => ("unauthorized", "API token is invalid."),
        403 => (
            "restricted_resource",
            "Insufficient permissions for this endpoint.",
        ),
        404 => ("object_not_found", "Could not find object."),
        409 => (
            "conflict_error",
            "Conflict occurred while saving. Please try again.",
        ),
        502 => ("bad_gateway", "Bad gateway."),
        503 => (
            "service_unavailable",
            "Notion is unavailable, please try again later.",
        ),
        504 => ("gateway_timeout", "Gateway timeout."),
        529 => (
            "service_overload",
            "Notion is overloaded, please try again later.",
        ),
        _ => ("internal_server_error", "Unexpected error occurred."),
    }
}

fn fault_response(spec: &FaultSpec, request_id: &str) -> Response<Body> {
    let status = spec.status.unwrap_or(match spec.kind {
        FaultKind::NonJson => 400,
        _ => 500,
    });
    let status_code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = if spec.kind == FaultKind::NonJson {
        let content_type = spec.content_type.as_deref().unwrap_or("text/plain");
        let reason = status_code.canonical_reason().unwrap_or("Error");
        let body = match &spec.body {
            Some(body) => body.clone(),
            None if content_type.contains("html") => format!(
                "<html><head><title>{status} {reason}</title></head><body><center><h1>{status} {reason}</h1></center></body></html>"
            ),
            None => format!("{status} {reason}"),
        };
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status_code;
        if let Ok(value) = HeaderValue::from_str(content_type) {
            response.headers_mut().insert(CONTENT_TYPE, value);
        }
        if let Ok(value) = HeaderValue::from_str(request_id) {
            response.headers_mut().insert("x-notion-request-id", value);
        }
        response
    } else if status == 429 {
        let reason = spec
            .rate_limit_reason
            .as_deref()
            .unwrap_or("public_api_request_rate_limit");
        return rate_limited(reason, spec.retry_after.unwrap_or(1), request_id);
    } else {
        let (code, message) = code_for(status);
        notion_error(status_code, code, message, request_id)
    };
    if let Some(seconds) = spec.retry_after {
        response
            .headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(seconds));
    }
    response
}
