//! The REST slice: auth, versions, sharing, capabilities, and the bodies.

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::{assert_notion_error, Sim};

async fn unshared_page(sim: &Sim, workspace_id: &str) -> String {
    let workspaces = sim.control_get("/_sim/workspaces").await;
    let ws = workspaces["workspaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["workspace_id"] == workspace_id)
        .expect("the workspace is listed");
    ws["unshared_page_ids"][0]
        .as_str()
        .expect("every workspace keeps a page unshared")
        .to_owned()
}

#[tokio::test]
async fn every_rest_answer_carries_a_request_id_header() {
    let sim = Sim::start().await;
    let pair = sim.connect().await;
    let ok = sim.me(&pair.access).await;
    assert_eq!(ok.status, StatusCode::OK);
    assert_eq!(
        ok.headers["x-notion-request-id"],
        ok.body["request_id"].as_str().unwrap()
    );
    let unauthorized = sim.me("ntn_nope").await;
    assert!(unauthorized.headers.contains_key("x-notion-request-id"));
}

#[tokio::test]
async fn dead_unknown_and_missing_tokens_are_unauthorized() {
    let sim = Sim::start().await;
    let answer = sim.me("ntn_not_a_token").await;
    assert_notion_error(&answer, 401, "unauthorized");
    assert_eq!(answer.body["message"], "API token is invalid.");
    let missing = sim
        .send(
            sim.http
                .get(sim.url("/v1/users"))
                .header("Notion-Version", "2026-03-11"),
        )
        .await;
    assert_notion_error(&missing, 401, "unauthorized");
}

#[tokio::test]
async fn the_version_header_is_required() {
    let sim = Sim::start().await;
    let pair = sim.connect().await;
    let answer = sim
        .send(
            sim.http
                .get(sim.url("/v1/users/me"))
                .bearer_auth(&pair.access),
        )
        .await;
    assert_notion_error(&answer, 400, "missing_version");
}

#[tokio::test]
async fn unknown_paths_are_invalid_request_urls() {
    let sim = Sim::start().await;
    let pair = sim.connect().await;
    for (method, path) in [
        (Method::GET, "/v1/invalid"),
        (Method::DELETE, "/v1/users/me"),
        (Method::GET, "/v2/users/me"),
    ] {
        let answer = sim.rest(method, path, &pair.access, None).await;
        assert_notion_error(&answer, 400, "invalid_request_url");
        assert_eq!(answer.body["message"], "Invalid request URL.");
    }
}

#[tokio::test]
async fn users_me_describes_the_bot() {
    let sim = Sim::start().await;
    let pair = sim.connect().await;
    let me = sim.me(&pair.access).await.body;
    assert_eq!(me["object"], "user");
    assert_eq!(me["type"], "bot");
    assert_eq!(me["id"], pair.bot_id.as_str());
    assert_eq!(me["bot"]["workspace_id"], pair.workspace_id.as_str());
    assert_eq!(me["bot"]["owner"]["type"], "user");
}

#[tokio::test]
async fn users_list_shows_the_members_and_the_bot() {
    let sim = Sim::start().await;
    let pair = sim.connect().await;
    let answer = sim.rest(Method::GET, "/v1/users", &pair.access, None).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.body["object"], "list");
    let results = answer.body["results"].as_array().unwrap();
    assert!(results
        .iter()
        .any(|u| u["type"] == "person" && u["person"]["email"].is_string()));
    assert!(results.iter().any(|u| u["id"] == pair.bot_id.as_str()));
}

#[tokio::test]
async fn search_sees_shared_pages_only() {
    let sim = Sim::start().await;
    let pair = sim.connect().await;
    let unshared = unshared_page(&sim, &pair.workspace_id).await;
    let answer = sim
        .rest(Method::POST, "/v1/search", &pair.access, Some(json!({})))
        .await;
    assert_eq!(answer.status, StatusCode::OK);
    let ids: Vec<&str> = answer.body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap())
        .collect();
    assert!(!ids.is_empty(), "the user shared some pages");
    assert!(!ids.contains(&unshared.as_str()));
    let bot = sim.bot(&pair.bot_id).await;
    let shared: Vec<&str> = bot["shared_page_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let mut sorted_ids = ids.clone();
    sorted_ids.sort();
    let mut sorted_shared = shared.clone();
    sorted_shared.sort();
    assert_eq!(sorted_ids, sorted_shared);

    let filtered = sim
        .rest(
            Method::POST,
            "/v1/search",
            &pair.access,
            Some(json!({"query": "wiki"})),
        )
        .await;
    let titles: Vec<&Value> = filtered.body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| &p["properties"]["title"]["title"][0]["plain_text"])
        .collect();
    assert_eq!(titles, [&json!("Team Wiki")]);

    let bad = sim
        .send(
            sim.http
                .post(sim.url("/v1/search"))
                .bearer_auth(&pair.access)
                .header("Notion-Version", "2026-03-11")
                .body("{not json"),
        )
        .await;
    assert_notion_error(&bad, 400, "invalid_json");
}

#[tokio::test]
async fn pages_not_shared_are_not_found() {
    let sim = Sim::start().await;
    let pair = sim.connect().await;
    let unshared = unshared_page(&sim, &pair.workspace_id).await;
    let answer = sim
        .rest(
            Method::GET,
            &format!("/v1/pages/{unshared}"),
            &pair.access,
            None,
        )
        .await;
    assert_notion_error(&answer, 404, "object_not_found");
    let shared = sim.bot(&pair.bot_id).await["shared_page_ids"][0]
        .as_str()
        .unwrap()
        .to_owned();
    let compact = shared.replace('-', "");
    let answer = sim
        .rest(
            Method::GET,
            &format!("/v1/pages/{compact}"),
            &pair.access,
            None,
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    assert_eq!(answer.body["id"], shared.as_str());
    let answer = sim
        .rest(Method::GET, "/v1/pages/not-an-id", &pair.access, None)
        .await;
    assert_notion_error(&answer, 400, "validation_error");
}

#[tokio::test]
async fn another_bot_cannot_see_pages_shared_with_the_first() {
    let sim = Sim::start().await;
    let alice = sim.connect().await;
    sim.control_post(
        "/_sim/next-authorization",
        json!({"workspace_id": alice.workspace_id, "user_id": "bob"}),
    )
    .await;
    let bob = sim.connect().await;
    let page = sim
        .rest(
            Method::POST,
            "/v1/pages",
            &alice.access,
            Some(json!({
                "parent": {"page_id": sim.bot(&alice.bot_id).await["shared_page_ids"][0]},
                "properties": {"title": [{"text": {"content": "Alice's notes"}}]},
            })),
        )
        .await;
    let id = page.body["id"].as_str().unwrap();
    let answer = sim
        .rest(Method::GET, &format!("/v1/pages/{id}"), &bob.access, None)
        .await;
    assert_notion_error(&answer, 404, "object_not_found");
}

#[tokio::test]
async fn creating_a_page_shares_it_with_the_bot() {
    let sim = Sim::start().await;
    let pair = sim.connect().await;
    let parent = sim.bot(&pair.bot_id).await["shared_page_ids"][0]
        .as_str()
        .unwrap()
        .to_owned();
    let created = sim
        .rest(
            Method::POST,
            "/v1/pages",
            &pair.access,
            Some(json!({
                "parent": {"page_id": parent.replace('-', "")},
                "properties": {"title": [{"text": {"content": "Test page"}}]},
                "children": [],
            })),
        )
        .await;
    assert_eq!(created.status, StatusCode::OK, "{}", created.text);
    assert_eq!(created.body["object"], "page");
    assert_eq!(created.body["parent"]["page_id"], parent.as_str());
    assert_eq!(
        created.body["properties"]["title"]["title"][0]["plain_text"],
        "Test page"
    );
    let id = created.body["id"].as_str().unwrap();
    let fetched = sim
        .rest(Method::GET, &format!("/v1/pages/{id}"), &pair.access, None)
        .await;
    assert_eq!(fetched.status, StatusCode::OK);
    assert!(sim.bot(&pair.bot_id).await["shared_page_ids"]
        .as_array()
        .unwrap()
        .contains(&json!(id)));

    let unshared = unshared_page(&sim, &pair.workspace_id).await;
    let refused = sim
        .rest(
            Method::POST,
            "/v1/pages",
            &pair.access,
            Some(json!({"parent": {"page_id": unshared}})),
        )
        .await;
    assert_notion_error(&refused, 404, "object_not_found");
    let no_parent = sim
        .rest(
            Method::POST,
            "/v1/pages",
            &pair.access,
            Some(json!({"properties": {}})),
        )
        .await;
    assert_notion_error(&no_parent, 400, "validation_error");
}

#[tokio::test]
async fn missing_capabilities_are_restricted_resources() {
    let sim = Sim::with(|c| c.capabilities = vec!["read_content".to_owned()]).await;
    let pair = sim.connect().await;
    let parent = sim.bot(&pair.bot_id).await["shared_page_ids"][0].clone();
    let create = sim
        .rest(
            Method::POST,
            "/v1/pages",
            &pair.access,
            Some(json!({"parent": {"page_id": parent}})),
        )
        .await;
    assert_notion_error(&create, 403, "restricted_resource");
    assert_notion_error(&sim.me(&pair.access).await, 403, "restricted_resource");
    let search = sim
        .rest(Method::POST, "/v1/search", &pair.access, None)
        .await;
    assert_eq!(search.status, StatusCode::OK);
    // Without the email capability, the owner's person object carries no email.
    sim.server
        .update_config(|c| c.capabilities = vec!["read_user_without_email".to_owned()]);
    let me = sim.me(&pair.access).await;
    assert_eq!(me.status, StatusCode::OK);
    assert_eq!(me.body["bot"]["owner"]["user"]["person"], json!({}));
    let search = sim
        .rest(Method::POST, "/v1/search", &pair.access, None)
        .await;
    assert_notion_error(&search, 403, "restricted_resource");
}
