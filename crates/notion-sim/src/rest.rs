//! The REST slice: users, search and pages, with Notion's auth, version, rate-limit, capability
//! and sharing semantics, and bodies shaped like recorded traffic.

use hyper::header::AUTHORIZATION;
use hyper::{Response, StatusCode};
use serde_json::{json, Value};

use crate::endpoint::Endpoint;
use crate::exchange::{json_response, notion_error, rate_limited, Body, Call, Reply, Shared};
use crate::limits::Verdict;
use crate::oauth::{owner_object, person_object};
use crate::world::{Caller, Id, Page, PageParent, World};

fn bearer(call: &Call) -> Option<&str> {
    let header = call.headers.get(AUTHORIZATION)?.to_str().ok()?;
    header
        .strip_prefix("Bearer ")
        .or_else(|| header.strip_prefix("bearer "))
        .map(str::trim)
}

/// The capability an endpoint needs; users endpoints accept either `read_user_*`.
fn allowed(call: &Call) -> bool {
    let config = &call.config;
    match call.endpoint {
        Endpoint::UsersMe | Endpoint::UsersList => {
            config.has_capability("read_user_with_email")
                || config.has_capability("read_user_without_email")
        }
        Endpoint::Search | Endpoint::PagesRetrieve => config.has_capability("read_content"),
        Endpoint::PagesCreate => config.has_capability("insert_content"),
        _ => true,
    }
}

pub(crate) fn handle(shared: &Shared, call: &Call) -> Reply {
    let mut reply = Reply::plain(Response::new(Body::default()));
    reply.response = respond(shared, call, &mut reply);
    reply
}

fn respond(shared: &Shared, call: &Call, reply: &mut Reply) -> Response<Body> {
    let rid = call.request_id.as_str();
    let token = bearer(call);
    reply.token = token.map(str::to_owned);
    if !call.headers.contains_key("notion-version") {
        return notion_error(
            StatusCode::BAD_REQUEST,
            "missing_version",
            "Notion-Version header failed validation: Notion-Version header should be defined, instead was `undefined`.",
            rid,
        );
    }
    let caller = token.and_then(|t| shared.world().authenticate(&call.config, t, call.now));
    let Some(caller) = caller else {
        if let Some(token) = token {
            if let Some(owner) = shared.world().token_owner(&call.config, token, call.now) {
                reply.bot_id = Some(owner.bot_id);
                reply.token_is_newest_live = Some(false);
            }
        }
        return notion_error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "API token is invalid.",
            rid,
        );
    };
    reply.bot_id = Some(caller.bot_id.clone());
    reply.token_is_newest_live = Some(caller.token_is_newest_live);
    if let Verdict::Limited {
        reason,
        retry_after,
    } = shared.limits.check(
        &call.config,
        &caller.bot_id,
        &caller.workspace_id,
        call.now.instant,
    ) {
        shared.stats.count_rate_limited(reason);
        return rate_limited(reason, retry_after, rid);
    }
    if !allowed(call) {
        return notion_error(
            StatusCode::FORBIDDEN,
            "restricted_resource",
            "Insufficient permissions for this endpoint.",
            rid,
        );
    }
    match call.endpoint {
        Endpoint::UsersMe => {
            let world = shared.world();
            json_response(StatusCode::OK, bot_user(call, &world, &caller), rid)
        }
        Endpoint::UsersList => users_list(shared, call, &caller),
        Endpoint::Search => search(shared, call, &caller),
        Endpoint::PagesRetrieve => retrieve_page(shared, call, &caller),
        Endpoint::PagesCreate => create_page(shared, call, &caller),
        _ => notion_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_url",
            "Invalid request URL.",
            rid,
        ),
    }
}

/// The bot user, shaped like `GET /v1/users/me` in recorded traffic.
fn bot_user(call: &Call, world: &World, caller: &Caller) -> Value {
    let bot = world.bot(&caller.bot_id);
    let owner = bot
        .map(|b| owner_object(&call.config, &world.user_view(&b.user_id)))
        .unwrap_or(Value::Null);
    let workspace_name = world
        .workspace(&caller.workspace_id)
        .map(|w| w.name.clone())
        .unwrap_or_default();
    json!({
        "object": "user",
        "id": caller.bot_id,
        "name": call.config.client_id,
        "avatar_url": null,
        "type": "bot",
        "bot": {
            "owner": owner,
            "workspace_name": workspace_name,
            "workspace_id": caller.workspace_id,
            "workspace_limits": {"max_file_upload_size_in_bytes": 5_242_880},
        },
    })
}

fn users_list(shared: &Shared, call: &Call, caller: &Caller) -> Response<Body> {
    let world = shared.world();
    let mut results: Vec<Value> = world
        .workspace(&caller.workspace_id)
        .map(|ws| {
            ws.member_ids
                .iter()
                .map(|id| person_object(&call.config, &world.user_view(id)))
                .collect()
        })
        .unwrap_or_default();
    let mut bot = bot_user(call, &world, caller);
    if let Value::Object(map) = &mut bot {
        map.remove("request_id");
    }
    results.push(bot);
    json_response(
        StatusCode::OK,
        json!({
            "object": "list",
            "results": results,
            "next_cursor": null,
            "has_more": false,
            "type": "user",
            "user": {},
        }),
        &call.request_id,
    )
}

/// The body as a JSON object; an empty body counts as `{}`.
fn body_object(call: &Call) -> Result<serde_json::Map<String, Value>, Response<Body>> {
    if call.body.iter().all(u8::is_ascii_whitespace) {
        return Ok(serde_json::Map::new());
    }
    match serde_json::from_slice(&call.body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(notion_error(
            StatusCode::BAD_REQUEST,
            "validation_error",
            "body failed validation: body should be an object.",
            &call.request_id,
        )),
        Err(_) => Err(notion_error(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            "Error parsing JSON body.",
            &call.request_id,
        )),
    }
}

fn search(shared: &Shared, call: &Call, caller: &Caller) -> Response<Body> {
    let body = match body_object(call) {
        Ok(body) => body,
        Err(response) => return response,
    };
    let query = body.get("query").and_then(Value::as_str).unwrap_or("");
    let world = shared.world();
    let results: Vec<Value> = world
        .search(&caller.bot_id, &caller.workspace_id, query)
        .into_iter()
        .map(page_object)
        .collect();
    json_response(
        StatusCode::OK,
        json!({
            "object": "list",
            "results": results,
            "next_cursor": null,
            "has_more": false,
            "type": "page_or_data_source",
            "page_or_data_source": {},
        }),
        &call.request_id,
    )
}

/// Accepts ids with or without dashes, as Notion does, and gives the dashed form.
fn normalize_id(raw: &str) -> Option<String> {
    let hex: String = raw.chars().filter(|c| *c != '-').collect();
    if hex.len() != 32 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let hex = hex.to_ascii_lowercase();
    Some(format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    ))
}

fn not_found(id: &str, request_id: &str) -> Response<Body> {
    notion_error(
        StatusCode::NOT_FOUND,
        "object_not_found",
        &format!(
            "Could not find page with ID: {id}. Make sure the relevant pages and databases are shared with your integration."
        ),
        request_id,
    )
}

fn retrieve_page(shared: &Shared, call: &Call, caller: &Caller) -> Response<Body> {
    let raw = call.path_id.as_deref().unwrap_or("");
    let Some(id) = normalize_id(raw) else {
        return notion_error(
            StatusCode::BAD_REQUEST,
            "validation_error",
            &format!("path failed validation: path.page_id should be a valid uuid, instead was `\"{raw}\"`."),
            &call.request_id,
        );
    };
    let world = shared.world();
    match world.visible_page(&caller.bot_id, &id) {
        Some(page) => json_response(StatusCode::OK, page_object(page), &call.request_id),
        None => not_found(&id, &call.request_id),
    }
}

/// The title of a create request: `properties.title` as a rich-text array, or as
/// `{"title": [...]}`.
fn requested_title(body: &serde_json::Map<String, Value>) -> String {
    let title = body.get("properties").and_then(|p| p.get("title"));
    let items = match title {
        Some(Value::Array(items)) => items.as_slice(),
        Some(Value::Object(obj)) => obj
            .get("title")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default(),
        _ => &[],
    };
    items
        .iter()
        .filter_map(|item| {
            item.pointer("/text/content")
                .or_else(|| item.get("plain_text"))
                .and_then(Value::as_str)
        })
        .collect()
}

fn create_page(shared: &Shared, call: &Call, caller: &Caller) -> Response<Body> {
    let rid = call.request_id.as_str();
    let body = match body_object(call) {
        Ok(body) => body,
        Err(response) => return response,
    };
    let Some(parent) = body.get("parent") else {
        return notion_error(
            StatusCode::BAD_REQUEST,
            "validation_error",
            "body failed validation: body.parent should be defined, instead was `undefined`.",
            rid,
        );
    };
    let Some(raw_parent) = parent.get("page_id").and_then(Value::as_str) else {
        return notion_error(
            StatusCode::BAD_REQUEST,
            "validation_error",
            "body failed validation: body.parent.page_id should be defined; the simulator supports page parents only.",
            rid,
        );
    };
    let Some(parent_id) = normalize_id(raw_parent) else {
        return notion_error(
            StatusCode::BAD_REQUEST,
            "validation_error",
            "body failed validation: body.parent.page_id should be a valid uuid.",
            rid,
        );
    };
    let title = requested_title(&body);
    let mut world = shared.world();
    let Some(parent) = world.visible_page(&caller.bot_id, &parent_id) else {
        return not_found(&parent_id, rid);
    };
    let parent_id: Id = parent.id.clone();
    let id = world.create_page(&caller.bot_id, &parent_id, title, call.now);
    let page = world.page(&id).map(page_object).unwrap_or(Value::Null);
    json_response(StatusCode::OK, page, rid)
}

/// A page object, shaped like the one in recorded traffic.
fn page_object(page: &Page) -> Value {
    let parent = match &page.parent {
        PageParent::Workspace => json!({"type": "workspace", "workspace": true}),
        PageParent::Page(id) => json!({"type": "page_id", "page_id": id}),
    };
    let slug: String = page
        .title
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let compact: String = page.id.chars().filter(|c| *c != '-').collect();
    let url = if slug.is_empty() {
        format!("https://app.notion.com/p/{compact}")
    } else {
        format!("https://app.notion.com/p/{slug}-{compact}")
    };
    json!({
        "object": "page",
        "id": page.id,
        "created_time": page.created_time,
        "last_edited_time": page.created_time,
        "created_by": {"object": "user", "id": page.created_by},
        "last_edited_by": {"object": "user", "id": page.created_by},
        "cover": null,
        "icon": null,
        "parent": parent,
        "in_trash": false,
        "is_archived": false,
        "is_locked": false,
        "properties": {
            "title": {
                "id": "title",
                "type": "title",
                "title": [{
                    "type": "text",
                    "text": {"content": page.title, "link": null},
                    "annotations": {
                        "bold": false,
                        "italic": false,
                        "strikethrough": false,
                        "underline": false,
                        "code": false,
                        "color": "default",
                    },
                    "plain_text": page.title,
                    "href": null,
                }],
            },
        },
        "url": url,
        "public_url": null,
        "archived": false,
    })
}

#[cfg(test)]
mod tests {
    use super::normalize_id;

    #[test]
    fn page_ids_are_accepted_with_or_without_dashes() {
        let dashed = "393abc1e-edcd-80f3-813b-e205934558c6";
        assert_eq!(
            normalize_id("393abc1eedcd80f3813be205934558c6").as_deref(),
            Some(dashed)
        );
        assert_eq!(normalize_id(dashed).as_deref(), Some(dashed));
        assert_eq!(normalize_id("not-a-page"), None);
    }
}
