//! What the ledger's states and records mean, in words a person reads on the console.

use crate::ledger::{CheckResult, ConnectionStatus, DiagnosisReason, EventKind, GrantOrigin};

/// A status's name and what it means for the app.
pub fn status(status: ConnectionStatus) -> (&'static str, &'static str) {
    match status {
        ConnectionStatus::Active => (
            "Active",
            "Working: the app gets a working access token, and tokenkeeper refreshes it when Notion refuses it.",
        ),
        ConnectionStatus::NeedsReauth => (
            "Needs reconnect",
            "The user must connect again: Notion no longer accepts any token of this connection, so the app gets 424 needs_reauth until they do. Send them the reconnect link.",
        ),
        ConnectionStatus::Revoked => (
            "Revoked",
            "Revoked: its tokens were revoked at Notion and are never handed out again. Its history is kept.",
        ),
    }
}

/// Why a connection needs its user back.
pub fn reason(reason: DiagnosisReason) -> &'static str {
    match reason {
        DiagnosisReason::RefreshRejected => {
            "Notion refused to refresh the connection's token. The refresh token had been used already, or was revoked, or the user removed the connection from their workspace."
        }
        DiagnosisReason::TokenRejected => {
            "Notion refused the connection's access token itself, and no refresh brought it back."
        }
        DiagnosisReason::IntrospectionInactive => {
            "The health check asked Notion about the access token, Notion called it inactive, and no refresh brought the connection back (the user most likely removed the connection)."
        }
        DiagnosisReason::ImportedDead => {
            "It was imported from an existing token store with nothing alive: every row was revoked there, or every access token was inactive with no refresh token to try."
        }
        DiagnosisReason::Unknown => "A reason this version of tokenkeeper does not know.",
    }
}

/// What an event of the audit trail says happened.
pub fn event(kind: EventKind) -> &'static str {
    match kind {
        EventKind::Authorized => "Connected: the user authorized at Notion",
        EventKind::Reauthorized => "Authorized again: a new grant became current",
        EventKind::ReauthorizationConfirmed => {
            "Authorized again: Notion answered the pair already held (no new grant)"
        }
        EventKind::BotChanged => "Reconnected with a different bot",
        EventKind::RefreshStarted => "Refresh started",
        EventKind::Refreshed => "Refreshed: a new grant became current",
        EventKind::RefreshFailed => "Refresh failed",
        EventKind::Superseded => "Grant superseded",
        EventKind::NeedsReauth => "Needs reconnect",
        EventKind::Revoked => "Revoked",
        EventKind::Recovered => "Recovered: active again",
        EventKind::Rescued => "Rescued by an unused refresh token",
        EventKind::UpstreamRevocation => "Token revoked at Notion",
        EventKind::TokenRejected => "Notion refused a fresh token",
        EventKind::Imported => "Imported from an existing token store",
        EventKind::TokenInactive => "Health check: Notion called the access token inactive",
    }
}

pub fn origin(origin: GrantOrigin) -> &'static str {
    match origin {
        GrantOrigin::Authorization => "authorization",
        GrantOrigin::Reauthorization => "re-authorization",
        GrantOrigin::Refresh => "refresh",
        GrantOrigin::Import => "import",
    }
}

pub fn check(result: CheckResult) -> &'static str {
    match result {
        CheckResult::Active => "Notion called the token active",
        CheckResult::Inactive => "Notion called the token inactive",
        CheckResult::Unknown => "Notion could not be asked (throttled or unavailable)",
    }
}
