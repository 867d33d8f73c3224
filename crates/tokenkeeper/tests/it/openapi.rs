//! The OpenAPI document (issue 12 §4): a snapshot, so that any change to the API shows in
//! review, and served at `/openapi.json` without a key. `scripts/test` also validates it with
//! openapi-spec-validator and runs schemathesis against a running tokenkeeper with it.

use serde_json::Value;

use crate::support::app::TestApp;
use crate::support::db::Backend;

#[test]
fn the_document_is_the_reviewed_snapshot() {
    insta::assert_snapshot!("openapi.json", tokenkeeper::api::openapi::document());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_is_served_without_a_key_and_describes_every_route() {
    let app = TestApp::start(Backend::Sqlite).await;
    let r = app
        .http
        .get(format!("{}/openapi.json", app.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");
    let served: Value = r.json().await.unwrap();
    let document: Value = serde_json::from_str(&tokenkeeper::api::openapi::document()).unwrap();
    assert_eq!(served, document);
    assert!(served["openapi"].as_str().unwrap().starts_with("3.1."));
    let paths = served["paths"].as_object().unwrap();
    // docs/API.md's calls, each of which the router serves.
    for (path, methods) in [
        ("/v1/connect-sessions", &["post"][..]),
        ("/v1/connections", &["get"]),
        ("/v1/connections/{id}", &["get", "delete"]),
        ("/v1/connections/{id}/access-token", &["get"]),
        ("/v1/connections/{id}/refresh", &["post"]),
        ("/v1/connections/{id}/reconnect-sessions", &["post"]),
        ("/v1/connections/{id}/grants", &["get"]),
        ("/v1/connections/{id}/events", &["get"]),
        ("/v1/connections/import", &["post"]),
        (
            "/v1/proxy/{id}/{path}",
            &[
                "get", "post", "put", "patch", "delete", "head", "options", "trace",
            ],
        ),
        ("/v1/webhook-deliveries", &["get"]),
        ("/v1/webhook-deliveries/{id}/retry", &["post"]),
        ("/oauth/callback", &["get"]),
        ("/connect/pending/{session}/{grant}", &["get"]),
        ("/connect/{session}/{state}", &["get"]),
        ("/healthz", &["get"]),
        ("/readyz", &["get"]),
        ("/metrics", &["get"]),
        ("/openapi.json", &["get"]),
    ] {
        let item = paths
            .get(path)
            .unwrap_or_else(|| panic!("{path} is not in the document"));
        for method in methods {
            let operation = &item[*method];
            assert!(
                operation.is_object(),
                "{method} {path} is not in the document"
            );
            let statuses = operation["responses"].as_object().unwrap();
            assert!(!statuses.is_empty(), "{method} {path} documents no answer");
        }
    }
    assert_eq!(paths.len(), 19, "a path the list above does not know");
    // Every error answer of the API is the envelope, and every code is listed.
    let codes = &served["components"]["schemas"]["ErrorCode"]["enum"];
    assert_eq!(
        codes.as_array().unwrap().len(),
        tokenkeeper::api::error::ErrorCode::ALL.len()
    );
    // The calls without a key say so; the others need the bearer key.
    for path in [
        "/healthz",
        "/readyz",
        "/openapi.json",
        "/oauth/callback",
        "/connect/pending/{session}/{grant}",
    ] {
        let security = &paths[path]["get"]["security"];
        assert_eq!(security, &serde_json::json!([{}]), "{path}");
    }
    assert_eq!(served["security"], serde_json::json!([{"api_key": []}]));
}
