//! Connections, their tokens, refreshes and history.

use axum::extract::{Extension, Query, State};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::auth::Scope;
use super::connect::needs_reauth;
use super::error::{ApiError, ErrorCode};
use super::{optional_json, parse_connection_id, require_admin, ConnectionPath, SharedState};
use crate::ids::{ConnectionId, GrantId};
use crate::ledger::{Connection, ConnectionFilter, ConnectionStatus, OpenGrant, Provider};
use crate::metrics::TokenRead;

async fn load(state: &SharedState, id: &ConnectionId) -> Result<Connection, ApiError> {
    state
        .store
        .get_connection(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("connection {id} does not exist")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    provider: Option<String>,
    end_user_id: Option<String>,
    status: Option<String>,
    after: Option<String>,
    limit: Option<u32>,
}

pub async fn list(
    State(state): State<SharedState>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
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
        limit: q.limit.unwrap_or(100).clamp(1, 1000),
    };
    let connections = state.store.list_connections(&filter).await?;
    let next = (connections.len() as u32 == filter.limit)
        .then(|| connections.last().map(|c| c.id.clone()))
        .flatten();
    Ok(Json(json!({"data": connections, "next_after": next})))
}

pub async fn get_one(
    State(state): State<SharedState>,
    ConnectionPath(id): ConnectionPath,
) -> Result<Json<Connection>, ApiError> {
    Ok(Json(load(&state, &id).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenQuery {
    #[serde(default)]
    include_refresh_token: bool,
}

fn token_body(grant: &OpenGrant, include_refresh: bool) -> Value {
    let mut body = json!({
        "connection_id": grant.record.connection_id,
        "access_token": grant.access_token.expose_secret(),
        "grant_id": grant.record.id,
        "obtained_at": grant.record.obtained_at,
        "expires_at": grant.record.expires_at,
    });
    if include_refresh {
        body["refresh_token"] = grant
            .refresh_token
            .as_ref()
            .map(|t| Value::from(t.expose_secret()))
            .unwrap_or(Value::Null);
    }
    body
}

fn revoked(connection: &Connection) -> ApiError {
    ApiError::new(ErrorCode::ConnectionRevoked, "the connection was revoked")
        .with("connection_id", connection.id.as_str())
}

/// `GET /v1/connections/{id}/access-token`: the current grant's token, without calling Notion.
pub async fn access_token(
    State(state): State<SharedState>,
    Extension(scope): Extension<Scope>,
    ConnectionPath(id): ConnectionPath,
    Query(q): Query<TokenQuery>,
) -> Result<Json<Value>, ApiError> {
    if q.include_refresh_token {
        require_admin(scope, "reading refresh tokens")?;
    }
    let (connection, grant) = state
        .store
        .current_grant(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("connection {id} does not exist")))?;
    match connection.status {
        ConnectionStatus::Active => {}
        ConnectionStatus::NeedsReauth => {
            state.metrics.token_read(TokenRead::NeedsReauth);
            return Err(needs_reauth(&state, &id, connection.diagnosis).await);
        }
        ConnectionStatus::Revoked => {
            state.metrics.token_read(TokenRead::Revoked);
            return Err(revoked(&connection));
        }
    }
    let grant =
        grant.ok_or_else(|| ApiError::internal(format!("active connection {id} has no grant")))?;
    state.metrics.token_read(TokenRead::Served);
    Ok(Json(token_body(&grant, q.include_refresh_token)))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RefreshBody {
    #[serde(default)]
    if_grant: Option<String>,
}

/// `POST /v1/connections/{id}/refresh`: "this token just failed"; one refresh in flight.
pub async fn refresh(
    State(state): State<SharedState>,
    Extension(scope): Extension<Scope>,
    ConnectionPath(id): ConnectionPath,
    Query(q): Query<TokenQuery>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
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
        Ok(done) => {
            let mut body = token_body(&done.grant, q.include_refresh_token);
            body["refreshed"] = Value::from(done.refreshed);
            Ok(Json(body))
        }
        Err(crate::refresh::RefreshError::NeedsReauth { diagnosis }) => {
            Err(needs_reauth(&state, &id, diagnosis.map(|d| *d)).await)
        }
        Err(e) => Err(e.into()),
    }
}

pub async fn grants(
    State(state): State<SharedState>,
    Extension(scope): Extension<Scope>,
    ConnectionPath(id): ConnectionPath,
) -> Result<Json<Value>, ApiError> {
    require_admin(scope, "reading the ledger")?;
    let connection = load(&state, &id).await?;
    let grants = state.store.list_grants(&id).await?;
    Ok(Json(
        json!({"connection_id": id, "current_grant_id": connection.grant_id, "data": grants}),
    ))
}

pub async fn events(
    State(state): State<SharedState>,
    Extension(scope): Extension<Scope>,
    ConnectionPath(id): ConnectionPath,
) -> Result<Json<Value>, ApiError> {
    require_admin(scope, "reading the audit trail")?;
    load(&state, &id).await?;
    let events = state.store.list_events(&id).await?;
    Ok(Json(json!({"connection_id": id, "data": events})))
}

/// `DELETE /v1/connections/{id}`: mark revoked (keeping the history), then revoke upstream
/// every token of the connection that may still be alive, waiting a little for the answers.
/// Tokens whose revocation is still pending are retried in the background until they are
/// revoked (or for `jobs::GIVE_UP_AFTER`).
pub async fn revoke(
    State(state): State<SharedState>,
    Extension(scope): Extension<Scope>,
    ConnectionPath(id): ConnectionPath,
) -> Result<Json<Value>, ApiError> {
    require_admin(scope, "revoking connections")?;
    let connection = state
        .store
        .mark_revoked(&id, "revoked through the API")
        .await?;
    state.metrics.revocation();
    let counts = state.jobs.run_for_connection(&id, REVOKE_WAIT).await;
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
    Ok(Json(json!({
        "connection": connection,
        "upstream_revoked": counts.pending == 0 && counts.failed == 0,
        "tokens_revoked": counts.revoked,
        "tokens_pending": counts.pending,
        "tokens_failed": counts.failed,
    })))
}

/// How long a `DELETE` waits for the provider's answers before it answers itself.
const REVOKE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);
