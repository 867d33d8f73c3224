//! The SQLite backend: one file, several processes.
//!
//! Concurrency is SQLite's own: WAL mode, and every write is one `BEGIN IMMEDIATE` transaction,
//! which takes the database's write lock before its first read. So a write sees the latest
//! commit of every process and nothing commits in between: that is the per-connection lock the
//! `Store` contract asks for (coarser, since it covers the whole file, which is fine at the
//! write rates of a token broker). `synchronous = FULL` makes a commit durable before the call
//! returns (invariant 1). Reads go to a small pool of read-only connections, so the token-read
//! path never waits behind a writer.
//!
//! rusqlite is blocking: writes (which may wait for another process's lock) run on tokio's blocking
//! pool; reads, one indexed lookup that never waits for a writer in WAL mode, run inline.

mod ledger;
mod rows;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, SubsecRound, Utc};
use rusqlite::{params, ErrorCode, OptionalExtension, TransactionBehavior};

use self::rows::{
    connection_at, event_at, find_connection, find_grant, grant_at, open_grant, ts,
    CONNECTION_COLUMNS, CONNECTION_WIDTH, EVENT_COLUMNS, GRANT_COLUMNS,
};
use super::{RefreshRecorded, SessionLookup, Store, StoreError};
use crate::clock::Clock;
use crate::ids::{AttemptId, ConnectionId, GrantId, SessionId};
use crate::ledger::{
    AuthorizationOutcome, ConnectSession, Connection, ConnectionFilter, Event, FailureOutcome,
    GrantRecord, LeaseOutcome, MintedPair, NewAuthorization, OpenGrant, RefreshFailure,
    RotateProgress,
};
use crate::seal::KeyRing;

/// The migrations this binary knows, in order. Each is applied in its own transaction.
const MIGRATIONS: &[(i64, &str)] = &[(1, include_str!("../../migrations/sqlite/0001_ledger.sql"))];

/// The schema version this binary runs against.
pub const SCHEMA_VERSION: i64 = MIGRATIONS[MIGRATIONS.len() - 1].0;

/// How long a statement waits for another process's write lock before answering `Timeout`.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Read connections kept open; reads beyond this many wait for one to come back.
const READERS: usize = 4;

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        match e.sqlite_error_code() {
            Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => StoreError::Timeout,
            _ => StoreError::Database(e.to_string()),
        }
    }
}

#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    keys: Arc<KeyRing>,
    clock: Clock,
    /// The one connection that writes; writers in this process queue here, writers in other
    /// processes queue on the file lock (`busy_timeout`).
    writer: Arc<tokio::sync::Mutex<rusqlite::Connection>>,
    /// Idle read connections; `read_permits` bounds how many are in use.
    readers: Mutex<Vec<rusqlite::Connection>>,
    read_permits: Arc<tokio::sync::Semaphore>,
}

fn open_connection(path: &Path, writer: bool) -> Result<rusqlite::Connection, StoreError> {
    let conn = rusqlite::Connection::open(path)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.set_prepared_statement_cache_capacity(64);
    conn.pragma_update(None, "foreign_keys", "ON")?;
    if writer {
        // WAL lets readers work while a writer commits, and is a property of the file.
        let mode: String =
            conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Database(format!(
                "{} could not be put in WAL mode (it is in {mode} mode)",
                path.display()
            )));
        }
        conn.pragma_update(None, "synchronous", "FULL")?;
    } else {
        conn.pragma_update(None, "query_only", "ON")?;
    }
    Ok(conn)
}

fn join_error(e: tokio::task::JoinError) -> StoreError {
    if e.is_panic() {
        std::panic::resume_unwind(e.into_panic());
    }
    StoreError::Database(format!("the storage task was cancelled: {e}"))
}

impl SqliteStore {
    /// Opens (creating if needed) the database file. Does not migrate.
    pub async fn open(path: &Path, keys: Arc<KeyRing>, clock: Clock) -> Result<Self, StoreError> {
        let path = path.to_path_buf();
        let (writer, path) =
            tokio::task::spawn_blocking(move || open_connection(&path, true).map(|c| (c, path)))
                .await
                .map_err(join_error)??;
        Ok(SqliteStore {
            inner: Arc::new(Inner {
                path,
                keys,
                clock,
                writer: Arc::new(tokio::sync::Mutex::new(writer)),
                readers: Mutex::new(Vec::new()),
                read_permits: Arc::new(tokio::sync::Semaphore::new(READERS)),
            }),
        })
    }

    /// The file this store works on.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Runs `f` in one `BEGIN IMMEDIATE` transaction on the writer and commits it; any error
    /// rolls everything back. `now` is read after the write lock is held, so lease times are
    /// ordered like the commits.
    async fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&rusqlite::Transaction<'_>, &KeyRing, DateTime<Utc>) -> Result<T, StoreError>
            + Send
            + 'static,
    {
        let mut conn = self.inner.writer.clone().lock_owned().await;
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let now = inner.clock.now().trunc_subsecs(6);
            let out = f(&tx, &inner.keys, now)?;
            tx.commit()?;
            Ok(out)
        })
        .await
        .map_err(join_error)?
    }

    /// Runs `f` on a read connection from the pool, inline on the calling task.
    ///
    /// Reads run on the async worker rather than through `spawn_blocking`: in WAL mode a reader
    /// never waits for a writer, a token read is one indexed lookup in pages that are almost
    /// always cached, and the thread hand-off cost more than the read itself (about a quarter
    /// of a token read's CPU in the benchmarks). Writes, which may wait on another process's
    /// lock, still run on the blocking pool.
    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&rusqlite::Connection, &KeyRing) -> Result<T, StoreError> + Send + 'static,
    {
        let permit = self
            .inner
            .read_permits
            .acquire()
            .await
            .map_err(|_| StoreError::Database("the read pool is closed".into()))?;
        let inner = &self.inner;
        let idle = inner
            .readers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop();
        let conn = match idle {
            Some(conn) => conn,
            None => open_connection(&inner.path, false)?,
        };
        let out = f(&conn, &inner.keys);
        inner
            .readers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(conn);
        drop(permit);
        out
    }
}

fn schema_version(conn: &rusqlite::Connection) -> Result<i64, StoreError> {
    let has_table: bool = conn
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations')")?
        .query_row([], |r| r.get(0))?;
    if !has_table {
        return Ok(0);
    }
    Ok(conn
        .prepare_cached("SELECT coalesce(max(version), 0) FROM schema_migrations")?
        .query_row([], |r| r.get(0))?)
}

#[async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn migrate(&self) -> Result<i64, StoreError> {
        // One migration per transaction, each re-reading the version under the write lock, so
        // two processes migrating at once apply each migration exactly once.
        loop {
            let applied = self
                .write(|tx, _, now| {
                    tx.execute_batch(
                        "CREATE TABLE IF NOT EXISTS schema_migrations (\
                             version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL) STRICT",
                    )?;
                    let found = schema_version(tx)?;
                    if found > SCHEMA_VERSION {
                        return Err(StoreError::SchemaTooNew {
                            found,
                            supported: SCHEMA_VERSION,
                        });
                    }
                    let Some((version, sql)) = MIGRATIONS.iter().find(|(v, _)| *v > found) else {
                        return Ok(None);
                    };
                    tx.execute_batch(sql)?;
                    tx.execute(
                        "INSERT INTO schema_migrations (version, applied_at) VALUES (?1, ?2)",
                        params![version, ts(now)],
                    )?;
                    Ok(Some(*version))
                })
                .await?;
            if applied.is_none() {
                return Ok(SCHEMA_VERSION);
            }
        }
    }

    async fn check_schema(&self) -> Result<i64, StoreError> {
        let found = self.read(|conn, _| schema_version(conn)).await?;
        match found.cmp(&SCHEMA_VERSION) {
            std::cmp::Ordering::Greater => Err(StoreError::SchemaTooNew {
                found,
                supported: SCHEMA_VERSION,
            }),
            std::cmp::Ordering::Less => Err(StoreError::SchemaBehind {
                found,
                supported: SCHEMA_VERSION,
            }),
            std::cmp::Ordering::Equal => Ok(found),
        }
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.read(|conn, _| {
            Ok(conn
                .query_row("SELECT 1", [], |r| r.get::<_, i64>(0))
                .map(drop)?)
        })
        .await
    }

    async fn create_session(&self, session: &ConnectSession) -> Result<(), StoreError> {
        let s = session.clone();
        self.write(move |tx, _, _| {
            tx.prepare_cached(
                "INSERT INTO connect_sessions (id, provider, state_hash, end_user_id, return_to, connection_id, \
                     created_at, expires_at, used_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?
            .execute(params![
                s.id.as_str(),
                s.provider.as_str(),
                s.state_hash,
                s.end_user_id,
                s.return_to,
                s.connection_id.as_ref().map(ConnectionId::as_str),
                ts(s.created_at),
                ts(s.expires_at),
                s.used_at.map(ts),
            ])?;
            Ok(())
        })
        .await
    }

    async fn get_session(&self, id: &SessionId) -> Result<Option<ConnectSession>, StoreError> {
        let id = id.clone();
        self.read(move |conn, _| {
            Ok(conn
                .prepare_cached(&format!(
                    "SELECT {} FROM connect_sessions WHERE id = ?1",
                    ledger::SESSION_COLUMNS
                ))?
                .query_row([id.as_str()], ledger::session_at)
                .optional()?)
        })
        .await
    }

    async fn consume_session(&self, state_hash: &str) -> Result<SessionLookup, StoreError> {
        let state_hash = state_hash.to_owned();
        self.write(move |tx, _, now| ledger::consume_session(tx, now, &state_hash))
            .await
    }

    async fn record_authorization(
        &self,
        auth: NewAuthorization,
    ) -> Result<AuthorizationOutcome, StoreError> {
        self.write(move |tx, keys, now| ledger::record_authorization(tx, keys, now, &auth))
            .await
    }

    async fn import_authorizations(
        &self,
        batch: Vec<NewAuthorization>,
    ) -> Result<Vec<ConnectionId>, StoreError> {
        super::check_distinct(&batch)?;
        self.write(move |tx, keys, now| {
            batch
                .iter()
                .map(|auth| {
                    ledger::record_authorization(tx, keys, now, auth).map(|o| o.connection.id)
                })
                .collect()
        })
        .await
    }

    async fn get_connection(&self, id: &ConnectionId) -> Result<Option<Connection>, StoreError> {
        let id = id.clone();
        self.read(move |conn, _| Ok(find_connection(conn, &id)?.map(|r| r.connection)))
            .await
    }

    async fn list_connections(
        &self,
        filter: &ConnectionFilter,
    ) -> Result<Vec<Connection>, StoreError> {
        let filter = filter.clone();
        self.read(move |conn, _| {
            let mut clauses = Vec::new();
            let mut values: Vec<rusqlite::types::Value> = Vec::new();
            let mut push = |clause: &str, value: String| {
                values.push(value.into());
                clauses.push(format!("{clause} ?{}", values.len()));
            };
            if let Some(p) = filter.provider {
                push("c.provider =", p.as_str().to_owned());
            }
            if let Some(u) = &filter.end_user_id {
                push("c.end_user_id =", u.clone());
            }
            if let Some(s) = filter.status {
                push("c.status =", s.as_str().to_owned());
            }
            if let Some(after) = &filter.after {
                push("c.id >", after.as_str().to_owned());
            }
            let limit = match filter.limit {
                0 => 100,
                n => n.min(1000),
            };
            values.push(i64::from(limit).into());
            let filter_sql = if clauses.is_empty() {
                String::new()
            } else {
                format!("WHERE {}", clauses.join(" AND "))
            };
            let sql = format!(
                "SELECT {CONNECTION_COLUMNS} FROM connections c {filter_sql} ORDER BY c.id LIMIT ?{}",
                values.len()
            );
            let rows = conn
                .prepare_cached(&sql)?
                .query_map(rusqlite::params_from_iter(values), |row| connection_at(row, 0))?
                .map(|r| r.map(|r| r.connection))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
        .await
    }

    async fn current_grant(
        &self,
        id: &ConnectionId,
    ) -> Result<Option<(Connection, Option<OpenGrant>)>, StoreError> {
        let id = id.clone();
        self.read(move |conn, keys| {
            let found = conn
                .prepare_cached(&format!(
                    "SELECT {CONNECTION_COLUMNS}, {GRANT_COLUMNS} FROM connections c \
                     LEFT JOIN grants g ON g.id = c.current_grant_id WHERE c.id = ?1"
                ))?
                .query_row([id.as_str()], |row| {
                    let connection = connection_at(row, 0)?.connection;
                    let grant = match row.get::<_, Option<String>>(CONNECTION_WIDTH)? {
                        Some(_) => Some(grant_at(row, CONNECTION_WIDTH)?),
                        None => None,
                    };
                    Ok((connection, grant))
                })
                .optional()?;
            let Some((connection, grant)) = found else {
                return Ok(None);
            };
            let grant = grant.map(|g| open_grant(keys, g)).transpose()?;
            Ok(Some((connection, grant)))
        })
        .await
    }

    async fn get_grant(
        &self,
        id: &ConnectionId,
        grant: &GrantId,
    ) -> Result<Option<OpenGrant>, StoreError> {
        let (id, grant) = (id.clone(), grant.clone());
        self.read(move |conn, keys| {
            find_grant(conn, &id, &grant)?
                .map(|g| open_grant(keys, g))
                .transpose()
        })
        .await
    }

    async fn list_grants(&self, id: &ConnectionId) -> Result<Vec<GrantRecord>, StoreError> {
        let id = id.clone();
        self.read(move |conn, _| {
            Ok(conn
                .prepare_cached(&format!(
                    "SELECT {GRANT_COLUMNS} FROM grants g WHERE g.connection_id = ?1 ORDER BY g.seq"
                ))?
                .query_map([id.as_str()], |row| grant_at(row, 0).map(|g| g.record))?
                .collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    async fn list_events(&self, id: &ConnectionId) -> Result<Vec<Event>, StoreError> {
        let id = id.clone();
        self.read(move |conn, _| {
            Ok(conn
                .prepare_cached(&format!(
                    "SELECT {EVENT_COLUMNS} FROM events WHERE connection_id = ?1 ORDER BY seq"
                ))?
                .query_map([id.as_str()], event_at)?
                .collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    async fn begin_refresh(
        &self,
        id: &ConnectionId,
        if_grant: Option<&GrantId>,
        holder: &str,
        lease: Duration,
    ) -> Result<LeaseOutcome, StoreError> {
        let (id, if_grant, holder) = (id.clone(), if_grant.cloned(), holder.to_owned());
        self.write(move |tx, keys, now| {
            ledger::begin_refresh(tx, keys, now, &id, if_grant.as_ref(), &holder, lease)
        })
        .await
    }

    async fn record_refresh(
        &self,
        id: &ConnectionId,
        parent: &GrantId,
        fence: i64,
        attempt: &AttemptId,
        pair: MintedPair,
    ) -> Result<RefreshRecorded, StoreError> {
        let (id, parent, attempt) = (id.clone(), parent.clone(), attempt.clone());
        self.write(move |tx, keys, now| {
            ledger::record_refresh(tx, keys, now, &id, &parent, fence, &attempt, &pair)
        })
        .await
    }

    async fn record_refresh_failure(
        &self,
        id: &ConnectionId,
        parent: &GrantId,
        fence: i64,
        attempt: &AttemptId,
        failure: &RefreshFailure,
    ) -> Result<FailureOutcome, StoreError> {
        let (id, parent, attempt, failure) =
            (id.clone(), parent.clone(), attempt.clone(), failure.clone());
        self.write(move |tx, _, now| {
            ledger::record_refresh_failure(tx, now, &id, &parent, fence, &attempt, &failure)
        })
        .await
    }

    async fn mark_needs_reauth(
        &self,
        id: &ConnectionId,
        grant: &GrantId,
        diagnosis: serde_json::Value,
    ) -> Result<Connection, StoreError> {
        let (id, grant) = (id.clone(), grant.clone());
        self.write(move |tx, _, now| ledger::mark_needs_reauth(tx, now, &id, &grant, &diagnosis))
            .await
            .map(|r| r.connection)
    }

    async fn mark_revoked(
        &self,
        id: &ConnectionId,
        reason: &str,
    ) -> Result<Connection, StoreError> {
        let (id, reason) = (id.clone(), reason.to_owned());
        self.write(move |tx, _, now| ledger::mark_revoked(tx, now, &id, &reason))
            .await
            .map(|r| r.connection)
    }

    async fn rotate_keys(&self, batch: u32) -> Result<RotateProgress, StoreError> {
        self.write(move |tx, keys, _| ledger::rotate_keys(tx, keys, batch))
            .await
    }
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.inner.path)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_sort_as_text() {
        let a = chrono::DateTime::parse_from_rfc3339("2026-06-08T09:59:59.999999Z")
            .unwrap()
            .to_utc();
        let b = chrono::DateTime::parse_from_rfc3339("2026-06-08T10:00:00Z")
            .unwrap()
            .to_utc();
        assert!(ts(a) < ts(b));
        assert_eq!(ts(b), "2026-06-08T10:00:00.000000Z");
    }
}
