//! Providers: the OAuth servers and APIs tokenkeeper speaks to. Notion first.

pub mod notion;
pub mod text;

use std::time::Duration;

use text::{ProviderCode, ProviderRequestId, ProviderText};

/// What went wrong talking to a provider's OAuth endpoints. The refresh coordinator's decisions
/// read from these variants, never from strings.
///
/// What the provider said arrives only as `ProviderCode`, `ProviderText` and
/// `ProviderRequestId`, which are made by scrubbing it (`text.rs`) when the error is built:
/// the error, its `Display`, and everything made from it (logs, events, diagnoses, 424 bodies,
/// pages) can hold no unscrubbed provider text.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProviderError {
    /// The provider answered with an OAuth error about this request (`invalid_grant`,
    /// `invalid_client`, …).
    #[error("the provider rejected the request: {code} ({status}){}", describe(.message))]
    Rejected {
        status: u16,
        code: ProviderCode,
        message: Option<ProviderText>,
        request_id: Option<ProviderRequestId>,
    },
    /// Throttled (429) or overloaded (529): try again after `retry_after`.
    #[error("the provider is throttling requests ({status}), retry after {retry_after:?}")]
    Throttled {
        status: u16,
        retry_after: Option<Duration>,
        request_id: Option<ProviderRequestId>,
    },
    /// The provider could not be reached, timed out, or answered 5xx.
    #[error("the provider is unreachable or failing: {reason}")]
    Unavailable {
        status: Option<u16>,
        reason: String,
        /// Whether the provider may have acted on the request anyway (a timeout, a connection
        /// that broke after sending, a gateway timeout): a refresh token may be consumed.
        maybe_processed: bool,
    },
    /// The provider answered something we cannot read. The body is never quoted: it may hold a
    /// token.
    #[error("the provider's answer could not be read: {reason}")]
    Unparseable { status: u16, reason: String },
}

fn describe(message: &Option<ProviderText>) -> String {
    message
        .as_ref()
        .map(|m| format!(": {m}"))
        .unwrap_or_default()
}

impl ProviderError {
    /// `invalid_grant`: this grant is dead. The only token-endpoint answer that can put a
    /// connection in `needs_reauth` (invariants 5 and 6).
    pub fn is_invalid_grant(&self) -> bool {
        matches!(self, ProviderError::Rejected { code, .. } if code == "invalid_grant")
    }

    /// Worth trying again later: throttling, 5xx, timeouts, network failures.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            ProviderError::Throttled { .. } | ProviderError::Unavailable { .. }
        )
    }

    /// See `Unavailable::maybe_processed`.
    pub fn maybe_processed(&self) -> bool {
        matches!(
            self,
            ProviderError::Unavailable {
                maybe_processed: true,
                ..
            }
        )
    }

    pub fn code(&self) -> String {
        match self {
            ProviderError::Rejected { code, .. } => code.to_string(),
            ProviderError::Throttled { status, .. } => format!("throttled_{status}"),
            ProviderError::Unavailable {
                status: Some(s), ..
            } => format!("http_{s}"),
            ProviderError::Unavailable { status: None, .. } => "unreachable".into(),
            ProviderError::Unparseable { .. } => "unparseable".into(),
        }
    }

    pub fn request_id(&self) -> Option<String> {
        match self {
            ProviderError::Rejected { request_id, .. }
            | ProviderError::Throttled { request_id, .. } => {
                request_id.as_ref().map(|r| r.as_str().to_owned())
            }
            _ => None,
        }
    }
}
