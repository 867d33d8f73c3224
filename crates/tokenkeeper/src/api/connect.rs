//! The connect flow: a one-time link, Notion's consent, the callback, and the grant recorded
//! through the ledger (never an early return for a `bot_id` we already know).

use axum::extract::{Extension, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Redirect, Response};
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::auth::Scope;
use super::error::{ApiError, ErrorCode};
use super::{require_admin, ApiJson, ConnectionPath, SharedState};
use crate::ids::{ConnectionId, SessionId};
use crate::ledger::{
    AuthorizationKind, AuthorizationTarget, ConnectionStatus, Diagnosis, NewAuthorization, Provider,
};
use crate::store::SessionLookup;

/// We store only a hash of `state`: the database alone cannot complete anyone's flow.
pub fn state_hash(state: &str) -> String {
    Sha256::digest(state.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSession {
    provider: String,
    end_user_id: String,
    return_to: String,
}

fn check_end_user(id: &str) -> Result<(), ApiError> {
    if id.trim().is_empty() || id.len() > 256 {
        return Err(ApiError::invalid("end_user_id must be 1 to 256 characters"));
    }
    Ok(())
}

fn check_return_to(state: &SharedState, return_to: &str) -> Result<(), ApiError> {
    if state.return_to_allowed(return_to) {
        return Ok(());
    }
    Err(ApiError::new(
        ErrorCode::ReturnToNotAllowed,
        "return_to must start with one of TOKENKEEPER_ALLOWED_RETURN_URLS",
    ))
}

pub async fn create_session(
    State(state): State<SharedState>,
    Extension(scope): Extension<Scope>,
    ApiJson(body): ApiJson<CreateSession>,
) -> Result<Response, ApiError> {
    require_admin(scope, "creating connect sessions")?;
    let provider = Provider::parse(&body.provider).ok_or_else(|| {
        ApiError::new(
            ErrorCode::UnsupportedProvider,
            "provider must be \"notion\"",
        )
    })?;
    check_end_user(&body.end_user_id)?;
    check_return_to(&state, &body.return_to)?;
    let (session, url) = state
        .new_session(provider, body.end_user_id, body.return_to, None)
        .await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({"id": session.id, "url": url, "expires_at": session.expires_at})),
    )
        .into_response())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct CreateReconnect {
    #[serde(default)]
    return_to: Option<String>,
}

pub async fn create_reconnect_session(
    State(state): State<SharedState>,
    Extension(scope): Extension<Scope>,
    ConnectionPath(id): ConnectionPath,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    require_admin(scope, "creating reconnect sessions")?;
    let connection = state
        .store
        .get_connection(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("connection {id} does not exist")))?;
    let body: CreateReconnect = super::optional_json(&body)?;
    let return_to = match body.return_to {
        Some(r) => {
            check_return_to(&state, &r)?;
            r
        }
        None => default_return_to(&state),
    };
    let (session, url) = state
        .new_session(
            connection.provider,
            connection.end_user_id,
            return_to,
            Some(id),
        )
        .await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({"id": session.id, "url": url, "expires_at": session.expires_at})),
    )
        .into_response())
}

/// Where a reconnect link made by tokenkeeper itself (in a 424) sends the user back to.
pub fn default_return_to(state: &SharedState) -> String {
    state
        .allowed_return_urls
        .first()
        .cloned()
        .unwrap_or_else(|| state.public("/"))
}

/// A fresh reconnect link for a connection, for 424 answers.
pub async fn reconnect_url(state: &SharedState, id: &ConnectionId) -> Result<String, ApiError> {
    let connection = state
        .store
        .get_connection(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("connection {id} does not exist")))?;
    let (_, url) = state
        .new_session(
            connection.provider,
            connection.end_user_id,
            default_return_to(state),
            Some(id.clone()),
        )
        .await?;
    Ok(url)
}

/// The answer for a connection whose user must reconnect: 424 `needs_reauth` with the
/// diagnosis and a reconnect link (`null`, logged, when one cannot be made).
pub async fn needs_reauth(
    state: &SharedState,
    id: &ConnectionId,
    diagnosis: Option<Diagnosis>,
) -> ApiError {
    let link = match reconnect_url(state, id).await {
        Ok(url) => serde_json::Value::from(url),
        Err(e) => {
            tracing::error!(connection = %id, "could not make a reconnect link: {}", e.message);
            serde_json::Value::Null
        }
    };
    ApiError::new(
        ErrorCode::NeedsReauth,
        "the user must reconnect this connection; send them to reconnect_url",
    )
    .with("connection_id", id.as_str())
    .with("reconnect_url", link)
    .with(
        "diagnosis",
        serde_json::to_value(diagnosis).expect("a diagnosis serializes"),
    )
}

/// A plain page that says what happened, for the user's browser.
pub fn page(status: StatusCode, title: &str, text: &str) -> Response {
    let body = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{t}</title>\
         <style>body{{font-family:system-ui,sans-serif;max-width:40em;margin:4em auto;line-height:1.5}}</style></head>\
         <body><h1>{t}</h1><p>{x}</p></body></html>",
        t = escape(title),
        x = escape(text)
    );
    (status, Html(body)).into_response()
}

pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

/// `GET /connect/{session}/{state}`: the link an app sends its user to.
pub async fn follow_link(
    State(state): State<SharedState>,
    Path((session, secret)): Path<(String, String)>,
) -> Response {
    let invalid = || {
        page(
            StatusCode::NOT_FOUND,
            "Unknown connect link",
            "This connect link is not valid. Ask the application for a new one.",
        )
    };
    let Some(id) = SessionId::parse(&session) else {
        return invalid();
    };
    let found = match state.store.get_session(&id).await {
        Ok(Some(s)) => s,
        Ok(None) => return invalid(),
        Err(e) => return ApiError::from(e).into_response(),
    };
    if !bool::from(
        state_hash(&secret)
            .as_bytes()
            .ct_eq(found.state_hash.as_bytes()),
    ) {
        return invalid();
    }
    if found.used_at.is_some() {
        return page(
            StatusCode::GONE,
            "Connect link already used",
            "This connect link was already used. Ask the application for a new one.",
        );
    }
    if found.expires_at <= state.clock.now() {
        return page(
            StatusCode::GONE,
            "Connect link expired",
            "This connect link has expired. Ask the application for a new one.",
        );
    }
    Redirect::to(
        state
            .notion
            .authorize_url(&secret, &state.callback_url())
            .as_str(),
    )
    .into_response()
}

#[derive(Deserialize)]
pub struct CallbackQuery {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
}

fn with_query(return_to: &str, pairs: &[(&str, &str)]) -> String {
    match url::Url::parse(return_to) {
        Ok(mut url) => {
            {
                let mut q = url.query_pairs_mut();
                for (k, v) in pairs {
                    q.append_pair(k, v);
                }
            }
            url.into()
        }
        Err(_) => return_to.to_owned(),
    }
}

/// `GET /oauth/callback`: Notion sends the user back here.
pub async fn callback(
    State(state): State<SharedState>,
    Query(query): Query<CallbackQuery>,
) -> Response {
    let Some(secret) = query.state.as_deref().filter(|s| !s.is_empty()) else {
        return page(
            StatusCode::BAD_REQUEST,
            "Missing state",
            "This callback carries no state, so it cannot be matched to a connect link. Nothing was stored.",
        );
    };
    let session = match state.store.consume_session(&state_hash(secret)).await {
        Ok(SessionLookup::Consumed(s)) => s,
        Ok(SessionLookup::Unknown) => {
            return page(
                StatusCode::BAD_REQUEST,
                "Unknown authorization",
                "This callback does not match any connect link tokenkeeper made. Nothing was stored.",
            )
        }
        Ok(SessionLookup::AlreadyUsed(_)) => {
            return page(
                StatusCode::BAD_REQUEST,
                "Authorization already completed",
                "This connect link was already used; a callback can be used only once. Nothing was stored.",
            )
        }
        Ok(SessionLookup::Expired(_)) => {
            return page(
                StatusCode::BAD_REQUEST,
                "Connect link expired",
                "This connect link expired before the authorization came back. Ask the application for a new one. Nothing was stored.",
            )
        }
        Err(e) => return ApiError::from(e).into_response(),
    };
    if let Some(error) = query.error.as_deref() {
        let status = if error == "access_denied" {
            "denied"
        } else {
            "error"
        };
        let mut pairs = vec![("status", status)];
        if status == "error" {
            pairs.push(("error", error));
        }
        if let Some(id) = &session.connection_id {
            pairs.push(("connection_id", id.as_str()));
        }
        return Redirect::to(&with_query(&session.return_to, &pairs)).into_response();
    }
    let Some(code) = query.code.as_deref().filter(|c| !c.is_empty()) else {
        return page(
            StatusCode::BAD_REQUEST,
            "Missing code",
            "Notion sent neither a code nor an error. Nothing was stored.",
        );
    };
    let pair = match state
        .notion
        .exchange_code(code, &state.callback_url())
        .await
    {
        Ok(pair) => pair,
        Err(e) => {
            tracing::warn!("code exchange failed: {e}");
            return page(
                StatusCode::BAD_GATEWAY,
                "Notion did not complete the authorization",
                &format!("Exchanging the authorization code failed ({e}). Nothing was stored; try connecting again."),
            );
        }
    };
    let target = match &session.connection_id {
        Some(id) => AuthorizationTarget::Reconnect {
            connection_id: id.clone(),
        },
        None => AuthorizationTarget::Connect {
            end_user_id: session.end_user_id.clone(),
        },
    };
    let outcome = match state
        .store
        .record_authorization(NewAuthorization::new(session.provider, target, pair))
        .await
    {
        Ok(o) => o,
        Err(e) => {
            tracing::error!("recording an authorization failed: {e}");
            return page(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Authorization not recorded",
                &format!("tokenkeeper could not record this authorization: {e}"),
            );
        }
    };
    let status = match outcome.kind {
        AuthorizationKind::Connected => "connected",
        AuthorizationKind::Reauthorized | AuthorizationKind::Confirmed => "reconnected",
    };
    debug_assert_eq!(outcome.connection.status, ConnectionStatus::Active);
    Redirect::to(&with_query(
        &session.return_to,
        &[
            ("connection_id", outcome.connection.id.as_str()),
            ("status", status),
        ],
    ))
    .into_response()
}
