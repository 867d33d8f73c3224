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
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Notify;

use crate::clock::SimClock;
use crate::endpoint::Endpoint;
use crate::exchange::{notion_error, rate_limited, Body, Call, Reply, Shared};
use crate::faults::{FaultAction, FaultKind, FaultSpec};
use crate::hold::HOLD_DEADLINE;
use crate::observe::LoggedRequest;
use crate::{control, oauth, rest, token};

/// Requests larger than this are refused; nothing in the simulated API needs more.
const MAX_BODY: usize = 1 << 20;

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
