//! The one error envelope of the HTTP API: `{"error":{"code":"…","message":"…", …}}`.
//!
//! Every code has one status; docs/API.md lists them. Messages never contain a token or key.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};

use crate::refresh::RefreshError;
use crate::store::StoreError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// More fields for the `error` object (`reconnect_url`, `diagnosis`, `retry_after`, …).
    pub extra: Map<String, Value>,
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            extra: Map::new(),
            retry_after: None,
        }
    }

    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.extra.insert(key.to_owned(), value.into());
        self
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    pub fn unauthorized() -> Self {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid API key is required: Authorization: Bearer <key>",
        )
    }

    pub fn forbidden(what: &str) -> Self {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("this API key's scope does not allow {what}; use an admin key"),
        )
    }

    pub fn not_found(what: impl Into<String>) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", what)
    }

    pub fn internal(e: impl std::fmt::Display) -> Self {
        tracing::error!("internal error: {e}");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "tokenkeeper failed to handle this request; see its log",
        )
    }

    /// The body, for callers that need it outside a response (the proxy adds a header).
    pub fn body(&self) -> Value {
        let mut error = Map::new();
        error.insert("code".into(), Value::from(self.code));
        error.insert("message".into(), Value::from(self.message.clone()));
        for (k, v) in &self.extra {
            error.insert(k.clone(), v.clone());
        }
        json!({ "error": error })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
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
        match e {
            StoreError::UnknownConnection(id) => {
                ApiError::not_found(format!("connection {id} does not exist"))
            }
            StoreError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, "conflict", m),
            StoreError::Timeout => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "database_unavailable",
                "the database did not answer in time",
            ),
            other => ApiError::internal(other),
        }
    }
}

impl From<RefreshError> for ApiError {
    fn from(e: RefreshError) -> Self {
        let message = e.to_string();
        match e {
            RefreshError::UnknownConnection(id) => {
                ApiError::not_found(format!("connection {id} does not exist"))
            }
            RefreshError::NeedsReauth { diagnosis } => {
                ApiError::new(StatusCode::FAILED_DEPENDENCY, "needs_reauth", message)
                    .with("diagnosis", diagnosis)
            }
            RefreshError::Revoked => ApiError::new(StatusCode::GONE, "connection_revoked", message),
            RefreshError::NotRefreshable(_) => {
                ApiError::new(StatusCode::CONFLICT, "not_refreshable", message)
            }
            RefreshError::LockTimeout => {
                let mut e = ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "refresh_lock_timeout",
                    message,
                );
                e.retry_after = Some(1);
                e
            }
            RefreshError::ProviderUnavailable { retry_after, .. } => {
                let mut e = ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "provider_unavailable",
                    message,
                );
                e.retry_after = Some(retry_after.map(|d| d.as_secs().max(1)).unwrap_or(1));
                e
            }
            RefreshError::ProviderRejected { code, .. } => {
                ApiError::new(StatusCode::BAD_GATEWAY, "provider_rejected", message)
                    .with("provider_code", code)
            }
            RefreshError::Store(m) => ApiError::internal(m),
        }
    }
}
