//! `ANY /v1/proxy/{connection_id}/{path…}`: Notion API calls through tokenkeeper.
//!
//! The request goes to Notion's base URL plus the path as given, with the connection's current
//! token. On the way, the proxy tells the answers apart (notion-wire.md §4):
//! - 401: the token is dead. Refresh through the coordinator with `if_grant` set to the grant
//!   just used (so many concurrent 401s cause one refresh), then retry once.
//! - 429 and 529: throttling. Wait `Retry-After` within the request's budget; never touch auth.
//!   `public_api_request_blocked` is never retried.
//! - 5xx and network failures: retried for GET and DELETE only (a write may have been applied).
//! - 403, 404 and everything else: passed through, never touching auth.
//!
//! Answers that come back, Notion's or not, come back byte for byte: the proxy reads at most the
//! head of a throttling answer (to see its `rate_limit_reason`) and sends that head on, followed
//! by the rest of the stream. The proxy's own errors (unknown connection, `needs_reauth`, Notion
//! unreachable) use tokenkeeper's envelope and carry a `Tokenkeeper-Error` header, so a caller
//! can always tell them from Notion's.
//!
//! Notion gets a deadline too (invariant 10): the head of its answer must arrive within
//! `ProxyTimeouts::first_byte` of sending the request, and while its body streams back, each
//! next piece within `ProxyTimeouts::idle`. A missed first byte is the proxy's own 504
//! `upstream_timeout`, retried first for GET, HEAD and DELETE only (a silent Notion may still
//! apply a write); a body that stalls after its head was passed on can no longer become an error
//! answer, so the stream ends with an error and the caller sees a truncated body.
//!
//! Request bodies up to `REPLAY_LIMIT` are read before the first attempt and kept, so that a
//! 401, a 429 or a 5xx can be retried with the same bytes. Larger ones stream through as they
//! arrive (the first `REPLAY_LIMIT` bytes, then the rest), cannot be sent twice, and so are
//! never retried: whatever Notion answers goes back as is. Reading small bodies first rather
//! than teeing them is deliberate: Notion may answer a 401 before it has read the body, and a
//! tee would then hold only part of it.

use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Extension, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use tower_http::timeout::{TimeoutBody, TimeoutError};

use super::connect::needs_reauth;
use super::error::{ApiError, ErrorCode};
use super::{ConnectionPath, SharedState};
use crate::api_keys::Scope;
use crate::ids::{AccessToken, ConnectionId, GrantId};
use crate::ledger::ConnectionStatus;
use crate::metrics::ProxyRetry;
use crate::refresh::RefreshError;
use crate::store::{Throttle, ThrottleScope, TokenSource};

/// Request bodies up to this size are kept so that a 401, 429 or 5xx can be retried.
pub const REPLAY_LIMIT: usize = 1024 * 1024;
/// How much of a throttling answer is read to find its `rate_limit_reason`.
const PEEK_LIMIT: usize = 64 * 1024;
pub const DEFAULT_RETRIES: u32 = 2;
pub const DEFAULT_BUDGET: Duration = Duration::from_secs(10);
/// Callers may ask for more, but not for an unbounded number of retries or an endless wait.
const MAX_RETRIES: u64 = 10;
const MAX_BUDGET_MS: u64 = 120_000;
/// A 429 or 529 without a usable `Retry-After` waits this long.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);
/// The first retry of a 5xx or a network failure waits this long; later ones double it.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// Marks a response that is Notion's answer passed on, which the server's last check
/// (`api::server`) must leave byte for byte as it is.
#[derive(Debug, Clone, Copy)]
pub struct FromUpstream;

/// Headers that describe one hop, not the message: never forwarded, in either direction
/// (RFC 9110 §7.6.1 names `Proxy-Connection` among them, though no standard defines it).
const HOP_BY_HOP: [&str; 10] = [
    "connection",
    "proxy-connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
];

/// The header that marks an answer as the proxy's own, not Notion's.
const ERROR_HEADER: &str = "tokenkeeper-error";
/// The grant whose token the forwarded request carried.
const GRANT_HEADER: &str = "tokenkeeper-grant-id";
/// Per-request retry settings.
const RETRIES_HEADER: &str = "tokenkeeper-retries";
const BUDGET_HEADER: &str = "tokenkeeper-retry-budget-ms";

fn proxy_error(e: ApiError) -> Response {
    let code = e.code;
    let mut response = e.into_response();
    response
        .headers_mut()
        .insert(ERROR_HEADER, HeaderValue::from_static(code.as_str()));
    response
}

/// `ANY /v1/proxy/{id}` and `ANY /v1/proxy/{id}/{*path}`; the path is read from the URI.
///
/// The OpenAPI document describes every method OpenAPI knows (the proxy forwards any) on the
/// form with a path, and one `default` answer, since whatever Notion answers comes back as it is.
#[utoipa::path(
    method(get, post, put, patch, delete, head, options, trace),
    path = "/v1/proxy/{id}/{path}",
    tag = "proxy",
    params(
        ("id" = crate::ids::ConnectionId, Path, description = "The connection whose token is used"),
        ("path" = String, Path, description = "Notion's API path (it may contain `/`), e.g. `v1/users/me`; the query string is passed on too"),
        ("Tokenkeeper-Retries" = Option<u32>, Header, nullable = false, description = "Retries of throttling, 5xx and network failures (default 2; more than 10 count as 10)"),
        ("Tokenkeeper-Retry-Budget-Ms" = Option<u64>, Header, nullable = false, description = "Time spent waiting for retries in all, in milliseconds (default 10000; more than 120000 count as 120000; 0 turns retries off)"),
    ),
    request_body(content = Option<serde_json::Value>, description = "Passed on to Notion as it is", content_type = "application/json"),
    responses(
        (status = "default", description = "Notion's answer, passed on unchanged, with `Tokenkeeper-Grant-Id`; or tokenkeeper's own error in the envelope, marked by a `Tokenkeeper-Error` header with its code: 400 `invalid_request`, 401 `unauthorized`, 404 `not_found`, 410 `connection_revoked`, 424 `needs_reauth`, 502 `upstream_unreachable`, 503 `provider_unavailable` or `database_unavailable`, 504 `upstream_timeout`", body = serde_json::Value, content_type = "*/*"),
    )
)]
pub async fn forward(
    State(state): State<SharedState>,
    // Both scopes may call Notion through the proxy: it never reveals a token.
    Extension(_scope): Extension<Scope>,
    id: Result<ConnectionPath, ApiError>,
    req: Request,
) -> Response {
    let result = match id {
        Ok(ConnectionPath(id)) => forward_inner(state, id, req).await,
        Err(e) => Err(e),
    };
    result.unwrap_or_else(proxy_error)
}

/// The request body: held whole when small (replayable), or a stream when large.
enum OutBody {
    Held(Bytes),
    /// Taken by the one attempt that sends it.
    Streaming(Option<Body>),
}

impl OutBody {
    fn replayable(&self) -> bool {
        matches!(self, OutBody::Held(_))
    }
}

/// Reads the body up to `REPLAY_LIMIT`; past that, sends on what was read followed by the rest
/// as it arrives.
async fn hold_or_stream(body: Body) -> Result<OutBody, ApiError> {
    let mut stream = body.into_data_stream();
    let mut held: Vec<Bytes> = Vec::new();
    let mut size = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk
            .map_err(|e| ApiError::invalid(format!("the request body could not be read: {e}")))?;
        size += chunk.len();
        held.push(chunk);
        if size > REPLAY_LIMIT {
            let prefix = futures::stream::iter(held.into_iter().map(Ok::<_, axum::Error>));
            return Ok(OutBody::Streaming(Some(Body::from_stream(
                prefix.chain(stream),
            ))));
        }
    }
    Ok(OutBody::Held(match held.len() {
        0 => Bytes::new(),
        1 => held.pop().expect("one chunk"),
        _ => Bytes::from(held.concat()),
    }))
}

/// What one request may spend on retries of throttling, 5xx and network failures. A refresh
/// after a 401 is not counted: it is a different problem with its own single retry.
struct Budget {
    retries_left: u32,
    /// Waiting left, summed over all retries.
    wait_left: Duration,
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
                        .ok_or_else(|| {
                            ApiError::invalid(format!("the {name} header must be a whole number"))
                        })
                })
                .transpose()
        };
        let retries = number(RETRIES_HEADER)?
            .map(|n| n.min(MAX_RETRIES) as u32)
            .unwrap_or(DEFAULT_RETRIES);
        let wait = number(BUDGET_HEADER)?
            .map(|ms| Duration::from_millis(ms.min(MAX_BUDGET_MS)))
            .unwrap_or(DEFAULT_BUDGET);
        Ok(Budget {
            retries_left: if wait.is_zero() { 0 } else { retries },
            wait_left: wait,
        })
    }

    fn exhausted(&self) -> bool {
        self.retries_left == 0
    }

    /// Takes `wait` from the waiting left without using a retry (a hold before the first
    /// attempt, which sends nothing twice), if it fits.
    fn take_wait(&mut self, wait: Duration) -> bool {
        if wait > self.wait_left {
            return false;
        }
        self.wait_left -= wait;
        true
    }

    /// Takes one retry that waits `wait`, if the budget allows it.
    fn take(&mut self, wait: Duration) -> bool {
        if self.retries_left == 0 || wait > self.wait_left {
            return false;
        }
        self.retries_left -= 1;
        self.wait_left -= wait;
        true
    }
}

/// The grant whose token a forwarded request carries.
struct Using {
    grant: GrantId,
    access_token: AccessToken,
}

/// The connection's current token (from the token cache when it can, `Store::read_token`) and
/// its workspace, or the proxy's own answer for a connection that cannot be used.
async fn current_grant(
    state: &SharedState,
    id: &ConnectionId,
) -> Result<(Using, String, TokenSource), ApiError> {
    let view = state
        .store
        .read_token(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("connection {id} does not exist")))?;
    match view.status {
        ConnectionStatus::Active => {}
        ConnectionStatus::NeedsReauth => {
            return Err(needs_reauth(state, id, view.diagnosis).await);
        }
        ConnectionStatus::Revoked => {
            return Err(ApiError::new(
                ErrorCode::ConnectionRevoked,
                "the connection was revoked",
            ));
        }
    }
    let grant = view
        .grant
        .ok_or_else(|| ApiError::internal(format!("active connection {id} has no grant")))?;
    Ok((
        Using {
            grant: grant.id,
            access_token: grant.access_token,
        },
        view.workspace_id,
        view.source,
    ))
}

/// What a 429 or 529 from Notion holds, for every process (`TOKENKEEPER_PROXY_SHARED_THROTTLE`):
/// a connection's own budget (`public_api_request_rate_limit`, or a 429 without a reason), or
/// its workspace's (`public_api_space_request_rate_limit`, and 529 `service_overload`, which
/// Notion sends when it is overloaded). An endpoint's own limit and a blocked request hold
/// nothing beyond the call that met them.
fn throttle_scope(status: u16, reason: Option<&str>) -> Option<ThrottleScope> {
    match (status, reason) {
        (529, _) => Some(ThrottleScope::Workspace),
        (_, Some("public_api_space_request_rate_limit")) => Some(ThrottleScope::Workspace),
        (_, Some("public_api_request_rate_limit") | None) => Some(ThrottleScope::Connection),
        _ => None,
    }
}

/// The throttle holding this call now, the connection's or its workspace's, whichever ends
/// later.
fn holding(state: &SharedState, id: &ConnectionId, workspace: &str) -> Option<Throttle> {
    let connection = state.store.throttle(ThrottleScope::Connection, id.as_str());
    let workspace = state.store.throttle(ThrottleScope::Workspace, workspace);
    match (connection, workspace) {
        (Some(a), Some(b)) => Some(if a.until >= b.until { a } else { b }),
        (a, b) => a.or(b),
    }
}

/// The proxy's own 429 for a call held by a throttle whose end does not fit the caller's
/// budget: Notion was not called.
fn throttled(t: &Throttle, wait: Duration) -> ApiError {
    ApiError::new(
        ErrorCode::NotionThrottled,
        format!(
            "Notion throttles this {} for another {} ms; the call was not sent",
            t.scope.as_str(),
            wait.as_millis()
        ),
    )
    .with("scope", t.scope.as_str())
    .with("rate_limit_reason", t.reason.as_str())
    .retry_after(wait.as_secs_f64().ceil().max(1.0) as u64)
}

/// A call that waited in line behind a subject's one call at a time, just after a throttle
/// ended (`cache::Throttles`), until its budget ran out.
fn recovering(scope: ThrottleScope) -> ApiError {
    ApiError::new(
        ErrorCode::NotionThrottled,
        format!(
            "Notion throttled this {} moments ago; until it has recovered, its calls are sent \
             one at a time, and this call's wait budget ran out in line; the call was not sent",
            scope.as_str()
        ),
    )
    .with("scope", scope.as_str())
    .retry_after(1)
}

/// The part of the request path after `/v1/proxy/{id}`, raw (still percent-encoded), so that it
/// reaches Notion as the caller wrote it. Works whether or not the router stripped `/v1`.
pub(crate) fn rest_of_path(path: &str) -> &str {
    let path = path.strip_prefix("/v1").unwrap_or(path);
    let after = path.strip_prefix("/proxy/").unwrap_or("");
    after.find('/').map_or("", |i| &after[i..])
}

/// Where a request for `path` (the request's path, as routed) and `query` is forwarded: Notion's
/// base URL with the rest of the path appended. `None` when the rest, once its dot segments are
/// resolved as a URL parser resolves them (`..`, `%2e%2e`, `.%2E`, …), leaves the base URL's
/// path: the request carries the connection's token, so it must not reach whatever else the
/// base URL's host serves beside Notion (a gateway's other routes).
pub(crate) fn target_url(base: &url::Url, path: &str, query: Option<&str>) -> Option<url::Url> {
    let mut target = base.clone();
    let base_path = target.path().trim_end_matches('/').to_owned();
    target.set_path(&format!("{base_path}{}", rest_of_path(path)));
    target.set_query(query);
    let inside = target
        .path()
        .strip_prefix(base_path.as_str())
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'));
    inside.then_some(target)
}

/// The caller's headers, minus what belongs to this hop or to tokenkeeper.
pub(crate) fn outgoing_headers(from: &HeaderMap, notion_version: &str) -> HeaderMap {
    // Headers the caller listed in `Connection` are hop-by-hop too (RFC 9110 §7.6.1).
    // Read from the bytes: a value with one byte that is not ASCII still names the others.
    let listed: Vec<String> = from
        .get_all("connection")
        .iter()
        .flat_map(|v| {
            String::from_utf8_lossy(v.as_bytes())
                .split(',')
                .map(|n| n.trim().to_ascii_lowercase())
                .collect::<Vec<_>>()
        })
        .collect();
    let mut headers = HeaderMap::new();
    for (name, value) in from {
        let n = name.as_str();
        let ours = n == "authorization" || n.starts_with("tokenkeeper-");
        // `Expect: 100-continue` was answered by our own server; the client does not do it.
        if ours || n == "expect" || HOP_BY_HOP.contains(&n) || listed.iter().any(|l| l == n) {
            continue;
        }
        headers.append(name.clone(), value.clone());
    }
    if !headers.contains_key("notion-version") {
        if let Ok(v) = HeaderValue::from_str(notion_version) {
            headers.insert("notion-version", v);
        }
    }
    headers
}

async fn forward_inner(
    state: SharedState,
    id: ConnectionId,
    req: Request,
) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let mut budget = Budget::from_headers(&parts.headers)?;
    // Answered from the token cache or the database alone: a connection that needs a
    // reconnect, or was revoked, never costs a call to Notion.
    let (mut grant, workspace, source) = current_grant(&state, &id).await?;

    let target = target_url(
        &state.notion.settings().base_url,
        parts.uri.path(),
        parts.uri.query(),
    )
    .ok_or_else(|| {
        ApiError::invalid("the path goes above Notion's base URL (a `..` segment); it is not sent")
    })?;
    let headers = outgoing_headers(&parts.headers, &state.notion_version);

    let mut body = hold_or_stream(body).await?;
    let replayable = body.replayable();
    // Only these may be sent again after a 5xx or a broken connection: Notion may have applied
    // a write whose answer was lost.
    let idempotent = matches!(parts.method, Method::GET | Method::HEAD | Method::DELETE);
    let mut refreshes = 0;
    let mut backoff = FIRST_BACKOFF;
    // The gates this call holds (a subject careful after a throttle), released once Notion's
    // answer head is here and any new throttle is known.
    let mut gates: Vec<tokio::sync::OwnedMutexGuard<()>> = Vec::new();

    loop {
        // Notion throttles this connection or its workspace (a 429 any process met): wait
        // until it is over, within the caller's budget, rather than collect a 429 of our own.
        if state.shared_throttle {
            if let Some(t) = holding(&state, &id, &workspace) {
                let wait = (t.until - chrono::Utc::now()).to_std().unwrap_or_default();
                if !budget.take_wait(wait) {
                    state.metrics.proxy_held(false);
                    return Err(throttled(&t, wait));
                }
                state.metrics.proxy_held(true);
                tokio::time::sleep(wait).await;
                continue;
            }
            // Just after a throttle, one call at a time per subject in this process, so that a
            // budget Notion has not refilled yet meets one call, not every call that was held.
            // Waiting in line takes from the budget; a call whose budget runs out in line is
            // answered 429 without calling Notion, as a held call is.
            if gates.is_empty() {
                let careful = [
                    (
                        ThrottleScope::Workspace,
                        state
                            .store
                            .throttle_gate(ThrottleScope::Workspace, &workspace),
                    ),
                    (
                        ThrottleScope::Connection,
                        state
                            .store
                            .throttle_gate(ThrottleScope::Connection, id.as_str()),
                    ),
                ];
                for (scope, gate) in careful {
                    let Some(gate) = gate else { continue };
                    let start = tokio::time::Instant::now();
                    match tokio::time::timeout(budget.wait_left, gate.lock_owned()).await {
                        Ok(guard) => gates.push(guard),
                        Err(_) => {
                            state.metrics.proxy_held(false);
                            return Err(recovering(scope));
                        }
                    }
                    budget.wait_left = budget.wait_left.saturating_sub(start.elapsed());
                }
                if !gates.is_empty() {
                    // Our turn: the throttle may have come back meanwhile.
                    continue;
                }
            }
        }
        let mut request = state
            .http
            .request(parts.method.clone(), target.clone())
            .headers(headers.clone())
            .bearer_auth(grant.access_token.expose_secret());
        request = match &mut body {
            OutBody::Held(bytes) if bytes.is_empty() => request,
            OutBody::Held(bytes) => request.body(bytes.clone()),
            OutBody::Streaming(stream) => match stream.take() {
                Some(b) => request.body(reqwest::Body::wrap_stream(b.into_data_stream())),
                None => request,
            },
        };
        let sent = tokio::time::timeout(state.proxy_timeouts.first_byte, request.send()).await;
        let mut upstream = match sent {
            Ok(Ok(r)) => r,
            Err(_elapsed) => {
                state
                    .proxy_upstream_timeouts
                    .fetch_add(1, Ordering::Relaxed);
                // Notion may be working on the request behind its silence: only a request that
                // may be applied twice is sent again.
                if replayable && idempotent && budget.take(backoff) {
                    state.metrics.proxy_retry(ProxyRetry::Timeout);
                    tracing::info!(connection = %id, wait_ms = backoff.as_millis() as u64, "Notion sent no answer in time; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                    continue;
                }
                tracing::warn!(connection = %id, "Notion sent no answer within {}", humantime::format_duration(state.proxy_timeouts.first_byte));
                return Err(upstream_timeout(&state));
            }
            Ok(Err(e)) => {
                // A refused connection never reached Notion: safe to retry whatever the method.
                let may_retry = replayable && (idempotent || e.is_connect());
                if may_retry && budget.take(backoff) {
                    state.metrics.proxy_retry(ProxyRetry::Unreachable);
                    tracing::info!(connection = %id, wait_ms = backoff.as_millis() as u64, "Notion unreachable ({}); retrying", describe(&e));
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                    continue;
                }
                tracing::warn!(connection = %id, "Notion unreachable: {}", describe(&e));
                return Err(ApiError::new(
                    ErrorCode::UpstreamUnreachable,
                    format!("Notion could not be reached: {}", describe(&e)),
                ));
            }
        };
        let status = upstream.status().as_u16();
        state.metrics.proxy_answer(status);
        if !matches!(status, 429 | 529) {
            gates.clear();
        }
        match status {
            // A dead token: one shared refresh and a retry. A token obtained moments ago that is
            // refused again is not refreshed again (the coordinator judges it instead), and no
            // request refreshes more than twice, so a 401 loop cannot mint pairs without end.
            401 if replayable && refreshes < 2 => {
                refreshes += 1;
                match state.coordinator.refresh(&id, Some(&grant.grant)).await {
                    Ok(done) => {
                        state.metrics.proxy_retry(ProxyRetry::Unauthorized);
                        tracing::info!(connection = %id, refreshed = done.refreshed, "401 from Notion; retrying with grant {}", done.grant.record.id);
                        grant = Using {
                            grant: done.grant.record.id,
                            access_token: done.grant.access_token,
                        };
                        continue;
                    }
                    Err(RefreshError::TokenRejectedAfterRefresh { .. }) => {
                        let mut response = stream_back(&state, &id, upstream, &grant.grant, source);
                        response.headers_mut().insert(
                            ERROR_HEADER,
                            HeaderValue::from_static("token_rejected_after_refresh"),
                        );
                        return Ok(response);
                    }
                    Err(RefreshError::NeedsReauth { diagnosis }) => {
                        return Err(needs_reauth(&state, &id, diagnosis.map(|d| *d)).await)
                    }
                    Err(other) => return Err(other.into()),
                }
            }
            429 | 529 if state.shared_throttle || (replayable && !budget.exhausted()) => {
                let wait = retry_after(upstream.headers()).unwrap_or(DEFAULT_RETRY_AFTER);
                let code = upstream.status();
                let up_headers = std::mem::take(upstream.headers_mut());
                let (head, rest) = peek(upstream_body(&state, &id, upstream), PEEK_LIMIT).await;
                if head
                    .iter()
                    .any(|piece| matches!(piece, Err(e) if e.is::<TimeoutError>()))
                {
                    // Nothing was passed on yet, so the stall can still be our own answer.
                    return Err(upstream_timeout(&state));
                }
                let reason = rate_limit_reason(&head);
                if state.shared_throttle {
                    if let Some(scope) = throttle_scope(status, reason.as_deref()) {
                        share_throttle(
                            &state,
                            &id,
                            &workspace,
                            scope,
                            status,
                            reason.as_deref(),
                            wait,
                        );
                    }
                }
                gates.clear();
                let blocked = reason.as_deref() == Some("public_api_request_blocked");
                if replayable && !blocked && budget.take(wait) {
                    state.metrics.proxy_retry(ProxyRetry::Throttled);
                    tracing::info!(connection = %id, status, wait_ms = wait.as_millis() as u64, "Notion is throttling; retrying");
                    tokio::time::sleep(wait).await;
                    continue;
                }
                // Blocked, or the wait does not fit the budget: the answer goes back at once.
                return Ok(respond(
                    code,
                    up_headers,
                    &grant.grant,
                    source,
                    Body::from_stream(chain(head, rest)),
                ));
            }
            500..=599 if idempotent && replayable => {
                let wait = retry_after(upstream.headers()).map_or(backoff, |r| r.max(backoff));
                if budget.take(wait) {
                    state.metrics.proxy_retry(ProxyRetry::ServerError);
                    tracing::info!(connection = %id, status, wait_ms = wait.as_millis() as u64, "Notion failed; retrying");
                    tokio::time::sleep(wait).await;
                    backoff *= 2;
                    continue;
                }
            }
            _ => {}
        }
        return Ok(stream_back(&state, &id, upstream, &grant.grant, source));
    }
}

/// Tells every process that Notion throttles this connection or its workspace for `wait`: this
/// process at once, the others through the database (one small write, in the background, so
/// that the caller's answer does not wait for it).
fn share_throttle(
    state: &SharedState,
    id: &ConnectionId,
    workspace: &str,
    scope: ThrottleScope,
    status: u16,
    reason: Option<&str>,
    wait: Duration,
) {
    let throttle = Throttle {
        scope,
        subject: match scope {
            ThrottleScope::Connection => id.as_str().to_owned(),
            ThrottleScope::Workspace => workspace.to_owned(),
        },
        until: chrono::Utc::now() + chrono::Duration::from_std(wait).unwrap_or_default(),
        reason: reason.map(str::to_owned).unwrap_or_else(|| {
            if status == 529 {
                "service_overload"
            } else {
                "rate_limited"
            }
            .to_owned()
        }),
    };
    // Known here before the answer goes back, so that this process's next call is held.
    state.store.learn_throttle(&throttle);
    let store = state.store.clone();
    tokio::spawn(async move {
        if let Err(e) = store.record_throttle(&throttle).await {
            tracing::debug!("a throttle could not be shared with other processes: {e}");
        }
    });
}

fn upstream_timeout(state: &SharedState) -> ApiError {
    ApiError::new(
        ErrorCode::UpstreamTimeout,
        format!(
            "Notion did not answer within {}",
            humantime::format_duration(state.proxy_timeouts.first_byte)
        ),
    )
}

/// The body of Notion's answer as a stream that fails when Notion sends nothing for
/// `ProxyTimeouts::idle` (tower-http's `TimeoutBody` restarts its timer at every piece, which is
/// exactly an idle timeout), counting each such stall.
fn upstream_body(
    state: &SharedState,
    id: &ConnectionId,
    upstream: reqwest::Response,
) -> ByteStream {
    let body = TimeoutBody::new(state.proxy_timeouts.idle, reqwest::Body::from(upstream));
    let (state, id) = (state.clone(), id.clone());
    http_body_util::BodyDataStream::new(body)
        .inspect_err(move |e| {
            if e.is::<TimeoutError>() {
                state
                    .proxy_upstream_timeouts
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(connection = %id, "Notion's answer stalled for {}; cutting it off", humantime::format_duration(state.proxy_timeouts.idle));
            }
        })
        .boxed()
}

fn describe(e: &reqwest::Error) -> &'static str {
    if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "the connection was refused"
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

/// `additional_data.rate_limit_reason` of a 429 whose head was peeked.
fn rate_limit_reason(head: &[Result<Bytes, axum::BoxError>]) -> Option<String> {
    let body: Vec<u8> = head
        .iter()
        .flatten()
        .flat_map(|chunk| chunk.iter().copied())
        .collect();
    let v: serde_json::Value = serde_json::from_slice(&body).ok()?;
    v.get("additional_data")?
        .get("rate_limit_reason")?
        .as_str()
        .map(str::to_owned)
}

type ByteStream = BoxStream<'static, Result<Bytes, axum::BoxError>>;

/// Reads up to `limit` bytes from the head of a body; the rest (if any) stays unread.
async fn peek(
    mut stream: ByteStream,
    limit: usize,
) -> (Vec<Result<Bytes, axum::BoxError>>, Option<ByteStream>) {
    let mut head = Vec::new();
    let mut size = 0;
    while size < limit {
        match stream.next().await {
            Some(Ok(chunk)) => {
                size += chunk.len();
                head.push(Ok(chunk));
            }
            Some(Err(e)) => {
                head.push(Err(e));
                return (head, None);
            }
            None => return (head, None),
        }
    }
    (head, Some(stream))
}

fn chain(
    head: Vec<Result<Bytes, axum::BoxError>>,
    rest: Option<ByteStream>,
) -> impl futures::Stream<Item = std::io::Result<Bytes>> {
    futures::stream::iter(head)
        .chain(rest.unwrap_or_else(|| futures::stream::empty().boxed()))
        .map_err(std::io::Error::other)
}

fn stream_back(
    state: &SharedState,
    id: &ConnectionId,
    mut upstream: reqwest::Response,
    grant: &GrantId,
    source: TokenSource,
) -> Response {
    let status = upstream.status();
    // Moved, not copied: the answer's headers are Notion's, less the hop-by-hop ones.
    let headers = std::mem::take(upstream.headers_mut());
    let body = upstream_body(state, id, upstream).map_err(std::io::Error::other);
    respond(status, headers, grant, source, Body::from_stream(body))
}

/// Notion's answer, as it came: status, end-to-end headers, body; plus the grant used, and
/// `Tokenkeeper-Cached` when the token came from the cache during a database outage.
fn respond(
    status: StatusCode,
    mut headers: reqwest::header::HeaderMap,
    grant: &GrantId,
    source: TokenSource,
    body: Body,
) -> Response {
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response.extensions_mut().insert(FromUpstream);
    *response.headers_mut() = headers;
    let headers = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(grant.as_str()) {
        headers.insert(HeaderName::from_static(GRANT_HEADER), v);
    }
    if source == TokenSource::CacheDuringOutage {
        headers.insert(
            super::connections::CACHED_HEADER,
            HeaderValue::from_static("database_unavailable"),
        );
    }
    response
}
