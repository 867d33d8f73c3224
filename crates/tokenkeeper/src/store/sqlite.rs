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

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, SubsecRound, Utc};
use futures::FutureExt;
use rusqlite::types::ToSqlOutput;
use rusqlite::{params, ErrorCode, TransactionBehavior};

use super::cache::{Local, Touched};
use super::db::{Cell, Context, Db, Decode, Endpoints, Param, Row, Rows};
use super::StoreError;
use crate::clock::Clock;
use crate::ledger::Provider;
use crate::seal::KeyRing;

/// The migrations this binary knows, in order (`store::migrations!`).
const MIGRATIONS: &[(i64, &str)] = super::migrations!("sqlite");

/// The schema version this binary runs against.
pub const SCHEMA_VERSION: i64 = MIGRATIONS[MIGRATIONS.len() - 1].0;

/// How long a statement waits for another process's write lock before the database counts as
/// unavailable (invariant 10: no call waits on the database for more than a couple of seconds).
const BUSY_TIMEOUT: Duration = Duration::from_secs(2);

/// Read connections kept open; reads beyond this many wait for one to come back.
const READERS: usize = 4;

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        match e.sqlite_error_code() {
            // Another process has held the write lock for longer than `BUSY_TIMEOUT`, or the
            // file cannot be written or read: the database is not there for us, for now.
            Some(
                ErrorCode::DatabaseBusy
                | ErrorCode::DatabaseLocked
                | ErrorCode::CannotOpen
                | ErrorCode::SystemIoFailure
                | ErrorCode::DiskFull
                | ErrorCode::ReadOnly
                | ErrorCode::FileLockingProtocolFailed,
            ) => StoreError::Unavailable(e.to_string()),
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
    endpoints: Endpoints,
    /// The one connection that writes; writers in this process queue here, writers in other
    /// processes queue on the file lock (`busy_timeout`).
    writer: Arc<tokio::sync::Mutex<rusqlite::Connection>>,
    /// Idle read connections; `read_permits` bounds how many are in use.
    readers: Mutex<Vec<rusqlite::Connection>>,
    read_permits: Arc<tokio::sync::Semaphore>,
    /// The token cache, throttles and waiters this store shares with its change feed.
    local: Arc<Local>,
}

/// Creates the database file readable and writable by its owner only, before SQLite opens it:
/// SQLite would create it with the process's default mode (usually 0644), and it gives the WAL
/// and shared-memory files it creates beside it the database file's own mode. The tokens inside
/// are sealed, but the file also holds every connection's metadata and history.
fn create_private(path: &Path) -> Result<(), StoreError> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(StoreError::Database(format!(
            "could not create {}: {e}",
            path.display()
        ))),
    }
}

fn open_connection(path: &Path, writer: bool) -> Result<rusqlite::Connection, StoreError> {
    if writer {
        create_private(path)?;
    }
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
                endpoints: Endpoints::default(),
                writer: Arc::new(tokio::sync::Mutex::new(writer)),
                readers: Mutex::new(Vec::new()),
                read_permits: Arc::new(tokio::sync::Semaphore::new(READERS)),
                local: Local::new(0),
            }),
        })
    }

    pub(super) fn local(&self) -> &Arc<Local> {
        &self.inner.local
    }

    pub(super) fn keys(&self) -> &KeyRing {
        &self.inner.keys
    }

    pub(super) fn endpoints(&self) -> &Endpoints {
        &self.inner.endpoints
    }

    /// Runs `f` in one `BEGIN IMMEDIATE` transaction on the writer and commits it; any error
    /// rolls everything back. The transaction holds the database's write lock from its start,
    /// so everything `f` reads is the latest commit of any process.
    pub(super) async fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&SqliteDb<'_>) -> Result<T, StoreError> + Send + 'static,
    {
        self.write_then(f, true).await
    }

    /// `write`, committing only if `commit`; otherwise everything `f` did is rolled back (an
    /// import's `--dry-run`).
    pub(super) async fn write_then<T, F>(&self, f: F, commit: bool) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&SqliteDb<'_>) -> Result<T, StoreError> + Send + 'static,
    {
        let mut conn = self.inner.writer.clone().lock_owned().await;
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            // Declared before the transaction, so dropped after it: the cache's marks are
            // released once the transaction is committed or rolled back.
            let touched = Touched::new(&inner.local);
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let out = f(&inner.session(&tx, Some(&touched)))?;
            if commit {
                tx.commit()?;
            } else {
                tx.rollback()?;
            }
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
    pub(super) async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(&SqliteDb<'_>) -> Result<T, StoreError>,
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
        let out = f(&inner.session(&conn, None));
        inner
            .readers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(conn);
        drop(permit);
        out
    }
}

impl Inner {
    fn session<'a>(
        &'a self,
        conn: &'a rusqlite::Connection,
        touched: Option<&'a Touched>,
    ) -> SqliteDb<'a> {
        SqliteDb {
            conn,
            cx: Context::new(&self.keys, &self.clock, &self.endpoints, touched),
            local: &self.local,
        }
    }
}

impl SqliteStore {
    pub(super) async fn migrate(&self) -> Result<i64, StoreError> {
        // One migration per transaction, each re-reading the version under the write lock, so
        // two processes migrating at once apply each migration exactly once.
        loop {
            let applied = self
                .write(|db| {
                    let tx = db.conn;
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
                        params![version, ts(db.now())],
                    )?;
                    Ok(Some(*version))
                })
                .await?;
            if applied.is_none() {
                return Ok(SCHEMA_VERSION);
            }
        }
    }

    pub(super) async fn schema_version(&self) -> Result<i64, StoreError> {
        self.read(|db| schema_version(db.conn)).await
    }

    pub(super) async fn ping(&self) -> Result<(), StoreError> {
        self.read(|db| {
            Ok(db
                .conn
                .query_row("SELECT 1", [], |r| r.get::<_, i64>(0))
                .map(drop)?)
        })
        .await
    }
}

/// How often the change feed looks for other processes' commits: the bound on how stale this
/// process's token cache can be on SQLite (plus the few microseconds of applying a change), and
/// how late a refresh waiting for another process's learns of it. Each look is one
/// `PRAGMA data_version` on the feed's own connection (a read of the WAL index in shared
/// memory); the change log is read only when it moved.
pub const FEED_POLL: Duration = Duration::from_millis(5);

/// Rows of the change log read at once by the feed.
const FEED_BATCH: i64 = 1000;

impl SqliteStore {
    /// Starts the change feed (a thread of its own, which ends when the store is dropped) and
    /// turns the token cache on with `capacity` entries.
    pub(super) fn start_feed(&self) -> Result<(), StoreError> {
        let path = self.inner.path.clone();
        let local = Arc::downgrade(&self.inner.local);
        std::thread::Builder::new()
            .name("tokenkeeper-feed".into())
            .spawn(move || run_feed(&path, &local))
            .map(drop)
            .map_err(|e| StoreError::Database(format!("the change feed could not start: {e}")))
    }
}

/// The feed's position: its own read connection, the last change it applied, and the
/// `data_version` it last saw.
struct FeedPosition {
    conn: rusqlite::Connection,
    last: i64,
    data_version: i64,
}

fn run_feed(path: &Path, local: &std::sync::Weak<Local>) {
    let mut position: Option<FeedPosition> = None;
    loop {
        std::thread::sleep(FEED_POLL);
        let Some(local) = local.upgrade() else {
            return;
        };
        if let Err(e) = feed_step(path, &local, &mut position) {
            if local.tokens.is_live() {
                tracing::debug!("the change feed lost the database ({e}); the token cache is set aside until it is back");
                local.feed_lost();
            }
            position = None;
        }
    }
}

fn data_version(conn: &rusqlite::Connection) -> Result<i64, StoreError> {
    Ok(conn
        .prepare_cached("PRAGMA data_version")?
        .query_row([], |r| r.get(0))?)
}

/// One look at the database: (re)connects and resynchronises if needed, then applies the
/// changes committed since the last look.
fn feed_step(
    path: &Path,
    local: &Local,
    position: &mut Option<FeedPosition>,
) -> Result<(), StoreError> {
    let position = match position {
        Some(p) => p,
        None => {
            let conn = open_connection(path, false)?;
            // In this order: a commit after `data_version` is read moves it, and every change
            // after `last` is read from the log; entries filled before `distrust_all` are read
            // again, and reads that began before it cannot fill (`cache.rs`, rule 4).
            let data_version = data_version(&conn)?;
            let last: i64 = conn
                .prepare_cached("SELECT coalesce(max(seq), 0) FROM change_log")?
                .query_row([], |r| r.get(0))?;
            local.tokens.distrust_all();
            let throttles = conn
                .prepare_cached(
                    "SELECT scope, subject, until, reason FROM throttles WHERE until > ?1",
                )?
                .query_map([ts(Utc::now())], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, String>(3)?,
                    ))
                })?
                .collect::<Result<Vec<_>, _>>()?
                .into_iter()
                .filter_map(|(scope, subject, until, reason)| {
                    Some(super::cache::Throttle {
                        scope: super::cache::ThrottleScope::parse(&scope)?,
                        subject,
                        until: DateTime::parse_from_rfc3339(&until).ok()?.to_utc(),
                        reason,
                    })
                })
                .collect();
            local.resynced(throttles);
            position.insert(FeedPosition {
                conn,
                last,
                data_version,
            })
        }
    };
    let now = data_version(&position.conn)?;
    if now == position.data_version {
        return Ok(());
    }
    position.data_version = now;
    loop {
        let rows = position
            .conn
            .prepare_cached(
                "SELECT seq, kind, subject, detail FROM change_log WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            )?
            .query_map(params![position.last, FEED_BATCH], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        let Some(first) = rows.first() else {
            return Ok(());
        };
        if first.0 != position.last + 1 {
            // The log was pruned past our position: changes were missed.
            return Err(StoreError::Database(
                "the change feed fell behind the change log".into(),
            ));
        }
        let full = rows.len() as i64 == FEED_BATCH;
        for (seq, kind, subject, detail) in rows {
            let detail = serde_json::from_str(&detail).unwrap_or(serde_json::Value::Null);
            local.apply(&kind, &subject, &detail);
            position.last = seq;
        }
        if !full {
            return Ok(());
        }
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

/// Runs a sequence written against `Db` to completion. SQLite's `Db` never waits (rusqlite is
/// synchronous, and a write transaction already holds the lock), so the sequence finishes in
/// its first poll; a sequence that waited would be a bug, and fails loudly.
pub(super) fn drive<T>(sequence: impl std::future::Future<Output = T>) -> T {
    sequence
        .now_or_never()
        .expect("a sequence on SQLite never waits")
}

/// Timestamps are stored as fixed-width RFC 3339 in UTC with microseconds, so that SQL string
/// comparison is time comparison. Microseconds match PostgreSQL's precision.
pub(super) fn ts(t: DateTime<Utc>) -> String {
    t.trunc_subsecs(6)
        .to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// A SQLite session for the shared sequences: the writer's transaction, or a read connection.
pub(crate) struct SqliteDb<'a> {
    conn: &'a rusqlite::Connection,
    cx: Context<'a>,
    local: &'a Local,
}

impl SqliteDb<'_> {
    fn prepare(&self, sql: &str) -> Result<rusqlite::CachedStatement<'_>, StoreError> {
        self.local
            .counters
            .statements
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let stmt = self.conn.prepare_cached(sql)?;
        // Shared statements number their `$n` in order of first appearance (see `db.rs`);
        // SQLite numbers named parameters that way, so any other order would bind wrongly.
        #[cfg(debug_assertions)]
        for i in 1..=stmt.parameter_count() {
            assert_eq!(
                stmt.parameter_name(i),
                Some(format!("${i}").as_str()),
                "placeholders out of order in: {sql}"
            );
        }
        Ok(stmt)
    }
}

impl rusqlite::ToSql for Param<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        use rusqlite::types::Value;
        Ok(match *self {
            Param::Text(s) => s.into(),
            Param::OptText(s) => s.map_or(ToSqlOutput::Owned(Value::Null), ToSqlOutput::from),
            Param::Int(n) => n.into(),
            Param::Bool(b) => b.into(),
            Param::Time(t) => ToSqlOutput::Owned(Value::Text(ts(t))),
            Param::OptTime(t) => ToSqlOutput::Owned(t.map_or(Value::Null, |t| Value::Text(ts(t)))),
            Param::Bytes(b) => b.into(),
            Param::OptBytes(b) => b.map_or(ToSqlOutput::Owned(Value::Null), ToSqlOutput::from),
            Param::Json(v) => ToSqlOutput::Owned(Value::Text(v.to_string())),
            Param::OptJson(v) => {
                ToSqlOutput::Owned(v.map_or(Value::Null, |v| Value::Text(v.to_string())))
            }
        })
    }
}

struct SqliteRow<'r, 's>(&'r rusqlite::Row<'s>);

impl Row for SqliteRow<'_, '_> {
    fn cell(&self, i: usize) -> Result<Cell, StoreError> {
        use rusqlite::types::ValueRef;
        Ok(match self.0.get_ref(i)? {
            ValueRef::Null => Cell::Null,
            ValueRef::Integer(n) => Cell::Int(n),
            ValueRef::Text(t) => Cell::Text(
                std::str::from_utf8(t)
                    .map_err(|e| StoreError::Database(format!("column {i}: {e}")))?
                    .to_owned(),
            ),
            ValueRef::Blob(b) => Cell::Bytes(b.to_vec()),
            ValueRef::Real(_) => {
                return Err(StoreError::Database(format!(
                    "column {i} holds a real number, which no column of ours does"
                )))
            }
        })
    }
}

impl Db for SqliteDb<'_> {
    fn context(&self) -> &Context<'_> {
        &self.cx
    }

    async fn execute(&self, sql: &str, params: &[Param<'_>]) -> Result<u64, StoreError> {
        let changed = self
            .prepare(sql)?
            .execute(rusqlite::params_from_iter(params))?;
        Ok(changed as u64)
    }

    async fn query<T>(&self, sql: &str, params: &[Param<'_>], decode: Decode<T>) -> Rows<T> {
        let mut stmt = self.prepare(sql)?;
        let mut rows = stmt.query(rusqlite::params_from_iter(params))?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            out.push(decode(&SqliteRow(row))?);
        }
        Ok(out)
    }

    fn locks_rows(&self) -> bool {
        false
    }

    async fn lock_bot(&self, _provider: Provider, _bot: &str) -> Result<(), StoreError> {
        Ok(())
    }

    async fn lock_keys(&self) -> Result<(), StoreError> {
        Ok(())
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
    use crate::store::sql;

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

    /// Every shared statement prepares on a migrated SQLite database with its placeholders in
    /// order (a wrong order would bind values to the wrong columns).
    #[tokio::test]
    async fn every_console_filter_reads_an_index_in_id_order() {
        use crate::ledger::{ConnectionFilter, ConnectionStatus};
        let dir = tempfile::tempdir().unwrap();
        let keys = Arc::new(KeyRing::parse(&KeyRing::generate_entry()).unwrap());
        let store = SqliteStore::open(&dir.path().join("t.db"), keys, Clock::System)
            .await
            .unwrap();
        store.migrate().await.unwrap();
        let text = || Some("x".to_owned());
        let status = Some(ConnectionStatus::NeedsReauth);
        // Each filter (alone, beside a status, with a cursor) and the index that must answer
        // it: never a scan of the table, never a sort of what it found.
        type Case<'a> = (ConnectionFilter, Option<(&'a str, &'a str)>, &'a str);
        let cases: Vec<Case<'_>> = vec![
            (
                ConnectionFilter::default(),
                None,
                "sqlite_autoindex_connections_1",
            ),
            (
                ConnectionFilter {
                    status,
                    ..Default::default()
                },
                None,
                "connections_status",
            ),
            (
                ConnectionFilter {
                    end_user_id: text(),
                    status,
                    ..Default::default()
                },
                None,
                "connections_end_user",
            ),
            (
                ConnectionFilter {
                    workspace_id: text(),
                    ..Default::default()
                },
                None,
                "connections_workspace",
            ),
            (
                ConnectionFilter {
                    workspace_id: text(),
                    status,
                    ..Default::default()
                },
                None,
                "connections_workspace",
            ),
            (
                ConnectionFilter {
                    bot_id: text(),
                    status,
                    after: Some(crate::ids::ConnectionId::generate()),
                    ..Default::default()
                },
                None,
                "connections_bot",
            ),
        ];
        let mut cases = cases;
        for (column, index) in super::super::reads::SEARCHED.iter().map(|(c, _)| *c).zip([
            "sqlite_autoindex_connections_1",
            "connections_bot",
            "connections_workspace",
            "connections_end_user",
            "connections_workspace_name",
        ]) {
            cases.push((
                ConnectionFilter {
                    status,
                    ..Default::default()
                },
                Some((column, "x")),
                index,
            ));
        }
        for (filter, searched, index) in &cases {
            let (statement, params) = super::super::reads::connections_sql(filter, *searched, 50);
            let plan: Vec<String> = store
                .read(|db| {
                    let mut plan = db.prepare(&format!("EXPLAIN QUERY PLAN {statement}"))?;
                    for i in 1..=params.len() {
                        plan.raw_bind_parameter(i, 1)?;
                    }
                    let mut rows = plan.raw_query();
                    let mut lines = Vec::new();
                    while let Some(row) = rows.next()? {
                        lines.push(row.get::<_, String>(3)?);
                    }
                    Ok(lines)
                })
                .await
                .unwrap();
            let plan = plan.join(" | ");
            assert!(
                plan.contains(&format!("USING INDEX {index} "))
                    || plan.ends_with(&format!("USING INDEX {index}")),
                "{statement}: {plan}"
            );
            assert!(!plan.contains("TEMP B-TREE"), "{statement}: {plan}");
        }
    }

    #[tokio::test]
    async fn every_shared_statement_prepares_with_ordered_placeholders() {
        let dir = tempfile::tempdir().unwrap();
        let keys = Arc::new(KeyRing::parse(&KeyRing::generate_entry()).unwrap());
        let store = SqliteStore::open(&dir.path().join("t.db"), keys, Clock::System)
            .await
            .unwrap();
        store.migrate().await.unwrap();
        store
            .read(|db| {
                for statement in sql::ALL {
                    db.prepare(statement)?;
                }
                Ok(())
            })
            .await
            .unwrap();
    }
}
