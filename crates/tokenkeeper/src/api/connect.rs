//! The connect flow: a one-time link, Notion's consent, the callback, and the grant recorded
//! through the ledger (never an early return for a `bot_id` we already know).

use axum::extract::{Extension, Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use cookie::{Cookie, SameSite};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiError, ErrorCode, ErrorEnvelope};
use super::pages::{self, Link, Message};
use super::{require_admin, ApiJson, AppState, ConnectionPath, SharedState};
use crate::api_keys::Scope;
use crate::return_to::ReturnTo;
use std::time::Duration;

use crate::ids::{ConnectionId, GrantId, SessionId};
use crate::ledger::{
    AuthorizationKind, AuthorizationTarget, ConnectSession, ConnectionStatus, Diagnosis,
    NewAuthorization, Provider,
};
use crate::provider::text::{ProviderCode, Sent};
use crate::store::{SessionLookup, StoreError};

/// We store only a hash of `state`: the database alone cannot complete anyone's flow.
pub fn state_hash(state: &str) -> String {
    Sha256::digest(state.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A connect session to make.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSession {
    /// `notion`.
    #[schema(value_type = Provider)]
    provider: String,
    /// The app's own id for the user, 1 to 256 characters, not all of them white space.
    #[schema(min_length = 1, max_length = 256, pattern = r"\S")]
    end_user_id: String,
    /// Where the user's browser goes back to: an http(s) URL under one of
    /// `TOKENKEEPER_ALLOWED_RETURN_URLS`. Without it, the user lands on tokenkeeper's own
    /// page `/connect/done`, which says the workspace is connected and the tab can be closed.
    #[serde(default)]
    return_to: Option<String>,
}

/// A one-time link to send a user's own browser to.
#[derive(Serialize, ToSchema)]
pub struct SessionCreated {
    pub id: SessionId,
    /// The link; it binds the attempt to the browser that follows it.
    pub url: String,
    pub expires_at: chrono::DateTime<chrono::Utc>,
}

impl SessionCreated {
    fn answer(session: &ConnectSession, url: String) -> Response {
        (
            StatusCode::CREATED,
            axum::Json(SessionCreated {
                id: session.id.clone(),
                url,
                expires_at: session.expires_at,
            }),
        )
            .into_response()
    }
}

fn check_end_user(id: &str) -> Result<(), ApiError> {
    if id.trim().is_empty() || id.chars().count() > 256 {
        return Err(ApiError::invalid("end_user_id must be 1 to 256 characters"));
    }
    Ok(())
}

fn check_return_to(state: &SharedState, return_to: &str) -> Result<ReturnTo, ApiError> {
    state.allowed_return_urls.check(return_to).map_err(|why| {
        ApiError::new(
            ErrorCode::ReturnToNotAllowed,
            format!("return_to is refused: {why}"),
        )
    })
}

/// `POST /v1/connect-sessions` (admin).
#[utoipa::path(
    post,
    path = "/v1/connect-sessions",
    tag = "connect",
    request_body = CreateSession,
    responses(
        (status = 201, description = "A one-time connect link", body = SessionCreated),
        (status = 400, description = "`invalid_request` (malformed JSON, unknown fields, a bad `end_user_id`, a missing or wrong `Content-Type`), `unsupported_provider` or `return_to_not_allowed`", body = ErrorEnvelope),
        (status = 401, description = "`unauthorized`", body = ErrorEnvelope),
        (status = 403, description = "`forbidden`: needs an admin key", body = ErrorEnvelope),
        (status = 413, description = "`payload_too_large`", body = ErrorEnvelope),
        (status = 503, description = "`database_unavailable`", body = ErrorEnvelope),
    )
)]
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
    let return_to = match &body.return_to {
        Some(r) => check_return_to(&state, r)?,
        None => done_page(&state),
    };
    let (session, url) = state
        .new_session(provider, body.end_user_id, return_to, None)
        .await?;
    Ok(SessionCreated::answer(&session, url))
}

/// `/connect/done`, where a connect session without `return_to` ends: tokenkeeper's own page,
/// checked against the public URL (like the demo's), not against the app's allow-list.
fn done_page(state: &SharedState) -> ReturnTo {
    crate::return_to::AllowedReturnUrls::only(&state.public_url)
        .check(&state.public("/connect/done"))
        .expect("a page under the public URL is under the public URL")
}

/// A reconnect session to make (the body is optional).
#[derive(Deserialize, Default, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateReconnect {
    /// Where the user's browser goes back to; default: the first allowed return URL.
    #[serde(default)]
    return_to: Option<String>,
}

/// `POST /v1/connections/{id}/reconnect-sessions` (admin).
#[utoipa::path(
    post,
    path = "/v1/connections/{id}/reconnect-sessions",
    tag = "connect",
    params(("id" = ConnectionId, Path, description = "The connection's id")),
    request_body(content = Option<CreateReconnect>, description = "Optional", content_type = "application/json"),
    responses(
        (status = 201, description = "A one-time link that re-authorizes this connection", body = SessionCreated),
        (status = 400, description = "`invalid_request` or `return_to_not_allowed`", body = ErrorEnvelope),
        (status = 401, description = "`unauthorized`", body = ErrorEnvelope),
        (status = 403, description = "`forbidden`: needs an admin key", body = ErrorEnvelope),
        (status = 404, description = "`not_found`: no such connection", body = ErrorEnvelope),
        (status = 413, description = "`payload_too_large`", body = ErrorEnvelope),
        (status = 503, description = "`database_unavailable`", body = ErrorEnvelope),
    )
)]
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
        Some(r) => check_return_to(&state, &r)?,
        None => state.allowed_return_urls.first(),
    };
    let (session, url) = state
        .new_session(
            connection.provider,
            connection.end_user_id,
            return_to,
            Some(id),
        )
        .await?;
    Ok(SessionCreated::answer(&session, url))
}

/// The connection's reconnect link for 424 answers (see `AppState::reconnect_link`), and when
/// it expires.
pub(crate) async fn reconnect_link(
    state: &AppState,
    id: &ConnectionId,
) -> Result<(String, chrono::DateTime<chrono::Utc>), ApiError> {
    let connection = state
        .store
        .get_connection(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("connection {id} does not exist")))?;
    let (session, url) = state
        .reconnect_link(connection.provider, connection.end_user_id, id.clone())
        .await?;
    Ok((url, session.expires_at))
}

impl crate::jobs::ReconnectLinks for AppState {
    fn reconnect_link<'a>(
        &'a self,
        id: &'a ConnectionId,
    ) -> futures::future::BoxFuture<'a, Option<(String, chrono::DateTime<chrono::Utc>)>> {
        Box::pin(async move { reconnect_link(self, id).await.ok() })
    }
}

/// The answer for a connection whose user must reconnect: 424 `needs_reauth` with the
/// diagnosis and a reconnect link (`null`, logged, when one cannot be made). The link is the
/// same for every 424 of the connection until it is used or expires.
pub async fn needs_reauth(
    state: &SharedState,
    id: &ConnectionId,
    diagnosis: Option<Diagnosis>,
) -> ApiError {
    let (link, expires_at) = match reconnect_link(state, id).await {
        Ok((url, expires_at)) => (
            serde_json::Value::from(url),
            serde_json::to_value(expires_at).expect("a time serializes"),
        ),
        Err(e) => {
            tracing::error!(connection = %id, "could not make a reconnect link: {}", e.message);
            (serde_json::Value::Null, serde_json::Value::Null)
        }
    };
    ApiError::new(
        ErrorCode::NeedsReauth,
        "the user must reconnect this connection; send them to reconnect_url",
    )
    .with("connection_id", id.as_str())
    .with("reconnect_url", link)
    .with("reconnect_url_expires_at", expires_at)
    .with(
        "diagnosis",
        serde_json::to_value(diagnosis).expect("a diagnosis serializes"),
    )
}

/// A plain page that says what happened, for the user's browser.
pub fn page(status: StatusCode, title: &str, text: &str) -> Response {
    page_with_way_back(status, title, text, None)
}

/// A plain page that says what happened and, with `back`, offers a link out of the dead end.
fn page_with_way_back(
    status: StatusCode,
    title: &str,
    text: &str,
    back: Option<(&str, &str)>,
) -> Response {
    let mut message = Message::new(title, text);
    message.link = back.map(|(href, label)| Link {
        href: href.to_owned(),
        label: label.to_owned(),
    });
    pages::render(status, &message)
}

/// `GET /connect/{session}/{state}`: the link an app sends its user to.
#[utoipa::path(
    get,
    path = "/connect/{session}/{state}",
    tag = "connect",
    security(()),
    params(
        ("session" = String, Path, description = "The session's id (`cs_…`)"),
        ("state" = String, Path, description = "The session's secret state"),
    ),
    responses(
        (status = 303, description = "To Notion's consent page; sets the attempt cookie `tokenkeeper_connect`", headers(("location" = String), ("set-cookie" = String))),
        (status = 404, description = "An unknown link: a page", body = String, content_type = "text/html"),
        (status = 410, description = "A used or expired link: a page", body = String, content_type = "text/html"),
        (status = 503, description = "The database is unavailable: a page", body = String, content_type = "text/html"),
    )
)]
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
    let lifetime = (found.expires_at - state.clock.now()).num_seconds().max(1);
    let mut response = Redirect::to(
        state
            .notion
            .authorize_url(&secret, &state.callback_url())
            .as_str(),
    )
    .into_response();
    set_attempt_cookie(&state, &mut response, Some((&secret, lifetime)));
    response
}

/// The cookie that binds a connect attempt to the browser that started it (RFC 9700 §4.7:
/// `state` bound to the user agent). Its value is the attempt's `state`, which the browser
/// already holds in the link it followed, so the cookie reveals nothing new; the callback
/// accepts a `state` only from the browser holding the same value, and finds the attempt
/// through it when Notion sends a cancelled consent back with an empty `state`.
const ATTEMPT_COOKIE: &str = "tokenkeeper_connect";

/// The attempt cookie (`Some((state, seconds))`), or the header that clears it (`None`). It is
/// HttpOnly; SameSite=Lax, which still sends it on the top-level redirect from Notion to the
/// callback; scoped to the callback's path, so no other page of ours receives it; and Secure
/// when the public URL is https.
fn attempt_cookie(public_url: &url::Url, value: Option<(&str, i64)>) -> String {
    let path = format!("{}/oauth/callback", public_url.path().trim_end_matches('/'));
    let (value, max_age) = value.unwrap_or(("", 0));
    Cookie::build((ATTEMPT_COOKIE, value))
        .path(path)
        .http_only(true)
        .same_site(SameSite::Lax)
        .secure(public_url.scheme() == "https")
        .max_age(cookie::time::Duration::seconds(max_age))
        .build()
        .to_string()
}

fn set_attempt_cookie(state: &SharedState, response: &mut Response, value: Option<(&str, i64)>) {
    if let Ok(v) = HeaderValue::from_str(&attempt_cookie(&state.public_url, value)) {
        response.headers_mut().append(header::SET_COOKIE, v);
    }
}

/// The attempt cookies the browser sent (normally one; more if someone planted another).
fn attempt_cookies(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(Cookie::split_parse)
        .filter_map(Result::ok)
        .filter(|c| c.name() == ATTEMPT_COOKIE && !c.value().is_empty())
        .map(|c| c.value().to_owned())
        .collect()
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct CallbackQuery {
    /// The authorization code Notion sends back.
    code: Option<String>,
    /// The attempt's state; empty when Notion sends a cancelled consent back.
    state: Option<String>,
    /// Notion's error (`access_denied` when the user cancelled).
    error: Option<String>,
}

impl CallbackQuery {
    /// Reads the query as a browser sent it, names and values decoded as a form's are (as
    /// axum's `Query` would), each of `code`, `state` and `error` at most once: a repeated one
    /// is answered by name (which of two states would be the attempt's?), with the callback's
    /// own page rather than a deserialiser's message. Other names are ignored.
    fn parse(raw: Option<&str>) -> Result<CallbackQuery, &'static str> {
        let mut query = CallbackQuery {
            code: None,
            state: None,
            error: None,
        };
        for (name, value) in url::form_urlencoded::parse(raw.unwrap_or_default().as_bytes()) {
            let (name, slot) = match name.as_ref() {
                "code" => ("code", &mut query.code),
                "state" => ("state", &mut query.state),
                "error" => ("error", &mut query.error),
                _ => continue,
            };
            if slot.is_some() {
                return Err(name);
            }
            *slot = Some(value.into_owned());
        }
        Ok(query)
    }
}

/// The page for a callback tokenkeeper cannot act on, with a way back to the application.
fn dead_end(state: &SharedState, title: &str, text: &str) -> Response {
    dead_end_to(state, None, title, text)
}

/// `dead_end`, linking back to the session's own `return_to` when the session is known.
fn dead_end_to(
    state: &SharedState,
    session: Option<&ConnectSession>,
    title: &str,
    text: &str,
) -> Response {
    let back = session
        .and_then(|s| state.return_target(&s.return_to))
        .unwrap_or_else(|| state.allowed_return_urls.first());
    page_with_way_back(
        StatusCode::BAD_REQUEST,
        title,
        text,
        Some((back.as_str(), "Return to the application")),
    )
}

/// `GET /oauth/callback`: Notion sends the user back here.
///
/// The `state` must come from the browser that followed the connect link (the attempt cookie
/// holds the same value); a `state` from any other browser is refused, nothing stored, so that
/// nobody can make a victim's browser complete the attacker's authorization. A callback with no
/// `state` but an attempt cookie is Notion's cancelled consent (notion-wire.md §1): the attempt
/// is consumed and the user goes back to the app with `status=denied`.
#[utoipa::path(
    get,
    path = "/oauth/callback",
    tag = "connect",
    security(()),
    params(CallbackQuery),
    responses(
        (status = 303, description = "Back to the session's `return_to` with `connection_id` and `status` (`connected`, `reconnected`, `denied`, `error`)", headers(("location" = String), ("set-cookie" = String))),
        (status = 202, description = "The database could not take the authorization: it is kept in the spill journal, and the page looks again every two seconds at `/connect/pending/{session}/{grant}`", body = String, content_type = "text/html"),
        (status = 400, description = "A callback that cannot be completed (no attempt in this browser, an unknown, used or expired state, no code): a page; nothing is stored", body = String, content_type = "text/html"),
        (status = 500, description = "The authorization could not be recorded: a page", body = String, content_type = "text/html"),
        (status = 502, description = "Notion did not complete the code exchange: a page", body = String, content_type = "text/html"),
        (status = 503, description = "The database is unavailable: a page", body = String, content_type = "text/html"),
    )
)]
pub async fn callback(
    State(state): State<SharedState>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Response {
    let query = match CallbackQuery::parse(raw.as_deref()) {
        Ok(query) => query,
        Err(repeated) => {
            return dead_end(
                &state,
                "Sign-in not completed",
                &format!(
                    "The answer that brought you here carried `{repeated}` twice, so it cannot be \
                     matched to your connect attempt. Nothing was stored. Go back to the \
                     application and connect again."
                ),
            )
        }
    };
    let presented = query.state.as_deref().filter(|s| !s.is_empty());
    let cookies = attempt_cookies(&headers);
    let secret = match (presented, cookies.as_slice()) {
        (None, []) => {
            return dead_end(
                &state,
                "Sign-in not completed",
                "Notion sent you back without saying which connect attempt this was, and this \
                 browser holds no connect attempt of tokenkeeper's (it may have expired, or cookies \
                 may be blocked). Nothing was stored. Go back to the application and connect again.",
            )
        }
        (Some(s), cookies) => {
            if !cookies
                .iter()
                .any(|c| bool::from(c.as_bytes().ct_eq(s.as_bytes())))
            {
                // Worth an operator's notice (an attack, or a user switching browsers); the
                // state itself is not logged.
                state.metrics.authorization("foreign_state");
                tracing::info!(
                    op = "authorization",
                    outcome = "foreign_state",
                    cookies = cookies.len(),
                    "refused a callback whose state this browser did not start"
                );
                return dead_end(
                    &state,
                    "Sign-in not completed",
                    "This authorization was not started in this browser, was already completed \
                     here, or this browser started another connect attempt since. For your safety \
                     it was not completed and nothing was stored. Go back to the application and \
                     connect again.",
                );
            }
            s.to_owned()
        }
        (None, [only]) => {
            if query.error.is_none() {
                // An authorization without `state` is not Notion's: it always echoes it.
                return dead_end(
                    &state,
                    "Sign-in not completed",
                    "Notion's answer carried no state, so it cannot be matched to your connect \
                     attempt. Nothing was stored. Go back to the application and connect again.",
                );
            }
            only.clone()
        }
        (None, _) => {
            return dead_end(
                &state,
                "Sign-in not completed",
                "This browser holds several connect attempts, and Notion's answer does not say \
                 which one it ends. Nothing was stored. Go back to the application and connect again.",
            )
        }
    };
    let session = match state.store.consume_session(&state_hash(&secret)).await {
        Ok(SessionLookup::Consumed(s)) => s,
        Ok(SessionLookup::Unknown) => {
            return dead_end(
                &state,
                "Unknown authorization",
                "This callback does not match any connect link tokenkeeper made. Nothing was stored.",
            )
        }
        Ok(SessionLookup::AlreadyUsed(session)) => {
            return dead_end_to(
                &state,
                Some(&session),
                "Authorization already completed",
                "This connect link was already used; a callback can be used only once. Nothing was stored.",
            )
        }
        Ok(SessionLookup::Expired(session)) => {
            return dead_end_to(
                &state,
                Some(&session),
                "Connect link expired",
                "This connect link expired before the authorization came back. Ask the application for a new one. Nothing was stored.",
            )
        }
        Err(e) => return ApiError::from(e).into_response(),
    };
    // The attempt is over whatever happens next: the browser forgets it.
    let finish = |mut response: Response| {
        set_attempt_cookie(&state, &mut response, None);
        response
    };
    let Some(return_to) = state.return_target(&session.return_to) else {
        return finish(page(
            StatusCode::BAD_REQUEST,
            "Return address not allowed",
            "This connect link's return address is no longer allowed by tokenkeeper's settings. Nothing was stored.",
        ));
    };
    if let Some(error) = query.error.as_deref() {
        // The code arrived in the browser's address bar, from anyone: it is kept only if it has
        // the shape of an OAuth error code.
        let code = ProviderCode::from_untrusted(error, &Sent::nothing());
        let status = if code == "access_denied" {
            "denied"
        } else {
            "error"
        };
        state.metrics.authorization(status);
        tracing::info!(
            op = "authorization",
            outcome = status,
            end_user = %session.end_user_id,
            connection = session.connection_id.as_ref().map(|c| c.as_str()),
            provider_code = code.as_str(),
            "the user did not authorize at Notion"
        );
        let mut pairs = vec![("status", status)];
        if status == "error" {
            pairs.push(("error", code.as_str()));
        }
        if let Some(id) = &session.connection_id {
            pairs.push(("connection_id", id.as_str()));
        }
        return finish(Redirect::to(&return_to.with_query(&pairs)).into_response());
    }
    let Some(code) = query.code.as_deref().filter(|c| !c.is_empty()) else {
        return finish(page(
            StatusCode::BAD_REQUEST,
            "Missing code",
            "Notion sent neither a code nor an error. Nothing was stored.",
        ));
    };
    let pair = match state
        .notion
        .exchange_code(code, &state.callback_url())
        .await
    {
        Ok(pair) => pair,
        Err(e) => {
            state.metrics.authorization("failed");
            tracing::warn!(
                op = "authorization",
                outcome = "failed",
                cause = "provider",
                provider_code = %e.code(),
                end_user = %session.end_user_id,
                connection = session.connection_id.as_ref().map(|c| c.as_str()),
                "code exchange failed: {e}"
            );
            return finish(page(
                StatusCode::BAD_GATEWAY,
                "Notion did not complete the authorization",
                &format!("Exchanging the authorization code failed ({e}). Nothing was stored; try connecting again."),
            ));
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
    let auth = NewAuthorization::new(session.provider, target, pair);
    let outcome = match record_or_spill(&state, &session.id, auth).await {
        Recorded::Yes(o) => o,
        Recorded::Spilled(grant) => {
            // The pair is kept; the browser waits on a page that sends it on to the app once
            // the database has it.
            state.metrics.authorization("kept");
            tracing::warn!(
                op = "authorization",
                outcome = "kept",
                cause = "database",
                end_user = %session.end_user_id,
                connection = session.connection_id.as_ref().map(|c| c.as_str()),
                grant = %grant,
                "the database could not take an authorization; it is kept in the spill journal until it can"
            );
            return finish(kept_page(&pending_url(&state, &session.id, &grant)));
        }
        Recorded::Refused(e) => {
            state.metrics.authorization("failed");
            tracing::error!(
                op = "authorization",
                outcome = "failed",
                cause = "database",
                end_user = %session.end_user_id,
                connection = session.connection_id.as_ref().map(|c| c.as_str()),
                "recording an authorization failed: {e}"
            );
            return finish(page(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Authorization not recorded",
                &format!("tokenkeeper could not record this authorization: {e}"),
            ));
        }
    };
    let status = match outcome.kind {
        AuthorizationKind::Connected => "connected",
        AuthorizationKind::Reauthorized | AuthorizationKind::Confirmed => "reconnected",
    };
    let kind = match outcome.kind {
        AuthorizationKind::Connected => "connected",
        AuthorizationKind::Reauthorized => "reauthorized",
        AuthorizationKind::Confirmed => "confirmed",
    };
    state.metrics.authorization(kind);
    tracing::info!(
        op = "authorization",
        outcome = kind,
        connection = %outcome.connection.id,
        bot = %outcome.connection.bot_id,
        end_user = %outcome.connection.end_user_id,
        grant = %outcome.grant_id,
        workspace = %outcome.connection.workspace_id,
        reconnect = session.connection_id.is_some(),
        recovered = outcome.recovered,
        "recorded an authorization"
    );
    debug_assert_eq!(outcome.connection.status, ConnectionStatus::Active);
    finish(
        Redirect::to(&return_to.with_query(&[
            ("connection_id", outcome.connection.id.as_str()),
            ("status", status),
        ]))
        .into_response(),
    )
}

/// What became of an authorization from the callback.
#[allow(clippy::large_enum_variant)]
enum Recorded {
    Yes(crate::ledger::AuthorizationOutcome),
    /// The database could not take it: it is in the spill journal as this grant.
    Spilled(GrantId),
    Refused(StoreError),
}

/// How long a callback retries recording an authorization before it spills the pair (the
/// browser is waiting; the journal is durable).
const SPILL_AFTER: Duration = Duration::from_secs(2);

/// Records an authorization whose code Notion already exchanged (invariant 1: the pair exists
/// only here until then). A database that cannot take it is retried for `SPILL_AFTER`, then
/// the pair goes to the spill journal, which commits it as soon as the database is back.
async fn record_or_spill(
    state: &SharedState,
    session: &SessionId,
    auth: NewAuthorization,
) -> Recorded {
    let started = std::time::Instant::now();
    let mut wait = Duration::from_millis(50);
    loop {
        match state.store.record_authorization(auth.clone()).await {
            Ok(outcome) => return Recorded::Yes(outcome),
            Err(e @ (StoreError::Conflict(_) | StoreError::UnknownConnection(_))) => {
                return Recorded::Refused(e)
            }
            Err(e) if started.elapsed() >= SPILL_AFTER => {
                let journal = state.journal.clone();
                let (session, spilled) = (session.clone(), auth.clone());
                let written = tokio::task::spawn_blocking(move || {
                    journal.spill_authorization(&session, &spilled)
                })
                .await;
                match written {
                    Ok(Ok(())) => {
                        tracing::warn!(
                            grant = %auth.grant_id,
                            "the database cannot take an authorization ({e}); it is kept in the \
                             spill journal and will be committed when the database is back"
                        );
                        return Recorded::Spilled(auth.grant_id);
                    }
                    Ok(Err(journal)) => tracing::error!(
                        "an authorization can be neither recorded ({e}) nor spilled ({journal}); \
                         retrying"
                    ),
                    Err(task) => tracing::error!("spilling an authorization failed: {task}"),
                }
            }
            Err(_) => {}
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(1));
    }
}

/// Where a browser waits for a spilled authorization.
fn pending_url(state: &SharedState, session: &SessionId, grant: &GrantId) -> String {
    state.public(&format!("/connect/pending/{session}/{grant}"))
}

/// "Kept, and on its way": a page that looks again every two seconds.
fn kept_page(pending: &str) -> Response {
    let mut message = Message::new(
        "Authorization kept",
        "Notion authorized the connection, and tokenkeeper has kept it. It is being recorded; \
         this page goes on to the application by itself in a moment.",
    );
    message.refresh = Some(pending);
    message.link = Some(Link {
        href: pending.to_owned(),
        label: "Continue".to_owned(),
    });
    pages::render(StatusCode::ACCEPTED, &message)
}

/// `GET /connect/pending/{session}/{grant}`: once the spilled authorization is in the ledger,
/// on to the app's `return_to` with the connection; until then, the same waiting page.
#[utoipa::path(
    get,
    path = "/connect/pending/{session}/{grant}",
    operation_id = "pending_authorization",
    tag = "connect",
    security(()),
    params(
        ("session" = String, Path, description = "The connect session's id (`cs_…`)"),
        ("grant" = String, Path, description = "The kept grant's id (`grt_…`)"),
    ),
    responses(
        (status = 303, description = "The authorization is recorded: back to the session's `return_to` with `connection_id` and `status`", headers(("location" = String))),
        (status = 202, description = "The authorization is kept but not recorded yet (the database is away): a page that looks again every two seconds", body = String, content_type = "text/html"),
        (status = 400, description = "The session's `return_to` is no longer allowed: a page", body = String, content_type = "text/html"),
        (status = 404, description = "An unknown session or grant: a page", body = String, content_type = "text/html"),
    )
)]
pub async fn pending(
    State(state): State<SharedState>,
    Path((session, grant)): Path<(String, String)>,
) -> Response {
    let (Some(session), Some(grant)) = (SessionId::parse(&session), GrantId::parse(&grant)) else {
        return page(
            StatusCode::NOT_FOUND,
            "Unknown authorization",
            "This address does not name an authorization tokenkeeper kept.",
        );
    };
    let here = pending_url(&state, &session, &grant);
    let (found, recorded) = match (
        state.store.get_session(&session).await,
        state.store.grant_by_id(&grant).await,
    ) {
        (Ok(Some(found)), Ok(recorded)) => (found, recorded),
        (Ok(None), _) => {
            return page(
                StatusCode::NOT_FOUND,
                "Unknown authorization",
                "This address does not name an authorization tokenkeeper kept.",
            )
        }
        // The database is still away: keep waiting.
        _ => return kept_page(&here),
    };
    let Some(grant) = recorded else {
        return kept_page(&here);
    };
    let Some(return_to) = state.return_target(&found.return_to) else {
        return page(
            StatusCode::BAD_REQUEST,
            "Return address not allowed",
            "The authorization is recorded, but this connect link's return address is no longer allowed by tokenkeeper's settings.",
        );
    };
    let status = match grant.origin {
        crate::ledger::GrantOrigin::Authorization => "connected",
        _ => "reconnected",
    };
    Redirect::to(&return_to.with_query(&[
        ("connection_id", grant.connection_id.as_str()),
        ("status", status),
    ]))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_attempt_cookie_is_secure_on_https_and_scoped_under_the_public_path() {
        let https = url::Url::parse("https://auth.example/tk/").unwrap();
        let cookie = attempt_cookie(&https, Some(("s3", 600)));
        for part in [
            "tokenkeeper_connect=s3",
            "HttpOnly",
            "SameSite=Lax",
            "Secure",
            "Path=/tk/oauth/callback",
            "Max-Age=600",
        ] {
            assert!(cookie.split("; ").any(|p| p == part), "{part} in {cookie}");
        }
        let http = url::Url::parse("http://127.0.0.1:8080").unwrap();
        let cleared = attempt_cookie(&http, None);
        assert!(!cleared.contains("Secure"), "{cleared}");
        assert!(cleared.contains("Max-Age=0") && cleared.contains("Path=/oauth/callback"));
    }
}
