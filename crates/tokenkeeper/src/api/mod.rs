//! The HTTP API (DESIGN.md's table under "Interfaces"): routes, the API-key gate, and the
//! state every handler shares. One file per group of routes.

pub mod admin;
pub(crate) mod connect;
mod connections;
mod demo;
pub mod error;
mod import;
pub mod openapi;
pub mod pages;
pub mod proxy;
pub mod server;
mod webhooks;

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRequest, FromRequestParts, MatchedPath, Path, Request, State};
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::Router;

use crate::api_keys::{ApiKeys, Scope};
use crate::clock::Clock;
use crate::ids::ConnectionId;
use crate::ledger::{ConnectSession, Provider};
use crate::provider::notion::NotionClient;
use crate::refresh::Coordinator;
use crate::return_to::{AllowedReturnUrls, ReturnTo};
use crate::store::Store;
use error::{ApiError, ErrorCode};

/// Everything a handler may need, built once at start and shared.
pub struct AppState {
    pub store: Arc<Store>,
    pub coordinator: Arc<Coordinator>,
    pub notion: NotionClient,
    pub api_keys: ApiKeys,
    pub public_url: url::Url,
    pub allowed_return_urls: AllowedReturnUrls,
    pub session_ttl: Duration,
    pub clock: Clock,
    /// The `Notion-Version` set on proxied calls whose caller sent none.
    pub notion_version: String,
    /// HTTP client of the proxy.
    pub http: reqwest::Client,
    /// Set when Notion is the built-in simulator: enables the demo pages.
    pub simulator: Option<String>,
    /// Mounts `GET /v1/_baseline` for the benchmarks (`--bench-baseline-route`).
    pub bench_baseline_route: bool,
    /// Upstream revocations and webhook deliveries (work that must happen at least once).
    pub jobs: Arc<crate::jobs::Jobs>,
    /// Where a pair waits when the database cannot take it (the callback's, here).
    pub journal: Arc<crate::journal::Journal>,
    /// The server's deadlines and connection cap, read by `serve`.
    pub server: crate::config::ServerLimits,
    /// How long the proxy waits on Notion.
    pub proxy_timeouts: crate::config::ProxyTimeouts,
    /// Whether Notion's 429s and 529s hold every process's proxied calls (`api::proxy`).
    pub shared_throttle: bool,
    /// Proxied calls that Notion left silent past a deadline: no answer head within the first
    /// byte timeout, or a body that stalled for the idle timeout. Read by `/metrics`.
    pub proxy_upstream_timeouts: Arc<AtomicU64>,
    /// What the server did about slow, stalled and surplus clients. Read by `/metrics`, and by
    /// tests, which wait for these rather than for time to pass.
    pub server_counters: Arc<crate::metrics::ServerCounters>,
    /// Everything `GET /metrics` reports.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The admin console's sessions and caches (`api::admin`).
    pub console: admin::Console,
}

pub type SharedState = Arc<AppState>;

impl AppState {
    /// What the health check needs of this state (`health::spawn`).
    pub fn health_checker(&self) -> crate::health::Checker {
        crate::health::Checker {
            store: self.store.clone(),
            notion: self.notion.clone(),
            coordinator: self.coordinator.clone(),
            clock: self.clock.clone(),
        }
    }

    /// `<public url>/<path>`, whatever path the public URL itself has.
    pub fn public(&self, path: &str) -> String {
        format!("{}{}", self.public_url.as_str().trim_end_matches('/'), path)
    }

    pub fn callback_url(&self) -> String {
        self.public("/oauth/callback")
    }

    /// Where the callback may send the browser back to, for a `return_to` a session stored:
    /// checked again, so that the redirect is built from a URL that passed the check now (a
    /// session stored before the allow-list changed, or by an older version, is refused), and
    /// normalised. tokenkeeper's own pages (the demo's) are always allowed: they are not an
    /// open redirect.
    pub fn return_target(&self, stored: &str) -> Option<ReturnTo> {
        self.allowed_return_urls
            .check(stored)
            .or_else(|_| AllowedReturnUrls::only(&self.public_url).check(stored))
            .ok()
    }

    /// Creates a connect (or, with `connection`, reconnect) session; returns it with its link.
    pub async fn new_session(
        &self,
        provider: Provider,
        end_user_id: String,
        return_to: ReturnTo,
        connection: Option<ConnectionId>,
    ) -> Result<(ConnectSession, String), ApiError> {
        let (session, state) = self.session_candidate(provider, end_user_id, return_to, connection);
        self.store.create_session(&session).await?;
        let url = self.link(&session, &state);
        Ok((session, url))
    }

    /// The reconnect link that 424 answers carry: the connection's live one, or a new one.
    /// Reads of a connection that needs its user back must not write a session each (a
    /// `tokens` key, which may not create sessions, would otherwise make one per read).
    ///
    /// Handing the same link out again needs its `state`, and only a hash of the state is
    /// stored. Two ways were weighed: deriving the state as an HMAC of the session id under a
    /// key derived from the key ring, or storing the state sealed with the key ring. The state
    /// is sealed: it reuses the one AEAD and key ring that already seal tokens, with no new
    /// key derivation and no record of which key derived which state, and the database alone
    /// still cannot complete anyone's flow.
    pub async fn reconnect_link(
        &self,
        provider: Provider,
        end_user_id: String,
        connection: ConnectionId,
    ) -> Result<(ConnectSession, String), ApiError> {
        let (candidate, state) = self.session_candidate(
            provider,
            end_user_id,
            self.allowed_return_urls.first(),
            Some(connection),
        );
        let (session, state) = self.store.reconnect_link(&candidate, &state).await?;
        let url = self.link(&session, &state);
        Ok((session, url))
    }

    /// A new session, not stored yet, and its `state` (192 random bits; only its hash is kept).
    fn session_candidate(
        &self,
        provider: Provider,
        end_user_id: String,
        return_to: ReturnTo,
        connection: Option<ConnectionId>,
    ) -> (ConnectSession, String) {
        let state = crate::ids::random_token(24);
        let now = self.clock.now();
        let ttl =
            chrono::Duration::from_std(self.session_ttl).unwrap_or(chrono::Duration::minutes(10));
        let session = ConnectSession {
            id: crate::ids::SessionId::generate(),
            provider,
            state_hash: connect::state_hash(&state),
            end_user_id,
            return_to: return_to.as_str().to_owned(),
            connection_id: connection,
            created_at: now,
            expires_at: now + ttl,
            used_at: None,
        };
        (session, state)
    }

    /// The link to send a user to for `session`.
    fn link(&self, session: &ConnectSession, state: &str) -> String {
        self.public(&format!("/connect/{}/{state}", session.id))
    }
}

/// The `{id}` of a connection's route, parsed once for every handler: a malformed id is a 400
/// in our envelope, before the handler runs.
pub struct ConnectionPath(pub ConnectionId);

impl<S: Send + Sync> FromRequestParts<S> for ConnectionPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(params) = Path::<Vec<(String, String)>>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::invalid(e.body_text()))?;
        let raw = params
            .iter()
            .find(|(name, _)| name == "id")
            .map(|(_, value)| value.as_str())
            .unwrap_or_default();
        parse_connection_id(raw).map(ConnectionPath)
    }
}

/// A connection id received from outside.
pub fn parse_connection_id(s: &str) -> Result<ConnectionId, ApiError> {
    ConnectionId::parse(s)
        .ok_or_else(|| ApiError::invalid(format!("{s:?} is not a connection id (con_…)")))
}

/// The largest body a call of the API itself reads (the proxy's bodies are Notion's business and
/// are not limited in size, only in time). Every body the API takes is a small JSON object.
pub const API_BODY_LIMIT: usize = 64 * 1024;

/// A JSON body whose rejection (bad JSON, wrong content type) answers in our envelope. The body
/// must be a JSON object: serde would otherwise read a struct from an array of its fields.
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<serde_json::Value>::from_request(req, state).await {
            Ok(axum::Json(v)) => from_object(v).map(ApiJson),
            Err(rejection) if rejection.status() == http::StatusCode::PAYLOAD_TOO_LARGE => {
                Err(ApiError::new(
                    ErrorCode::PayloadTooLarge,
                    format!("the body is larger than this call accepts ({API_BODY_LIMIT} bytes)"),
                ))
            }
            Err(rejection) => Err(ApiError::invalid(rejection.body_text())),
        }
    }
}

/// A JSON body that may be absent: an empty body, or JSON's `null`, means `T::default()`.
pub fn optional_json<T: serde::de::DeserializeOwned + Default>(body: &[u8]) -> Result<T, ApiError> {
    let text = body.trim_ascii();
    if text.is_empty() || text == b"null" {
        return Ok(T::default());
    }
    let value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("the body is not valid JSON: {e}")))?;
    from_object(value)
}

/// Reads a call's body from a JSON value that must be an object (see `ApiJson`).
fn from_object<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> Result<T, ApiError> {
    if !value.is_object() {
        return Err(ApiError::invalid("the body must be a JSON object"));
    }
    serde_json::from_value(value)
        .map_err(|e| ApiError::invalid(format!("the body is not valid JSON for this call: {e}")))
}

/// The gate in front of `/v1`: a known key, whose scope handlers can read from the request.
async fn require_api_key(
    State(state): State<SharedState>,
    mut req: Request,
    next: Next,
) -> Response {
    let presented = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match presented.and_then(|key| state.api_keys.check(key)) {
        Some(scope) => {
            req.extensions_mut().insert(scope);
            next.run(req).await
        }
        None => {
            // Worth an operator's notice (a misconfigured app, or someone guessing); the key
            // itself never reaches the log, and the route is its template, not the path.
            let reason = if presented.is_some() {
                "unknown"
            } else {
                "missing"
            };
            state.metrics.api_key_rejected(reason);
            tracing::info!(
                op = "api_key_rejected",
                reason,
                method = %req.method(),
                route = req
                    .extensions()
                    .get::<MatchedPath>()
                    .map_or("unmatched", MatchedPath::as_str),
                "refused a request for its API key"
            );
            // Marked as ours: through the proxy, a bare 401 would read as Notion's dead token.
            let mut response = ApiError::unauthorized().into_response();
            response.headers_mut().insert(
                "tokenkeeper-error",
                http::HeaderValue::from_static("unauthorized"),
            );
            response
        }
    }
}

/// Fails unless the request's key has the admin scope.
pub fn require_admin(scope: Scope, what: &str) -> Result<(), ApiError> {
    if scope == Scope::Admin {
        Ok(())
    } else {
        Err(ApiError::forbidden(what))
    }
}

pub fn router(state: SharedState) -> Router {
    let v1 = Router::new()
        .route("/connect-sessions", post(connect::create_session))
        .route("/connections", get(connections::list))
        .route(
            "/connections/import",
            post(import::import).layer(axum::extract::DefaultBodyLimit::max(import::BODY_LIMIT)),
        )
        .route(
            "/connections/{id}",
            get(connections::get_one).delete(connections::revoke),
        )
        .route(
            "/connections/{id}/access-token",
            get(connections::access_token),
        )
        .route("/connections/{id}/refresh", post(connections::refresh))
        .route(
            "/connections/{id}/reconnect-sessions",
            post(connect::create_reconnect_session),
        )
        .route("/connections/{id}/grants", get(connections::grants))
        .route("/connections/{id}/events", get(connections::events))
        .route("/webhook-deliveries", get(webhooks::list))
        .route("/webhook-deliveries/{id}/retry", post(webhooks::retry))
        .route("/proxy/{id}", any(proxy::forward))
        .route("/proxy/{id}/{*path}", any(proxy::forward))
        .fallback(|| async { ApiError::not_found("no such API route") })
        .method_not_allowed_fallback(method_not_allowed);
    // The benchmarks' baseline: a constant answer behind the same key check as every `/v1`
    // route, so that a token read can be compared with the cost of the HTTP stack alone.
    let v1 = if state.bench_baseline_route {
        v1.route("/_baseline", get(baseline))
    } else {
        v1
    };
    let v1 = v1.layer(axum::middleware::from_fn_with_state(
        state.clone(),
        require_api_key,
    ));
    let root = if state.simulator.is_some() {
        Router::new().merge(demo::routes())
    } else {
        Router::new()
    };
    let metrics = Router::new().route("/metrics", get(metrics)).route_layer(
        axum::middleware::from_fn_with_state(state.clone(), require_api_key),
    );
    root.nest("/v1", v1)
        .merge(metrics)
        .route("/connect/{session}/{state}", get(connect::follow_link))
        .route("/connect/pending/{session}/{grant}", get(connect::pending))
        .route("/oauth/callback", get(connect::callback))
        .route("/healthz", get(health))
        .route("/readyz", get(ready))
        .route("/openapi.json", get(openapi::serve))
        .route("/", get(demo::home))
        .route("/connect/done", get(pages::connect_done))
        .route("/assets/tokenkeeper.css", get(pages::stylesheet))
        .route("/assets/console.js", get(pages::script))
        .merge(admin::routes(state.clone()))
        .fallback(|| async { ApiError::not_found("no such route") })
        // axum adds `Allow` to this answer.
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(API_BODY_LIMIT))
        .layer(axum::middleware::from_fn(note_route))
        .with_state(state)
}

/// Hands the route template that served a request on to its answer, where `api::server`
/// counts and logs it (the router has consumed the request by then).
async fn note_route(req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().cloned();
    let mut response = next.run(req).await;
    if let Some(route) = route {
        response.extensions_mut().insert(route);
    }
    response
}

/// `GET /metrics` (any API key): Prometheus's text format.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "health",
    responses(
        (status = 200, description = "Prometheus's text format (version 0.0.4); docs/OBSERVABILITY.md lists the metrics", body = String, content_type = "text/plain"),
        (status = 401, description = "`unauthorized`: any API key may read the metrics", body = error::ErrorEnvelope),
    )
)]
async fn metrics(State(state): State<SharedState>) -> Response {
    let text = state.metrics.render(&state.store).await;
    (
        [(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
        )],
        text,
    )
        .into_response()
}

async fn method_not_allowed(method: http::Method) -> ApiError {
    ApiError::new(
        ErrorCode::MethodNotAllowed,
        format!("{method} is not allowed here; the Allow header lists the methods that are"),
    )
}

async fn baseline() -> axum::Json<serde_json::Value> {
    axum::Json(serde_json::json!({"ok": true, "grant_id": "grt_00000000000000000000000000000000"}))
}

/// `GET /healthz`'s answer.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct Health {
    /// Always `ok`.
    #[schema(value_type = String, example = "ok")]
    pub status: &'static str,
}

/// `GET /healthz` (no key): the process is alive.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "health",
    security(()),
    responses((status = 200, description = "The process is alive", body = Health))
)]
async fn health() -> axum::Json<Health> {
    axum::Json(Health { status: "ok" })
}

/// `GET /readyz`'s answer.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct Ready {
    /// Always `ready`.
    #[schema(value_type = String, example = "ready")]
    pub status: &'static str,
    pub backend: crate::store::Backend,
    pub schema_version: i64,
}

/// `GET /readyz` (no key): the database answers and its schema is the one this binary knows.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "health",
    security(()),
    responses(
        (status = 200, description = "Ready to serve", body = Ready),
        (status = 503, description = "`not_ready`: the database is unreachable or its schema is not current", body = error::ErrorEnvelope),
    )
)]
async fn ready(State(state): State<SharedState>) -> Result<axum::Json<Ready>, ApiError> {
    // An outage the store has seen and not yet seen end: on SQLite, reads may still work while
    // nothing can be written, so the schema check below would not notice.
    if !state.store.is_up() {
        return Err(ApiError::new(
            ErrorCode::NotReady,
            "the database is not answering; tokenkeeper is waiting for it",
        ));
    }
    match state.store.check_schema().await {
        Ok(version) => Ok(axum::Json(Ready {
            status: "ready",
            backend: state.store.backend(),
            schema_version: version,
        })),
        Err(e) => Err(ApiError::new(ErrorCode::NotReady, e.to_string())),
    }
}

pub use server::serve;
