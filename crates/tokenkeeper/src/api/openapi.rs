//! `GET /openapi.json`: the OpenAPI 3.1 document of the whole HTTP API, made by `utoipa` from
//! the handlers' own types and the `#[utoipa::path]` beside each handler.
//!
//! docs/API.md stays the readable guide; this is the machine-readable one. A snapshot test
//! (`openapi::the_document_is_the_reviewed_snapshot`) shows every change to it in review, and
//! `scripts/test` validates it with `openapi-spec-validator` and runs `schemathesis` against a
//! running tokenkeeper with it.
//!
//! Left out: the HTML pages a person opens rather than a program calls (the admin console under
//! `/admin`, the landing page `/`, `/connect/done` where a connect without `return_to` ends,
//! the demo pages, mounted only with the built-in simulator, and the stylesheet and script
//! under `/assets`), the benchmarks' hidden baseline route, and `ANY /v1/proxy/{id}` without a
//! path, which is the proxy's with an empty path.

use axum::response::{IntoResponse, Response};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{connect, connections, error, import, proxy, webhooks};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "tokenkeeper",
        description = "A self-hosted OAuth token broker for Notion. docs/API.md is the readable guide to this API.\n\nEverything under `/v1` and `/metrics` needs `Authorization: Bearer <api key>`: a `tokens` key may read connections and access tokens, ask for refreshes and use the proxy; an `admin` key may do everything. Every error answer of the API is the envelope `{\"error\":{\"code\",\"message\",…}}`; each code has one status. Besides the statuses each operation lists, any request may be answered 405 `method_not_allowed` (with `Allow`), 408 `request_timeout`, 413 `payload_too_large`, 414 `uri_too_long`, 431 `headers_too_large`, 500 `internal` or 503 `too_many_connections` by the HTTP layer.",
    ),
    paths(
        connect::create_session,
        connect::follow_link,
        connect::callback,
        connect::pending,
        connections::list,
        connections::get_one,
        connections::revoke,
        import::import,
        connections::access_token,
        connections::refresh,
        connect::create_reconnect_session,
        connections::grants,
        connections::events,
        proxy::forward,
        webhooks::list,
        webhooks::retry,
        super::health,
        super::ready,
        super::metrics,
        serve,
    ),
    components(schemas(error::ErrorCode)),
    modifiers(&BearerKey, &ProxyOperationIds),
    security(("api_key" = [])),
    tags(
        (name = "connect", description = "Connect links, Notion's consent and the callback"),
        (name = "connections", description = "Connections: read, list, revoke"),
        (name = "tokens", description = "Access tokens and refreshes"),
        (name = "ledger", description = "Every grant and event of a connection (admin)"),
        (name = "proxy", description = "Notion's API through tokenkeeper"),
        (name = "webhooks", description = "Webhook deliveries: what was sent, what failed, and sending one again (admin)"),
        (name = "health", description = "Liveness, readiness, metrics and this document"),
    )
)]
pub struct ApiDoc;

/// The API key scheme that `security(("api_key" = []))` names.
struct BearerKey;

impl Modify for BearerKey {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An API key of TOKENKEEPER_API_KEYS, with the tokens or the admin scope",
                    ))
                    .build(),
            ),
        );
    }
}

/// One handler serves every method of the proxy, and utoipa gives each the handler's name as
/// its operation id; OpenAPI wants them unique, so each becomes `proxy_<method>`.
struct ProxyOperationIds;

impl Modify for ProxyOperationIds {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        if let Some(item) = openapi.paths.paths.get_mut("/v1/proxy/{id}/{path}") {
            let operations = [
                ("get", &mut item.get),
                ("post", &mut item.post),
                ("put", &mut item.put),
                ("patch", &mut item.patch),
                ("delete", &mut item.delete),
                ("head", &mut item.head),
                ("options", &mut item.options),
                ("trace", &mut item.trace),
            ];
            for (method, operation) in operations {
                if let Some(operation) = operation {
                    operation.operation_id = Some(format!("proxy_{method}"));
                }
            }
        }
    }
}

/// The document as JSON text.
pub fn document() -> String {
    ApiDoc::openapi()
        .to_pretty_json()
        .expect("the OpenAPI document serializes")
}

/// `GET /openapi.json` (no key).
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "health",
    security(()),
    responses((status = 200, description = "This document (OpenAPI 3.1)", body = serde_json::Value, content_type = "application/json"))
)]
pub async fn serve() -> Response {
    (
        [(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        )],
        document(),
    )
        .into_response()
}
