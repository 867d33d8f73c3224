//! The one error envelope of the HTTP API: `{"error":{"code":"…","message":"…", …}}`.
//!
//! Every code has one status; docs/API.md lists them. Messages never contain a token or key.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};

use crate::ids::ConnectionId;
use crate::refresh::RefreshError;
use crate::store::StoreError;

/// Every error code tokenkeeper answers with, each with its one HTTP status (docs/API.md
/// lists them). The code is the contract; the message is for people.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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
}

impl ErrorCode {
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
            ErrorCode::RefreshRateLimited => StatusCode::TOO_MANY_REQUESTS,
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
