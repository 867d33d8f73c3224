//! Plain values both backends build their writes from.

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{json, Value};

use super::sealed::{open_grant, GrantRow};
use super::StoreError;
use crate::ids::{AttemptId, GrantId};
use crate::ledger::{Connection, EventKind, MintedPair, RefreshFailure};
use crate::seal::KeyRing;

/// An audit record about to be appended.
pub(crate) struct NewEvent<'a> {
    pub kind: EventKind,
    pub grant: Option<&'a GrantId>,
    pub related: Option<&'a GrantId>,
    pub provider_request_id: Option<&'a str>,
    pub detail: serde_json::Value,
}

impl<'a> NewEvent<'a> {
    pub fn new(kind: EventKind, grant: Option<&'a GrantId>) -> Self {
        NewEvent {
            kind,
            grant,
            related: None,
            provider_request_id: None,
            detail: serde_json::json!({}),
        }
    }

    pub fn related(mut self, related: Option<&'a GrantId>) -> Self {
        self.related = related;
        self
    }

    pub fn request(mut self, id: Option<&'a str>) -> Self {
        self.provider_request_id = id;
        self
    }

    pub fn detail(mut self, detail: serde_json::Value) -> Self {
        self.detail = detail;
        self
    }
}

/// The columns `connection_at` reads, in order, for a table aliased `c`.
pub(crate) const CONNECTION_COLUMNS: &str = "c.id, c.provider, c.bot_id, c.workspace_id, c.workspace_name, \
     c.workspace_icon, c.end_user_id, c.status, c.current_grant_id, c.diagnosis, c.created_at, c.updated_at, \
     c.lease_holder, c.lease_until, c.lease_fence";
pub(crate) const CONNECTION_WIDTH: usize = 15;

/// A connection as stored, with its lease, which the API never shows.
#[derive(Debug, Clone)]
pub(crate) struct ConnectionRow {
    pub connection: Connection,
    pub lease_holder: Option<String>,
    pub lease_until: Option<DateTime<Utc>>,
    pub lease_fence: i64,
}

/// The columns `grant_at` reads, in order, for a table aliased `g`; the two sealed tokens last.
pub(crate) const GRANT_COLUMNS: &str = "g.id, g.connection_id, g.origin, g.parent_grant_id, g.bot_id, \
     g.obtained_at, g.expires_at, g.superseded_at, g.revoked_at, g.stale_at_birth, g.access_fp, g.refresh_fp, \
     g.provider_request_id, g.key_id, g.access_token, g.refresh_token";

/// Timestamps inside JSON details: RFC 3339, UTC, microseconds (both backends' precision).
pub(crate) fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// Whether a re-authorization returned the pair the connection already holds (Notion before
/// 2026-06-08): a confirmation, not a new grant (invariant 8). The whole pair must match: a new
/// refresh token with an old access token is still a new pair, and dropping it would lose it
/// (invariant 1).
pub(crate) fn is_confirmation(
    keys: &KeyRing,
    current: Option<&GrantRow>,
    pair: &MintedPair,
) -> Result<bool, StoreError> {
    match current {
        Some(g) if g.record.revoked_at.is_none() => {
            let open = open_grant(keys, g.clone())?;
            Ok(open.access_token == pair.access_token && open.refresh_token == pair.refresh_token)
        }
        _ => Ok(false),
    }
}

/// The detail of a `bot_changed` event: a reconnect answered by another bot.
pub(crate) fn bot_changed_detail(connection: &Connection, pair: &MintedPair) -> Value {
    json!({
        "from_bot_id": connection.bot_id,
        "to_bot_id": pair.bot_id,
        "from_workspace_id": connection.workspace_id,
        "to_workspace_id": pair.workspace_id,
    })
}

/// Why a connection needs re-authorization after the provider rejected the refresh of its
/// current grant: which grant, obtained when, and any earlier attempt with the same refresh
/// token whose answer never arrived (invariant 5).
pub(crate) fn refresh_rejected_diagnosis(
    failure: &RefreshFailure,
    parent: &GrantId,
    obtained_at: DateTime<Utc>,
    attempt: &AttemptId,
    interrupted: Option<Value>,
) -> Value {
    json!({
        "reason": "refresh_rejected",
        "code": failure.code,
        "message": failure.message,
        "grant_id": parent,
        "grant_obtained_at": rfc3339(obtained_at),
        "provider_request_id": failure.provider_request_id,
        "attempt_id": attempt,
        "interrupted_attempt": interrupted,
    })
}
