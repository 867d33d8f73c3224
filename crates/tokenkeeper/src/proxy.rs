//! `ANY /v1/proxy/{connection_id}/{path…}`: Notion API calls through tokenkeeper.
//!
//! The request goes to Notion's base URL plus the path as given, with the connection's current
//! token. On the way, the proxy tells the answers apart (notion-wire.md §4):
//! - 401: the token is dead. Refresh through the coordinator with `if_grant` set to the grant
//!   just used (so many concurrent 401s cause one refresh), then retry once.
//! - 429 and 529: throttling. Wait `Retry-After` within the request's budget; never touch auth.
//! - 5xx and network failures: retried for GET and DELETE only (a write may have been applied).
//! - 403 and 404: sharing and capabilities; passed through, never touching auth.
//!
//! Request bodies up to `REPLAY_LIMIT` are held so they can be sent again; larger ones stream
//! through and are not retried. Response bodies always stream, except the small error bodies
//! the proxy must read to decide (401, 429, 529, 5xx).

use std::time::Duration;

use axum::body::Body;
use axum::extract::{Extension, Path, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use tokio::time::Instant;

use crate::api::auth::Scope;
use crate::api::error::ApiError;
use crate::api::SharedState;
use crate::ids::ConnectionId;
use crate::ledger::{ConnectionStatus, OpenGrant};
use crate::refresh::RefreshError;

/// Request bodies up to this size are kept so that a 401 or 429 can be retried.
pub const REPLAY_LIMIT: usize = 1024 * 1024;
/// Error bodies read to decide what to do are cut off here.
const ERROR_BODY_LIMIT: usize = 64 * 1024;
const DEFAULT_RETRIES: u32 = 2;
const DEFAULT_BUDGET: Duration = Duration::from_secs(10);
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// Headers that describe one hop, not the message: never forwarded.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
];

fn proxy_error(e: ApiError) -> Response {
    let code = e.code;
    let mut response = e.into_response();
    response
        .headers_mut()
        .insert("tokenkeeper-error", HeaderValue::from_static(code));
    response
}

pub async fn forward_root(
    state: State<SharedState>,
    scope: Extension<Scope>,
    Path(id): Path<String>,
    req: Request,
) -> Response {
    forward(state, scope, Path((id, String::new())), req).await
}

/// The request body: held whole when small (replayable), or a stream when large.
enum OutBody {
    Held(Bytes),
    Streaming(Option<Body>),
}

async fn hold_or_stream(body: Body) -> Result<OutBody, ApiError> {
    let mut stream = body.into_data_stream();
    let mut held: Vec<Bytes> = Vec::new();
    let mut size = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::invalid(format!("the request body could not be read: {e}")))?;
        size += chunk.len();
        held.push(chunk);
        if size > REPLAY_LIMIT {
            // Too large to keep: send what we read, then the rest as it comes.
            let prefix = futures::stream::iter(held.into_iter().map(Ok::<_, axum::Error>));
            return Ok(OutBody::Streaming(Some(Body::from_stream(prefix.chain(stream)))));
        }
    }
    Ok(OutBody::Held(match held.len() {
        0 => Bytes::new(),
        1 => held.pop().expect("one chunk"),
        _ => Bytes::from(held.concat()),
    }))
}

struct Budget {
    retries_left: u32,
    deadline: Instant,
}

impl Budget {
    fn from_headers(headers: &HeaderMap) -> Result<Budget, ApiError> {
        let number = |name: &str| -> Result<Option<u64>, ApiError> {
            headers
                .get(name)
                .map(|v| {
                    v.to_str()
                        .ok()
                        .and_then(|s| s.trim().parse::<u64>().ok())
                        .ok_or_else(|| ApiError::invalid(format!("{name} must be a whole number")))
                })
                .transpose()
        };
        let retries = number("tokenkeeper-retries")?.map(|n| n.min(10) as u32).unwrap_or(DEFAULT_RETRIES);
        let budget = number("tokenkeeper-retry-budget-ms")?
            .map(|ms| Duration::from_millis(ms.min(120_000)))
            .unwrap_or(DEFAULT_BUDGET);
        let retries = if budget.is_zero() { 0 } else { retries };
        Ok(Budget {
            retries_left: retries,
            deadline: Instant::now() + budget,
        })
    }

    /// Takes one retry that waits `wait`, if the budget allows it.
    fn take(&mut self, wait: Duration) -> bool {
        if self.retries_left == 0 || Instant::now() + wait > self.deadline {
            return false;
        }
        self.retries_left -= 1;
        true
    }
}

pub async fn forward(
    State(state): State<SharedState>,
    Extension(_scope): Extension<Scope>,
    Path((id, _)): Path<(String, String)>,
    req: Request,
) -> Response {
    match forward_inner(state, id, req).await {
        Ok(response) => response,
        Err(e) => proxy_error(e),
    }
}

async fn current_grant(state: &SharedState, id: &ConnectionId) -> Result<OpenGrant, ApiError> {
    let (connection, grant) = state
        .store
        .current_grant(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("connection {id} does not exist")))?;
    match connection.status {
        ConnectionStatus::Active => {}
        ConnectionStatus::NeedsReauth => {
            return Err(needs_reauth(state, id, connection.diagnosis.unwrap_or_default()).await);
        }
        ConnectionStatus::Revoked => {
            return Err(ApiError::new(StatusCode::GONE, "connection_revoked", "the connection was revoked"));
        }
    }
    grant.ok_or_else(|| ApiError::internal(format!("active connection {id} has no grant")))
}

async fn needs_reauth(state: &SharedState, id: &ConnectionId, diagnosis: serde_json::Value) -> ApiError {
    let link = crate::api::connect_reconnect_url(state, id).await;
    ApiError::new(
        StatusCode::FAILED_DEPENDENCY,
        "needs_reauth",
        "the user must reconnect this connection; send them to reconnect_url",
    )
    .with("connection_id", id.as_str())
    .with("reconnect_url", link)
    .with("diagnosis", diagnosis)
}

async fn forward_inner(state: SharedState, id: String, req: Request) -> Result<Response, ApiError> {
    let id = crate::api::parse_connection_id(&id)?;
    let (parts, body) = req.into_parts();
    let mut budget = Budget::from_headers(&parts.headers)?;
    let mut grant = current_grant(&state, &id).await?;

    // The path after `/v1/proxy/{id}`, raw, so its encoding reaches Notion unchanged.
    let prefix_len = "/v1/proxy/".len() + id.as_str().len();
    let rest = parts.uri.path().get(prefix_len..).unwrap_or("");
    let mut target = state.notion.settings().base_url.clone();
    let base_path = target.path().trim_end_matches('/').to_owned();
    target.set_path(&format!("{base_path}{rest}"));
    target.set_query(parts.uri.query());

    let mut headers = HeaderMap::new();
    for (name, value) in &parts.headers {
        let n = name.as_str();
        if HOP_BY_HOP.contains(&n) || n == "authorization" || n.starts_with("tokenkeeper-") {
            continue;
        }
        headers.append(name.clone(), value.clone());
    }
    if !headers.contains_key("notion-version") {
        if let Ok(v) = HeaderValue::from_str(&state.notion_version) {
            headers.insert("notion-version", v);
        }
    }
    let mut body = hold_or_stream(body).await?;
    let replayable = matches!(body, OutBody::Held(_));
    let idempotent = parts.method == Method::GET || parts.method == Method::DELETE || parts.method == Method::HEAD;
    let mut refreshed = false;
    let mut backoff = FIRST_BACKOFF;

    loop {
        let mut request = state
            .http
            .request(parts.method.clone(), target.clone())
            .headers(headers.clone())
            .bearer_auth(grant.access_token.expose_secret());
        request = match &mut body {
            OutBody::Held(bytes) => request.body(bytes.clone()),
            OutBody::Streaming(stream) => match stream.take() {
                Some(b) => request.body(reqwest::Body::wrap_stream(b.into_data_stream())),
                None => request,
            },
        };
        let upstream = match request.send().await {
            Ok(r) => r,
            Err(e) => {
                if idempotent && replayable && budget.take(backoff) {
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                    continue;
                }
                tracing::warn!(connection = %id, "upstream request failed: {}", describe(&e));
                return Err(ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "upstream_unreachable",
                    format!("Notion could not be reached: {}", describe(&e)),
                ));
            }
        };
        let status = upstream.status();
        let code = status.as_u16();
        let decides = code == 401 || code == 429 || code >= 500;
        if !decides {
            return Ok(stream_back(upstream, &grant));
        }
        let up_headers = upstream.headers().clone();
        let bytes = read_limited(upstream).await;
        match code {
            401 if !refreshed && replayable => {
                refreshed = true;
                match state.coordinator.refresh(&id, Some(&grant.record.id)).await {
                    Ok(done) => {
                        grant = done.grant;
                        continue;
                    }
                    Err(RefreshError::NeedsReauth { diagnosis }) => return Err(needs_reauth(&state, &id, diagnosis).await),
                    Err(other) => return Err(other.into()),
                }
            }
            429 | 529 => {
                let blocked = rate_limit_reason(&bytes).as_deref() == Some("public_api_request_blocked");
                let wait = retry_after(&up_headers).unwrap_or(Duration::from_secs(1));
                if !blocked && replayable && budget.take(wait) {
                    tokio::time::sleep(wait).await;
                    continue;
                }
            }
            500..=599 if idempotent && replayable => {
                if budget.take(backoff) {
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                    continue;
                }
            }
            _ => {}
        }
        return Ok(held_back(status, &up_headers, bytes, &grant));
    }
}

fn describe(e: &reqwest::Error) -> &'static str {
    if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection refused"
    } else {
        "the connection closed before an answer arrived"
    }
}

fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    headers
        .get("retry-after")?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

fn rate_limit_reason(body: &Bytes) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v.get("additional_data")?
        .get("rate_limit_reason")?
        .as_str()
        .map(str::to_owned)
}

async fn read_limited(response: reqwest::Response) -> Bytes {
    let mut out = Vec::new();
    let mut stream = response.bytes_stream();
    while let Some(Ok(chunk)) = stream.next().await {
        let room = ERROR_BODY_LIMIT.saturating_sub(out.len());
        out.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if room <= chunk.len() {
            break;
        }
    }
    Bytes::from(out)
}

fn copy_headers(from: &reqwest::header::HeaderMap, to: &mut HeaderMap, grant: &OpenGrant) {
    for (name, value) in from {
        if HOP_BY_HOP.contains(&name.as_str()) {
            continue;
        }
        to.append(name.clone(), value.clone());
    }
    if let Ok(v) = HeaderValue::from_str(grant.record.id.as_str()) {
        to.insert(HeaderName::from_static("tokenkeeper-grant-id"), v);
    }
}

fn stream_back(upstream: reqwest::Response, grant: &OpenGrant) -> Response {
    let status = upstream.status();
    let mut headers = HeaderMap::new();
    copy_headers(upstream.headers(), &mut headers, grant);
    let body = Body::from_stream(upstream.bytes_stream().map_err(std::io::Error::other));
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

fn held_back(status: StatusCode, up_headers: &reqwest::header::HeaderMap, bytes: Bytes, grant: &OpenGrant) -> Response {
    let mut headers = HeaderMap::new();
    copy_headers(up_headers, &mut headers, grant);
    // The body may have been cut at ERROR_BODY_LIMIT; its length is what we send.
    headers.remove("content-length");
    let mut response = Response::new(Body::from(bytes));
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}
