//! The control API under `/_sim`: no Notion auth, JSON in and out.
//! Tests outside this repository use these paths and field names; keep them stable.

use std::time::Duration;

use hyper::body::Bytes;
use hyper::{Method, Response, StatusCode};
use serde_json::{json, Value};

use crate::exchange::{plain_json, Body, Shared};
use crate::faults::FaultSpec;
use crate::hold::HOLD_DEADLINE;
use crate::token::fingerprint;
use crate::world::{NextAuthorization, World};

fn ok(body: Value) -> Response<Body> {
    control_json(StatusCode::OK, body)
}

fn control_json(status: StatusCode, body: Value) -> Response<Body> {
    // Control answers are not Notion's: no request id.
    plain_json(status, &body)
}

fn bad_request(message: impl Into<String>) -> Response<Body> {
    control_json(
        StatusCode::BAD_REQUEST,
        json!({"error": "bad_request", "message": message.into()}),
    )
}

fn not_found() -> Response<Body> {
    control_json(
        StatusCode::NOT_FOUND,
        json!({"error": "not_found", "message": "No such control endpoint or object."}),
    )
}

/// A JSON body, where an empty body means `{}`.
fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, Response<Body>> {
    let source: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        body
    };
    serde_json::from_slice(source).map_err(|e| bad_request(format!("invalid JSON body: {e}")))
}

pub(crate) async fn handle(
    shared: &Shared,
    method: &Method,
    path: &str,
    query: Option<&str>,
    body: &Bytes,
) -> Response<Body> {
    let route = path.trim_start_matches("/_sim").trim_end_matches('/');
    // The one answer that waits: for requests to reach a hold.
    if method == Method::POST {
        if let Some(id) = hold_route(route, "/wait") {
            return wait_for_hold(shared, id, body)
                .await
                .unwrap_or_else(|response| response);
        }
    }
    let result = match (method, route) {
        (&Method::GET, "/stats") => Ok(ok(shared.stats.to_json())),
        (&Method::GET, "/config") => Ok(ok(json!(&*shared.config()))),
        (&Method::POST, "/config") => patch_config(shared, body),
        (&Method::POST, "/next-authorization") => next_authorization(shared, body),
        (&Method::GET, "/bots") => Ok(ok(bots(shared))),
        (&Method::GET, "/workspaces") => Ok(ok(workspaces(shared))),
        (&Method::GET, "/faults") => Ok(ok(json!({"faults": shared.faults.list()}))),
        (&Method::POST, "/faults") => add_fault(shared, body),
        (&Method::DELETE, "/faults") => {
            shared.faults.clear();
            Ok(ok(json!({"faults": []})))
        }
        (&Method::POST, "/reset") => reset(shared, body),
        (&Method::GET, "/requests") => Ok(ok(requests(shared, query))),
        (&Method::GET, "/clock") => Ok(ok(clock(shared))),
        (&Method::POST, "/clock/advance") => advance_clock(shared, body),
        (&Method::GET, "/holds") => Ok(ok(holds(shared))),
        (&Method::POST, "/holds") => add_hold(shared, body),
        (&Method::DELETE, "/holds") => {
            shared.holds.lift_all();
            Ok(ok(json!({"holds": []})))
        }
        (&Method::POST, route) => {
            if let Some(id) = hold_route(route, "/release") {
                release_hold(shared, id, body)
            } else if let Some(bot_id) = route
                .strip_prefix("/bots/")
                .and_then(|r| r.strip_suffix("/revoke"))
            {
                uninstall(shared, bot_id)
            } else {
                Err(not_found())
            }
        }
        (&Method::DELETE, route) => match hold_route(route, "") {
            Some(id) => lift_hold(shared, id),
            None => Err(not_found()),
        },
        _ => Err(not_found()),
    };
    result.unwrap_or_else(|response| response)
}

/// The id in `/holds/{id}{suffix}`; a malformed id is no route at all.
fn hold_route(route: &str, suffix: &str) -> Option<u64> {
    route
        .strip_prefix("/holds/")?
        .strip_suffix(suffix)?
        .parse()
        .ok()
}

fn patch_config(shared: &Shared, body: &Bytes) -> Result<Response<Body>, Response<Body>> {
    let patch: Value = parse(body)?;
    let patched = shared.config().patched(&patch).map_err(bad_request)?;
    shared.set_config(patched.clone());
    Ok(ok(json!(patched)))
}

fn next_authorization(shared: &Shared, body: &Bytes) -> Result<Response<Body>, Response<Body>> {
    let next: NextAuthorization = parse(body)?;
    let queued = shared.world().queue_authorization(next);
    Ok(ok(json!({"queued": queued})))
}

fn bots(shared: &Shared) -> Value {
    let config = shared.config();
    let now = shared.clock.moment();
    let world = shared.world();
    let bots: Vec<Value> = world
        .bots()
        .into_iter()
        .map(|bot| {
            let access: Vec<String> = world
                .live_access_tokens(&config, bot, now)
                .iter()
                .map(|t| fingerprint(t))
                .collect();
            let refresh: Vec<String> = world
                .live_refresh_tokens(bot)
                .iter()
                .map(|t| fingerprint(t))
                .collect();
            json!({
                "bot_id": bot.id,
                "workspace_id": bot.workspace_id,
                "user_id": bot.user_id,
                "status": if bot.installed { "installed" } else { "uninstalled" },
                "shared_page_ids": shared_pages(&world, &bot.id, &bot.workspace_id),
                "live_access_token_fingerprints": access,
                "live_refresh_token_fingerprints": refresh,
                "newest_access_token_fingerprint": access.last(),
            })
        })
        .collect();
    json!({"bots": bots})
}

fn shared_pages(world: &World, bot_id: &str, workspace_id: &str) -> Vec<String> {
    world
        .workspace(workspace_id)
        .map(|ws| {
            ws.page_ids
                .iter()
                .filter(|id| {
                    world
                        .page(id)
                        .is_some_and(|p| p.shared_with.iter().any(|b| &**b == bot_id))
                })
                .map(|id| id.to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn workspaces(shared: &Shared) -> Value {
    let world = shared.world();
    let list: Vec<Value> = world
        .workspaces()
        .into_iter()
        .map(|ws| {
            let pages: Vec<Value> = ws
                .page_ids
                .iter()
                .filter_map(|id| world.page(id))
                .map(|page| {
                    let mut visible: Vec<String> =
                        page.shared_with.iter().map(|b| b.to_string()).collect();
                    visible.sort();
                    json!({
                        "page_id": page.id,
                        "title": page.title,
                        "shared_with_bot_ids": visible,
                    })
                })
                .collect();
            let unshared: Vec<&str> = ws
                .page_ids
                .iter()
                .filter(|id| world.page(id).is_some_and(|p| p.shared_with.is_empty()))
                .map(|id| &**id)
                .collect();
            let users: Vec<Value> = ws
                .member_ids
                .iter()
                .filter_map(|id| world.user(id))
                .map(|u| json!({"user_id": u.id, "name": u.name, "email": u.email}))
                .collect();
            let bot_ids: Vec<&str> = world.bots_in_workspace(&ws.id).map(|b| &*b.id).collect();
            json!({
                "workspace_id": ws.id,
                "name": ws.name,
                "users": users,
                "bot_ids": bot_ids,
                "pages": pages,
                "unshared_page_ids": unshared,
            })
        })
        .collect();
    json!({"workspaces": list})
}

fn add_fault(shared: &Shared, body: &Bytes) -> Result<Response<Body>, Response<Body>> {
    let spec: FaultSpec = parse(body)?;
    spec.validate().map_err(bad_request)?;
    Ok(ok(json!(shared.faults.add(spec))))
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ResetRequest {
    #[serde(default)]
    state: bool,
}

fn reset(shared: &Shared, body: &Bytes) -> Result<Response<Body>, Response<Body>> {
    let request: ResetRequest = parse(body)?;
    shared.faults.clear();
    shared.stats.clear();
    shared.log.clear();
    shared.limits.clear();
    shared.holds.lift_all();
    // The clock is left alone: time does not go back, so tokens minted before a reset keep
    // their age and a test that advanced the clock keeps the time it set.
    if request.state {
        *shared.world() = World::default();
    }
    Ok(ok(json!({"reset": true, "state": request.state})))
}

fn uninstall(shared: &Shared, bot_id: &str) -> Result<Response<Body>, Response<Body>> {
    if !shared.world().uninstall(bot_id) {
        return Err(not_found());
    }
    Ok(ok(json!({"bot_id": bot_id, "status": "uninstalled"})))
}

fn requests(shared: &Shared, query: Option<&str>) -> Value {
    let limit = url::form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .find(|(k, _)| k == "limit")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(usize::MAX);
    json!({"requests": shared.log.recent(limit)})
}

fn clock(shared: &Shared) -> Value {
    let clock = &shared.clock;
    let now = clock.utc();
    json!({
        "manual": clock.is_manual(),
        "now": now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "now_ms": now.timestamp_millis(),
        "advanced_ms": u64::try_from(clock.advanced().as_millis()).unwrap_or(u64::MAX),
    })
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AdvanceRequest {
    ms: u64,
}

fn advance_clock(shared: &Shared, body: &Bytes) -> Result<Response<Body>, Response<Body>> {
    let request: AdvanceRequest = parse(body)?;
    if !shared.clock.is_manual() {
        return Err(control_json(
            StatusCode::CONFLICT,
            json!({
                "error": "system_clock",
                "message": "The simulator runs on the system clock; start it with --manual-clock to move time by hand.",
            }),
        ));
    }
    shared.clock.advance(Duration::from_millis(request.ms));
    Ok(ok(clock(shared)))
}

fn holds(shared: &Shared) -> Value {
    let holds: Vec<Value> = shared.holds.list().iter().map(|h| h.to_json()).collect();
    json!({"holds": holds})
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct HoldRequest {
    endpoint: String,
}

fn add_hold(shared: &Shared, body: &Bytes) -> Result<Response<Body>, Response<Body>> {
    let request: HoldRequest = parse(body)?;
    let hold = shared.holds.add(&request.endpoint).map_err(bad_request)?;
    Ok(ok(hold.to_json()))
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ReleaseRequest {
    /// How many of the oldest held requests to release; unset: all of them.
    #[serde(default)]
    count: Option<usize>,
}

fn release_hold(shared: &Shared, id: u64, body: &Bytes) -> Result<Response<Body>, Response<Body>> {
    let request: ReleaseRequest = parse(body)?;
    let hold = shared.holds.get(id).ok_or_else(not_found)?;
    let released = hold.release(request.count.unwrap_or(usize::MAX));
    let mut answer = hold.to_json();
    answer["released"] = json!(released);
    Ok(ok(answer))
}

fn lift_hold(shared: &Shared, id: u64) -> Result<Response<Body>, Response<Body>> {
    let hold = shared.holds.get(id).ok_or_else(not_found)?;
    hold.lift();
    Ok(ok(hold.to_json()))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct WaitRequest {
    arrived: u64,
    /// How long to wait; unset: the hold deadline.
    #[serde(default)]
    timeout_ms: Option<u64>,
}

/// Answers once `arrived` requests in all have reached the hold, or 408 after the timeout, so
/// a test in another process learns of an arrival without polling or sleeping.
async fn wait_for_hold(
    shared: &Shared,
    id: u64,
    body: &Bytes,
) -> Result<Response<Body>, Response<Body>> {
    let request: WaitRequest = parse(body)?;
    let hold = shared.holds.get(id).ok_or_else(not_found)?;
    let limit = request
        .timeout_ms
        .map_or(HOLD_DEADLINE, Duration::from_millis);
    match hold.wait_for_arrivals(request.arrived, limit).await {
        Ok(()) => Ok(ok(hold.to_json())),
        Err(count) => Err(control_json(
            StatusCode::REQUEST_TIMEOUT,
            json!({
                "error": "timeout",
                "message": format!("only {count} of {} requests reached hold {id} within {limit:?}", request.arrived),
                "arrived": count,
            }),
        )),
    }
}
