//! The admin console at `/admin`: server-rendered pages (askama templates under
//! `templates/admin/`) that work without JavaScript, for a person who must find, within a
//! minute, which connections need their users back and why.
//!
//! Sign-in takes an admin API key (`api_keys`; a `tokens` key is refused) and starts a session
//! held in this process's memory (`session.rs`) behind an HttpOnly, SameSite=Strict cookie,
//! Secure when the public URL is https, scoped to `/admin`. Every form carries a CSRF token that
//! every POST checks: the session's own, or, for the sign-in form, the value of a short-lived
//! cookie of its own (a double submit), so a page of another site can neither sign a browser
//! in nor act in its session. Failed sign-ins are logged (never the key) and limited per client
//! address. Pages never show a token, a key or a secret: grants by fingerprint, keys by id.
//!
//! Actions do exactly what the API's calls do, through the same code: revoking is
//! `connections::revoke_connection` (`DELETE /v1/connections/{id}`), retrying a delivery is
//! `webhooks::retry_delivery` (`POST /v1/webhook-deliveries/{id}/retry`), and the reconnect
//! link is the connection's shared one (`connect::reconnect_link`).
//!
//! These are HTML pages, not API calls: they are not in the OpenAPI document.

pub mod session;
pub mod words;

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use askama::Template;
use axum::extract::{Form, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use chrono::{DateTime, Utc};
use cookie::{Cookie, SameSite};
use serde::Deserialize;
use subtle::ConstantTimeEq;

use super::error::ApiError;
use super::pages::{self, When};
use super::server::ClientAddr;
use super::webhooks::{Delivery, DeliveryStatus};
use super::{parse_connection_id, SharedState};
use crate::api_keys::Scope;
use crate::ids::ConnectionId;
use crate::ledger::{ConnectionFilter, ConnectionStatus, Diagnosis, EventKind, JobKind, JobStatus};
use crate::store::StatusCounts;
use session::{Session, Sessions};

/// The session cookie.
const SESSION_COOKIE: &str = "tokenkeeper_admin";
/// The sign-in form's own CSRF cookie (there is no session yet to hold its token).
const SIGN_IN_COOKIE: &str = "tokenkeeper_admin_sign_in";
/// How long a sign-in form stays usable.
const SIGN_IN_FORM_LIFETIME: i64 = 3600;
/// Connections on one page of the list.
const PAGE: u32 = 50;
/// Deliveries on one page.
const DELIVERY_PAGE: u32 = 50;
/// How many of a connection's newest grants, events and deliveries its page shows.
const HISTORY: u32 = 100;
const CONNECTION_DELIVERIES: u32 = 20;
/// The counts at the top of the pages are each a scan (of an index), tens of milliseconds at a
/// million connections: they are kept for a hundred times as long as counting took (so the
/// console spends at most about 1 % of its time counting), at most `COUNTS_FOR_AT_MOST`. A small
/// database is counted afresh on almost every page.
const COUNTS_KEPT_PER_COUNTING: u32 = 100;
const COUNTS_FOR_AT_MOST: Duration = Duration::from_secs(10);

/// The console's state in this process: sessions, failed sign-ins, the counts' cache, and the
/// health check's settings (for the health page).
#[derive(Debug, Default)]
pub struct Console {
    pub sessions: Sessions,
    /// The last counts: until when they are kept, when they were made, and them.
    counts: tokio::sync::Mutex<Option<(Instant, DateTime<Utc>, StatusCounts)>>,
    health_check: std::sync::OnceLock<crate::config::HealthSettings>,
}

impl Console {
    /// Tells the health page how this process's health check runs (`app` calls it at start).
    pub fn set_health_check(&self, settings: crate::config::HealthSettings) {
        let _ = self.health_check.set(settings);
    }

    /// Connections by status and jobs by kind and status, and when they were counted (see
    /// `COUNTS_KEPT_PER_COUNTING`).
    async fn counts(&self, state: &SharedState) -> Result<(StatusCounts, DateTime<Utc>), ApiError> {
        let mut cached = self.counts.lock().await;
        if let Some((until, when, counts)) = cached.as_ref() {
            if Instant::now() < *until {
                return Ok((counts.clone(), *when));
            }
        }
        let started = Instant::now();
        let counts = state.store.status_counts().await?;
        let keep = (started.elapsed() * COUNTS_KEPT_PER_COUNTING).min(COUNTS_FOR_AT_MOST);
        let when = state.clock.now();
        *cached = Some((Instant::now() + keep, when, counts.clone()));
        Ok((counts, when))
    }
}

/// The console's routes; `api::router` mounts them with the security headers of `secure`.
pub fn routes(state: SharedState) -> Router<SharedState> {
    Router::new()
        .route("/admin", get(start))
        .route("/admin/", get(start))
        .route("/admin/sign-in", get(start).post(sign_in))
        .route("/admin/sign-out", post(sign_out))
        .route("/admin/connections", get(connections))
        .route("/admin/connections/{id}", get(connection))
        .route(
            "/admin/connections/{id}/revoke",
            get(confirm_revoke).post(revoke),
        )
        .route("/admin/webhook-deliveries", get(deliveries))
        .route("/admin/webhook-deliveries/{id}/retry", post(retry))
        .route("/admin/health", get(health))
        .layer(axum::middleware::map_response(secure))
        .with_state(state)
}

/// Headers of every console page: nothing else may frame it, run script in it or post its
/// forms elsewhere; it is never cached; the pages a link leads from are not told its URLs.
async fn secure(mut response: Response) -> Response {
    let headers = response.headers_mut();
    for (name, value) in [
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self'; \
             form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "same-origin"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::CACHE_CONTROL, "no-store"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

// Cookies.

fn cookie_header(
    state: &SharedState,
    name: &str,
    value: &str,
    max_age: i64,
) -> Option<HeaderValue> {
    let cookie = Cookie::build((name, value))
        .path(format!("{}/admin", pages::base(state)))
        .http_only(true)
        .same_site(SameSite::Strict)
        .secure(state.public_url.scheme() == "https")
        .max_age(cookie::time::Duration::seconds(max_age))
        .build();
    HeaderValue::from_str(&cookie.to_string()).ok()
}

fn set_cookie(response: &mut Response, value: Option<HeaderValue>) {
    if let Some(value) = value {
        response.headers_mut().append(header::SET_COOKIE, value);
    }
}

fn read_cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(Cookie::split_parse)
        .filter_map(Result::ok)
        .find(|c| c.name() == name && !c.value().is_empty())
        .map(|c| c.value().to_owned())
}

/// The browser's session, or the answer that sends it to sign in. (The error is the answer
/// itself, made once per request: boxing it would buy nothing.)
#[allow(clippy::result_large_err)]
fn signed_in(state: &SharedState, headers: &HeaderMap) -> Result<Session, Response> {
    read_cookie(headers, SESSION_COOKIE)
        .and_then(|cookie| state.console.sessions.get(&cookie, state.clock.now()))
        .ok_or_else(|| Redirect::to(&format!("{}/admin", pages::base(state))).into_response())
}

/// The session of a console page's request, taken by the handler like any extractor; a
/// request without one is sent to sign in (`signed_in`).
struct SignedIn(Session);

impl axum::extract::FromRequestParts<SharedState> for SignedIn {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &SharedState,
    ) -> Result<Self, Response> {
        signed_in(state, &parts.headers).map(SignedIn)
    }
}

/// A POST's session whose CSRF token the form carries; otherwise the refusal, logged.
#[allow(clippy::result_large_err)]
fn checked(
    state: &SharedState,
    headers: &HeaderMap,
    csrf: &str,
    action: &'static str,
) -> Result<Session, Response> {
    let session = signed_in(state, headers)?;
    if session.csrf_matches(csrf) {
        return Ok(session);
    }
    tracing::warn!(
        op = "admin_action",
        action,
        outcome = "refused",
        reason = "csrf",
        key = %session.key,
        "refused a console form without this session's CSRF token"
    );
    Err(pages::render(
        StatusCode::FORBIDDEN,
        &pages::Message::new(
            "Form refused",
            "This form did not come from this console session (its CSRF token does not match), \
             so nothing was done. Go back, reload the page and try again.",
        ),
    ))
}

fn client_ip(client: Option<Extension<ClientAddr>>) -> IpAddr {
    client
        .and_then(|Extension(ClientAddr(ip))| ip)
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
}

/// A notice at the top of a page, after an action.
struct Notice {
    kind: &'static str,
    text: String,
}

// Sign-in.

#[derive(Template)]
#[template(path = "admin/sign_in.html")]
struct SignIn {
    base: String,
    csrf: String,
    problem: Option<String>,
}

/// `GET /admin`: the sign-in form, or, when signed in, the connections.
async fn start(State(state): State<SharedState>, headers: HeaderMap) -> Response {
    if signed_in(&state, &headers).is_ok() {
        return Redirect::to(&format!("{}/admin/connections", pages::base(&state))).into_response();
    }
    sign_in_page(&state, &headers, StatusCode::OK, None)
}

/// The sign-in form, with its CSRF cookie (the browser's current one, or a new one).
fn sign_in_page(
    state: &SharedState,
    headers: &HeaderMap,
    status: StatusCode,
    problem: Option<String>,
) -> Response {
    let csrf = read_cookie(headers, SIGN_IN_COOKIE)
        .filter(|v| v.len() == 32)
        .unwrap_or_else(|| crate::ids::random_token(24));
    let mut response = pages::render(
        status,
        &SignIn {
            base: pages::base(state),
            csrf: csrf.clone(),
            problem,
        },
    );
    set_cookie(
        &mut response,
        cookie_header(state, SIGN_IN_COOKIE, &csrf, SIGN_IN_FORM_LIFETIME),
    );
    response
}

#[derive(Deserialize)]
struct SignInForm {
    #[serde(default)]
    key: String,
    #[serde(default)]
    csrf: String,
}

/// `POST /admin/sign-in`.
async fn sign_in(
    State(state): State<SharedState>,
    client: Option<Extension<ClientAddr>>,
    headers: HeaderMap,
    Form(form): Form<SignInForm>,
) -> Response {
    let now = state.clock.now();
    let client = client_ip(client);
    let refuse = |reason: &'static str| {
        tracing::warn!(
            op = "admin_sign_in",
            outcome = "refused",
            reason,
            client = %client,
            "refused a sign-in to the console"
        );
    };
    let form_is_ours = read_cookie(&headers, SIGN_IN_COOKIE).is_some_and(|cookie| {
        !form.csrf.is_empty() && bool::from(cookie.as_bytes().ct_eq(form.csrf.as_bytes()))
    });
    if !form_is_ours {
        refuse("csrf");
        return sign_in_page(
            &state,
            &headers,
            StatusCode::FORBIDDEN,
            Some(
                "This sign-in form did not come from this page, or it expired. Nothing was \
                 checked; sign in again below."
                    .into(),
            ),
        );
    }
    if let Err(wait) = state.console.sessions.may_try(client, now) {
        refuse("rate_limited");
        let minutes = (wait.num_seconds() + 59) / 60;
        let mut response = sign_in_page(
            &state,
            &headers,
            StatusCode::TOO_MANY_REQUESTS,
            Some(format!(
                "Too many failed sign-ins from your address. Try again in {minutes} minute{}.",
                if minutes == 1 { "" } else { "s" }
            )),
        );
        if let Ok(v) = HeaderValue::from_str(&wait.num_seconds().max(1).to_string()) {
            response.headers_mut().insert(header::RETRY_AFTER, v);
        }
        return response;
    }
    let key = form.key.trim();
    match state.api_keys.check(key) {
        Some(Scope::Admin) => {
            let fingerprint = crate::ids::fingerprint(key);
            let (cookie, _) = state.console.sessions.start(fingerprint.clone(), now);
            tracing::info!(
                op = "admin_sign_in",
                outcome = "signed_in",
                key = %fingerprint,
                client = %client,
                "signed in to the console"
            );
            let mut response =
                Redirect::to(&format!("{}/admin/connections", pages::base(&state))).into_response();
            set_cookie(
                &mut response,
                cookie_header(
                    &state,
                    SESSION_COOKIE,
                    &cookie,
                    session::LIFETIME.num_seconds(),
                ),
            );
            set_cookie(&mut response, cookie_header(&state, SIGN_IN_COOKIE, "", 0));
            response
        }
        Some(Scope::Tokens) => {
            state.console.sessions.failed(client, now);
            refuse("tokens_key");
            sign_in_page(
                &state,
                &headers,
                StatusCode::FORBIDDEN,
                Some(
                    "That is a tokens key: it may read tokens through the API, but it cannot \
                     sign in to the console. Sign in with an admin key."
                        .into(),
                ),
            )
        }
        None => {
            state.console.sessions.failed(client, now);
            refuse(if key.is_empty() {
                "missing_key"
            } else {
                "unknown_key"
            });
            sign_in_page(
                &state,
                &headers,
                StatusCode::UNAUTHORIZED,
                Some("That key is not one of this tokenkeeper's API keys.".into()),
            )
        }
    }
}

#[derive(Deserialize)]
struct CsrfForm {
    #[serde(default)]
    csrf: String,
    /// Where a retried delivery's page goes back to: `connection` or a deliveries tab.
    #[serde(default)]
    from: String,
}

/// `POST /admin/sign-out`.
async fn sign_out(
    State(state): State<SharedState>,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Response {
    let session = match checked(&state, &headers, &form.csrf, "sign_out") {
        Ok(session) => session,
        Err(response) => return response,
    };
    if let Some(cookie) = read_cookie(&headers, SESSION_COOKIE) {
        state.console.sessions.end(&cookie);
    }
    tracing::info!(op = "admin_action", action = "sign_out", outcome = "done", key = %session.key, "signed out of the console");
    let mut response = Redirect::to(&format!("{}/admin", pages::base(&state))).into_response();
    set_cookie(&mut response, cookie_header(&state, SESSION_COOKIE, "", 0));
    response
}

// Connections.

struct StatusCount {
    status: &'static str,
    words: &'static str,
    count: i64,
}

struct ConnectionRow {
    id: String,
    workspace: String,
    end_user: String,
    status: &'static str,
    status_words: &'static str,
    bot: String,
    updated: When,
    checked: Option<When>,
    check_result: &'static str,
}

#[derive(Template)]
#[template(path = "admin/connections.html")]
struct Connections {
    base: String,
    csrf: String,
    tab: &'static str,
    notice: Option<Notice>,
    simulator: bool,
    counts: Vec<StatusCount>,
    total: i64,
    counted: When,
    status: String,
    q: String,
    end_user: String,
    workspace: String,
    bot: String,
    filtered: bool,
    after: bool,
    rows: Vec<ConnectionRow>,
    first_query: String,
    next_query: Option<String>,
}

#[derive(Deserialize, Default)]
struct ListQuery {
    #[serde(default)]
    status: String,
    #[serde(default)]
    q: String,
    #[serde(default)]
    end_user: String,
    #[serde(default)]
    workspace: String,
    #[serde(default)]
    bot: String,
    #[serde(default)]
    after: String,
}

const STATUSES: [ConnectionStatus; 3] = [
    ConnectionStatus::NeedsReauth,
    ConnectionStatus::Active,
    ConnectionStatus::Revoked,
];

fn given(s: &str) -> Option<String> {
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_owned())
}

/// `GET /admin/connections`: counts by status, then a page of connections, filtered.
async fn connections(
    State(state): State<SharedState>,
    SignedIn(session): SignedIn,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    let status =
        match given(&q.status) {
            None => None,
            Some(s) => Some(ConnectionStatus::parse(&s).ok_or_else(|| {
                ApiError::invalid("status must be active, needs_reauth or revoked")
            })?),
        };
    let after = given(&q.after)
        .map(|a| parse_connection_id(&a))
        .transpose()?;
    let filter = ConnectionFilter {
        status,
        end_user_id: given(&q.end_user),
        workspace_id: given(&q.workspace),
        bot_id: given(&q.bot),
        search: given(&q.q),
        after: after.clone(),
        limit: PAGE,
        ..ConnectionFilter::default()
    };
    let found = state.store.list_connections(&filter).await?;
    let (counts, counted) = state.console.counts(&state).await?;
    let now = state.clock.now();
    let count_of = |s: ConnectionStatus| {
        counts
            .connections
            .iter()
            .find(|(name, _)| name == s.as_str())
            .map_or(0, |(_, n)| *n)
    };
    // The query of this list without its cursor, and with one.
    let query_with = |after: Option<&ConnectionId>| {
        let mut query = url::form_urlencoded::Serializer::new(String::new());
        for (name, value) in [
            ("status", &q.status),
            ("q", &q.q),
            ("end_user", &q.end_user),
            ("workspace", &q.workspace),
            ("bot", &q.bot),
        ] {
            if let Some(v) = given(value) {
                query.append_pair(name, &v);
            }
        }
        if let Some(after) = after {
            query.append_pair("after", after.as_str());
        }
        query.finish()
    };
    let next_query = (found.len() as u32 == PAGE)
        .then(|| found.last().map(|c| query_with(Some(&c.id))))
        .flatten();
    let page = Connections {
        base: pages::base(&state),
        csrf: session.csrf,
        tab: "connections",
        notice: None,
        simulator: state.simulator.is_some(),
        total: STATUSES.iter().map(|s| count_of(*s)).sum(),
        counts: STATUSES
            .iter()
            .map(|s| StatusCount {
                status: s.as_str(),
                words: words::status(*s).0,
                count: count_of(*s),
            })
            .collect(),
        counted: When::of(counted, now),
        status: status.map(|s| s.as_str().to_owned()).unwrap_or_default(),
        filtered: filter.status.is_some()
            || filter.end_user_id.is_some()
            || filter.workspace_id.is_some()
            || filter.bot_id.is_some()
            || filter.search.is_some(),
        q: q.q.clone(),
        end_user: q.end_user.clone(),
        workspace: q.workspace.clone(),
        bot: q.bot.clone(),
        after: after.is_some(),
        rows: found
            .iter()
            .map(|c| ConnectionRow {
                id: c.id.to_string(),
                workspace: c
                    .workspace_name
                    .clone()
                    .filter(|n| !n.is_empty())
                    .unwrap_or_else(|| c.workspace_id.clone()),
                end_user: c.end_user_id.clone(),
                status: c.status.as_str(),
                status_words: words::status(c.status).0,
                bot: c.bot_id.0.clone(),
                updated: When::of(c.updated_at, now),
                checked: c.last_checked_at.map(|t| When::of(t, now)),
                check_result: c.last_check_result.map_or("", |r| r.as_str()),
            })
            .collect(),
        first_query: query_with(None),
        next_query,
    };
    Ok(pages::render(StatusCode::OK, &page))
}

// One connection.

struct DiagnosisView {
    reason: &'static str,
    found: Option<When>,
    notion_said: Option<String>,
    grant: Option<String>,
    grant_obtained: Option<When>,
    interrupted: Option<InterruptedView>,
    tried: Vec<TriedView>,
}

struct InterruptedView {
    attempt: String,
    started: When,
    holder: String,
}

struct TriedView {
    grant: String,
    origin: &'static str,
    obtained: When,
    outcome: String,
}

struct ReconnectView {
    url: String,
    expires: When,
}

struct EventView {
    at: When,
    words: &'static str,
    grant: String,
    detail: String,
}

struct GrantView {
    id: String,
    origin: &'static str,
    obtained: When,
    access_fp: String,
    refresh_fp: String,
    state: &'static str,
}

/// A webhook delivery as the console's tables show it.
struct DeliveryView {
    id: String,
    event_type: String,
    webhook_id: String,
    connection: String,
    endpoint: String,
    status: &'static str,
    attempts: i64,
    last_error: String,
    next_attempt: Option<When>,
    created: When,
    retryable: bool,
}

impl DeliveryView {
    fn of(d: &Delivery, now: DateTime<Utc>) -> DeliveryView {
        let status = match d.status {
            DeliveryStatus::Pending => "pending",
            DeliveryStatus::Delivered => "delivered",
            DeliveryStatus::Failed => "failed",
        };
        DeliveryView {
            id: d.id.clone(),
            event_type: d.event_type.clone().unwrap_or_default(),
            webhook_id: d.webhook_id.clone().unwrap_or_default(),
            connection: d
                .connection_id
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
            endpoint: d.endpoint.clone(),
            status,
            attempts: d.attempts,
            last_error: d.last_error.clone().unwrap_or_default(),
            next_attempt: d.next_attempt_at.map(|t| When::of(t, now)),
            created: When::of(d.created_at, now),
            retryable: !matches!(d.status, DeliveryStatus::Delivered),
        }
    }
}

#[derive(Template)]
#[template(path = "admin/connection.html")]
struct ConnectionPage {
    base: String,
    csrf: String,
    tab: &'static str,
    notice: Option<Notice>,
    id: String,
    title: String,
    status: &'static str,
    status_words: &'static str,
    status_meaning: &'static str,
    needs_reauth: bool,
    revoked: bool,
    diagnosis: Option<DiagnosisView>,
    reconnect: Option<ReconnectView>,
    end_user: String,
    workspace_name: String,
    workspace_id: String,
    bot: String,
    current_grant: String,
    created: When,
    updated: When,
    checked: Option<When>,
    check_result: &'static str,
    events: Vec<EventView>,
    event_count: usize,
    grants: Vec<GrantView>,
    grant_count: usize,
    deliveries: Vec<DeliveryView>,
    from: &'static str,
}

#[derive(Deserialize, Default)]
struct DoneQuery {
    #[serde(default)]
    done: String,
}

fn connection_id(raw: &str) -> Result<ConnectionId, ApiError> {
    parse_connection_id(raw)
}

async fn load(
    state: &SharedState,
    id: &ConnectionId,
) -> Result<crate::ledger::Connection, ApiError> {
    state
        .store
        .get_connection(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("connection {id} does not exist")))
}

/// `GET /admin/connections/{id}`: the connection in words, its diagnosis, reconnect link,
/// timeline, grants and webhook deliveries.
async fn connection(
    State(state): State<SharedState>,
    SignedIn(session): SignedIn,
    Path(raw): Path<String>,
    Query(done): Query<DoneQuery>,
) -> Result<Response, ApiError> {
    let id = connection_id(&raw)?;
    let c = load(&state, &id).await?;
    let history = state.store.history(&id, HISTORY).await?;
    let deliveries = state
        .store
        .recent_jobs_of_connection(&id, JobKind::Webhook, CONNECTION_DELIVERIES)
        .await?;
    let now = state.clock.now();
    let needs_reauth = c.status == ConnectionStatus::NeedsReauth;
    let reconnect = if needs_reauth {
        match super::connect::reconnect_link(&state, &id).await {
            Ok((url, expires)) => Some(ReconnectView {
                url,
                expires: When::of(expires, now),
            }),
            Err(e) => {
                tracing::error!(connection = %id, "could not make a reconnect link for the console: {}", e.message);
                None
            }
        }
    } else {
        None
    };
    // When the connection was found dead: its newest `needs_reauth` event.
    let found = history
        .events
        .iter()
        .find(|e| e.kind == EventKind::NeedsReauth)
        .map(|e| e.at);
    let diagnosis = c
        .diagnosis
        .as_ref()
        .filter(|_| needs_reauth)
        .map(|d| diagnosis_view(d, found.or(Some(c.updated_at)), now));
    let fingerprints: std::collections::HashMap<&str, &str> = history
        .grants
        .iter()
        .map(|g| (g.id.as_str(), g.access_token_fingerprint.as_str()))
        .collect();
    let (status_words, status_meaning) = words::status(c.status);
    let page = ConnectionPage {
        base: pages::base(&state),
        csrf: session.csrf,
        tab: "connections",
        notice: match done.done.as_str() {
            "revoked" => Some(Notice {
                kind: "ok",
                text: "The connection is revoked; its tokens are revoked at Notion (those Notion \
                       has not confirmed yet are retried in the background)."
                    .into(),
            }),
            "retried" => Some(Notice {
                kind: "ok",
                text: "The delivery is due again now, with the same webhook-id.".into(),
            }),
            _ => None,
        },
        id: c.id.to_string(),
        title: c
            .workspace_name
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| c.workspace_id.clone()),
        status: c.status.as_str(),
        status_words,
        status_meaning,
        needs_reauth,
        revoked: c.status == ConnectionStatus::Revoked,
        diagnosis,
        reconnect,
        end_user: c.end_user_id.clone(),
        workspace_name: c.workspace_name.clone().unwrap_or_default(),
        workspace_id: c.workspace_id.clone(),
        bot: c.bot_id.0.clone(),
        current_grant: c
            .grant_id
            .as_ref()
            .map_or_else(|| "none".to_owned(), ToString::to_string),
        created: When::of(c.created_at, now),
        updated: When::of(c.updated_at, now),
        checked: c.last_checked_at.map(|t| When::of(t, now)),
        check_result: c.last_check_result.map_or("", words::check),
        events: history
            .events
            .iter()
            .map(|e| EventView {
                at: When::of(e.at, now),
                words: words::event(e.kind),
                grant: e
                    .grant_id
                    .as_ref()
                    .map(|g| match fingerprints.get(g.as_str()) {
                        Some(fp) => format!("{g} (access token {fp})"),
                        None => g.to_string(),
                    })
                    .unwrap_or_default(),
                detail: event_detail(&e.detail),
            })
            .collect(),
        event_count: usize::try_from(history.event_count).unwrap_or(0),
        grants: history
            .grants
            .iter()
            .map(|g| GrantView {
                id: g.id.to_string(),
                origin: words::origin(g.origin),
                obtained: When::of(g.obtained_at, now),
                access_fp: g.access_token_fingerprint.clone(),
                refresh_fp: g
                    .refresh_token_fingerprint
                    .clone()
                    .unwrap_or_else(|| "none".into()),
                state: if c.grant_id.as_ref() == Some(&g.id) {
                    "current"
                } else if g.revoked_at.is_some() {
                    "revoked"
                } else if g.stale_at_birth {
                    "superseded at birth"
                } else if g.superseded_at.is_some() {
                    "superseded"
                } else {
                    "kept"
                },
            })
            .collect(),
        grant_count: usize::try_from(history.grant_count).unwrap_or(0),
        deliveries: deliveries
            .iter()
            .map(|j| DeliveryView::of(&Delivery::of(j), now))
            .collect(),
        from: "connection",
    };
    Ok(pages::render(StatusCode::OK, &page))
}

fn diagnosis_view(
    d: &Diagnosis,
    found: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> DiagnosisView {
    let notion_said = match (&d.code, d.message.trim()) {
        (Some(code), "") => Some(code.clone()),
        (Some(code), message) => Some(format!("{code}: {message}")),
        (None, "") => None,
        (None, message) => Some(message.to_owned()),
    };
    DiagnosisView {
        reason: words::reason(d.reason),
        found: found.map(|t| When::of(t, now)),
        notion_said,
        grant: d.grant_id.as_ref().map(ToString::to_string),
        grant_obtained: d.grant_obtained_at.map(|t| When::of(t, now)),
        interrupted: d.interrupted_attempt.as_ref().map(|i| InterruptedView {
            attempt: i.attempt_id.to_string(),
            started: When::of(i.started_at, now),
            holder: i.holder.to_string(),
        }),
        tried: d
            .tried
            .iter()
            .map(|t| TriedView {
                grant: t.grant_id.to_string(),
                origin: words::origin(t.origin),
                obtained: When::of(t.obtained_at, now),
                outcome: t.outcome.clone(),
            })
            .collect(),
    }
}

/// An event's detail in one short line: its scalar fields, `name: value`. Details hold no
/// token (the store writes them; provider text in them is already scrubbed).
fn event_detail(detail: &serde_json::Value) -> String {
    let Some(fields) = detail.as_object() else {
        return String::new();
    };
    let mut parts = Vec::new();
    for (name, value) in fields {
        let text = match value {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Number(n) => n.to_string(),
            serde_json::Value::Bool(b) => b.to_string(),
            _ => continue,
        };
        parts.push(format!("{}: {}", name.replace('_', " "), text));
    }
    let mut line = parts.join("; ");
    if line.chars().count() > 300 {
        line = line.chars().take(300).collect::<String>() + "…";
    }
    line
}

#[derive(Template)]
#[template(path = "admin/revoke.html")]
struct ConfirmRevoke {
    base: String,
    csrf: String,
    tab: &'static str,
    notice: Option<Notice>,
    id: String,
    title: String,
    end_user: String,
}

/// `GET /admin/connections/{id}/revoke`: the confirmation step.
async fn confirm_revoke(
    State(state): State<SharedState>,
    SignedIn(session): SignedIn,
    Path(raw): Path<String>,
) -> Result<Response, ApiError> {
    let id = connection_id(&raw)?;
    let c = load(&state, &id).await?;
    if c.status == ConnectionStatus::Revoked {
        return Ok(
            Redirect::to(&format!("{}/admin/connections/{id}", pages::base(&state)))
                .into_response(),
        );
    }
    Ok(pages::render(
        StatusCode::OK,
        &ConfirmRevoke {
            base: pages::base(&state),
            csrf: session.csrf,
            tab: "connections",
            notice: None,
            id: id.to_string(),
            title: c
                .workspace_name
                .clone()
                .filter(|n| !n.is_empty())
                .unwrap_or(c.workspace_id),
            end_user: c.end_user_id,
        },
    ))
}

/// `POST /admin/connections/{id}/revoke`: what `DELETE /v1/connections/{id}` does.
async fn revoke(
    State(state): State<SharedState>,
    headers: HeaderMap,
    Path(raw): Path<String>,
    Form(form): Form<CsrfForm>,
) -> Result<Response, ApiError> {
    let session = match checked(&state, &headers, &form.csrf, "revoke") {
        Ok(s) => s,
        Err(response) => return Ok(response),
    };
    let id = connection_id(&raw)?;
    let revocation =
        super::connections::revoke_connection(&state, &id, "revoked in the admin console").await?;
    tracing::info!(
        op = "admin_action",
        action = "revoke",
        outcome = "done",
        connection = %id,
        key = %session.key,
        tokens_pending = revocation.tokens_pending,
        "revoked a connection from the console"
    );
    Ok(Redirect::to(&format!(
        "{}/admin/connections/{id}?done=revoked",
        pages::base(&state)
    ))
    .into_response())
}

// Webhook deliveries.

struct Tab {
    status: &'static str,
    count: i64,
    current: bool,
}

#[derive(Template)]
#[template(path = "admin/deliveries.html")]
struct Deliveries {
    base: String,
    csrf: String,
    tab: &'static str,
    notice: Option<Notice>,
    tabs: Vec<Tab>,
    status: &'static str,
    tab_meaning: &'static str,
    counted: When,
    empty: &'static str,
    deliveries: Vec<DeliveryView>,
    before: bool,
    next_query: Option<String>,
    from: &'static str,
}

#[derive(Deserialize, Default)]
struct DeliveriesQuery {
    #[serde(default)]
    status: String,
    #[serde(default)]
    before: String,
    #[serde(default)]
    done: String,
}

/// `GET /admin/webhook-deliveries?status=failed|pending|delivered`: newest first.
async fn deliveries(
    State(state): State<SharedState>,
    SignedIn(session): SignedIn,
    Query(q): Query<DeliveriesQuery>,
) -> Result<Response, ApiError> {
    let (status, name, meaning, empty) = match q.status.as_str() {
        "" | "failed" => (
            JobStatus::Failed,
            "failed",
            "Failed: given up after three days of failed attempts. Retry sends one again, with the same webhook-id.",
            "No failed deliveries.",
        ),
        "pending" => (
            JobStatus::Pending,
            "pending",
            "Pending: not delivered yet, tried again with backoff. Retry makes one due now.",
            "Nothing is waiting to be delivered.",
        ),
        "delivered" => (
            JobStatus::Done,
            "delivered",
            "Delivered: an endpoint answered 2xx.",
            "Nothing delivered yet: deliveries are made when TOKENKEEPER_WEBHOOK_URLS is set and connections change.",
        ),
        _ => return Err(ApiError::invalid("status must be failed, pending or delivered")),
    };
    let before = given(&q.before);
    let jobs = state
        .store
        .list_jobs(
            JobKind::Webhook,
            Some(status),
            before.as_deref(),
            DELIVERY_PAGE,
        )
        .await?;
    let (counts, counted) = state.console.counts(&state).await?;
    let webhook_count = |s: JobStatus| {
        counts
            .jobs
            .iter()
            .find(|(k, st, _)| k == JobKind::Webhook.as_str() && st == s.as_str())
            .map_or(0, |(_, _, n)| *n)
    };
    let now = state.clock.now();
    let next_query = (jobs.len() as u32 == DELIVERY_PAGE)
        .then(|| {
            jobs.last().map(|j| {
                url::form_urlencoded::Serializer::new(String::new())
                    .append_pair("status", name)
                    .append_pair("before", &j.id)
                    .finish()
            })
        })
        .flatten();
    let page = Deliveries {
        base: pages::base(&state),
        csrf: session.csrf,
        tab: "deliveries",
        notice: (q.done == "retried").then(|| Notice {
            kind: "ok",
            text: "The delivery is due again now, with the same webhook-id.".into(),
        }),
        tabs: [
            (JobStatus::Failed, "failed"),
            (JobStatus::Pending, "pending"),
            (JobStatus::Done, "delivered"),
        ]
        .into_iter()
        .map(|(s, n)| Tab {
            status: n,
            count: webhook_count(s),
            current: n == name,
        })
        .collect(),
        status: name,
        tab_meaning: meaning,
        counted: When::of(counted, now),
        empty,
        deliveries: jobs
            .iter()
            .map(|j| DeliveryView::of(&Delivery::of(j), now))
            .collect(),
        before: before.is_some(),
        next_query,
        from: name,
    };
    Ok(pages::render(StatusCode::OK, &page))
}

/// `POST /admin/webhook-deliveries/{id}/retry`: what `POST /v1/webhook-deliveries/{id}/retry`
/// does; then back to the page the form was on.
async fn retry(
    State(state): State<SharedState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(form): Form<CsrfForm>,
) -> Result<Response, ApiError> {
    let session = match checked(&state, &headers, &form.csrf, "retry") {
        Ok(s) => s,
        Err(response) => return Ok(response),
    };
    let delivery = super::webhooks::retry_delivery(&state, &id).await?;
    tracing::info!(
        op = "admin_action",
        action = "retry",
        outcome = "done",
        delivery = %delivery.id,
        key = %session.key,
        "made a webhook delivery due again from the console"
    );
    let base = pages::base(&state);
    let back = match (form.from.as_str(), &delivery.connection_id) {
        ("connection", Some(connection)) => {
            format!("{base}/admin/connections/{connection}?done=retried")
        }
        (tab @ ("pending" | "delivered"), _) => {
            format!("{base}/admin/webhook-deliveries?status={tab}&done=retried")
        }
        _ => format!("{base}/admin/webhook-deliveries?status=failed&done=retried"),
    };
    Ok(Redirect::to(&back).into_response())
}

// Health.

struct CheckView {
    interval: String,
    rate: String,
    active: i64,
    checked: i64,
    percent: i64,
    never: i64,
    oldest: Option<When>,
}

struct JobRow {
    kind: String,
    pending: i64,
    done: i64,
    failed: i64,
}

#[derive(Template)]
#[template(path = "admin/health.html")]
struct HealthPage {
    base: String,
    csrf: String,
    tab: &'static str,
    notice: Option<Notice>,
    backend: &'static str,
    database_up: bool,
    ping_ms: String,
    database_problem: String,
    schema: String,
    active_key: String,
    ring_keys: String,
    sealing_keys: String,
    registered_keys: String,
    stale_keys: String,
    check: Option<CheckView>,
    jobs: Vec<JobRow>,
    counted: When,
}

/// `GET /admin/health`: the database, the key ids in use, the health check's progress, and
/// the jobs by kind and state.
async fn health(
    State(state): State<SharedState>,
    SignedIn(session): SignedIn,
) -> Result<Response, ApiError> {
    let store = &state.store;
    let started = Instant::now();
    let ping = store.ping().await;
    let ping_ms = format!("{:.1}", started.elapsed().as_secs_f64() * 1000.0);
    let schema = match store.check_schema().await {
        Ok(v) => format!("version {v}, current"),
        Err(e) => e.to_string(),
    };
    let (database_up, database_problem) = match &ping {
        Ok(()) => (true, String::new()),
        Err(e) => (false, e.to_string()),
    };
    let now = state.clock.now();
    let keys = store.keys();
    let (usage, check, jobs, counted) = if database_up {
        let usage = store.key_usage().await?;
        let check = match state.console.health_check.get() {
            Some(settings) if !settings.interval.is_zero() => {
                let interval = chrono::Duration::from_std(settings.interval)
                    .unwrap_or(chrono::Duration::days(1));
                let progress = store.check_progress(now - interval).await?;
                Some(CheckView {
                    interval: humantime::format_duration(settings.interval).to_string(),
                    rate: settings.rate.to_string(),
                    active: progress.active,
                    checked: progress.checked_since,
                    percent: (progress.checked_since * 100)
                        .checked_div(progress.active)
                        .unwrap_or(100),
                    never: progress.never_checked,
                    oldest: progress.oldest_check.map(|t| When::of(t, now)),
                })
            }
            _ => None,
        };
        let (counts, counted) = state.console.counts(&state).await?;
        let mut jobs: Vec<JobRow> = Vec::new();
        for (kind, status, n) in &counts.jobs {
            let row = match jobs.iter_mut().find(|r| &r.kind == kind) {
                Some(row) => row,
                None => {
                    jobs.push(JobRow {
                        kind: kind.clone(),
                        pending: 0,
                        done: 0,
                        failed: 0,
                    });
                    jobs.last_mut().expect("just pushed")
                }
            };
            match status.as_str() {
                "pending" => row.pending += n,
                "done" => row.done += n,
                "failed" => row.failed += n,
                _ => {}
            }
        }
        (usage, check, jobs, counted)
    } else {
        (Default::default(), None, Vec::new(), now)
    };
    let list = |ids: Vec<&str>| {
        if ids.is_empty() {
            "none".to_owned()
        } else {
            ids.join(", ")
        }
    };
    let active = keys.active_key_id().to_owned();
    let page = HealthPage {
        base: pages::base(&state),
        csrf: session.csrf,
        tab: "health",
        notice: None,
        backend: store.backend().as_str(),
        database_up,
        ping_ms,
        database_problem,
        schema,
        ring_keys: list(keys.key_ids()),
        sealing_keys: usage
            .sealing_grants
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join(", "),
        registered_keys: list(usage.registered.iter().map(String::as_str).collect()),
        stale_keys: usage
            .sealing_grants
            .iter()
            .filter(|k| **k != active)
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join(", "),
        active_key: active,
        check,
        jobs,
        counted: When::of(counted, now),
    };
    Ok(pages::render(StatusCode::OK, &page))
}
