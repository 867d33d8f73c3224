//! Values to PostgreSQL rows and back: row decoders, sealing, and the two inserts every ledger
//! operation shares (a grant, sealed; an event). Types are native: timestamptz, bytea, jsonb.

pub(super) use crate::store::common::{
    ConnectionRow, NewEvent, CONNECTION_COLUMNS, CONNECTION_WIDTH, GRANT_COLUMNS,
};
pub(super) use crate::store::sealed::{open_grant, seal_tokens, GrantRow};

use chrono::{DateTime, SubsecRound, Utc};
use deadpool_postgres::GenericClient;
use tokio_postgres::Row;

use crate::ids::{BotId, ConnectionId, EventId, GrantId, RefreshToken};
use crate::ledger::{
    Connection, ConnectionStatus, Event, EventKind, GrantOrigin, GrantRecord, MintedPair, Provider,
};
use crate::seal::KeyRing;
use crate::store::StoreError;

/// PostgreSQL keeps microseconds; values are truncated on the way in so that what a caller
/// wrote and what it reads back are equal.
pub(super) fn micros(t: DateTime<Utc>) -> DateTime<Utc> {
    t.trunc_subsecs(6)
}

fn corrupt(what: &str, value: &str) -> StoreError {
    StoreError::Database(format!("unexpected {what} {value:?} in the database"))
}

fn grant_id(row: &Row, idx: usize) -> Result<Option<GrantId>, StoreError> {
    Ok(row
        .try_get::<_, Option<String>>(idx)?
        .map(GrantId::from_trusted))
}

pub(super) fn connection_at(row: &Row, base: usize) -> Result<ConnectionRow, StoreError> {
    let provider: String = row.try_get(base + 1)?;
    let status: String = row.try_get(base + 7)?;
    Ok(ConnectionRow {
        connection: Connection {
            id: ConnectionId::from_trusted(row.try_get(base)?),
            provider: Provider::parse(&provider).ok_or_else(|| corrupt("provider", &provider))?,
            bot_id: BotId(row.try_get(base + 2)?),
            workspace_id: row.try_get(base + 3)?,
            workspace_name: row.try_get(base + 4)?,
            workspace_icon: row.try_get(base + 5)?,
            end_user_id: row.try_get(base + 6)?,
            status: ConnectionStatus::parse(&status).ok_or_else(|| corrupt("status", &status))?,
            grant_id: grant_id(row, base + 8)?,
            diagnosis: row.try_get(base + 9)?,
            created_at: row.try_get(base + 10)?,
            updated_at: row.try_get(base + 11)?,
        },
        lease_holder: row.try_get(base + 12)?,
        lease_until: row.try_get(base + 13)?,
        lease_fence: row.try_get(base + 14)?,
    })
}

pub(super) fn grant_at(row: &Row, base: usize) -> Result<GrantRow, StoreError> {
    let origin: String = row.try_get(base + 2)?;
    Ok(GrantRow {
        record: GrantRecord {
            id: GrantId::from_trusted(row.try_get(base)?),
            connection_id: ConnectionId::from_trusted(row.try_get(base + 1)?),
            origin: GrantOrigin::parse(&origin).ok_or_else(|| corrupt("grant origin", &origin))?,
            parent_grant_id: grant_id(row, base + 3)?,
            bot_id: BotId(row.try_get(base + 4)?),
            obtained_at: row.try_get(base + 5)?,
            expires_at: row.try_get(base + 6)?,
            superseded_at: row.try_get(base + 7)?,
            revoked_at: row.try_get(base + 8)?,
            stale_at_birth: row.try_get(base + 9)?,
            access_token_fingerprint: row.try_get(base + 10)?,
            refresh_token_fingerprint: row.try_get(base + 11)?,
            provider_request_id: row.try_get(base + 12)?,
            key_id: row.try_get(base + 13)?,
        },
        access: row.try_get(base + 14)?,
        refresh: row.try_get(base + 15)?,
    })
}

pub(super) const EVENT_COLUMNS: &str =
    "id, connection_id, kind, grant_id, related_grant_id, provider_request_id, detail, at";

pub(super) fn event_at(row: &Row) -> Result<Event, StoreError> {
    let kind: String = row.try_get(2)?;
    Ok(Event {
        id: EventId::from_trusted(row.try_get(0)?),
        connection_id: ConnectionId::from_trusted(row.try_get(1)?),
        kind: EventKind::parse(&kind).ok_or_else(|| corrupt("event kind", &kind))?,
        grant_id: grant_id(row, 3)?,
        related_grant_id: grant_id(row, 4)?,
        provider_request_id: row.try_get(5)?,
        detail: row.try_get(6)?,
        at: row.try_get(7)?,
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

pub(super) async fn insert_grant(
    tx: &impl GenericClient,
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
    let stmt = tx
        .prepare_cached(
            "INSERT INTO grants (id, connection_id, origin, parent_grant_id, bot_id, obtained_at, expires_at, \
                 superseded_at, revoked_at, stale_at_birth, access_token, refresh_token, access_fp, refresh_fp, \
                 key_id, provider_request_id, metadata) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)",
        )
        .await?;
    tx.execute(
        &stmt,
        &[
            &g.id.as_str(),
            &g.connection.as_str(),
            &g.origin.as_str(),
            &g.parent.map(GrantId::as_str),
            &pair.bot_id.0,
            &micros(pair.obtained_at),
            &pair.expires_at.map(micros),
            &g.superseded_at.map(micros),
            &g.revoked_at,
            &g.stale_at_birth,
            &access,
            &refresh,
            &pair.access_token.fingerprint(),
            &pair.refresh_token.as_ref().map(RefreshToken::fingerprint),
            &key_id,
            &pair.provider_request_id,
            &pair.metadata,
        ],
    )
    .await?;
    Ok(())
}

pub(super) async fn insert_event(
    tx: &impl GenericClient,
    connection: &ConnectionId,
    at: DateTime<Utc>,
    e: NewEvent<'_>,
) -> Result<(), StoreError> {
    let stmt = tx
        .prepare_cached(
            "INSERT INTO events (id, connection_id, kind, grant_id, related_grant_id, provider_request_id, detail, at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .await?;
    tx.execute(
        &stmt,
        &[
            &EventId::generate().as_str(),
            &connection.as_str(),
            &e.kind.as_str(),
            &e.grant.map(GrantId::as_str),
            &e.related.map(GrantId::as_str),
            &e.provider_request_id,
            &e.detail,
            &at,
        ],
    )
    .await?;
    Ok(())
}

/// The connection row, without a lock.
pub(super) async fn find_connection(
    client: &impl GenericClient,
    id: &ConnectionId,
) -> Result<Option<ConnectionRow>, StoreError> {
    let stmt = client
        .prepare_cached(&format!(
            "SELECT {CONNECTION_COLUMNS} FROM connections c WHERE c.id = $1"
        ))
        .await?;
    client
        .query_opt(&stmt, &[&id.as_str()])
        .await?
        .map(|r| connection_at(&r, 0))
        .transpose()
}

/// The connection row, locked until the transaction ends: the per-connection lock that every
/// write takes first, so writes to one connection are serialized across processes.
pub(super) async fn lock_connection(
    tx: &impl GenericClient,
    id: &ConnectionId,
) -> Result<ConnectionRow, StoreError> {
    let stmt = tx
        .prepare_cached(&format!(
            "SELECT {CONNECTION_COLUMNS} FROM connections c WHERE c.id = $1 FOR UPDATE"
        ))
        .await?;
    tx.query_opt(&stmt, &[&id.as_str()])
        .await?
        .map(|r| connection_at(&r, 0))
        .transpose()?
        .ok_or_else(|| StoreError::UnknownConnection(id.clone()))
}

pub(super) async fn find_grant(
    client: &impl GenericClient,
    connection: &ConnectionId,
    grant: &GrantId,
) -> Result<Option<GrantRow>, StoreError> {
    let stmt = client
        .prepare_cached(&format!(
            "SELECT {GRANT_COLUMNS} FROM grants g WHERE g.id = $1 AND g.connection_id = $2"
        ))
        .await?;
    client
        .query_opt(&stmt, &[&grant.as_str(), &connection.as_str()])
        .await?
        .map(|r| grant_at(&r, 0))
        .transpose()
}

/// Prepares (once per pooled connection) and runs a statement.
pub(super) async fn exec(
    client: &impl GenericClient,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<u64, StoreError> {
    let stmt = client.prepare_cached(sql).await?;
    Ok(client.execute(&stmt, params).await?)
}

/// Prepares (once per pooled connection) and runs a query that answers at most one row.
pub(super) async fn query_opt(
    client: &impl GenericClient,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Option<Row>, StoreError> {
    let stmt = client.prepare_cached(sql).await?;
    Ok(client.query_opt(&stmt, params).await?)
}

/// Prepares (once per pooled connection) and runs a query.
pub(super) async fn query(
    client: &impl GenericClient,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Vec<Row>, StoreError> {
    let stmt = client.prepare_cached(sql).await?;
    Ok(client.query(&stmt, params).await?)
}
