//! Connections, their tokens, refreshes and history.
//!
//! Each handler answers with a type of its own, and those types, with the `#[utoipa::path]`
//! above each handler, are what `/openapi.json` describes (`api::openapi`).

use axum::extract::{Extension, Query, State};
use axum::http::{HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::connect::needs_reauth;
use super::error::{ApiError, ErrorCode, ErrorEnvelope};
use super::{optional_json, parse_connection_id, require_admin, ConnectionPath, SharedState};
use crate::api_keys::Scope;
use crate::ids::{ConnectionId, GrantId};
use crate::ledger::{
    Connection, ConnectionFilter, ConnectionStatus, Event, GrantRecord, OpenGrant, Provider,
};
use crate::metrics::TokenRead;
use crate::store::TokenSource;

async fn load(state: &SharedState, id: &ConnectionId) -> Result<Connection, ApiError> {
    state
        .store
        .get_connection(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("connection {id} does not exist")))
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only connections of this provider.
    #[param(value_type = Option<Provider>)]
    provider: Option<String>,
    /// Only connections of this end user (as given when the connect session was made).
    end_user_id: Option<String>,
    /// Only connections in this status.
    #[param(value_type = Option<ConnectionStatus>)]
    status: Option<String>,
    /// Only connections whose id sorts after this one: the `next_after` of the previous page.
    #[param(value_type = Option<crate::ids::ConnectionId>)]
    after: Option<String>,
    /// At most this many connections, 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
}

/// A page of connections, by id.
#[derive(Serialize, ToSchema)]
pub struct ConnectionList {
    pub data: Vec<Connection>,
    /// The `after` that asks for the next page; null on the last page.
    pub next_after: Option<ConnectionId>,
}

/// `GET /v1/connections`.
#[utoipa::path(
    get,
    path = "/v1/connections",
    tag = "connections",
    params(ListQuery),
    responses(
        (status = 200, description = "A page of connections, never their tokens", body = ConnectionList),
        (status = 400, description = "`invalid_request`: a malformed filter", body = ErrorEnvelope),
        (status = 401, description = "`unauthorized`: no API key, or an unknown one", body = ErrorEnvelope),
        (status = 503, description = "`database_unavailable`", body = ErrorEnvelope),
    )
)]
pub async fn list(
    State(state): State<SharedState>,
    Query(q): Query<ListQuery>,
) -> Result<Json<ConnectionList>, ApiError> {
    let filter = ConnectionFilter {
        provider: q
            .provider
            .map(|p| {
                Provider::parse(&p).ok_or_else(|| ApiError::invalid("provider must be \"notion\""))
            })
            .transpose()?,
        end_user_id: q.end_user_id,
        status: q
            .status
            .map(|s| {
                ConnectionStatus::parse(&s).ok_or_else(|| {
                    ApiError::invalid("status must be active, needs_reauth or revoked")
                })
            })
            .transpose()?,
        after: q.after.map(|a| parse_connection_id(&a)).transpose()?,
        limit: match q.limit.unwrap_or(100) {
            limit @ 1..=1000 => limit,
            _ => return Err(ApiError::invalid("limit must be 1 to 1000")),
        },
        ..ConnectionFilter::default()
    };
    let connections = state.store.list_connections(&filter).await?;
    let next = (connections.len() as u32 == filter.limit)
        .then(|| connections.last().map(|c| c.id.clone()))
        .flatten();
    Ok(Json(ConnectionList {
        data: connections,
        next_after: next,
    }))
}

/// `GET /v1/connections/{id}`.
#[utoipa::path(
    get,
    path = "/v1/connections/{id}",
    tag = "connections",
    params(("id" = ConnectionId, Path, description = "The connection's id")),
    responses(
        (status = 200, description = "The connection, never its tokens", body = Connection),
        (status = 400, description = "`invalid_request`: a malformed id", body = ErrorEnvelope),
        (status = 401, description = "`unauthorized`", body = ErrorEnvelope),
        (status = 404, description = "`not_found`: no such connection", body = ErrorEnvelope),
        (status = 503, description = "`database_unavailable`", body = ErrorEnvelope),
    )
)]
pub async fn get_one(
    State(state): State<SharedState>,
    ConnectionPath(id): ConnectionPath,
) -> Result<Json<Connection>, ApiError> {
    Ok(Json(load(&state, &id).await?))
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct TokenQuery {
    /// Also answer the grant's refresh token (admin keys only).
    #[serde(default)]
    include_refresh_token: bool,
}

/// A working access token: the connection's current grant.
#[derive(Serialize, ToSchema)]
pub struct TokenAnswer {
    pub connection_id: ConnectionId,
    /// The token to call Notion with.
    pub access_token: String,
    /// The grant the token belongs to: send it as `if_grant` when Notion refuses the token.
    pub grant_id: GrantId,
    pub obtained_at: DateTime<Utc>,
    /// When Notion said the token expires; null when it did not say.
    pub expires_at: Option<DateTime<Utc>>,
    /// Only with `include_refresh_token=true`: the grant's refresh token, null when it has none.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub refresh_token: Option<Option<String>>,
}

/// The current grant after a refresh, and whether this call refreshed it.
#[derive(Serialize, ToSchema)]
pub struct RefreshAnswer {
    #[serde(flatten)]
    pub token: TokenAnswer,
    /// False when `if_grant` had already been replaced and Notion was not called.
    pub refreshed: bool,
}

fn token_body(grant: &OpenGrant, include_refresh: bool) -> TokenAnswer {
    TokenAnswer {
        connection_id: grant.record.connection_id.clone(),
        access_token: grant.access_token.expose_secret().to_owned(),
        grant_id: grant.record.id.clone(),
        obtained_at: grant.record.obtained_at,
        expires_at: grant.record.expires_at,
        refresh_token: include_refresh.then(|| {
            grant
                .refresh_token
                .as_ref()
                .map(|t| t.expose_secret().to_owned())
        }),
    }
}

fn revoked(id: &ConnectionId) -> ApiError {
    ApiError::new(ErrorCode::ConnectionRevoked, "the connection was revoked")
        .with("connection_id", id.as_str())
}

/// `GET /v1/connections/{id}/access-token`: the current grant's token, without calling Notion.
#[utoipa::path(
    get,
    path = "/v1/connections/{id}/access-token",
    tag = "tokens",
    params(("id" = ConnectionId, Path, description = "The connection's id"), TokenQuery),
    responses(
        (status = 200, description = "The current access token; Notion is not called", body = TokenAnswer,
            headers(("Tokenkeeper-Cached" = String, description = "`database_unavailable` when the answer came from this process's token cache because the database could not be reached: the latest grant this process knew of, with no change of it seen, but unchecked"))),
        (status = 400, description = "`invalid_request`: a malformed id or query", body = ErrorEnvelope),
        (status = 401, description = "`unauthorized`", body = ErrorEnvelope),
        (status = 403, description = "`forbidden`: `include_refresh_token` with a `tokens` key", body = ErrorEnvelope),
        (status = 404, description = "`not_found`: no such connection", body = ErrorEnvelope),
        (status = 410, description = "`connection_revoked`", body = ErrorEnvelope),
        (status = 424, description = "`needs_reauth`: the user must reconnect; with `reconnect_url`, `reconnect_url_expires_at` and `diagnosis`", body = ErrorEnvelope),
        (status = 503, description = "`database_unavailable`", body = ErrorEnvelope),
    )
)]
pub async fn access_token(
    State(state): State<SharedState>,
    Extension(scope): Extension<Scope>,
    ConnectionPath(id): ConnectionPath,
    Query(q): Query<TokenQuery>,
) -> Result<Response, ApiError> {
    if q.include_refresh_token {
        require_admin(scope, "reading refresh tokens")?;
        return Ok(Json(with_refresh_token(&state, &id).await?).into_response());
    }
    let view = state
        .store
        .read_token(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("connection {id} does not exist")))?;
    match view.status {
        ConnectionStatus::Active => {}
        ConnectionStatus::NeedsReauth => {
            state.metrics.token_read(TokenRead::NeedsReauth);
            return Err(needs_reauth(&state, &id, view.diagnosis).await);
        }
        ConnectionStatus::Revoked => {
            state.metrics.token_read(TokenRead::Revoked);
            return Err(revoked(&id));
        }
    }
    let grant = view
        .grant
        .ok_or_else(|| ApiError::internal(format!("active connection {id} has no grant")))?;
    state.metrics.token_read(TokenRead::Served);
    let body = Json(TokenAnswer {
        connection_id: id,
        access_token: grant.access_token.expose_secret().to_owned(),
        grant_id: grant.id,
        obtained_at: grant.obtained_at,
        expires_at: grant.expires_at,
        refresh_token: None,
    });
    Ok(match view.source {
        TokenSource::CacheDuringOutage => (
            [(
                CACHED_HEADER,
                HeaderValue::from_static("database_unavailable"),
            )],
            body,
        )
            .into_response(),
        TokenSource::Database | TokenSource::Cache => body.into_response(),
    })
}

/// Marks an answer made from the token cache because the database could not be reached: the
/// grant is the latest this process knew of, and no change of it was seen, but it could not be
/// checked (docs/API.md).
pub const CACHED_HEADER: HeaderName = HeaderName::from_static("tokenkeeper-cached");

/// The token read with `include_refresh_token` (admin): always read from the database, since the
/// token cache never holds a refresh token.
async fn with_refresh_token(
    state: &SharedState,
    id: &ConnectionId,
) -> Result<TokenAnswer, ApiError> {
    let (connection, grant) = state
        .store
        .current_grant(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("connection {id} does not exist")))?;
    match connection.status {
        ConnectionStatus::Active => {}
        ConnectionStatus::NeedsReauth => {
            state.metrics.token_read(TokenRead::NeedsReauth);
            return Err(needs_reauth(state, id, connection.diagnosis).await);
        }
        ConnectionStatus::Revoked => {
            state.metrics.token_read(TokenRead::Revoked);
            return Err(revoked(id));
        }
    }
    let grant =
        grant.ok_or_else(|| ApiError::internal(format!("active connection {id} has no grant")))?;
    state.metrics.token_read(TokenRead::Served);
    Ok(token_body(&grant, true))
}

/// The body of a refresh (optional: an empty body refreshes the current grant).
#[derive(Deserialize, Default, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RefreshBody {
    /// The grant whose token Notion just refused; if it was already replaced, the current
    /// grant is answered without calling Notion.
    #[serde(default)]
    #[schema(value_type = Option<GrantId>)]
    if_grant: Option<String>,
}

/// `POST /v1/connections/{id}/refresh`: "this token just failed"; one refresh in flight.
#[utoipa::path(
    post,
    path = "/v1/connections/{id}/refresh",
    tag = "tokens",
    params(("id" = ConnectionId, Path, description = "The connection's id"), TokenQuery),
    request_body(content = Option<RefreshBody>, description = "Optional; an empty body refreshes the current grant", content_type = "application/json"),
    responses(
        (status = 200, description = "The current grant: refreshed now, or already replaced", body = RefreshAnswer),
        (status = 400, description = "`invalid_request`: a malformed id, query or body", body = ErrorEnvelope),
        (status = 401, description = "`unauthorized`", body = ErrorEnvelope),
        (status = 403, description = "`forbidden`: `include_refresh_token` with a `tokens` key", body = ErrorEnvelope),
        (status = 404, description = "`not_found`: no such connection", body = ErrorEnvelope),
        (status = 409, description = "`not_refreshable` (no refresh token) or `token_rejected_after_refresh` (Notion refused a token it issued moments ago and calls it active)", body = ErrorEnvelope),
        (status = 410, description = "`connection_revoked`", body = ErrorEnvelope),
        (status = 413, description = "`payload_too_large`", body = ErrorEnvelope),
        (status = 424, description = "`needs_reauth`: the user must reconnect", body = ErrorEnvelope),
        (status = 429, description = "`refresh_rate_limited`: refreshed too often; `Retry-After`", body = ErrorEnvelope),
        (status = 502, description = "`provider_rejected`: Notion refused our client (a configuration problem)", body = ErrorEnvelope),
        (status = 503, description = "`provider_unavailable`, `refresh_lock_timeout` or `database_unavailable`; `Retry-After`", body = ErrorEnvelope),
    )
)]
pub async fn refresh(
    State(state): State<SharedState>,
    Extension(scope): Extension<Scope>,
    ConnectionPath(id): ConnectionPath,
    Query(q): Query<TokenQuery>,
    body: axum::body::Bytes,
) -> Result<Json<RefreshAnswer>, ApiError> {
    if q.include_refresh_token {
        require_admin(scope, "reading refresh tokens")?;
    }
    let body: RefreshBody = optional_json(&body)?;
    let if_grant = match body.if_grant {
        Some(g) => Some(
            GrantId::parse(&g)
                .ok_or_else(|| ApiError::invalid(format!("{g:?} is not a grant id (grt_…)")))?,
        ),
        None => None,
    };
    match state.coordinator.refresh(&id, if_grant.as_ref()).await {
        Ok(done) => Ok(Json(RefreshAnswer {
            token: token_body(&done.grant, q.include_refresh_token),
            refreshed: done.refreshed,
        })),
        Err(crate::refresh::RefreshError::NeedsReauth { diagnosis }) => {
            Err(needs_reauth(&state, &id, diagnosis.map(|d| *d)).await)
        }
        Err(e) => Err(e.into()),
    }
}

/// A connection's ledger: every grant, oldest first, with fingerprints, never tokens.
#[derive(Serialize, ToSchema)]
pub struct GrantList {
    pub connection_id: ConnectionId,
    pub current_grant_id: Option<GrantId>,
    pub data: Vec<GrantRecord>,
}

/// `GET /v1/connections/{id}/grants` (admin).
#[utoipa::path(
    get,
    path = "/v1/connections/{id}/grants",
    tag = "ledger",
    params(("id" = ConnectionId, Path, description = "The connection's id")),
    responses(
        (status = 200, description = "Every grant of the connection, oldest first", body = GrantList),
        (status = 400, description = "`invalid_request`: a malformed id", body = ErrorEnvelope),
        (status = 401, description = "`unauthorized`", body = ErrorEnvelope),
        (status = 403, description = "`forbidden`: needs an admin key", body = ErrorEnvelope),
        (status = 404, description = "`not_found`: no such connection", body = ErrorEnvelope),
        (status = 503, description = "`database_unavailable`", body = ErrorEnvelope),
    )
)]
pub async fn grants(
    State(state): State<SharedState>,
    Extension(scope): Extension<Scope>,
    ConnectionPath(id): ConnectionPath,
) -> Result<Json<GrantList>, ApiError> {
    require_admin(scope, "reading the ledger")?;
    let connection = load(&state, &id).await?;
    let grants = state.store.list_grants(&id).await?;
    Ok(Json(GrantList {
        connection_id: id,
        current_grant_id: connection.grant_id,
        data: grants,
    }))
}

/// A connection's audit trail, oldest first.
#[derive(Serialize, ToSchema)]
pub struct EventList {
    pub connection_id: ConnectionId,
    pub data: Vec<Event>,
}

/// `GET /v1/connections/{id}/events` (admin).
#[utoipa::path(
    get,
    path = "/v1/connections/{id}/events",
    tag = "ledger",
    params(("id" = ConnectionId, Path, description = "The connection's id")),
    responses(
        (status = 200, description = "Every event of the connection, oldest first", body = EventList),
        (status = 400, description = "`invalid_request`: a malformed id", body = ErrorEnvelope),
        (status = 401, description = "`unauthorized`", body = ErrorEnvelope),
        (status = 403, description = "`forbidden`: needs an admin key", body = ErrorEnvelope),
        (status = 404, description = "`not_found`: no such connection", body = ErrorEnvelope),
        (status = 503, description = "`database_unavailable`", body = ErrorEnvelope),
    )
)]
pub async fn events(
    State(state): State<SharedState>,
    Extension(scope): Extension<Scope>,
    ConnectionPath(id): ConnectionPath,
) -> Result<Json<EventList>, ApiError> {
    require_admin(scope, "reading the audit trail")?;
    load(&state, &id).await?;
    let events = state.store.list_events(&id).await?;
    Ok(Json(EventList {
        connection_id: id,
        data: events,
    }))
}

/// What a `DELETE` did: the connection, now revoked, and its tokens' revocation at Notion.
#[derive(Serialize, ToSchema)]
pub struct Revocation {
    pub connection: Connection,
    /// Every token that may have been alive is revoked at Notion.
    pub upstream_revoked: bool,
    pub tokens_revoked: usize,
    /// Revocations Notion has not confirmed yet; retried in the background.
    pub tokens_pending: usize,
    /// Revocations given up after their retries.
    pub tokens_failed: usize,
}

/// `DELETE /v1/connections/{id}`: mark revoked (keeping the history), then revoke upstream
/// every token of the connection that may still be alive, waiting a little for the answers.
/// Tokens whose revocation is still pending are retried in the background until they are
/// revoked (or for `jobs::GIVE_UP_AFTER`).
#[utoipa::path(
    delete,
    path = "/v1/connections/{id}",
    tag = "connections",
    params(("id" = ConnectionId, Path, description = "The connection's id")),
    responses(
        (status = 200, description = "The connection is revoked (its history kept) and its tokens revoked at Notion, or queued for it", body = Revocation),
        (status = 400, description = "`invalid_request`: a malformed id", body = ErrorEnvelope),
        (status = 401, description = "`unauthorized`", body = ErrorEnvelope),
        (status = 403, description = "`forbidden`: needs an admin key", body = ErrorEnvelope),
        (status = 404, description = "`not_found`: no such connection", body = ErrorEnvelope),
        (status = 503, description = "`database_unavailable`", body = ErrorEnvelope),
    )
)]
pub async fn revoke(
    State(state): State<SharedState>,
    Extension(scope): Extension<Scope>,
    ConnectionPath(id): ConnectionPath,
) -> Result<Json<Revocation>, ApiError> {
    require_admin(scope, "revoking connections")?;
    Ok(Json(
        revoke_connection(&state, &id, "revoked through the API").await?,
    ))
}

/// Revokes a connection, for the API's `DELETE` and the console alike: marks it revoked
/// (keeping the history, queueing the upstream revocation of every token that may be alive),
/// then waits up to `REVOKE_WAIT` for Notion's answers.
pub(crate) async fn revoke_connection(
    state: &SharedState,
    id: &ConnectionId,
    reason: &str,
) -> Result<Revocation, ApiError> {
    let connection = state.store.mark_revoked(id, reason).await?;
    state.metrics.revocation();
    let counts = state.jobs.run_for_connection(id, REVOKE_WAIT).await;
    match &counts {
        Ok(counts) => tracing::info!(
            op = "revocation",
            connection = %id,
            bot = %connection.bot_id,
            end_user = %connection.end_user_id,
            tokens_revoked = counts.revoked,
            tokens_pending = counts.pending,
            tokens_failed = counts.failed,
            "revoked a connection; tokens still pending at Notion are retried in the background"
        ),
        Err(e) => tracing::warn!(
            op = "revocation",
            connection = %id,
            bot = %connection.bot_id,
            end_user = %connection.end_user_id,
            "revoked a connection; its revocations at Notion are queued but could not be counted: {e}"
        ),
    }
    let counts = counts?;
    Ok(Revocation {
        connection,
        upstream_revoked: counts.pending == 0 && counts.failed == 0,
        tokens_revoked: counts.revoked,
        tokens_pending: counts.pending,
        tokens_failed: counts.failed,
    })
}

/// How long a `DELETE` waits for the provider's answers before it answers itself.
const REVOKE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);
