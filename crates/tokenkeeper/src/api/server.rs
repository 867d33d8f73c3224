//! The HTTP server: accepts connections and serves them with hyper, so that every wait on a
//! client has a deadline and the number of connections a bound (invariant 10).
//!
//! axum's own `serve` has neither: a client that connects and sends nothing, or sends its head
//! or its body a byte at a time, holds a connection and a descriptor for ever, and enough of them
//! starve everyone else. Here:
//! - a request head must be complete within `header_read_timeout` of the moment the connection
//!   starts waiting for it, at its opening or after the previous answer (hyper's own timer; hyper
//!   then closes the connection without an answer);
//! - a request body must be complete within `body_read_timeout` of the end of its head
//!   (`DeadlineBody`); a late one is answered 408 `request_timeout` and the connection closed;
//! - a connection with no request in progress and nothing arriving for `idle_timeout` is closed,
//!   and so is one whose client stopped reading its answer for that long;
//! - at most `max_connections` connections are served. A connection beyond the cap displaces
//!   the connection that has been idle longest, so that stalled clients, however many, cannot
//!   keep ordinary calls out. Only when every connection is busy with a request is the new one
//!   answered 503 `too_many_connections` with `Retry-After: 1` and closed. A burst beyond that
//!   waits in the kernel's accept queue (`bind` makes it as deep as the system allows).
//!
//! The server speaks HTTP/1.1 and 1.0. axum's `serve` also accepted HTTP/2 without TLS (h2c with
//! prior knowledge), which no client of tokenkeeper used and which none of the deadlines above
//! would cover; HTTP/2 belongs to a TLS-terminating proxy in front, which speaks HTTP/1.1 to us.
//!
//! Last, `finish` checks every answer on its way out: under the API (`/v1`, `/healthz`,
//! `/readyz`) an error answer leaves in the envelope, and on a browser-facing page as an HTML
//! page, whichever layer wrote it (an axum rejection, a route's unknown method, a body limit).
//! Rewriting in this one place, rather than trusting every extractor never to answer on its own,
//! is what keeps the promise as routes are added.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::MatchedPath;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{header, HeaderValue, Request};
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tower::ServiceExt;

use super::error::{ApiError, Enveloped, ErrorCode};
use super::proxy::FromUpstream;
use super::SharedState;
use crate::config::ServerLimits;
use crate::metrics::{Route, ServerCounters};

/// Our own limits on a request head. hyper answers heads beyond its own limits itself, with an
/// empty body; ours are well below its (65,534-byte URIs, about 400 KiB of head, and the header
/// count we give it below), so an oversized head gets our envelope instead. docs/API.md says
/// what remains hyper's.
pub const MAX_URI_BYTES: usize = 8 * 1024;
pub const MAX_HEADERS: usize = 100;
/// The sum of the lengths of every header name and value.
pub const MAX_HEADER_BYTES: usize = 32 * 1024;
const HYPER_MAX_HEADERS: usize = 256;

/// Connections beyond the cap in flight at once, each waiting for the slot of the connection it
/// displaced or being answered 503 `too_many_connections`; beyond these, accepting waits.
pub const MAX_SURPLUS: usize = 256;
/// How long a refused connection may take to send the head that its 503 answers. The answer
/// waits for the head because closing a socket with unread data makes the kernel reset it, and
/// the reset can destroy the answer before the client reads it.
const REFUSAL_HEAD_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a new connection waits for the slot of the connection it displaced.
const DISPLACE_WAIT: Duration = Duration::from_secs(1);
/// Descriptors kept for everything but client connections: database files and connections,
/// calls to Notion, the built-in simulator.
pub const RESERVED_DESCRIPTORS: usize = 256;

/// A listener on `addr` with the deepest accept queue the system allows. A connection that
/// arrives while the queue is full is dropped by the kernel before tokenkeeper can see it (with
/// SYN cookies, without the client ever learning), so a burst of connections, ordinary or
/// stalled, must find room there until the accept loop has dealt with it. Linux caps the depth at
/// `net.core.somaxconn` (4,096 by default).
pub fn bind(addr: std::net::SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As `TcpListener::bind` does: a restart may listen again at once.
    #[cfg(unix)]
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(ACCEPT_QUEUE)
}

const ACCEPT_QUEUE: u32 = 65_535;

/// Raises this process's soft limit on open files to its hard limit, then lowers
/// `max_connections` if even that cannot hold so many connections besides everything else.
/// Returns a sentence for the log when it had to.
pub fn fit_descriptor_limit(limits: &mut ServerLimits) -> Option<String> {
    let available = usize::try_from(rlimit::increase_nofile_limit(u64::MAX).ok()?).ok()?;
    let others = MAX_SURPLUS + RESERVED_DESCRIPTORS;
    if available >= limits.max_connections + others {
        return None;
    }
    let fit = available.saturating_sub(others).max(16);
    let message = format!(
        "TOKENKEEPER_MAX_CONNECTIONS is {} but this process may open only {available} files: serving at most {fit} connections (raise the limit with `ulimit -n` or systemd's LimitNOFILE)",
        limits.max_connections
    );
    limits.max_connections = fit;
    Some(message)
}

/// Serves the API on `listener` until `shutdown` completes (mini-redis's `run` shape, so tests
/// start a real server on port 0 and stop it cleanly). Then it stops accepting, closes idle
/// connections, lets requests in progress finish (each bounded by the deadlines above) and
/// returns.
pub async fn serve(
    listener: TcpListener,
    state: SharedState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let limits = state.server.clone();
    let server = Arc::new(Server {
        app: super::router(state.clone()),
        state,
        registry: Registry::default(),
        limits: limits.clone(),
    });
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let surplus = Arc::new(Semaphore::new(MAX_SURPLUS));
    let (stop, stopping) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    tracing::trace!(%peer, "connection accepted");
                    stream
                }
                Err(e) => {
                    server.accept_failed(e).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        if let Ok(slot) = slots.clone().try_acquire_owned() {
            tokio::spawn(server.clone().connection(stream, slot, stopping.clone()));
            continue;
        }
        // Beyond the cap. What follows runs in its own task, so that the accept loop goes on
        // taking connections from the kernel's queue (where an ordinary call may be waiting
        // behind thousands of stalled ones) instead of waiting for each displaced one to close.
        // With too many surplus connections in flight already, accepting waits: the next ones
        // wait in the kernel's queue, in order, rather than being dropped. Each surplus
        // connection ends within `DISPLACE_WAIT` or the refusal's bound, so this wait is short.
        let surplus = tokio::select! {
            permit = surplus.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let handover = server.registry.displace_idlest();
        if handover.is_some() {
            server.counters().displaced.fetch_add(1, Ordering::Relaxed);
        }
        let (server, stopping) = (server.clone(), stopping.clone());
        tokio::spawn(async move {
            if let Some(handover) = handover {
                // The displaced connection hands its slot to this one and no other, so that a
                // connection accepted meanwhile cannot take it.
                if let Ok(Ok(slot)) = tokio::time::timeout(DISPLACE_WAIT, handover).await {
                    drop(surplus);
                    return server.connection(stream, slot, stopping).await;
                }
            }
            server.refuse(stream).await;
            drop(surplus);
        });
    }
    drop(listener);
    let _ = stop.send(true);
    // Every connection holds a slot, and every surplus connection a permit, until it ends.
    let all_slots = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let _ = slots.acquire_many(all_slots).await;
    let _ = surplus.acquire_many(MAX_SURPLUS as u32).await;
    Ok(())
}

struct Server {
    app: axum::Router,
    state: SharedState,
    registry: Registry,
    limits: ServerLimits,
}

impl Server {
    fn counters(&self) -> &ServerCounters {
        &self.state.server_counters
    }

    async fn accept_failed(&self, e: io::Error) {
        // A connection that went away between the kernel's accept and ours is no problem.
        if matches!(
            e.kind(),
            io::ErrorKind::ConnectionAborted
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionRefused
        ) {
            return;
        }
        // Out of descriptors, most likely: free one by displacing the idlest connection, and
        // give the system a moment rather than spin on an error that has not changed.
        tracing::warn!("accepting a connection failed: {e}");
        if self.registry.displace_idlest().is_some() {
            self.counters().displaced.fetch_add(1, Ordering::Relaxed);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    /// Serves one connection until it ends, its deadlines pass, it is displaced, or the server
    /// stops.
    async fn connection(
        self: Arc<Self>,
        stream: TcpStream,
        slot: OwnedSemaphorePermit,
        mut stopping: watch::Receiver<bool>,
    ) {
        let counters = self.counters();
        counters.open.fetch_add(1, Ordering::Relaxed);
        let client = ClientAddr(stream.peer_addr().ok().map(|a| a.ip()));
        let (id, tracked) = self.registry.add();
        let io = TokioIo::new(Watched {
            inner: stream,
            tracked: tracked.clone(),
        });
        let service = {
            let server = self.clone();
            let tracked = tracked.clone();
            hyper::service::service_fn(move |mut req: Request<Incoming>| {
                req.extensions_mut().insert(client);
                server.clone().handle(req, Busy::enter(&tracked))
            })
        };
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(self.limits.header_read_timeout)
            .max_headers(HYPER_MAX_HEADERS);
        let mut conn = Box::pin(builder.serve_connection(io, service));
        let idle = self.limits.idle_timeout;
        let mut stopping_now = false;
        loop {
            let deadline = tracked.deadline(idle);
            tokio::select! {
                ended = conn.as_mut() => {
                    if matches!(&ended, Err(e) if e.is_timeout()) {
                        counters.header_timeouts.fetch_add(1, Ordering::Relaxed);
                    }
                    break;
                }
                () = tracked.close.notified() => break,
                () = tracked.wake.notified() => {}
                changed = stopping.changed(), if !stopping_now => {
                    stopping_now = true;
                    if changed.is_err() || tracked.busy.load(Ordering::Acquire) == 0 {
                        break;
                    }
                    conn.as_mut().graceful_shutdown();
                }
                () = tokio::time::sleep_until(deadline) => {
                    if tracked.stalled(idle) {
                        counters.idle_closed.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                }
            }
        }
        // Dropping the connection closes the socket; only then is its slot free.
        drop(conn);
        self.registry.remove(id);
        counters.open.fetch_sub(1, Ordering::Relaxed);
        let handover = tracked
            .handover
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(handover) = handover {
            // Refused when the new connection gave up waiting; the slot is then released.
            let _ = handover.send(slot);
        }
    }

    /// One request: our head limits, then the router with the body deadline, then `finish`;
    /// then counted and logged (at `debug`) by route template, method and status.
    async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        busy: Busy,
    ) -> Result<Response<Guarded>, Infallible> {
        let started = Instant::now();
        let method = req.method().clone();
        let face = Face::of(req.uri().path());
        let response = match check_head(&req) {
            Err(e) => e.into_response(),
            Ok(()) => {
                let late = Arc::new(AtomicBool::new(false));
                let deadline = Instant::now() + self.limits.body_read_timeout;
                let req = req.map(|body| {
                    Body::new(DeadlineBody {
                        inner: body,
                        deadline,
                        sleep: None,
                        late: late.clone(),
                        limit: self.limits.body_read_timeout,
                    })
                });
                let response = match self.app.clone().oneshot(req).await {
                    Ok(response) => response,
                    Err(never) => match never {},
                };
                if late.load(Ordering::Acquire) {
                    // Whatever the handler made of the broken body, the answer is that it was
                    // late; the rest of it may still be on its way, so the connection closes.
                    self.counters()
                        .body_timeouts
                        .fetch_add(1, Ordering::Relaxed);
                    let mut response = ApiError::new(
                        ErrorCode::RequestTimeout,
                        format!(
                            "the request body did not arrive within {}",
                            humantime::format_duration(self.limits.body_read_timeout)
                        ),
                    )
                    .into_response();
                    response
                        .headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                    response
                } else {
                    response
                }
            }
        };
        let response = finish(face, response).await;
        self.observe(&method, &response, started.elapsed());
        Ok(response.map(|body| Guarded {
            inner: body,
            _busy: busy,
        }))
    }

    /// Counts an answer and logs it at `debug`: the route template (never the path, which may
    /// hold a connect link's state) and how long the answer's head took.
    fn observe(&self, method: &http::Method, response: &Response, elapsed: Duration) {
        let route = Route(response.extensions().get::<MatchedPath>().cloned());
        let status = response.status().as_u16();
        tracing::debug!(
            op = "request",
            method = %method,
            route = route.as_str(),
            status,
            latency_ms = elapsed.as_micros() as f64 / 1000.0,
            "answered"
        );
        self.state
            .metrics
            .http_request(route, method, status, elapsed);
    }

    /// Answers 503 `too_many_connections` on a connection that finds every slot busy.
    async fn refuse(&self, stream: TcpStream) {
        self.counters().refused.fetch_add(1, Ordering::Relaxed);
        let max = self.limits.max_connections;
        let head_timeout = REFUSAL_HEAD_TIMEOUT.min(self.limits.header_read_timeout);
        let service = hyper::service::service_fn(move |_req: Request<Incoming>| async move {
            let mut response = ApiError::new(
                ErrorCode::TooManyConnections,
                format!("tokenkeeper is serving as many connections as it may ({max}), every one busy with a request; retry shortly"),
            )
            .retry_after(1)
            .into_response();
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            Ok::<_, Infallible>(response)
        });
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(head_timeout)
            .keep_alive(false);
        let conn = builder.serve_connection(TokioIo::new(stream), service);
        // Bounded on top of hyper's own head timeout: the answer is small, but a client that
        // never reads it must not keep its permit.
        let _ = tokio::time::timeout(head_timeout * 2, conn).await;
    }
}

/// The address of the client a request came from, as the server accepted its connection (a
/// proxy's, behind one): what the console limits failed sign-ins by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub Option<std::net::IpAddr>);

/// Which kind of answer a path gets when something goes wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Face {
    /// The envelope: `/v1`, `/healthz`, `/readyz`, and unknown paths.
    Api,
    /// An HTML page: the pages a user's browser opens.
    Browser,
}

impl Face {
    fn of(path: &str) -> Face {
        let browser = path == "/"
            || path == "/admin"
            || ["/oauth/", "/connect/", "/demo/", "/admin/", "/assets/"]
                .iter()
                .any(|prefix| path.starts_with(prefix));
        if browser {
            Face::Browser
        } else {
            Face::Api
        }
    }
}

/// Our limits on a request head (see `MAX_URI_BYTES`).
fn check_head<B>(req: &Request<B>) -> Result<(), ApiError> {
    let uri = req.uri();
    let uri_len = uri.path_and_query().map_or(0, |p| p.as_str().len())
        + uri.authority().map_or(0, |a| a.as_str().len());
    if uri_len > MAX_URI_BYTES {
        return Err(ApiError::new(
            ErrorCode::UriTooLong,
            format!(
                "the request's URI is {uri_len} bytes long; at most {MAX_URI_BYTES} are accepted"
            ),
        ));
    }
    let headers = req.headers();
    let bytes: usize = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum();
    if headers.len() > MAX_HEADERS || bytes > MAX_HEADER_BYTES {
        return Err(ApiError::new(
            ErrorCode::HeadersTooLarge,
            format!(
                "the request has {} headers of {bytes} bytes in all; at most {MAX_HEADERS} headers of {MAX_HEADER_BYTES} bytes are accepted",
                headers.len()
            ),
        ));
    }
    Ok(())
}

/// The last check of every answer (see the module's comment). Notion's answers passed on by the
/// proxy, and answers already in the right form, leave untouched.
async fn finish(face: Face, response: Response) -> Response {
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error())
        || response.extensions().get::<FromUpstream>().is_some()
    {
        return response;
    }
    let enveloped = response.extensions().get::<Enveloped>().is_some();
    let html = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/html"));
    match face {
        Face::Api if enveloped => return response,
        Face::Browser if html => return response,
        _ => {}
    }
    let (parts, body) = response.into_parts();
    // Error answers are short; a longer one is cut rather than held whole.
    let bytes = http_body_util::Limited::new(body, 16 * 1024)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let text = if enveloped {
        serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
            .unwrap_or_default()
    } else {
        String::from_utf8_lossy(&bytes).trim().to_owned()
    };
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_owned()
    } else {
        text
    };
    let mut rewritten = match face {
        Face::Api => {
            let code = ErrorCode::for_status(status);
            tracing::debug!(
                status = status.as_u16(),
                code = code.as_str(),
                "an answer outside the envelope was put in it: {message}"
            );
            ApiError::new(code, message).into_response()
        }
        Face::Browser => {
            let title = status.canonical_reason().unwrap_or("Error");
            super::connect::page(status, title, &message)
        }
    };
    // Headers that explain the status (`Allow`, `Retry-After`, `Connection`) stay.
    for name in [header::ALLOW, header::RETRY_AFTER, header::CONNECTION] {
        if let Some(value) = parts.headers.get(&name) {
            rewritten.headers_mut().insert(name, value.clone());
        }
    }
    rewritten
}

/// The connections being served, so that a new one beyond the cap can displace the idlest.
struct Registry {
    epoch: Instant,
    next: AtomicU64,
    connections: Mutex<HashMap<u64, Arc<Tracked>>>,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            epoch: Instant::now(),
            next: AtomicU64::new(0),
            connections: Mutex::new(HashMap::new()),
        }
    }
}

impl Registry {
    fn add(&self) -> (u64, Arc<Tracked>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let tracked = Arc::new(Tracked {
            epoch: self.epoch,
            busy: AtomicUsize::new(0),
            last_activity: AtomicU64::new(0),
            write_blocked_since: AtomicU64::new(0),
            displaced: AtomicBool::new(false),
            handover: Mutex::new(None),
            close: Notify::new(),
            wake: Notify::new(),
        });
        tracked.touch();
        self.lock().insert(id, tracked.clone());
        (id, tracked)
    }

    fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Tracked>>> {
        self.connections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Tells the connection without a request in progress that has been quiet longest to close,
    /// and to hand its slot over through the channel returned. None when every connection is
    /// busy with a request. A scan, not an index: it runs only
    /// when the cap is reached, over at most `max_connections` entries, and an index would have
    /// to be updated on every request instead.
    fn displace_idlest(&self) -> Option<oneshot::Receiver<OwnedSemaphorePermit>> {
        let connections = self.lock();
        let idlest = connections
            .values()
            .filter(|c| c.busy.load(Ordering::Acquire) == 0 && !c.displaced.load(Ordering::Relaxed))
            .min_by_key(|c| c.last_activity.load(Ordering::Relaxed))?;
        let (give, take) = oneshot::channel();
        *idlest
            .handover
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(give);
        idlest.displaced.store(true, Ordering::Relaxed);
        idlest.close.notify_one();
        Some(take)
    }
}

/// What the server knows of one connection. Times are milliseconds since the registry's epoch.
struct Tracked {
    epoch: Instant,
    /// Requests in progress: from a complete head until hyper drops the answer's body.
    busy: AtomicUsize,
    /// The last byte received, or the end of the last request.
    last_activity: AtomicU64,
    /// When a write first found the client not reading; 0 while writes go through.
    write_blocked_since: AtomicU64,
    displaced: AtomicBool,
    /// Where a displaced connection hands its slot over.
    handover: Mutex<Option<oneshot::Sender<OwnedSemaphorePermit>>>,
    /// Tells the connection's task to close it now.
    close: Notify,
    /// Tells the connection's task that its deadline may have moved.
    wake: Notify,
}

impl Tracked {
    fn now(&self) -> u64 {
        // At least 1, so that 0 can mean "never".
        (self.epoch.elapsed().as_millis() as u64).max(1)
    }

    fn touch(&self) {
        self.last_activity.store(self.now(), Ordering::Relaxed);
    }

    fn at(&self, millis: u64) -> Instant {
        self.epoch + Duration::from_millis(millis)
    }

    /// When the connection must next be looked at.
    fn deadline(&self, idle: Duration) -> Instant {
        if self.busy.load(Ordering::Acquire) == 0 {
            return self.at(self.last_activity.load(Ordering::Relaxed)) + idle;
        }
        match self.write_blocked_since.load(Ordering::Relaxed) {
            0 => Instant::now() + idle,
            since => self.at(since) + idle,
        }
    }

    /// Whether nothing has moved for `idle`: no request and nothing received, or an answer the
    /// client has not read from for that long.
    fn stalled(&self, idle: Duration) -> bool {
        let now = self.now();
        let idle = idle.as_millis() as u64;
        if self.busy.load(Ordering::Acquire) == 0 {
            return now.saturating_sub(self.last_activity.load(Ordering::Relaxed)) >= idle;
        }
        match self.write_blocked_since.load(Ordering::Relaxed) {
            0 => false,
            since => now.saturating_sub(since) >= idle,
        }
    }
}

/// Marks a request in progress on its connection, from its head until its answer is done.
struct Busy(Arc<Tracked>);

impl Busy {
    fn enter(tracked: &Arc<Tracked>) -> Busy {
        tracked.busy.fetch_add(1, Ordering::AcqRel);
        Busy(tracked.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        // The idle time counts from the end of the request.
        self.0.touch();
        self.0.busy.fetch_sub(1, Ordering::AcqRel);
        self.0.wake.notify_one();
    }
}

/// An answer's body that keeps its request marked in progress until hyper drops it.
pub struct Guarded {
    inner: Body,
    _busy: Busy,
}

impl HttpBody for Guarded {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The request body did not arrive in time.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {}", humantime::format_duration(*.0))]
pub struct BodyDeadline(Duration);

/// A request body with one deadline for the whole of it. Written here because tower-http's
/// `TimeoutBody` restarts its timer at every piece, so a client sending a byte every few seconds
/// would never meet it.
struct DeadlineBody {
    inner: Incoming,
    deadline: Instant,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    late: Arc<AtomicBool>,
    limit: Duration,
}

impl HttpBody for DeadlineBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::BoxError>>> {
        // What has arrived is handed on even past the deadline: a handler that reads late is
        // not the client's fault.
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let deadline = self.deadline;
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => {
                self.late.store(true, Ordering::Release);
                Poll::Ready(Some(Err(BodyDeadline(self.limit).into())))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The socket, noting on its connection when bytes arrive and when the client stops reading.
struct Watched {
    inner: TcpStream,
    tracked: Arc<Tracked>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.tracked.touch();
        }
        polled
    }
}

impl Watched {
    fn note_write<T>(&self, polled: &Poll<io::Result<T>>) {
        let since = &self.tracked.write_blocked_since;
        match polled {
            Poll::Pending => {
                if since.load(Ordering::Relaxed) == 0 {
                    since.store(self.tracked.now(), Ordering::Relaxed);
                    self.tracked.wake.notify_one();
                }
            }
            Poll::Ready(_) => since.store(0, Ordering::Relaxed),
        }
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.note_write(&polled);
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.note_write(&polled);
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
