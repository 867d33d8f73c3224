//! Values to SQLite rows and back: timestamps, row decoders, and the two inserts every ledger
//! operation shares (a grant, sealed; an event).

pub(super) use crate::store::common::{
    ConnectionRow, NewEvent, CONNECTION_COLUMNS, CONNECTION_WIDTH, GRANT_COLUMNS,
};
pub(super) use crate::store::sealed::{open_grant, seal_tokens, GrantRow};

use chrono::{DateTime, SecondsFormat, SubsecRound, Utc};
use rusqlite::types::Type;
use rusqlite::{params, OptionalExtension, Row, Transaction};

use crate::ids::{BotId, ConnectionId, EventId, GrantId, RefreshToken};
use crate::ledger::{
    Connection, ConnectionStatus, Event, EventKind, GrantOrigin, GrantRecord, MintedPair, Provider,
};
use crate::seal::KeyRing;
use crate::store::StoreError;

/// Timestamps are stored as fixed-width RFC 3339 in UTC with microseconds, so that SQL string
/// comparison is time comparison. Microseconds match PostgreSQL's precision.
pub(super) fn ts(t: DateTime<Utc>) -> String {
    t.trunc_subsecs(6)
        .to_rfc3339_opts(SecondsFormat::Micros, true)
}

fn conversion(
    idx: usize,
    e: impl Into<Box<dyn std::error::Error + Send + Sync>>,
) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(idx, Type::Text, e.into())
}

fn parse_ts(idx: usize, s: &str) -> rusqlite::Result<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| conversion(idx, e))
}

pub(super) fn time(row: &Row<'_>, idx: usize) -> rusqlite::Result<DateTime<Utc>> {
    parse_ts(idx, &row.get::<_, String>(idx)?)
}

pub(super) fn opt_time(row: &Row<'_>, idx: usize) -> rusqlite::Result<Option<DateTime<Utc>>> {
    row.get::<_, Option<String>>(idx)?
        .map(|s| parse_ts(idx, &s))
        .transpose()
}

fn json(row: &Row<'_>, idx: usize) -> rusqlite::Result<Option<serde_json::Value>> {
    row.get::<_, Option<String>>(idx)?
        .map(|s| serde_json::from_str(&s).map_err(|e| conversion(idx, e)))
        .transpose()
}

fn grant_id(row: &Row<'_>, idx: usize) -> rusqlite::Result<Option<GrantId>> {
    Ok(row
        .get::<_, Option<String>>(idx)?
        .map(GrantId::from_trusted))
}

pub(super) fn connection_at(row: &Row<'_>, base: usize) -> rusqlite::Result<ConnectionRow> {
    let provider: String = row.get(base + 1)?;
    let status: String = row.get(base + 7)?;
    Ok(ConnectionRow {
        connection: Connection {
            id: ConnectionId::from_trusted(row.get(base)?),
            provider: Provider::parse(&provider)
                .ok_or_else(|| conversion(base + 1, format!("unknown provider {provider:?}")))?,
            bot_id: BotId(row.get(base + 2)?),
            workspace_id: row.get(base + 3)?,
            workspace_name: row.get(base + 4)?,
            workspace_icon: row.get(base + 5)?,
            end_user_id: row.get(base + 6)?,
            status: ConnectionStatus::parse(&status)
                .ok_or_else(|| conversion(base + 7, format!("unknown status {status:?}")))?,
            grant_id: grant_id(row, base + 8)?,
            diagnosis: json(row, base + 9)?,
            created_at: time(row, base + 10)?,
            updated_at: time(row, base + 11)?,
        },
        lease_holder: row.get(base + 12)?,
        lease_until: opt_time(row, base + 13)?,
        lease_fence: row.get(base + 14)?,
    })
}

pub(super) fn grant_at(row: &Row<'_>, base: usize) -> rusqlite::Result<GrantRow> {
    let origin: String = row.get(base + 2)?;
    Ok(GrantRow {
        record: GrantRecord {
            id: GrantId::from_trusted(row.get(base)?),
            connection_id: ConnectionId::from_trusted(row.get(base + 1)?),
            origin: GrantOrigin::parse(&origin)
                .ok_or_else(|| conversion(base + 2, format!("unknown grant origin {origin:?}")))?,
            parent_grant_id: grant_id(row, base + 3)?,
            bot_id: BotId(row.get(base + 4)?),
            obtained_at: time(row, base + 5)?,
            expires_at: opt_time(row, base + 6)?,
            superseded_at: opt_time(row, base + 7)?,
            revoked_at: opt_time(row, base + 8)?,
            stale_at_birth: row.get(base + 9)?,
            access_token_fingerprint: row.get(base + 10)?,
            refresh_token_fingerprint: row.get(base + 11)?,
            provider_request_id: row.get(base + 12)?,
            key_id: row.get(base + 13)?,
        },
        access: row.get(base + 14)?,
        refresh: row.get(base + 15)?,
    })
}

pub(super) const EVENT_COLUMNS: &str =
    "id, connection_id, kind, grant_id, related_grant_id, provider_request_id, detail, at";

pub(super) fn event_at(row: &Row<'_>) -> rusqlite::Result<Event> {
    let kind: String = row.get(2)?;
    Ok(Event {
        id: EventId::from_trusted(row.get(0)?),
        connection_id: ConnectionId::from_trusted(row.get(1)?),
        kind: EventKind::parse(&kind)
            .ok_or_else(|| conversion(2, format!("unknown event kind {kind:?}")))?,
        grant_id: grant_id(row, 3)?,
        related_grant_id: grant_id(row, 4)?,
        provider_request_id: row.get(5)?,
        detail: json(row, 6)?.unwrap_or(serde_json::Value::Null),
        at: time(row, 7)?,
    })
}

/// A grant about to be inserted.
pub(super) struct NewGrant<'a> {
    pub id: &'a GrantId,
    pub connection: &'a ConnectionId,
    pub origin: GrantOrigin,
    pub parent: Option<&'a GrantId>,
    pub pair: &'a MintedPair,
    pub superseded_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub stale_at_birth: bool,
}

pub(super) fn insert_grant(
    tx: &Transaction<'_>,
    keys: &KeyRing,
    g: NewGrant<'_>,
) -> Result<(), StoreError> {
    let pair = g.pair;
    let (access, refresh, key_id) = seal_tokens(
        keys,
        g.connection,
        g.id,
        &pair.access_token,
        pair.refresh_token.as_ref(),
    );
    tx.prepare_cached(
        "INSERT INTO grants (id, connection_id, origin, parent_grant_id, bot_id, obtained_at, expires_at, \
             superseded_at, revoked_at, stale_at_birth, access_token, refresh_token, access_fp, refresh_fp, key_id, \
             provider_request_id, metadata) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)",
    )?
    .execute(params![
        g.id.as_str(),
        g.connection.as_str(),
        g.origin.as_str(),
        g.parent.map(GrantId::as_str),
        pair.bot_id.0,
        ts(pair.obtained_at),
        pair.expires_at.map(ts),
        g.superseded_at.map(ts),
        g.revoked_at.map(ts),
        g.stale_at_birth,
        access,
        refresh,
        pair.access_token.fingerprint(),
        pair.refresh_token.as_ref().map(RefreshToken::fingerprint),
        key_id,
        pair.provider_request_id,
        pair.metadata.to_string(),
    ])?;
    Ok(())
}

pub(super) fn insert_event(
    tx: &Transaction<'_>,
    connection: &ConnectionId,
    at: DateTime<Utc>,
    e: NewEvent<'_>,
) -> Result<(), StoreError> {
    tx.prepare_cached(
        "INSERT INTO events (id, connection_id, kind, grant_id, related_grant_id, provider_request_id, detail, at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?
    .execute(params![
        EventId::generate().as_str(),
        connection.as_str(),
        e.kind.as_str(),
        e.grant.map(GrantId::as_str),
        e.related.map(GrantId::as_str),
        e.provider_request_id,
        e.detail.to_string(),
        ts(at),
    ])?;
    Ok(())
}

/// The connection row, or `UnknownConnection`. In a write transaction the row is as fresh as
/// it gets: `BEGIN IMMEDIATE` holds the database's write lock.
pub(super) fn load_connection(
    conn: &rusqlite::Connection,
    id: &ConnectionId,
) -> Result<ConnectionRow, StoreError> {
    find_connection(conn, id)?.ok_or_else(|| StoreError::UnknownConnection(id.clone()))
}

pub(super) fn find_connection(
    conn: &rusqlite::Connection,
    id: &ConnectionId,
) -> Result<Option<ConnectionRow>, StoreError> {
    Ok(conn
        .prepare_cached(&format!(
            "SELECT {CONNECTION_COLUMNS} FROM connections c WHERE c.id = ?1"
        ))?
        .query_row([id.as_str()], |row| connection_at(row, 0))
        .optional()?)
}

pub(super) fn find_grant(
    conn: &rusqlite::Connection,
    connection: &ConnectionId,
    grant: &GrantId,
) -> Result<Option<GrantRow>, StoreError> {
    Ok(conn
        .prepare_cached(&format!(
            "SELECT {GRANT_COLUMNS} FROM grants g WHERE g.id = ?1 AND g.connection_id = ?2"
        ))?
        .query_row([grant.as_str(), connection.as_str()], |row| {
            grant_at(row, 0)
        })
        .optional()?)
}
