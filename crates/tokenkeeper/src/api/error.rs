//! The one error envelope of the HTTP API: `{"error":{"code":"…","message":"…", …}}`.
//!
//! Every code has one status; docs/API.md lists them. Messages never contain a token or key.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use utoipa::ToSchema;

use crate::ids::ConnectionId;
use crate::refresh::RefreshError;
use crate::store::StoreError;

/// Every error code tokenkeeper answers with, each with its one HTTP status (docs/API.md
/// lists them). The code is the contract; the message is for people. Its serialized form,
/// which the OpenAPI document lists, is `as_str` (a unit test keeps the two equal).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    InvalidRequest,
    UnsupportedProvider,
    ReturnToNotAllowed,
    Unauthorized,
    Forbidden,
    NotFound,
    Conflict,
    NotRefreshable,
    ConnectionRevoked,
    NeedsReauth,
    Internal,
    ProviderRejected,
    UpstreamUnreachable,
    DatabaseUnavailable,
    NotReady,
    RefreshLockTimeout,
    ProviderUnavailable,
    TokenRejectedAfterRefresh,
    RefreshRateLimited,
    MethodNotAllowed,
    RequestTimeout,
    PayloadTooLarge,
    UriTooLong,
    HeadersTooLarge,
    TooManyConnections,
    UpstreamTimeout,
    NotionThrottled,
}

impl ErrorCode {
    /// Every code, for the test that keeps `as_str` and the serialized form equal.
    pub const ALL: [ErrorCode; 27] = [
        ErrorCode::InvalidRequest,
        ErrorCode::UnsupportedProvider,
        ErrorCode::ReturnToNotAllowed,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::NotFound,
        ErrorCode::Conflict,
        ErrorCode::NotRefreshable,
        ErrorCode::ConnectionRevoked,
        ErrorCode::NeedsReauth,
        ErrorCode::Internal,
        ErrorCode::ProviderRejected,
        ErrorCode::UpstreamUnreachable,
        ErrorCode::DatabaseUnavailable,
        ErrorCode::NotReady,
        ErrorCode::RefreshLockTimeout,
        ErrorCode::ProviderUnavailable,
        ErrorCode::TokenRejectedAfterRefresh,
        ErrorCode::RefreshRateLimited,
        ErrorCode::MethodNotAllowed,
        ErrorCode::RequestTimeout,
        ErrorCode::PayloadTooLarge,
        ErrorCode::UriTooLong,
        ErrorCode::HeadersTooLarge,
        ErrorCode::TooManyConnections,
        ErrorCode::UpstreamTimeout,
        ErrorCode::NotionThrottled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::UnsupportedProvider => "unsupported_provider",
            ErrorCode::ReturnToNotAllowed => "return_to_not_allowed",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Conflict => "conflict",
            ErrorCode::NotRefreshable => "not_refreshable",
            ErrorCode::ConnectionRevoked => "connection_revoked",
            ErrorCode::NeedsReauth => "needs_reauth",
            ErrorCode::Internal => "internal",
            ErrorCode::ProviderRejected => "provider_rejected",
            ErrorCode::UpstreamUnreachable => "upstream_unreachable",
            ErrorCode::DatabaseUnavailable => "database_unavailable",
            ErrorCode::NotReady => "not_ready",
            ErrorCode::RefreshLockTimeout => "refresh_lock_timeout",
            ErrorCode::ProviderUnavailable => "provider_unavailable",
            ErrorCode::TokenRejectedAfterRefresh => "token_rejected_after_refresh",
            ErrorCode::RefreshRateLimited => "refresh_rate_limited",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::RequestTimeout => "request_timeout",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::UriTooLong => "uri_too_long",
            ErrorCode::HeadersTooLarge => "headers_too_large",
            ErrorCode::TooManyConnections => "too_many_connections",
            ErrorCode::UpstreamTimeout => "upstream_timeout",
            ErrorCode::NotionThrottled => "notion_throttled",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            ErrorCode::InvalidRequest
            | ErrorCode::UnsupportedProvider
            | ErrorCode::ReturnToNotAllowed => StatusCode::BAD_REQUEST,
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::Forbidden => StatusCode::FORBIDDEN,
            ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::Conflict
            | ErrorCode::NotRefreshable
            | ErrorCode::TokenRejectedAfterRefresh => StatusCode::CONFLICT,
            ErrorCode::RefreshRateLimited | ErrorCode::NotionThrottled => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ErrorCode::ConnectionRevoked => StatusCode::GONE,
            ErrorCode::NeedsReauth => StatusCode::FAILED_DEPENDENCY,
            ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::ProviderRejected | ErrorCode::UpstreamUnreachable => StatusCode::BAD_GATEWAY,
            ErrorCode::DatabaseUnavailable
            | ErrorCode::NotReady
            | ErrorCode::RefreshLockTimeout
            | ErrorCode::ProviderUnavailable
            | ErrorCode::TooManyConnections => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ErrorCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::UriTooLong => StatusCode::URI_TOO_LONG,
            ErrorCode::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ErrorCode::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The code of an error answer that some layer wrote with a bare status (an axum rejection,
    /// a route's unknown method), for `api::server`'s last check that every answer under the API
    /// is in the envelope. A status no code owns maps to the nearest code, whose own status then
    /// replaces it: every code keeps exactly one status.
    pub fn for_status(status: StatusCode) -> ErrorCode {
        match status.as_u16() {
            401 => ErrorCode::Unauthorized,
            403 => ErrorCode::Forbidden,
            404 => ErrorCode::NotFound,
            405 => ErrorCode::MethodNotAllowed,
            408 => ErrorCode::RequestTimeout,
            413 => ErrorCode::PayloadTooLarge,
            414 => ErrorCode::UriTooLong,
            431 => ErrorCode::HeadersTooLarge,
            400..=499 => ErrorCode::InvalidRequest,
            _ => ErrorCode::Internal,
        }
    }
}

/// Every error answer's body, as the OpenAPI document describes it. `ApiError` builds the body
/// from a map rather than from this type, because a few errors add fields of their own; the
/// unit test `every_error_body_reads_as_the_documented_envelope` keeps the two in step.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorEnvelope {
    pub error: ErrorBody,
}

/// The `error` object: `code` and `message` always, and the fields some codes add.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub code: ErrorCode,
    /// For people; never contains a token or a key.
    pub message: String,
    /// The connection concerned (`needs_reauth`, `connection_revoked`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_id: Option<crate::ids::ConnectionId>,
    /// `needs_reauth`: the link to send the user to; null when none could be made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reconnect_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reconnect_url_expires_at: Option<chrono::DateTime<chrono::Utc>>,
    /// `needs_reauth`: why the user must reconnect, when it is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diagnosis: Option<crate::ledger::Diagnosis>,
    /// `provider_rejected`: Notion's error code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider_code: Option<String>,
    /// `token_rejected_after_refresh`: what Notion's introspection said (`active`, `unknown`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub introspection: Option<String>,
}

/// Marks a response whose body is tokenkeeper's envelope, so that the server's last check
/// (`api::server`) leaves it alone.
#[derive(Debug, Clone, Copy)]
pub struct Enveloped;

#[derive(Debug)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    /// More fields for the `error` object (`reconnect_url`, `diagnosis`, `retry_after`, …).
    pub extra: Map<String, Value>,
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
            extra: Map::new(),
            retry_after: None,
        }
    }

    /// Sets `Retry-After`, in seconds.
    pub fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.extra.insert(key.to_owned(), value.into());
        self
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        ApiError::new(ErrorCode::InvalidRequest, message)
    }

    pub fn unauthorized() -> Self {
        ApiError::new(
            ErrorCode::Unauthorized,
            "a valid API key is required: Authorization: Bearer <key>",
        )
    }

    pub fn forbidden(what: &str) -> Self {
        ApiError::new(
            ErrorCode::Forbidden,
            format!("this API key's scope does not allow {what}; use an admin key"),
        )
    }

    pub fn not_found(what: impl Into<String>) -> Self {
        ApiError::new(ErrorCode::NotFound, what)
    }

    pub fn unknown_connection(id: &ConnectionId) -> Self {
        ApiError::not_found(format!("connection {id} does not exist"))
    }

    pub fn internal(e: impl std::fmt::Display) -> Self {
        tracing::error!("internal error: {e}");
        ApiError::new(
            ErrorCode::Internal,
            "tokenkeeper failed to handle this request; see its log",
        )
    }

    /// The body, for callers that need it outside a response (the proxy adds a header).
    pub fn body(&self) -> Value {
        let mut error = Map::new();
        error.insert("code".into(), Value::from(self.code.as_str()));
        error.insert("message".into(), Value::from(self.message.clone()));
        for (k, v) in &self.extra {
            error.insert(k.clone(), v.clone());
        }
        json!({ "error": error })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.code.status(), axum::Json(self.body())).into_response();
        response.extensions_mut().insert(Enveloped);
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert("retry-after", HeaderValue::from(seconds));
        }
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError::from(&e)
    }
}

impl From<&StoreError> for ApiError {
    fn from(e: &StoreError) -> Self {
        match e {
            StoreError::UnknownConnection(id) => ApiError::unknown_connection(id),
            StoreError::Conflict(m) => ApiError::new(ErrorCode::Conflict, m.clone()),
            // Retryable, and said so: the store logs the outage once, not per request.
            StoreError::Timeout | StoreError::Unavailable(_) => ApiError::new(
                ErrorCode::DatabaseUnavailable,
                "the database cannot be reached right now; try again shortly",
            )
            .retry_after(1),
            other => ApiError::internal(other),
        }
    }
}

impl From<RefreshError> for ApiError {
    /// Every refresh error but `NeedsReauth`, whose answer carries a reconnect link and so is
    /// built by `connect::needs_reauth`.
    fn from(e: RefreshError) -> Self {
        let message = e.to_string();
        match e {
            RefreshError::UnknownConnection(id) => ApiError::unknown_connection(&id),
            RefreshError::NeedsReauth { diagnosis } => {
                ApiError::new(ErrorCode::NeedsReauth, message).with(
                    "diagnosis",
                    serde_json::to_value(diagnosis).expect("a diagnosis serializes"),
                )
            }
            RefreshError::Revoked => ApiError::new(ErrorCode::ConnectionRevoked, message),
            RefreshError::NotRefreshable(_) => ApiError::new(ErrorCode::NotRefreshable, message),
            RefreshError::LockTimeout => {
                ApiError::new(ErrorCode::RefreshLockTimeout, message).retry_after(1)
            }
            RefreshError::ProviderUnavailable { retry_after, .. } => {
                ApiError::new(ErrorCode::ProviderUnavailable, message)
                    .retry_after(retry_after.map(|d| d.as_secs().max(1)).unwrap_or(1))
            }
            RefreshError::ProviderRejected { code, .. } => {
                ApiError::new(ErrorCode::ProviderRejected, message).with("provider_code", code)
            }
            RefreshError::TokenRejectedAfterRefresh { introspection } => {
                ApiError::new(ErrorCode::TokenRejectedAfterRefresh, message)
                    .with("introspection", introspection)
            }
            RefreshError::RateLimited { retry_after } => {
                ApiError::new(ErrorCode::RefreshRateLimited, message)
                    .retry_after(retry_after.as_secs().max(1))
            }
            RefreshError::Store(e) => ApiError::from(&*e),
            RefreshError::Task(m) => ApiError::internal(m),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_serializes_as_its_documented_name() {
        for code in ErrorCode::ALL {
            assert_eq!(
                serde_json::to_value(code).unwrap(),
                Value::from(code.as_str())
            );
        }
    }

    #[test]
    fn every_error_body_reads_as_the_documented_envelope() {
        let id = crate::ids::ConnectionId::generate();
        let bodies = [
            ApiError::invalid("bad").body(),
            ApiError::new(ErrorCode::NeedsReauth, "reconnect")
                .with("connection_id", id.as_str())
                .with("reconnect_url", "https://tk.example/connect/cs_x/y")
                .with("reconnect_url_expires_at", "2026-06-08T00:00:00Z")
                .with("diagnosis", Value::Null)
                .body(),
            ApiError::new(ErrorCode::ProviderRejected, "no")
                .with("provider_code", "invalid_client")
                .body(),
            ApiError::new(ErrorCode::TokenRejectedAfterRefresh, "no")
                .with("introspection", "active")
                .body(),
        ];
        for body in bodies {
            let read: ErrorEnvelope = serde_json::from_value(body.clone())
                .unwrap_or_else(|e| panic!("{body} is not the documented envelope: {e}"));
            assert_eq!(read.error.message, body["error"]["message"]);
        }
    }
}
