//! The statements both backends run, and the decoders of their rows, written once.
//!
//! Placeholders are `$1, $2, …`, each introduced in increasing order (see `db.rs`). Types are
//! each backend's own (timestamps are `timestamptz` on PostgreSQL and fixed-width RFC 3339 text
//! on SQLite; JSON is `jsonb` or text); `Param` and `Row` convert at the edge.
//! Statements that lock (`… FOR UPDATE`) exist only on PostgreSQL: SQLite's write transaction
//! already holds the database's lock.

use chrono::{DateTime, Utc};

use super::db::Row;
use super::sealed::GrantRow;
use super::{ConnectionRow, StoreError};
use crate::ids::{AttemptId, BotId, ConnectionId, EventId, GrantId, SessionId};
use crate::ledger::{
    CheckResult, ConnectSession, Connection, ConnectionStatus, Diagnosis, Event, EventKind, Fence,
    GrantOrigin, GrantRecord, InterruptedAttempt, LeaseHolder, Provider,
};

/// The columns `connection_at` reads, in order, for a table aliased `c`.
macro_rules! connection_columns {
    () => {
        "c.id, c.provider, c.bot_id, c.workspace_id, c.workspace_name, c.workspace_icon, \
         c.end_user_id, c.status, c.current_grant_id, c.diagnosis, c.created_at, c.updated_at, \
         c.lease_holder, c.lease_until, c.lease_fence, c.last_checked_at, c.last_check_result, \
         c.last_checked_grant_id"
    };
}
const CONNECTION_WIDTH: usize = 18;

/// The columns `grant_at` reads, in order, for a table aliased `g`; the two sealed tokens last.
macro_rules! grant_columns {
    () => {
        "g.id, g.connection_id, g.origin, g.parent_grant_id, g.bot_id, g.obtained_at, \
         g.expires_at, g.superseded_at, g.revoked_at, g.stale_at_birth, g.access_fp, \
         g.refresh_fp, g.provider_request_id, g.key_id, g.access_token, g.refresh_token"
    };
}

macro_rules! session_columns {
    () => {
        "id, provider, state_hash, end_user_id, return_to, connection_id, created_at, \
         expires_at, used_at"
    };
}

pub(crate) const CONNECTION_COLUMNS: &str = connection_columns!();

// Connections.

pub(crate) const CONNECTION_BY_ID: &str = concat!(
    "SELECT ",
    connection_columns!(),
    " FROM connections c WHERE c.id = $1"
);
/// Connections by status, for the metrics' gauge (`reads::status_counts`); an index-only scan
/// of `connections_status`.
pub(crate) const CONNECTIONS_BY_STATUS: &str =
    "SELECT status, count(*) FROM connections GROUP BY status ORDER BY status";
/// Jobs by kind and status, for the metrics' gauge of the job queue (its pending jobs are the
/// outbox's depth).
pub(crate) const JOBS_BY_KIND_AND_STATUS: &str =
    "SELECT kind, status, count(*) FROM jobs GROUP BY kind, status ORDER BY kind, status";
pub(crate) const CONNECTION_BY_ID_FOR_UPDATE: &str = concat!(
    "SELECT ",
    connection_columns!(),
    " FROM connections c WHERE c.id = $1 FOR UPDATE"
);
pub(crate) const LIVE_CONNECTION_OF_BOT: &str = concat!(
    "SELECT ",
    connection_columns!(),
    " FROM connections c WHERE c.provider = $1 AND c.bot_id = $2 AND c.status <> 'revoked'"
);
pub(crate) const LIVE_CONNECTION_OF_BOT_FOR_UPDATE: &str = concat!(
    "SELECT ",
    connection_columns!(),
    " FROM connections c WHERE c.provider = $1 AND c.bot_id = $2 AND c.status <> 'revoked' \
     FOR UPDATE"
);
pub(crate) const INSERT_CONNECTION: &str =
    "INSERT INTO connections (id, provider, bot_id, workspace_id, workspace_name, workspace_icon, \
         end_user_id, status, created_at, updated_at) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, 'active', $8, $8)";
pub(crate) const SET_BOT: &str =
    "UPDATE connections SET bot_id = $1, workspace_id = $2, workspace_name = $3, \
         workspace_icon = $4, updated_at = $5 \
     WHERE id = $6";
pub(crate) const SET_CURRENT_GRANT: &str =
    "UPDATE connections SET current_grant_id = $1, updated_at = $2 WHERE id = $3";
pub(crate) const SET_STATUS: &str =
    "UPDATE connections SET status = $1, diagnosis = $2, updated_at = $3 WHERE id = $4";
/// Revoked connections keep no lease: nothing may refresh them.
pub(crate) const SET_REVOKED: &str =
    "UPDATE connections SET status = 'revoked', diagnosis = NULL, lease_holder = NULL, \
         lease_until = NULL, updated_at = $1 \
     WHERE id = $2";
pub(crate) const TOUCH_CONNECTION: &str = "UPDATE connections SET updated_at = $1 WHERE id = $2";
pub(crate) const TAKE_LEASE: &str =
    "UPDATE connections SET lease_holder = $1, lease_until = $2, lease_fence = $3 WHERE id = $4";
pub(crate) const RELEASE_LEASE: &str =
    "UPDATE connections SET lease_holder = NULL, lease_until = NULL WHERE id = $1";
pub(crate) const CURRENT_GRANT: &str = concat!(
    "SELECT ",
    connection_columns!(),
    ", ",
    grant_columns!(),
    " FROM connections c LEFT JOIN grants g ON g.id = c.current_grant_id WHERE c.id = $1"
);

/// What a token read needs, and no more (`reads::token_of_connection`): the connection's
/// status, workspace and diagnosis, and its current grant's id, times and sealed access token.
pub(crate) const TOKEN_OF_CONNECTION: &str =
    "SELECT c.status, c.workspace_id, c.diagnosis, g.id, g.obtained_at, g.expires_at, \
            g.access_token \
     FROM connections c LEFT JOIN grants g ON g.id = c.current_grant_id WHERE c.id = $1";

// Grants.

pub(crate) const GRANT_OF_CONNECTION: &str = concat!(
    "SELECT ",
    grant_columns!(),
    " FROM grants g WHERE g.id = $1 AND g.connection_id = $2"
);
pub(crate) const GRANT_BY_ID: &str = concat!(
    "SELECT ",
    grant_columns!(),
    " FROM grants g WHERE g.id = $1"
);
/// The connection's grants that may rescue it when its current grant's refresh token is
/// refused: not revoked, with a refresh token that was never used (no attempt with it that
/// refreshed, may have, or is still running; a refused one may be asked again), newest first.
pub(crate) const RESCUE_CANDIDATES: &str = concat!(
    "SELECT ",
    grant_columns!(),
    " FROM grants g WHERE g.connection_id = $1 AND g.id <> $2 AND g.revoked_at IS NULL \
     AND g.refresh_token IS NOT NULL \
     AND NOT EXISTS (SELECT 1 FROM refresh_attempts a WHERE a.grant_id = g.id \
         AND (a.finished_at IS NULL OR a.outcome <> 'failed')) \
     ORDER BY g.seq DESC LIMIT $3"
);
pub(crate) const GRANTS_OF_CONNECTION: &str = concat!(
    "SELECT ",
    grant_columns!(),
    " FROM grants g WHERE g.connection_id = $1 ORDER BY g.seq"
);
pub(crate) const INSERT_GRANT: &str =
    "INSERT INTO grants (id, connection_id, origin, parent_grant_id, bot_id, obtained_at, \
         expires_at, superseded_at, revoked_at, stale_at_birth, access_token, refresh_token, \
         access_fp, refresh_fp, key_id, provider_request_id, metadata) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)";
pub(crate) const SUPERSEDE_GRANT: &str =
    "UPDATE grants SET superseded_at = $1 WHERE id = $2 AND superseded_at IS NULL";
pub(crate) const REVOKE_GRANTS_OF_CONNECTION: &str =
    "UPDATE grants SET revoked_at = $1 WHERE connection_id = $2 AND revoked_at IS NULL";
pub(crate) const GRANTS_SEALED_WITH_OTHER_KEYS: &str = concat!(
    "SELECT ",
    grant_columns!(),
    " FROM grants g WHERE g.key_id <> $1 ORDER BY g.seq LIMIT $2"
);
pub(crate) const GRANTS_SEALED_WITH_OTHER_KEYS_SKIP_LOCKED: &str = concat!(
    "SELECT ",
    grant_columns!(),
    " FROM grants g WHERE g.key_id <> $1 ORDER BY g.seq LIMIT $2 FOR UPDATE SKIP LOCKED"
);
pub(crate) const COUNT_GRANTS_SEALED_WITH_OTHER_KEYS: &str =
    "SELECT count(*) FROM grants WHERE key_id <> $1";
pub(crate) const RESEAL_GRANT: &str =
    "UPDATE grants SET access_token = $1, refresh_token = $2, key_id = $3 WHERE id = $4";

// Key checks (invariant 11).

/// The key ids that seal grants, each once. A loose index scan: one `min` on the `grants_key`
/// index per key id instead of reading every grant, so a start costs the same on a million
/// grants as on ten.
pub(crate) const KEY_IDS_IN_USE: &str = "WITH RECURSIVE k (key_id) AS ( \
         SELECT min(key_id) FROM grants \
         UNION ALL \
         SELECT (SELECT min(g.key_id) FROM grants g WHERE g.key_id > k.key_id) \
         FROM k WHERE k.key_id IS NOT NULL \
     ) \
     SELECT key_id FROM k WHERE key_id IS NOT NULL";
/// One grant sealed with a key id, to prove a key that has no check value yet.
pub(crate) const GRANT_SEALED_WITH_KEY: &str = concat!(
    "SELECT ",
    grant_columns!(),
    " FROM grants g WHERE g.key_id = $1 LIMIT 1"
);
pub(crate) const KEY_CHECKS: &str = "SELECT key_id, check_value FROM key_checks ORDER BY key_id";
pub(crate) const INSERT_KEY_CHECK: &str =
    "INSERT INTO key_checks (key_id, check_value, registered_at) VALUES ($1, $2, $3)";

// Events.

pub(crate) const INSERT_EVENT: &str =
    "INSERT INTO events (id, connection_id, kind, grant_id, related_grant_id, \
         provider_request_id, detail, at) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)";
pub(crate) const EVENTS_OF_CONNECTION: &str =
    "SELECT id, connection_id, kind, grant_id, related_grant_id, provider_request_id, detail, at \
     FROM events WHERE connection_id = $1 ORDER BY seq";

// Refresh attempts.

pub(crate) const INSERT_ATTEMPT: &str =
    "INSERT INTO refresh_attempts (id, connection_id, grant_id, fence, holder, started_at, \
         lease_until) \
     VALUES ($1, $2, $3, $4, $5, $6, $7)";
/// The newest attempt on a grant that never finished.
pub(crate) const UNFINISHED_ATTEMPT_OF_GRANT: &str =
    "SELECT id, grant_id, started_at, holder FROM refresh_attempts \
     WHERE grant_id = $1 AND finished_at IS NULL ORDER BY fence DESC LIMIT 1";
pub(crate) const INTERRUPT_UNFINISHED_ATTEMPTS_OF_GRANT: &str =
    "UPDATE refresh_attempts SET finished_at = $1, outcome = 'interrupted' \
     WHERE grant_id = $2 AND finished_at IS NULL";
/// The newest attempt on a grant that was closed as interrupted.
pub(crate) const INTERRUPTED_ATTEMPT_OF_GRANT: &str =
    "SELECT id, grant_id, started_at, holder FROM refresh_attempts \
     WHERE grant_id = $1 AND outcome = 'interrupted' ORDER BY fence DESC LIMIT 1";
pub(crate) const CLOSE_ATTEMPT: &str =
    "UPDATE refresh_attempts SET finished_at = $1, outcome = $2 \
     WHERE id = $3 AND connection_id = $4";

/// Refresh attempts of a connection since a time that minted (or may have minted) a pair:
/// refused and throttled ones did not.
pub(crate) const ATTEMPTS_OF_CONNECTION_SINCE: &str =
    "SELECT count(*) FROM refresh_attempts WHERE connection_id = $1 AND started_at > $2 \
     AND (outcome IS NULL OR outcome <> 'failed')";

// Jobs.

macro_rules! job_columns {
    () => {
        "id, kind, connection_id, subject, payload, status, attempts, next_attempt_at, \
         last_error, created_at, updated_at"
    };
}

pub(crate) const INSERT_JOB: &str =
    "INSERT INTO jobs (id, kind, connection_id, subject, payload, status, attempts, \
         next_attempt_at, created_at, updated_at) \
     VALUES ($1, $2, $3, $4, $5, 'pending', 0, $6, $6, $6)";
/// Due jobs, webhook deliveries only when `$2` is 1 (a process without a webhook secret leaves
/// them to the processes that have one).
pub(crate) const DUE_JOBS: &str = concat!(
    "SELECT ",
    job_columns!(),
    " FROM jobs WHERE status = 'pending' AND next_attempt_at <= $1 \
     AND (kind <> 'webhook' OR CAST($2 AS BIGINT) = 1) ORDER BY next_attempt_at LIMIT $3"
);
pub(crate) const DUE_JOBS_SKIP_LOCKED: &str = concat!(
    "SELECT ",
    job_columns!(),
    " FROM jobs WHERE status = 'pending' AND next_attempt_at <= $1 \
     AND (kind <> 'webhook' OR CAST($2 AS BIGINT) = 1) ORDER BY next_attempt_at LIMIT $3 \
     FOR UPDATE SKIP LOCKED"
);
pub(crate) const DUE_JOBS_OF_CONNECTION: &str = concat!(
    "SELECT ",
    job_columns!(),
    " FROM jobs WHERE connection_id = $1 AND status = 'pending' AND next_attempt_at <= $2 \
     AND (kind <> 'webhook' OR CAST($3 AS BIGINT) = 1) ORDER BY next_attempt_at LIMIT $4"
);
pub(crate) const DUE_JOBS_OF_CONNECTION_SKIP_LOCKED: &str = concat!(
    "SELECT ",
    job_columns!(),
    " FROM jobs WHERE connection_id = $1 AND status = 'pending' AND next_attempt_at <= $2 \
     AND (kind <> 'webhook' OR CAST($3 AS BIGINT) = 1) ORDER BY next_attempt_at LIMIT $4 \
     FOR UPDATE SKIP LOCKED"
);
pub(crate) const JOBS_OF_CONNECTION: &str = concat!(
    "SELECT ",
    job_columns!(),
    " FROM jobs WHERE connection_id = $1 AND kind = $2 ORDER BY created_at, id"
);
pub(crate) const JOB_COLUMNS: &str = job_columns!();
pub(crate) const RETRY_JOB: &str =
    "UPDATE jobs SET status = 'pending', next_attempt_at = $1, updated_at = $1 \
     WHERE id = $2 AND kind = $3";
pub(crate) const JOB_BY_ID: &str = concat!("SELECT ", job_columns!(), " FROM jobs WHERE id = $1");
/// A claim: the job is someone's until `next_attempt_at`, when it comes due again if they die.
pub(crate) const CLAIM_JOB: &str =
    "UPDATE jobs SET attempts = attempts + 1, next_attempt_at = $1, updated_at = $2 WHERE id = $3";
pub(crate) const FINISH_JOB: &str =
    "UPDATE jobs SET status = $1, next_attempt_at = $2, last_error = $3, updated_at = $4 \
     WHERE id = $5";

/// Every grant of a connection: whether it has a refresh token, and whether that refresh token
/// was spent on a refresh that succeeded (and so is dead at the provider).
pub(crate) const TOKENS_OF_CONNECTION: &str = "SELECT g.id, g.refresh_token IS NOT NULL, \
         EXISTS (SELECT 1 FROM refresh_attempts a WHERE a.grant_id = g.id \
             AND a.outcome = 'refreshed') \
     FROM grants g WHERE g.connection_id = $1 ORDER BY g.seq";

// Connect sessions.

pub(crate) const INSERT_SESSION: &str =
    "INSERT INTO connect_sessions (id, provider, state_hash, end_user_id, return_to, \
         connection_id, created_at, expires_at, used_at) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)";
pub(crate) const SESSION_BY_ID: &str = concat!(
    "SELECT ",
    session_columns!(),
    " FROM connect_sessions WHERE id = $1"
);
pub(crate) const SESSION_BY_STATE: &str = concat!(
    "SELECT ",
    session_columns!(),
    " FROM connect_sessions WHERE state_hash = $1"
);
pub(crate) const SESSION_BY_STATE_FOR_UPDATE: &str = concat!(
    "SELECT ",
    session_columns!(),
    " FROM connect_sessions WHERE state_hash = $1 FOR UPDATE"
);
pub(crate) const MARK_SESSION_USED: &str = "UPDATE connect_sessions SET used_at = $1 WHERE id = $2";
/// A connection's newest unused reusable reconnect session, with its sealed state.
pub(crate) const REUSABLE_SESSION_OF_CONNECTION: &str = concat!(
    "SELECT ",
    session_columns!(),
    ", reusable_state FROM connect_sessions \
     WHERE connection_id = $1 AND reusable_state IS NOT NULL AND used_at IS NULL \
     ORDER BY created_at DESC LIMIT 1"
);
pub(crate) const INSERT_REUSABLE_SESSION: &str =
    "INSERT INTO connect_sessions (id, provider, state_hash, end_user_id, return_to, \
         connection_id, created_at, expires_at, used_at, reusable_state) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)";

// Imports and health checks (migration 0005).

/// Every pair the ledger holds for a bot, whichever connection has it: how an import knows a
/// pair it recorded before, by fingerprints only.
pub(crate) const GRANT_FINGERPRINTS_OF_BOT: &str =
    "SELECT g.id, g.access_fp, g.refresh_fp FROM grants g WHERE g.bot_id = $1";
pub(crate) const SET_LAST_CHECK: &str =
    "UPDATE connections SET last_checked_at = $1, last_check_result = $2, \
         last_checked_grant_id = $3 \
     WHERE id = $4";
/// Active connections due for a check (never checked, or last checked at or before `$1`),
/// least recently checked first, with their current grant.
pub(crate) const DUE_CHECKS: &str = "SELECT c.id, c.current_grant_id FROM connections c \
     WHERE c.status = 'active' AND c.current_grant_id IS NOT NULL \
     AND (c.last_checked_at IS NULL OR c.last_checked_at <= $1) \
     ORDER BY c.last_checked_at NULLS FIRST, c.id LIMIT $2";
pub(crate) const COUNT_ACTIVE: &str = "SELECT count(*) FROM connections WHERE status = 'active'";
/// When the least recently checked active connection was checked (`NULL`: one never was, or
/// there is none).
pub(crate) const OLDEST_CHECK: &str = "SELECT min(last_checked_at) FROM connections \
     WHERE status = 'active' AND current_grant_id IS NOT NULL";
pub(crate) const INSERT_SWEEPER_LEASE: &str =
    "INSERT INTO sweeper_leases (name, fence) VALUES ($1, 0) ON CONFLICT (name) DO NOTHING";
pub(crate) const SWEEPER_LEASE: &str =
    "SELECT holder, until, fence FROM sweeper_leases WHERE name = $1";
pub(crate) const SWEEPER_LEASE_FOR_UPDATE: &str =
    "SELECT holder, until, fence FROM sweeper_leases WHERE name = $1 FOR UPDATE";
pub(crate) const TAKE_SWEEPER_LEASE: &str =
    "UPDATE sweeper_leases SET holder = $1, until = $2, fence = $3 WHERE name = $4";

// Throttles (migration 0007).

/// Records a throttle, keeping the later end when one is already known.
pub(crate) const UPSERT_THROTTLE: &str =
    "INSERT INTO throttles (scope, subject, until, reason) VALUES ($1, $2, $3, $4) \
     ON CONFLICT (scope, subject) DO UPDATE SET until = excluded.until, reason = excluded.reason \
     WHERE throttles.until < excluded.until";
pub(crate) const DELETE_EXPIRED_THROTTLES: &str = "DELETE FROM throttles WHERE until < $1";

// Decoders.

fn corrupt(what: &str, value: &str) -> StoreError {
    StoreError::Database(format!("unexpected {what} {value:?} in the database"))
}

fn grant_id(row: &dyn Row, i: usize) -> Result<Option<GrantId>, StoreError> {
    Ok(row.opt_text(i)?.map(GrantId::from_trusted))
}

fn connection_at(row: &dyn Row, base: usize) -> Result<ConnectionRow, StoreError> {
    let provider = row.text(base + 1)?;
    let status = row.text(base + 7)?;
    let check = row
        .opt_text(base + 16)?
        .map(|c| CheckResult::parse(&c).ok_or_else(|| corrupt("check result", &c)))
        .transpose()?;
    let diagnosis = row
        .opt_json(base + 9)?
        .map(serde_json::from_value::<Diagnosis>)
        .transpose()
        .map_err(|e| StoreError::Database(format!("a stored diagnosis is unreadable: {e}")))?;
    Ok(ConnectionRow {
        connection: Connection {
            id: ConnectionId::from_trusted(row.text(base)?),
            provider: Provider::parse(&provider).ok_or_else(|| corrupt("provider", &provider))?,
            bot_id: BotId(row.text(base + 2)?),
            workspace_id: row.text(base + 3)?,
            workspace_name: row.opt_text(base + 4)?,
            workspace_icon: row.opt_text(base + 5)?,
            end_user_id: row.text(base + 6)?,
            status: ConnectionStatus::parse(&status).ok_or_else(|| corrupt("status", &status))?,
            grant_id: grant_id(row, base + 8)?,
            diagnosis,
            created_at: row.time(base + 10)?,
            updated_at: row.time(base + 11)?,
            last_checked_at: row.opt_time(base + 15)?,
            last_check_result: check,
        },
        lease_holder: row.opt_text(base + 12)?.map(LeaseHolder),
        lease_until: row.opt_time(base + 13)?,
        lease_fence: Fence(row.int(base + 14)?),
        last_checked_grant: grant_id(row, base + 17)?,
    })
}

fn grant_at(row: &dyn Row, base: usize) -> Result<GrantRow, StoreError> {
    let origin = row.text(base + 2)?;
    Ok(GrantRow {
        record: GrantRecord {
            id: GrantId::from_trusted(row.text(base)?),
            connection_id: ConnectionId::from_trusted(row.text(base + 1)?),
            origin: GrantOrigin::parse(&origin).ok_or_else(|| corrupt("grant origin", &origin))?,
            parent_grant_id: grant_id(row, base + 3)?,
            bot_id: BotId(row.text(base + 4)?),
            obtained_at: row.time(base + 5)?,
            expires_at: row.opt_time(base + 6)?,
            superseded_at: row.opt_time(base + 7)?,
            revoked_at: row.opt_time(base + 8)?,
            stale_at_birth: row.bool(base + 9)?,
            access_token_fingerprint: row.text(base + 10)?,
            refresh_token_fingerprint: row.opt_text(base + 11)?,
            provider_request_id: row.opt_text(base + 12)?,
            key_id: row.text(base + 13)?,
        },
        access: row.bytes(base + 14)?,
        refresh: row.opt_bytes(base + 15)?,
    })
}

pub(crate) fn connection(row: &dyn Row) -> Result<ConnectionRow, StoreError> {
    connection_at(row, 0)
}

pub(crate) fn grant(row: &dyn Row) -> Result<GrantRow, StoreError> {
    grant_at(row, 0)
}

/// A row of `TOKEN_OF_CONNECTION`.
pub(crate) struct TokenRow {
    pub status: ConnectionStatus,
    pub workspace_id: String,
    pub diagnosis: Option<Diagnosis>,
    pub grant: Option<TokenGrantRow>,
}

/// The current grant's id, obtained and expiry times, and sealed access token.
pub(crate) type TokenGrantRow = (GrantId, DateTime<Utc>, Option<DateTime<Utc>>, Vec<u8>);

pub(crate) fn token_row(row: &dyn Row) -> Result<TokenRow, StoreError> {
    let status = row.text(0)?;
    let diagnosis = row
        .opt_json(2)?
        .map(serde_json::from_value::<Diagnosis>)
        .transpose()
        .map_err(|e| StoreError::Database(format!("a stored diagnosis is unreadable: {e}")))?;
    let grant = match row.opt_text(3)? {
        Some(id) => Some((
            GrantId::from_trusted(id),
            row.time(4)?,
            row.opt_time(5)?,
            row.bytes(6)?,
        )),
        None => None,
    };
    Ok(TokenRow {
        status: ConnectionStatus::parse(&status).ok_or_else(|| corrupt("status", &status))?,
        workspace_id: row.text(1)?,
        diagnosis,
        grant,
    })
}

/// A row of `CURRENT_GRANT`: the connection, and its current grant when it has one.
pub(crate) fn connection_and_grant(
    row: &dyn Row,
) -> Result<(ConnectionRow, Option<GrantRow>), StoreError> {
    let connection = connection_at(row, 0)?;
    let grant = match row.opt_text(CONNECTION_WIDTH)? {
        Some(_) => Some(grant_at(row, CONNECTION_WIDTH)?),
        None => None,
    };
    Ok((connection, grant))
}

pub(crate) fn event(row: &dyn Row) -> Result<Event, StoreError> {
    let kind = row.text(2)?;
    Ok(Event {
        id: EventId::from_trusted(row.text(0)?),
        connection_id: ConnectionId::from_trusted(row.text(1)?),
        kind: EventKind::parse(&kind).ok_or_else(|| corrupt("event kind", &kind))?,
        grant_id: grant_id(row, 3)?,
        related_grant_id: grant_id(row, 4)?,
        provider_request_id: row.opt_text(5)?,
        detail: row.opt_json(6)?.unwrap_or(serde_json::Value::Null),
        at: row.time(7)?,
    })
}

pub(crate) fn attempt(row: &dyn Row) -> Result<InterruptedAttempt, StoreError> {
    Ok(InterruptedAttempt {
        attempt_id: AttemptId::from_trusted(row.text(0)?),
        grant_id: GrantId::from_trusted(row.text(1)?),
        started_at: row.time(2)?,
        holder: LeaseHolder(row.text(3)?),
    })
}

pub(crate) fn session(row: &dyn Row) -> Result<ConnectSession, StoreError> {
    let provider = row.text(1)?;
    Ok(ConnectSession {
        id: SessionId::from_trusted(row.text(0)?),
        provider: Provider::parse(&provider).ok_or_else(|| corrupt("provider", &provider))?,
        state_hash: row.text(2)?,
        end_user_id: row.text(3)?,
        return_to: row.text(4)?,
        connection_id: row.opt_text(5)?.map(ConnectionId::from_trusted),
        created_at: row.time(6)?,
        expires_at: row.time(7)?,
        used_at: row.opt_time(8)?,
    })
}

pub(crate) fn job(row: &dyn Row) -> Result<crate::ledger::Job, StoreError> {
    use crate::ledger::{JobKind, JobStatus};
    let kind = row.text(1)?;
    let status = row.text(5)?;
    Ok(crate::ledger::Job {
        id: row.text(0)?,
        kind: JobKind::parse(&kind).ok_or_else(|| corrupt("job kind", &kind))?,
        connection_id: row.opt_text(2)?.map(ConnectionId::from_trusted),
        subject: row.text(3)?,
        payload: row.opt_json(4)?.unwrap_or(serde_json::Value::Null),
        status: JobStatus::parse(&status).ok_or_else(|| corrupt("job status", &status))?,
        attempts: row.int(6)?,
        next_attempt_at: row.time(7)?,
        last_error: row.opt_text(8)?,
        created_at: row.time(9)?,
        updated_at: row.time(10)?,
    })
}

/// A row of `REUSABLE_SESSION_OF_CONNECTION`: the session and its sealed state.
pub(crate) fn reusable_session(row: &dyn Row) -> Result<(ConnectSession, Vec<u8>), StoreError> {
    Ok((session(row)?, row.bytes(9)?))
}

pub(crate) fn count(row: &dyn Row) -> Result<i64, StoreError> {
    row.int(0)
}

/// A row of `CONNECTIONS_BY_STATUS`.
pub(crate) fn status_count(row: &dyn Row) -> Result<(String, i64), StoreError> {
    Ok((row.text(0)?, row.int(1)?))
}

/// A row of `JOBS_BY_KIND_AND_STATUS`.
pub(crate) fn kind_status_count(row: &dyn Row) -> Result<(String, String, i64), StoreError> {
    Ok((row.text(0)?, row.text(1)?, row.int(2)?))
}

pub(crate) fn key_id(row: &dyn Row) -> Result<String, StoreError> {
    row.text(0)
}

/// A row of `KEY_CHECKS`: the key id and its sealed check value.
pub(crate) fn key_check(row: &dyn Row) -> Result<(String, Vec<u8>), StoreError> {
    Ok((row.text(0)?, row.bytes(1)?))
}

// The admin console's reads (`reads.rs`): a connection's history newest first, bounded, and
// what the health page shows.

pub(crate) const RECENT_GRANTS_OF_CONNECTION: &str = concat!(
    "SELECT ",
    grant_columns!(),
    " FROM grants g WHERE g.connection_id = $1 ORDER BY g.seq DESC LIMIT $2"
);
pub(crate) const COUNT_GRANTS_OF_CONNECTION: &str =
    "SELECT count(*) FROM grants WHERE connection_id = $1";
pub(crate) const RECENT_EVENTS_OF_CONNECTION: &str =
    "SELECT id, connection_id, kind, grant_id, related_grant_id, provider_request_id, detail, at \
     FROM events WHERE connection_id = $1 ORDER BY seq DESC LIMIT $2";
pub(crate) const COUNT_EVENTS_OF_CONNECTION: &str =
    "SELECT count(*) FROM events WHERE connection_id = $1";
pub(crate) const RECENT_JOBS_OF_CONNECTION: &str = concat!(
    "SELECT ",
    job_columns!(),
    " FROM jobs WHERE connection_id = $1 AND kind = $2 ORDER BY id DESC LIMIT $3"
);
/// Active connections checked at or after `$1` (`connections_due_check` answers it).
pub(crate) const COUNT_ACTIVE_CHECKED_SINCE: &str =
    "SELECT count(*) FROM connections WHERE status = 'active' AND last_checked_at >= $1";
pub(crate) const COUNT_ACTIVE_NEVER_CHECKED: &str =
    "SELECT count(*) FROM connections WHERE status = 'active' AND last_checked_at IS NULL";

/// Every shared statement, for the test that prepares each one on both backends.
#[cfg(test)]
pub(crate) const ALL: &[&str] = &[
    CONNECTION_BY_ID,
    CONNECTIONS_BY_STATUS,
    JOBS_BY_KIND_AND_STATUS,
    LIVE_CONNECTION_OF_BOT,
    INSERT_CONNECTION,
    SET_BOT,
    SET_CURRENT_GRANT,
    SET_STATUS,
    SET_REVOKED,
    TOUCH_CONNECTION,
    TAKE_LEASE,
    RELEASE_LEASE,
    CURRENT_GRANT,
    GRANT_OF_CONNECTION,
    GRANT_BY_ID,
    RESCUE_CANDIDATES,
    GRANTS_OF_CONNECTION,
    INSERT_GRANT,
    SUPERSEDE_GRANT,
    REVOKE_GRANTS_OF_CONNECTION,
    GRANTS_SEALED_WITH_OTHER_KEYS,
    COUNT_GRANTS_SEALED_WITH_OTHER_KEYS,
    RESEAL_GRANT,
    KEY_IDS_IN_USE,
    GRANT_SEALED_WITH_KEY,
    KEY_CHECKS,
    INSERT_KEY_CHECK,
    INSERT_EVENT,
    EVENTS_OF_CONNECTION,
    INSERT_ATTEMPT,
    UNFINISHED_ATTEMPT_OF_GRANT,
    INTERRUPT_UNFINISHED_ATTEMPTS_OF_GRANT,
    INTERRUPTED_ATTEMPT_OF_GRANT,
    CLOSE_ATTEMPT,
    INSERT_SESSION,
    SESSION_BY_ID,
    SESSION_BY_STATE,
    MARK_SESSION_USED,
    TOKENS_OF_CONNECTION,
    ATTEMPTS_OF_CONNECTION_SINCE,
    INSERT_JOB,
    DUE_JOBS,
    DUE_JOBS_OF_CONNECTION,
    JOBS_OF_CONNECTION,
    CLAIM_JOB,
    FINISH_JOB,
    RETRY_JOB,
    JOB_BY_ID,
    REUSABLE_SESSION_OF_CONNECTION,
    INSERT_REUSABLE_SESSION,
    GRANT_FINGERPRINTS_OF_BOT,
    SET_LAST_CHECK,
    DUE_CHECKS,
    COUNT_ACTIVE,
    OLDEST_CHECK,
    INSERT_SWEEPER_LEASE,
    SWEEPER_LEASE,
    TAKE_SWEEPER_LEASE,
    RECENT_GRANTS_OF_CONNECTION,
    COUNT_GRANTS_OF_CONNECTION,
    RECENT_EVENTS_OF_CONNECTION,
    COUNT_EVENTS_OF_CONNECTION,
    RECENT_JOBS_OF_CONNECTION,
    COUNT_ACTIVE_CHECKED_SINCE,
    COUNT_ACTIVE_NEVER_CHECKED,
    TOKEN_OF_CONNECTION,
    UPSERT_THROTTLE,
    DELETE_EXPIRED_THROTTLES,
];
