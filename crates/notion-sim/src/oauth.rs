//! The OAuth endpoints: authorize (consent page or auto-approval), token (both grants),
//! introspect and revoke. Errors are OAuth-style (`{"error":…,"request_id":…}`), as Notion
//! sends them.

use base64::Engine;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{HeaderValue, AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, LOCATION};
use hyper::{Method, Response, StatusCode};
use serde_json::{json, Value};

use crate::config::{OwnerKind, SimConfig};
use crate::exchange::{json_response, Body, Call, Reply, Shared};
use crate::world::{GrantError, IdentityChoice, Issued, Outcome, UserView};

/// Counts a token request under its grant type and, when the code or refresh token is known,
/// its bot; returns the grant type for latency selection.
/// It runs before faults so that requests answered by a fault are counted too.
pub(crate) fn count_token_request(shared: &Shared, call: &Call) -> Option<&'static str> {
    let body: Value = serde_json::from_slice(&call.body).unwrap_or(Value::Null);
    let grant_type = body.get("grant_type").and_then(Value::as_str);
    let bot = shared.world().bot_of_grant_input(
        body.get("code").and_then(Value::as_str),
        body.get("refresh_token").and_then(Value::as_str),
    );
    shared.stats.count_grant(grant_type, bot);
    known_grant(grant_type)
}

fn known_grant(grant_type: Option<&str>) -> Option<&'static str> {
    match grant_type {
        Some("authorization_code") => Some("authorization_code"),
        Some("refresh_token") => Some("refresh_token"),
        _ => None,
    }
}

fn oauth_error(
    status: StatusCode,
    error: &str,
    description: &str,
    request_id: &str,
) -> Response<Body> {
    json_response(
        status,
        json!({"error": error, "error_description": description}),
        request_id,
    )
}

/// Exactly the recorded answer to missing or wrong client credentials.
fn invalid_client(request_id: &str) -> Response<Body> {
    json_response(
        StatusCode::UNAUTHORIZED,
        json!({"error": "invalid_client"}),
        request_id,
    )
}

/// Checks `Authorization: Basic base64(client_id:client_secret)` against the registered client.
fn client_authenticated(call: &Call) -> bool {
    let Some(header) = call
        .headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let Some(encoded) = header
        .strip_prefix("Basic ")
        .or_else(|| header.strip_prefix("basic "))
    else {
        return false;
    };
    let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim()) else {
        return false;
    };
    let Ok(decoded) = std::str::from_utf8(&decoded) else {
        return false;
    };
    let Some((id, secret)) = decoded.split_once(':') else {
        return false;
    };
    id == call.config.client_id && secret == call.config.client_secret
}

/// The JSON body of an OAuth call, or the `invalid_request` answer.
fn json_body(call: &Call) -> Result<serde_json::Map<String, Value>, Response<Body>> {
    match serde_json::from_slice(&call.body) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "The request body must be a JSON object.",
            &call.request_id,
        )),
    }
}

fn user_object(config: &SimConfig, user: &UserView) -> Value {
    let person = if config.has_capability("read_user_with_email") {
        json!({"email": user.email})
    } else {
        json!({})
    };
    json!({
        "object": "user",
        "id": user.id,
        "name": user.name,
        "avatar_url": null,
        "type": "person",
        "person": person,
    })
}

/// The `owner` of token responses and of the bot user.
pub(crate) fn owner_object(config: &SimConfig, user: &UserView) -> Value {
    match config.owner {
        OwnerKind::User => json!({"type": "user", "user": user_object(config, user)}),
        OwnerKind::Workspace => json!({"type": "workspace", "workspace": true}),
    }
}

pub(crate) fn person_object(config: &SimConfig, user: &UserView) -> Value {
    user_object(config, user)
}

fn token_response(call: &Call, issued: Issued) -> Response<Body> {
    json_response(
        StatusCode::OK,
        json!({
            "access_token": issued.access_token,
            "token_type": "bearer",
            "refresh_token": issued.refresh_token,
            "bot_id": issued.bot_id,
            "workspace_name": issued.workspace_name,
            "workspace_icon": null,
            "workspace_id": issued.workspace_id,
            "owner": owner_object(&call.config, &issued.user),
            "duplicated_template_id": null,
        }),
        &call.request_id,
    )
}

/// `POST /v1/oauth/token`.
pub(crate) fn token(shared: &Shared, call: &Call) -> Reply {
    let body = match json_body(call) {
        Ok(body) => body,
        Err(response) => return Reply::plain(response),
    };
    let grant_type = known_grant(body.get("grant_type").and_then(Value::as_str));
    let presented = body
        .get("refresh_token")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let mut reply = Reply::plain(invalid_client(&call.request_id));
    reply.grant_type = grant_type;
    if grant_type == Some("refresh_token") {
        if let Some(token) = &presented {
            if let Some(owner) = shared.world().token_owner(&call.config, token, call.now) {
                reply.bot_id = Some(owner.bot_id);
                reply.token_is_newest_live = Some(owner.is_newest_live);
            }
        }
        reply.token = presented.clone();
    }
    if !client_authenticated(call) {
        return reply;
    }
    let outcome: Result<Issued, GrantError> =
        match (body.get("grant_type").and_then(Value::as_str), grant_type) {
            (None, _) => Err(GrantError {
                error: "invalid_request",
                description: "grant_type is required.",
            }),
            (Some(_), None) => Err(GrantError {
                error: "unsupported_grant_type",
                description: "Only authorization_code and refresh_token are supported.",
            }),
            (Some(_), Some("authorization_code")) => {
                match body.get("code").and_then(Value::as_str) {
                    None => Err(GrantError {
                        error: "invalid_request",
                        description: "code is required.",
                    }),
                    Some(code) => {
                        let redirect_uri = body.get("redirect_uri").and_then(Value::as_str);
                        shared
                            .world()
                            .exchange_code(&call.config, code, redirect_uri, call.now)
                    }
                }
            }
            (Some(_), Some(_)) => match &presented {
                None => Err(GrantError {
                    error: "invalid_request",
                    description: "refresh_token is required.",
                }),
                Some(token) => shared.world().refresh(&call.config, token, call.now),
            },
        };
    reply.response = match outcome {
        Ok(issued) => {
            reply.bot_id = Some(issued.bot_id.clone());
            token_response(call, issued)
        }
        Err(e) => oauth_error(
            StatusCode::BAD_REQUEST,
            e.error,
            e.description,
            &call.request_id,
        ),
    };
    reply
}

/// The `token` of an introspect or revoke body, with the reply to send if it is missing.
fn token_param(call: &Call) -> Result<String, Response<Body>> {
    let body = json_body(call)?;
    match body.get("token").and_then(Value::as_str) {
        Some(token) => Ok(token.to_owned()),
        None => Err(oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "token is required.",
            &call.request_id,
        )),
    }
}

/// `POST /v1/oauth/introspect`: `iat` in milliseconds, as in recorded traffic.
pub(crate) fn introspect(shared: &Shared, call: &Call) -> Reply {
    if !client_authenticated(call) {
        return Reply::plain(invalid_client(&call.request_id));
    }
    let token = match token_param(call) {
        Ok(token) => token,
        Err(response) => return Reply::plain(response),
    };
    let (iat, owner) = {
        let world = shared.world();
        (
            world.introspect(&call.config, &token, call.now),
            world.token_owner(&call.config, &token, call.now),
        )
    };
    let body = match iat {
        Some(iat) => json!({
            "active": true,
            "scope": call.config.capabilities.join(" "),
            "iat": iat,
        }),
        None => json!({"active": false}),
    };
    let mut reply = Reply::plain(json_response(StatusCode::OK, body, &call.request_id));
    if let Some(owner) = owner {
        reply.bot_id = Some(owner.bot_id);
        reply.token_is_newest_live = Some(owner.is_newest_live);
    }
    reply.token = Some(token);
    reply
}

/// `POST /v1/oauth/revoke`: the token dies; unknown tokens are accepted too (RFC 7009).
pub(crate) fn revoke(shared: &Shared, call: &Call) -> Reply {
    if !client_authenticated(call) {
        return Reply::plain(invalid_client(&call.request_id));
    }
    let token = match token_param(call) {
        Ok(token) => token,
        Err(response) => return Reply::plain(response),
    };
    let owner = {
        let mut world = shared.world();
        let owner = world.token_owner(&call.config, &token, call.now);
        world.revoke_token(&token);
        owner
    };
    let mut reply = Reply::plain(json_response(StatusCode::OK, json!({}), &call.request_id));
    if let Some(owner) = owner {
        reply.bot_id = Some(owner.bot_id);
        reply.token_is_newest_live = Some(owner.is_newest_live);
    }
    reply.token = Some(token);
    reply
}

/// The validated parameters of an authorization request.
struct AuthorizeRequest {
    client_id: String,
    /// As given in the URL (it decides the token endpoint's `redirect_uri` rule).
    redirect_uri: Option<String>,
    /// Where to send the user back: the given URI, or the one registered URI.
    target: url::Url,
    state: String,
    response_type: String,
    owner: String,
}

fn html(status: StatusCode, body: String) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    response
        .headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The look of tokenkeeper's own pages, so that the consent page belongs to the same demo.
const STYLESHEET: &str = include_str!("../../tokenkeeper/assets/tokenkeeper.css");

#[derive(askama::Template)]
#[template(path = "error.html")]
struct ErrorPage<'a> {
    css: &'a str,
    message: &'a str,
}

fn render(status: StatusCode, page: &impl askama::Template) -> Response<Body> {
    match page.render() {
        Ok(body) => html(status, body),
        Err(e) => html(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the page could not be rendered: {e}"),
        ),
    }
}

fn error_page(message: &str) -> Response<Body> {
    render(
        StatusCode::BAD_REQUEST,
        &ErrorPage {
            css: STYLESHEET,
            message,
        },
    )
}

fn redirect(mut target: url::Url, params: &[(&str, &str)]) -> Response<Body> {
    target.query_pairs_mut().extend_pairs(params);
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::FOUND;
    if let Ok(value) = HeaderValue::from_str(target.as_str()) {
        response.headers_mut().insert(LOCATION, value);
    }
    response
}

/// Validates the parameters; errors that cannot be sent back to a trusted redirect URI are
/// shown as a page, as an authorization server must.
fn parse_authorize(
    config: &SimConfig,
    params: &[(String, String)],
) -> Result<AuthorizeRequest, Response<Body>> {
    let get = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .filter(|v| !v.is_empty())
    };
    let client_id = get("client_id").unwrap_or_default();
    if client_id != config.client_id {
        return Err(error_page("Unknown client_id."));
    }
    let redirect_uri = get("redirect_uri");
    let target = match (&redirect_uri, config.redirect_uris.as_slice()) {
        (Some(uri), registered) => {
            let accepted = if registered.is_empty() {
                url::Url::parse(uri).is_ok_and(|u| matches!(u.scheme(), "http" | "https"))
            } else {
                registered.iter().any(|r| r == uri)
            };
            if !accepted {
                return Err(error_page(
                    "redirect_uri is not registered for this client.",
                ));
            }
            uri.clone()
        }
        (None, [only]) => only.clone(),
        (None, _) => return Err(error_page("redirect_uri is required.")),
    };
    let target = url::Url::parse(&target).map_err(|_| error_page("redirect_uri is not a URL."))?;
    Ok(AuthorizeRequest {
        client_id,
        redirect_uri,
        target,
        state: get("state").unwrap_or_default(),
        response_type: get("response_type").unwrap_or_default(),
        owner: get("owner").unwrap_or_default(),
    })
}

/// `GET /v1/oauth/authorize` (and the consent form's `POST` back to it).
pub(crate) fn authorize(shared: &Shared, call: &Call) -> Reply {
    let source: &[u8] = if call.method == Method::POST {
        &call.body
    } else {
        call.query.as_deref().unwrap_or("").as_bytes()
    };
    let params: Vec<(String, String)> = url::form_urlencoded::parse(source).into_owned().collect();
    let request = match parse_authorize(&call.config, &params) {
        Ok(request) => request,
        Err(page) => return Reply::plain(page),
    };
    let state = request.state.as_str();
    if request.response_type != "code" {
        return Reply::plain(redirect(
            request.target,
            &[("error", "unsupported_response_type"), ("state", state)],
        ));
    }
    if request.owner != "user" {
        return Reply::plain(redirect(
            request.target,
            &[("error", "invalid_request"), ("state", state)],
        ));
    }
    let decision = params
        .iter()
        .find(|(k, _)| k == "decision")
        .map(|(_, v)| v.as_str());
    let clicked = match (call.method == Method::POST, decision) {
        (true, Some("allow")) => Some(Outcome::Approve),
        (true, _) => Some(Outcome::Deny),
        (false, _) => None,
    };
    let mut world = shared.world();
    if clicked.is_none() && !call.config.auto_approve {
        drop(world);
        return Reply::plain(consent_page(shared, &call.config, &request));
    }
    // Who the person said they are on the consent page; a choice that names no known
    // identity is refused rather than guessed at.
    let picked = match params.iter().find(|(k, _)| k == "identity") {
        Some((_, value)) if clicked == Some(Outcome::Approve) => match world.parse_choice(value) {
            Some(picked) => Some(picked),
            None => {
                drop(world);
                return Reply::plain(error_page(
                    "The identity picked on the consent page is not one this simulator knows.",
                ));
            }
        },
        _ => None,
    };
    let (workspace_id, user_id, queued) = world.next_identity_as(&call.config, call.now, picked);
    if clicked.unwrap_or(queued) == Outcome::Deny {
        return Reply::plain(redirect(
            request.target,
            &[("error", "access_denied"), ("state", "")],
        ));
    }
    let bot_id = world.approve(&call.config, &workspace_id, &user_id);
    let code = world.issue_code(&call.config, bot_id.clone(), request.redirect_uri, call.now);
    drop(world);
    let mut reply = Reply::plain(redirect(
        request.target,
        &[("code", &code), ("state", state)],
    ));
    reply.bot_id = Some(bot_id);
    reply
}

#[derive(askama::Template)]
#[template(path = "consent.html")]
struct Consent<'a> {
    css: &'a str,
    client: &'a str,
    capabilities: String,
    action: &'static str,
    hidden: Vec<(&'static str, &'a str)>,
    choices: Vec<IdentityChoice>,
    default: String,
}

/// Notion's consent page, in the look of tokenkeeper's pages, with a choice of who is
/// consenting: any user the simulator knows, a new user in a known workspace, or a new
/// workspace (so that a second end user is one click away). Allow and Cancel post back to the
/// authorize endpoint.
fn consent_page(shared: &Shared, config: &SimConfig, request: &AuthorizeRequest) -> Response<Body> {
    let (choices, default) = shared.world().identity_choices(config);
    render(
        StatusCode::OK,
        &Consent {
            css: STYLESHEET,
            client: &config.client_id,
            capabilities: config.capabilities.join(", "),
            action: "/v1/oauth/authorize",
            hidden: vec![
                ("client_id", &request.client_id),
                (
                    "redirect_uri",
                    request.redirect_uri.as_deref().unwrap_or(""),
                ),
                ("response_type", &request.response_type),
                ("owner", &request.owner),
                ("state", &request.state),
            ],
            choices,
            default,
        },
    )
}
