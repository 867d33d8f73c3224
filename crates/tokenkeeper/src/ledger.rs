//! The ledger's vocabulary: connections, grants and events as DESIGN.md defines them.
//!
//! These are plain values. The rules that relate them (invariants 1, 2, 3 and 8) are kept by
//! the store, inside one transaction per operation; see `store/mod.rs`.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::ids::{
    AccessToken, AttemptId, BotId, ConnectionId, EventId, GrantId, RefreshToken, SessionId,
};

/// The providers tokenkeeper speaks to. Only Notion for now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Provider {
    Notion,
}

impl Provider {
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Notion => "notion",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "notion" => Some(Provider::Notion),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ConnectionStatus {
    Active,
    NeedsReauth,
    Revoked,
}

impl ConnectionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionStatus::Active => "active",
            ConnectionStatus::NeedsReauth => "needs_reauth",
            ConnectionStatus::Revoked => "revoked",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "active" => Some(ConnectionStatus::Active),
            "needs_reauth" => Some(ConnectionStatus::NeedsReauth),
            "revoked" => Some(ConnectionStatus::Revoked),
            _ => None,
        }
    }
}

/// How a grant was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum GrantOrigin {
    Authorization,
    Reauthorization,
    Refresh,
    Import,
}

impl GrantOrigin {
    pub fn as_str(self) -> &'static str {
        match self {
            GrantOrigin::Authorization => "authorization",
            GrantOrigin::Reauthorization => "reauthorization",
            GrantOrigin::Refresh => "refresh",
            GrantOrigin::Import => "import",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "authorization" => Some(GrantOrigin::Authorization),
            "reauthorization" => Some(GrantOrigin::Reauthorization),
            "refresh" => Some(GrantOrigin::Refresh),
            "import" => Some(GrantOrigin::Import),
            _ => None,
        }
    }
}

/// What an audit record says happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A new connection was authorized (its first grant).
    Authorized,
    /// An existing connection was authorized again and a new grant became current.
    Reauthorized,
    /// A re-authorization returned the pair we already hold (Notion before 2026-06-08).
    ReauthorizationConfirmed,
    /// A reconnect session landed with a different `bot_id` than the connection had.
    BotChanged,
    Refreshed,
    /// A refresh was about to call the provider (written before the call, see invariant 4).
    RefreshStarted,
    RefreshFailed,
    /// A grant stopped being current (by a newer authorization or refresh) or was born stale.
    Superseded,
    NeedsReauth,
    Revoked,
    /// A connection in `needs_reauth` became `active` again through a new authorization.
    Recovered,
    /// The current grant's refresh token was refused, and another unused refresh token of the
    /// connection was refreshed in its place.
    Rescued,
    /// A token of a revoked connection was revoked at the provider (or that failed for good).
    UpstreamRevocation,
    /// The provider refused a token it had issued moments before; refreshing again would not
    /// help (see `refresh::FRESH_WINDOW`).
    TokenRejected,
    /// Pairs from an existing token store were recorded (`tokenkeeper import`).
    Imported,
    /// The health check (or an import's verification) found the current access token inactive
    /// at the provider; a refresh decides what that means.
    TokenInactive,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Authorized => "authorized",
            EventKind::Reauthorized => "reauthorized",
            EventKind::ReauthorizationConfirmed => "reauthorization_confirmed",
            EventKind::BotChanged => "bot_changed",
            EventKind::Refreshed => "refreshed",
            EventKind::RefreshStarted => "refresh_started",
            EventKind::RefreshFailed => "refresh_failed",
            EventKind::Superseded => "superseded",
            EventKind::NeedsReauth => "needs_reauth",
            EventKind::Revoked => "revoked",
            EventKind::Recovered => "recovered",
            EventKind::Rescued => "rescued",
            EventKind::UpstreamRevocation => "upstream_revocation",
            EventKind::TokenRejected => "token_rejected",
            EventKind::Imported => "imported",
            EventKind::TokenInactive => "token_inactive",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "authorized" => EventKind::Authorized,
            "reauthorized" => EventKind::Reauthorized,
            "reauthorization_confirmed" => EventKind::ReauthorizationConfirmed,
            "bot_changed" => EventKind::BotChanged,
            "refreshed" => EventKind::Refreshed,
            "refresh_started" => EventKind::RefreshStarted,
            "refresh_failed" => EventKind::RefreshFailed,
            "superseded" => EventKind::Superseded,
            "needs_reauth" => EventKind::NeedsReauth,
            "revoked" => EventKind::Revoked,
            "recovered" => EventKind::Recovered,
            "rescued" => EventKind::Rescued,
            "upstream_revocation" => EventKind::UpstreamRevocation,
            "token_rejected" => EventKind::TokenRejected,
            "imported" => EventKind::Imported,
            "token_inactive" => EventKind::TokenInactive,
            _ => return None,
        })
    }
}

/// One token pair as the provider returned it, with the metadata that came along.
/// This is what a successful token response becomes before it is recorded.
#[derive(Debug, Clone)]
pub struct MintedPair {
    pub access_token: AccessToken,
    pub refresh_token: Option<RefreshToken>,
    pub bot_id: BotId,
    pub workspace_id: String,
    pub workspace_name: Option<String>,
    pub workspace_icon: Option<String>,
    /// The token response without its tokens (owner, duplicated_template_id, …), kept for the trail.
    pub metadata: serde_json::Value,
    /// The provider's `request_id`, when it sent one.
    pub provider_request_id: Option<String>,
    /// When the provider's answer arrived.
    pub obtained_at: DateTime<Utc>,
    /// When the access token stops working, if the provider said so (Notion never does).
    pub expires_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Connection {
    pub id: ConnectionId,
    pub provider: Provider,
    pub bot_id: BotId,
    pub workspace_id: String,
    pub workspace_name: Option<String>,
    pub workspace_icon: Option<String>,
    pub end_user_id: String,
    pub status: ConnectionStatus,
    /// `None` only for a revoked connection whose grants were all revoked.
    pub grant_id: Option<GrantId>,
    /// Why the connection needs re-authorization; present in `needs_reauth`.
    pub diagnosis: Option<Diagnosis>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// When the health check (or an import's verification) last introspected the current
    /// access token, and what the provider said.
    pub last_checked_at: Option<DateTime<Utc>>,
    pub last_check_result: Option<CheckResult>,
}

/// What introspecting an access token found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CheckResult {
    /// The provider calls the token active.
    Active,
    /// The provider calls the token inactive (expired, revoked, uninstalled).
    Inactive,
    /// The question failed (throttled, unavailable, unreadable): nothing is known, and nothing
    /// changes because of it.
    Unknown,
}

impl CheckResult {
    pub fn as_str(self) -> &'static str {
        match self {
            CheckResult::Active => "active",
            CheckResult::Inactive => "inactive",
            CheckResult::Unknown => "unknown",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "active" => Some(CheckResult::Active),
            "inactive" => Some(CheckResult::Inactive),
            "unknown" => Some(CheckResult::Unknown),
            _ => None,
        }
    }
}

/// A grant as the ledger shows it: metadata and fingerprints, never tokens.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct GrantRecord {
    pub id: GrantId,
    pub connection_id: ConnectionId,
    pub origin: GrantOrigin,
    pub parent_grant_id: Option<GrantId>,
    pub bot_id: BotId,
    pub obtained_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub superseded_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    /// Whether this grant was recorded as superseded at birth (a refresh that lost a race).
    pub stale_at_birth: bool,
    pub access_token_fingerprint: String,
    pub refresh_token_fingerprint: Option<String>,
    pub provider_request_id: Option<String>,
    /// The id of the key its tokens are sealed with.
    pub key_id: String,
}

/// A grant with its tokens opened: what a caller receives.
#[derive(Debug, Clone)]
pub struct OpenGrant {
    pub record: GrantRecord,
    pub access_token: AccessToken,
    pub refresh_token: Option<RefreshToken>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Event {
    pub id: EventId,
    pub connection_id: ConnectionId,
    pub kind: EventKind,
    pub grant_id: Option<GrantId>,
    /// The other grant involved: the parent of a refresh, the grant a new one superseded, …
    pub related_grant_id: Option<GrantId>,
    pub provider_request_id: Option<String>,
    pub detail: serde_json::Value,
    pub at: DateTime<Utc>,
}

/// Where an authorization lands.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthorizationTarget {
    /// A plain connect session: a new connection, or a re-authorization of the live connection
    /// that already has this `bot_id`.
    Connect { end_user_id: String },
    /// A reconnect session: always lands on this connection, whatever `bot_id` comes back.
    Reconnect { connection_id: ConnectionId },
}

#[derive(Debug, Clone)]
pub struct NewAuthorization {
    pub provider: Provider,
    pub target: AuthorizationTarget,
    pub pair: MintedPair,
    /// The id the pair's grant gets, chosen before the first attempt to record it, so that a
    /// retried or replayed recording (after a lost answer, or from the spill journal) finds
    /// the grant it already wrote instead of writing a second one.
    pub grant_id: GrantId,
}

impl NewAuthorization {
    pub fn new(provider: Provider, target: AuthorizationTarget, pair: MintedPair) -> Self {
        NewAuthorization {
            provider,
            target,
            pair,
            grant_id: GrantId::generate(),
        }
    }
}

/// What recording an authorization did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthorizationKind {
    /// A new connection.
    Connected,
    /// An existing connection got a new current grant.
    Reauthorized,
    /// An existing connection got the pair it already had (legacy Notion): no new grant.
    Confirmed,
}

#[derive(Debug, Clone)]
pub struct AuthorizationOutcome {
    pub connection: Connection,
    pub kind: AuthorizationKind,
    /// The grant that is current afterwards.
    pub grant_id: GrantId,
    /// Whether the connection was in `needs_reauth` and is now `active` again.
    pub recovered: bool,
}

/// What `begin_refresh` found.
// Returned once per refresh attempt and never stored in bulk, so the size of `Acquired` costs
// nothing worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum LeaseOutcome {
    /// We hold the lease: call the provider with this grant's refresh token, then report back
    /// with `record_refresh` or `record_refresh_failure` and this fence.
    Acquired {
        fence: Fence,
        attempt_id: AttemptId,
        grant: OpenGrant,
        /// An earlier attempt with the same refresh token that never reported back.
        interrupted: Option<InterruptedAttempt>,
    },
    /// The current grant is not the one the caller named: someone already rotated it.
    AlreadyRotated { current: GrantId },
    /// Someone else holds the lease until `until`: wait for their result.
    Busy { until: DateTime<Utc> },
    /// The connection cannot be refreshed in its state (needs_reauth, revoked, no refresh token).
    NotRefreshable {
        status: ConnectionStatus,
        reason: String,
    },
}

/// A refresh attempt that never reported back: its holder vanished (or its answer never
/// arrived) after it may have spent the refresh token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct InterruptedAttempt {
    pub attempt_id: AttemptId,
    pub grant_id: GrantId,
    #[serde(with = "rfc3339_micros")]
    pub started_at: DateTime<Utc>,
    pub holder: LeaseHolder,
}

/// The lease's fence: bumped by every `begin_refresh`, so a holder whose lease was taken over
/// can be told apart from the current one (invariant 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Fence(pub i64);

impl Fence {
    pub fn next(self) -> Fence {
        Fence(self.0 + 1)
    }
}

impl std::fmt::Display for Fence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Who holds a refresh lease: a name unique per process (its host, process id and a random suffix).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(transparent)]
pub struct LeaseHolder(pub String);

impl LeaseHolder {
    pub fn new(name: impl Into<String>) -> Self {
        LeaseHolder(name.into())
    }

    /// A name for this process, unique among processes: host, pid and a random suffix (pids
    /// repeat across hosts and restarts).
    pub fn for_this_process() -> Self {
        let host = std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "host".into());
        LeaseHolder(format!(
            "{host}-{}-{}",
            std::process::id(),
            &crate::ids::random_token(6)
        ))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for LeaseHolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// How a recorded refresh attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttemptOutcome {
    /// The provider answered with a new pair, and it was recorded.
    Refreshed,
    /// The provider answered with an error, and it was recorded.
    Failed,
    /// No answer is known: the holder vanished, or the answer never arrived. The refresh token
    /// may have been spent.
    Interrupted,
}

impl AttemptOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            AttemptOutcome::Refreshed => "refreshed",
            AttemptOutcome::Failed => "failed",
            AttemptOutcome::Interrupted => "interrupted",
        }
    }
}

/// Why a connection needs its user back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DiagnosisReason {
    /// The provider refused the refresh of the current grant (`invalid_grant`).
    RefreshRejected,
    /// The provider refused the current grant's access token itself.
    TokenRejected,
    /// Introspection found the current access token inactive, and no refresh brought the
    /// connection back.
    IntrospectionInactive,
    /// Imported from an existing token store with nothing alive: every row revoked in the
    /// source, or (with `--verify`) every access token inactive and no refresh token to try.
    ImportedDead,
    /// A reason this binary does not know (written by a newer one).
    #[serde(other)]
    Unknown,
}

/// The trail behind a `needs_reauth`: which grant failed, obtained when, what the provider
/// said, and any earlier attempt with the same refresh token whose answer never arrived
/// (invariant 5). Shown to the app in 424 answers and stored with the connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Diagnosis {
    pub reason: DiagnosisReason,
    /// The provider's error code (`invalid_grant`, `unauthorized`, …), when it sent one.
    #[serde(default)]
    pub code: Option<String>,
    /// What happened, in words.
    #[serde(default)]
    pub message: String,
    /// The grant found dead.
    #[serde(default)]
    pub grant_id: Option<GrantId>,
    #[serde(default, with = "rfc3339_micros::option")]
    pub grant_obtained_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub provider_request_id: Option<String>,
    /// The attempt that met the refusal.
    #[serde(default)]
    pub attempt_id: Option<AttemptId>,
    /// An earlier attempt with the same refresh token that never reported back: the likely
    /// reason the token was already spent.
    #[serde(default)]
    pub interrupted_attempt: Option<InterruptedAttempt>,
    /// The connection's other unused refresh tokens that were tried, newest first, and what
    /// the provider said to each: none could rescue the connection.
    #[serde(default)]
    pub tried: Vec<TriedGrant>,
}

impl Diagnosis {
    /// A diagnosis of `reason` for `grant`, with nothing else known yet.
    pub fn new(reason: DiagnosisReason, message: impl Into<String>) -> Self {
        Diagnosis {
            reason,
            code: None,
            message: message.into(),
            grant_id: None,
            grant_obtained_at: None,
            provider_request_id: None,
            attempt_id: None,
            interrupted_attempt: None,
            tried: Vec::new(),
        }
    }
}

/// Timestamps inside stored JSON (diagnoses, event details): RFC 3339 in UTC with exactly six
/// decimals, both backends' precision, so that a value reads back as it was written.
pub mod rfc3339_micros {
    use chrono::{DateTime, SecondsFormat, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn format(t: DateTime<Utc>) -> String {
        t.to_rfc3339_opts(SecondsFormat::Micros, true)
    }

    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(*t))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        DateTime::<Utc>::deserialize(d)
    }

    pub mod option {
        use super::*;

        pub fn serialize<S: Serializer>(
            t: &Option<DateTime<Utc>>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            match t {
                Some(t) => s.serialize_some(&super::format(*t)),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Option<DateTime<Utc>>, D::Error> {
            Option::<DateTime<Utc>>::deserialize(d)
        }
    }
}

/// What recording a refresh result did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RefreshCommit {
    /// The new grant is current.
    Current,
    /// The parent had been superseded meanwhile: the new grant is kept but never current.
    SupersededAtBirth,
}

/// Why a refresh failed, as the coordinator judged it.
#[derive(Debug, Clone, Serialize)]
pub struct RefreshFailure {
    /// True when the provider rejected the grant (`invalid_grant`, `invalid_client`, …);
    /// false for throttling, 5xx, timeouts and unparseable answers.
    pub auth_failure: bool,
    /// The provider's error code, if any (`invalid_grant`, `rate_limited`, …).
    pub code: Option<String>,
    pub message: String,
    pub provider_request_id: Option<String>,
    /// The provider may have processed the request although no answer arrived (a timeout, a
    /// connection that broke after the request was sent): its refresh token may be consumed.
    /// Such an attempt is closed as `interrupted`, so that a later `invalid_grant` names it.
    pub outcome_unknown: bool,
    /// The connection's other unused refresh tokens tried after this one was refused, and
    /// what the provider said to each (invariant 5's rescue); empty when none were tried.
    pub tried: Vec<TriedGrant>,
}

/// A grant whose refresh token was tried to rescue a connection whose current grant was
/// refused, and what came of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TriedGrant {
    pub grant_id: GrantId,
    pub origin: GrantOrigin,
    #[serde(with = "rfc3339_micros")]
    pub obtained_at: DateTime<Utc>,
    /// The provider's error code (`invalid_grant`, …).
    pub outcome: String,
}

/// A refresh that stands in for a refused current grant: the never-used refresh token of
/// another grant of the connection, refreshed after the current one's was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rescue {
    /// The current grant whose refresh token was refused.
    pub failed: GrantId,
    /// The attempt that met the refusal.
    pub failed_attempt: AttemptId,
}

/// What recording a refresh failure did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailureOutcome {
    /// The connection is unchanged (transient failure) and the lease is released.
    Recorded,
    /// The failing grant was no longer current: someone else rotated it; use theirs.
    AlreadyRotated { current: GrantId },
    /// The failing grant was current: the connection is now `needs_reauth`.
    NeedsReauth { diagnosis: Box<Diagnosis> },
    /// Our lease was taken over by a newer holder; we changed nothing.
    Fenced,
}

/// A connect or reconnect session.
#[derive(Debug, Clone)]
pub struct ConnectSession {
    pub id: SessionId,
    pub provider: Provider,
    /// The SHA-256 of the `state` value, hex. The state itself is never stored.
    pub state_hash: String,
    pub end_user_id: String,
    pub return_to: String,
    /// Set for a reconnect session.
    pub connection_id: Option<ConnectionId>,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub used_at: Option<DateTime<Utc>>,
}

/// Filters of `GET /v1/connections` and of the admin console's list.
#[derive(Debug, Clone, Default)]
pub struct ConnectionFilter {
    pub provider: Option<Provider>,
    pub end_user_id: Option<String>,
    pub status: Option<ConnectionStatus>,
    pub workspace_id: Option<String>,
    pub bot_id: Option<String>,
    /// Connections that this text names exactly: their id, bot id, workspace id or end user
    /// id, or their workspace's name in any case (the console's search box). Exact matches,
    /// so that each is one index range in id order, however many connections there are.
    pub search: Option<String>,
    /// Keyset pagination: ids strictly after this one.
    pub after: Option<ConnectionId>,
    pub limit: u32,
}

/// Progress of `keys rotate`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RotateProgress {
    /// Grants re-sealed by this call.
    pub resealed: u64,
    /// Grants still sealed with another key after this call.
    pub remaining: u64,
}

/// Work that must happen at least once after the transaction that called for it (see the
/// `jobs` module): revoking a token upstream, delivering a webhook.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    /// Revoke one token of one grant at the provider; `subject` is `<grant id>:<column>`.
    RevokeToken,
    /// Deliver one event to one webhook endpoint; `subject` is the endpoint's URL.
    Webhook,
}

impl JobKind {
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::RevokeToken => "revoke_token",
            JobKind::Webhook => "webhook",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "revoke_token" => Some(JobKind::RevokeToken),
            "webhook" => Some(JobKind::Webhook),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Pending,
    Done,
    /// Given up after its retries.
    Failed,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Pending => "pending",
            JobStatus::Done => "done",
            JobStatus::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "pending" => Some(JobStatus::Pending),
            "done" => Some(JobStatus::Done),
            "failed" => Some(JobStatus::Failed),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Job {
    pub id: String,
    pub kind: JobKind,
    pub connection_id: Option<ConnectionId>,
    pub subject: String,
    pub payload: serde_json::Value,
    pub status: JobStatus,
    pub attempts: i64,
    pub next_attempt_at: DateTime<Utc>,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// What one attempt at a job came to.
#[derive(Debug, Clone)]
pub enum JobOutcome {
    Done,
    /// Try again at `at`; `error` says why this attempt failed.
    Retry {
        at: DateTime<Utc>,
        error: String,
    },
    /// Give up.
    Failed {
        error: String,
    },
}

/// Which token of a grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenColumn {
    AccessToken,
    RefreshToken,
}

impl TokenColumn {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenColumn::AccessToken => "access_token",
            TokenColumn::RefreshToken => "refresh_token",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "access_token" => Some(TokenColumn::AccessToken),
            "refresh_token" => Some(TokenColumn::RefreshToken),
            _ => None,
        }
    }
}

/// What a webhook tells the app (DESIGN.md: "Webhooks").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WebhookEvent {
    #[serde(rename = "connection.created")]
    Created,
    #[serde(rename = "connection.reauthorized")]
    Reauthorized,
    /// The data adds `diagnosis` and a `reconnect_url`.
    #[serde(rename = "connection.needs_reauth")]
    NeedsReauth,
    #[serde(rename = "connection.recovered")]
    Recovered,
    #[serde(rename = "connection.revoked")]
    Revoked,
}

impl WebhookEvent {
    pub fn as_str(self) -> &'static str {
        match self {
            WebhookEvent::Created => "connection.created",
            WebhookEvent::Reauthorized => "connection.reauthorized",
            WebhookEvent::NeedsReauth => "connection.needs_reauth",
            WebhookEvent::Recovered => "connection.recovered",
            WebhookEvent::Revoked => "connection.revoked",
        }
    }
}

/// One bot of an existing token store, as `import` hands it to the store: its distinct pairs,
/// oldest first, and what is known of them.
#[derive(Debug, Clone)]
pub struct ImportedBot {
    pub provider: Provider,
    pub bot_id: BotId,
    /// Empty when the source had none (the connections table needs a value).
    pub workspace_id: String,
    pub workspace_name: Option<String>,
    /// Empty when the source had none.
    pub end_user_id: String,
    pub pairs: Vec<ImportedPair>,
    /// The pair to make current if the bot gets a new connection (an index into `pairs`): the
    /// newest live one. A pair the ledger already holds is never made current again.
    pub current: usize,
    /// Set when nothing alive is known: the new connection starts `needs_reauth` with it.
    pub dead: Option<Diagnosis>,
    /// What a verification found of the current pair's access token, and when: recorded as the
    /// connection's last check.
    pub checked: Option<(DateTime<Utc>, CheckResult)>,
}

/// One distinct pair of an imported bot.
#[derive(Debug, Clone)]
pub struct ImportedPair {
    /// Chosen before the first attempt to record it, as for authorizations.
    pub grant_id: GrantId,
    pub access_token: AccessToken,
    pub refresh_token: Option<RefreshToken>,
    /// `authorized_at` from the source, else the import's time.
    pub obtained_at: DateTime<Utc>,
    /// `revoked_at` from the source: the pair is recorded superseded from then.
    pub revoked_at: Option<DateTime<Utc>>,
}

/// What importing one bot did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BotImportKind {
    /// A new connection, with every pair as a grant.
    Created,
    /// The bot already had a live connection: the pairs it lacked were added to it, superseded
    /// (kept, and tried by a rescue, but never made current by an import).
    Added,
    /// Every pair was in the ledger already: nothing was written.
    Known,
}

/// What happened to one pair of an imported bot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ImportedPairOutcome {
    /// The pair's grant: the new one, or the one the ledger already had.
    pub grant_id: GrantId,
    /// False when the ledger already held this pair.
    pub new: bool,
}

#[derive(Debug, Clone)]
pub struct BotImportOutcome {
    pub kind: BotImportKind,
    /// The bot's live connection after the import, if it has one.
    pub connection_id: Option<ConnectionId>,
    pub status: Option<ConnectionStatus>,
    /// The connection's current grant after the import.
    pub current: Option<GrantId>,
    /// One per pair, in the order of `ImportedBot::pairs`.
    pub pairs: Vec<ImportedPairOutcome>,
}

/// What recording a health check found of the connection.
#[derive(Debug, Clone)]
pub struct CheckRecorded {
    pub status: ConnectionStatus,
    /// Whether the checked grant is still the connection's current grant.
    pub still_current: bool,
}
