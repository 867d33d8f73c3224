//! The store: one ledger over two backends (SQLite for the embedded default, PostgreSQL for several
//! processes), and the ledger rules kept inside the database's own transactions.
//!
//! Every operation that writes to a connection runs in one transaction that first takes that
//! connection's lock (SQLite: `BEGIN IMMEDIATE`; PostgreSQL: `SELECT … FOR UPDATE` on the
//! connection row, or a transaction-scoped advisory lock on `(provider, bot_id)` when the row
//! may not exist yet). So two processes on one database are as safe as one, and the invariants
//! below hold whatever the interleaving:
//!
//! 1. Nothing minted is lost: every `MintedPair` handed to `record_authorization` or
//!    `record_refresh` becomes a grant row, committed before the call returns.
//! 2. Append-only: grant rows are never deleted; the only updates set `superseded_at` or
//!    `revoked_at`, or re-seal the same plaintext under another key (`rotate_keys`).
//! 3. The current grant moves forward only: by an authorization of the connection, or by a
//!    refresh whose parent is still current. A refresh whose parent was superseded is stored
//!    superseded at birth.
//! 8. A re-authorization that returns the current access token is a confirmation event, not a
//!    new grant.
//!
//! Tokens are sealed (see `seal.rs`) inside the store, bound to `(connection, grant, column)`.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::clock::Clock;
use crate::ids::{AccessToken, AttemptId, ConnectionId, GrantId, SessionId};
use crate::ledger::{
    AuthorizationOutcome, ConnectSession, Connection, ConnectionFilter, ConnectionStatus, Event,
    FailureOutcome, Fence, GrantRecord, Job, JobKind, JobOutcome, JobStatus, LeaseHolder,
    LeaseOutcome, MintedPair, NewAuthorization, OpenGrant, RefreshCommit, RefreshFailure, Rescue,
    RotateProgress,
};
use crate::ledger::{BotImportOutcome, CheckRecorded, CheckResult, ImportedBot};
use crate::seal::{KeyRing, SealError};

pub mod cache;
mod db;
mod keys;
pub mod postgres;
mod reads;
mod rules;
mod sealed;
mod sql;
pub mod sqlite;

pub use cache::{CacheCounters, Throttle, ThrottleScope};
pub use keys::{KeyCheck, KeyRegistration};
use postgres::PgStore;
use sqlite::SqliteStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("connection {0} does not exist")]
    UnknownConnection(ConnectionId),
    #[error("{0}")]
    Conflict(String),
    #[error(
        "the database schema is at version {found}, newer than this binary knows ({supported}); \
         upgrade tokenkeeper before running it against this database"
    )]
    SchemaTooNew { found: i64, supported: i64 },
    #[error("the database schema is at version {found}, this binary needs {supported}: run `tokenkeeper migrate`")]
    SchemaBehind { found: i64, supported: i64 },
    #[error("a sealed token could not be opened: {0}")]
    Seal(#[from] SealError),
    /// A lock was not granted in time (PostgreSQL's `lock_timeout` or a cancelled statement).
    #[error("the database did not answer in time")]
    Timeout,
    /// The database cannot be reached, or cannot be written, right now: an outage. Callers are
    /// told at once (503 `database_unavailable`), and the store watches for its end.
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
    #[error("database error: {0}")]
    Database(String),
}

/// Which database a store runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A connection as stored, with its lease, which the API never shows.
#[derive(Debug, Clone)]
pub(crate) struct ConnectionRow {
    pub connection: Connection,
    pub lease_holder: Option<LeaseHolder>,
    pub lease_until: Option<DateTime<Utc>>,
    pub lease_fence: Fence,
    /// The grant the last health check introspected (`connection.last_check_result` says what
    /// it found).
    pub last_checked_grant: Option<GrantId>,
}

/// Rows counted by their state, database-wide (`Store::status_counts`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatusCounts {
    /// `(status, connections)`.
    pub connections: Vec<(String, i64)>,
    /// `(kind, status, jobs)`.
    pub jobs: Vec<(String, String, i64)>,
}

/// A connection's newest grants and events, newest first, and how many it has in all
/// (`Store::history`).
#[derive(Debug, Clone, Default)]
pub struct History {
    pub grants: Vec<GrantRecord>,
    pub grant_count: i64,
    pub events: Vec<Event>,
    pub event_count: i64,
}

/// How far the health check has come (`Store::check_progress`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CheckProgress {
    /// Active connections.
    pub active: i64,
    /// Active connections checked since the time asked about (one interval ago).
    pub checked_since: i64,
    /// Active connections never checked.
    pub never_checked: i64,
    /// When the least recently checked active connection was checked.
    pub oldest_check: Option<DateTime<Utc>>,
}

/// Which key ids the database uses (`Store::key_usage`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyUsage {
    /// Key ids that seal at least one grant.
    pub sealing_grants: std::collections::BTreeSet<String>,
    /// Key ids registered with the database (with a check value).
    pub registered: std::collections::BTreeSet<String>,
}

/// What a token read answers (`Store::read_token`): the connection's status and its current
/// grant's access token, from the token cache or the database.
#[derive(Debug, Clone)]
pub struct TokenView {
    pub status: ConnectionStatus,
    /// Why the connection needs re-authorization (read from the database: `needs_reauth` is
    /// never answered from the cache).
    pub diagnosis: Option<crate::ledger::Diagnosis>,
    pub workspace_id: String,
    pub grant: Option<TokenGrant>,
    pub source: TokenSource,
}

/// A current grant as a token read answers it: never its refresh token.
#[derive(Debug, Clone)]
pub struct TokenGrant {
    pub id: GrantId,
    pub obtained_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub access_token: AccessToken,
}

/// Where a token read's answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenSource {
    Database,
    /// A verified entry of the token cache: no change was missed.
    Cache,
    /// An entry of the token cache that could not be verified because the database could not
    /// be reached; no change of the connection was seen since it was filled.
    CacheDuringOutage,
}

/// The result of consuming a connect session's `state`.
#[derive(Debug, Clone)]
pub enum SessionLookup {
    /// The session was unused and unexpired; it is now marked used.
    Consumed(ConnectSession),
    Unknown,
    Expired(ConnectSession),
    AlreadyUsed(ConnectSession),
}

/// What `record_refresh` did.
#[derive(Debug, Clone)]
pub struct RefreshRecorded {
    pub grant_id: GrantId,
    pub commit: RefreshCommit,
    /// The connection's current grant after the commit (the new one, or the one that won).
    pub current: GrantId,
    /// Whether the commit brought the connection back from `needs_reauth`: a refresh of the
    /// current grant succeeded after another holder judged that grant dead.
    pub recovered: bool,
    /// The connection's status after the commit (`revoked`: the new pair must never be handed
    /// out).
    pub status: ConnectionStatus,
}

/// The ledger on one of its two databases. Every operation is written once (`rules.rs` for
/// writes, `reads.rs` for reads) and run here on whichever backend this store has: SQLite runs
/// it on its writer inside a blocking task, PostgreSQL on a pooled connection's transaction.
#[derive(Debug, Clone)]
pub struct Store {
    engine: Engine,
    health: Arc<Health>,
}

/// Whether the database answers. An outage is noticed by the first operation that meets it and
/// logged once; a prober then tries an empty write transaction every `PROBE_EVERY` and logs
/// once more when it succeeds, waking whoever waits for the database (the spill journal).
/// Operations during an outage are not held back: each tries and fails within the backends'
/// deadlines, so service resumes by itself the moment the database does.
#[derive(Debug)]
struct Health {
    /// `true` while the database answers (as far as we know).
    up: tokio::sync::watch::Sender<bool>,
}

/// How often an outage is probed for its end.
const PROBE_EVERY: Duration = Duration::from_millis(500);

#[derive(Debug, Clone)]
enum Engine {
    Sqlite(SqliteStore),
    Postgres(PgStore),
}

impl From<SqliteStore> for Store {
    fn from(s: SqliteStore) -> Self {
        Store::new(Engine::Sqlite(s))
    }
}

impl From<PgStore> for Store {
    fn from(p: PgStore) -> Self {
        Store::new(Engine::Postgres(p))
    }
}

/// Each backend's migrations, in order: the same numbers and names, each in its own SQL
/// dialect under `migrations/<backend>/`, each applied in its own transaction. A new
/// migration is one line here and one file per backend.
macro_rules! migrations {
    ($backend:literal) => {
        &[
            (1, $crate::store::migrations!($backend, "0001_ledger.sql")),
            (
                2,
                $crate::store::migrations!($backend, "0002_key_checks.sql"),
            ),
            (
                3,
                $crate::store::migrations!($backend, "0003_reusable_reconnect_links.sql"),
            ),
            (4, $crate::store::migrations!($backend, "0004_jobs.sql")),
            (
                5,
                $crate::store::migrations!($backend, "0005_import_and_health_checks.sql"),
            ),
            (
                6,
                $crate::store::migrations!($backend, "0006_console_indexes.sql"),
            ),
            (
                7,
                $crate::store::migrations!($backend, "0007_change_feed_and_throttles.sql"),
            ),
        ]
    };
    ($backend:literal, $file:literal) => {
        include_str!(concat!("../../migrations/", $backend, "/", $file))
    };
}
pub(crate) use migrations;

/// Runs `$body`, a future over `$db: &impl Db`, in one write transaction and commits it; any
/// error rolls it back. SQLite runs it on its one writer (the owned values it uses are moved
/// into a blocking task); PostgreSQL on a pooled connection.
macro_rules! in_transaction {
    ($store:expr, |$db:ident| $body:expr) => {
        in_transaction_then!($store, true, |$db| $body)
    };
}

/// `in_transaction!`, committed only if `$commit`; otherwise rolled back once `$body` is done.
macro_rules! in_transaction_then {
    ($store:expr, $commit:expr, |$db:ident| $body:expr) => {{
        let commit: bool = $commit;
        let result = match &$store.engine {
            Engine::Sqlite(s) => s.write_then(move |$db| sqlite::drive($body), commit).await,
            Engine::Postgres(p) => {
                async {
                    let mut client = p.client().await?;
                    let touched = cache::Touched::new(p.local());
                    let tx = client.transaction().await?;
                    let out = {
                        let $db = &p.session(&tx, Some(&touched));
                        $body.await?
                    };
                    if commit {
                        tx.commit().await?;
                    } else {
                        tx.rollback().await?;
                    }
                    Ok(out)
                }
                .await
            }
        };
        $store.observe(result)
    }};
}

/// Runs `$body`, a future over `$db: &impl Db`, on a read connection.
macro_rules! read_only {
    ($store:expr, |$db:ident| $body:expr) => {{
        let result = match &$store.engine {
            Engine::Sqlite(s) => s.read(|$db| sqlite::drive($body)).await,
            Engine::Postgres(p) => {
                async {
                    let client = p.client().await?;
                    let $db = &p.session(&client, None);
                    $body.await
                }
                .await
            }
        };
        $store.observe(result)
    }};
}

impl Store {
    fn new(engine: Engine) -> Self {
        Store {
            engine,
            health: Arc::new(Health {
                up: tokio::sync::watch::channel(true).0,
            }),
        }
    }

    /// Notes an outage that `result` reveals: the first one is logged, and a prober is started
    /// that logs its end.
    fn observe<T>(&self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        if let Err(StoreError::Unavailable(reason)) = &result {
            let started = self
                .health
                .up
                .send_if_modified(|up| std::mem::replace(up, false));
            if started {
                tracing::error!(
                    op = "database_outage",
                    phase = "start",
                    backend = %self.backend(),
                    reason = %reason,
                    "the database is unavailable ({reason}); calls that need it answer 503 \
                     database_unavailable until it is back"
                );
                let store = self.clone();
                tokio::spawn(async move { store.probe_until_up().await });
            }
        }
        result
    }

    async fn probe_until_up(&self) {
        let since = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(PROBE_EVERY).await;
            let probe = match &self.engine {
                Engine::Sqlite(s) => s.write(|_| Ok(())).await,
                Engine::Postgres(p) => p.ping().await,
            };
            if probe.is_ok() {
                tracing::warn!(
                    op = "database_outage",
                    phase = "end",
                    backend = %self.backend(),
                    outage_ms = since.elapsed().as_millis() as u64,
                    "the database is back"
                );
                self.health.up.send_replace(true);
                return;
            }
        }
    }

    /// Where this process delivers webhooks (see `webhooks.rs`): from now on, each event the
    /// ledger emits becomes one delivery job per endpoint, written with the change.
    pub fn set_webhook_endpoints(&self, endpoints: Vec<String>) {
        match &self.engine {
            Engine::Sqlite(s) => s.endpoints().set(endpoints),
            Engine::Postgres(p) => p.endpoints().set(endpoints),
        }
    }

    /// The key ring this store seals with.
    pub fn keys(&self) -> &KeyRing {
        match &self.engine {
            Engine::Sqlite(s) => s.keys(),
            Engine::Postgres(p) => p.keys(),
        }
    }

    fn local(&self) -> &std::sync::Arc<cache::Local> {
        match &self.engine {
            Engine::Sqlite(s) => s.local(),
            Engine::Postgres(p) => p.local(),
        }
    }

    /// Starts the change feed and turns the token cache on, with room for `capacity`
    /// connections (0: no cache; the feed still spreads throttles and wakes waiting refreshes).
    /// `serve` calls it once the schema is current; stores that never start it read the
    /// database every time.
    pub fn start_change_feed(&self, capacity: usize) -> Result<(), StoreError> {
        self.local().tokens.set_capacity(capacity);
        match &self.engine {
            Engine::Sqlite(s) => s.start_feed(),
            Engine::Postgres(p) => {
                p.start_feed();
                Ok(())
            }
        }
    }

    /// Whether the change feed is connected, so that the token cache is served and waiting
    /// refreshes are woken by other processes' commits.
    pub fn feed_is_live(&self) -> bool {
        self.local().tokens.is_live()
    }

    /// What the token cache and the change feed did so far (for `/metrics`).
    pub fn cache_counters(&self) -> &CacheCounters {
        &self.local().counters
    }

    /// Connections in the token cache now.
    pub fn cached_connections(&self) -> usize {
        self.local().tokens.len()
    }

    /// A registration that the change feed wakes when the connection changes (a commit of any
    /// process) or when the feed reconnects. Register before reading, then wait.
    pub fn watch_connection(&self, id: &ConnectionId) -> cache::Waiter<'_> {
        self.local().waiters.register(id)
    }

    /// The connection's status and current grant, as a token read answers them: from the token
    /// cache when a verified entry is there (no statement at all), else from the database (one
    /// indexed read, which fills the cache). When the database cannot be reached, an entry that
    /// could not be verified is answered as `CacheDuringOutage`; an entry that a change of the
    /// connection invalidated is never kept, so a superseded or revoked grant is never answered.
    pub async fn read_token(&self, id: &ConnectionId) -> Result<Option<TokenView>, StoreError> {
        use std::sync::atomic::Ordering::Relaxed;
        let local = self.local();
        let tokens = &local.tokens;
        let mut unverified = None;
        if tokens.enabled() {
            match tokens.get(id) {
                cache::Lookup::Fresh(entry) => {
                    local.counters.hits.fetch_add(1, Relaxed);
                    return self.view(id, &entry, TokenSource::Cache).map(Some);
                }
                cache::Lookup::Unverified(entry) => unverified = Some(entry),
                cache::Lookup::Miss => {}
            }
            if !self.is_up() {
                if let Some(entry) = &unverified {
                    local.counters.outage_hits.fetch_add(1, Relaxed);
                    return self
                        .view(id, entry, TokenSource::CacheDuringOutage)
                        .map(Some);
                }
            }
        }
        local.counters.misses.fetch_add(1, Relaxed);
        let ticket = tokens.ticket(id);
        let row = match read_only!(self, |db| reads::token_of_connection(db, id)) {
            Ok(Some(row)) => row,
            Ok(None) => return Ok(None),
            Err(StoreError::Unavailable(reason)) => {
                return match unverified {
                    Some(entry) => {
                        local.counters.outage_hits.fetch_add(1, Relaxed);
                        self.view(id, &entry, TokenSource::CacheDuringOutage)
                            .map(Some)
                    }
                    None => Err(StoreError::Unavailable(reason)),
                }
            }
            Err(e) => return Err(e),
        };
        let grant = match row.grant {
            Some((grant_id, obtained_at, expires_at, sealed)) => {
                let access_token = sealed::open_access(self.keys(), id, &grant_id, &sealed)?;
                let cacheable = match row.status {
                    ConnectionStatus::Active => Some(Some(cache::EntryGrant {
                        id: grant_id.clone(),
                        obtained_at,
                        expires_at,
                        sealed_access: sealed.into_boxed_slice(),
                    })),
                    ConnectionStatus::Revoked => Some(None),
                    ConnectionStatus::NeedsReauth => None,
                };
                if let Some(entry_grant) = cacheable {
                    tokens.fill(
                        ticket,
                        id,
                        cache::Entry::new(row.status, &row.workspace_id, entry_grant),
                    );
                }
                Some(TokenGrant {
                    id: grant_id,
                    obtained_at,
                    expires_at,
                    access_token,
                })
            }
            None => None,
        };
        Ok(Some(TokenView {
            status: row.status,
            diagnosis: row.diagnosis,
            workspace_id: row.workspace_id,
            grant,
            source: TokenSource::Database,
        }))
    }

    fn view(
        &self,
        id: &ConnectionId,
        entry: &cache::Entry,
        source: TokenSource,
    ) -> Result<TokenView, StoreError> {
        let grant = match &entry.grant {
            Some(g) => Some(TokenGrant {
                id: g.id.clone(),
                obtained_at: g.obtained_at,
                expires_at: g.expires_at,
                access_token: sealed::open_access(self.keys(), id, &g.id, &g.sealed_access)?,
            }),
            None => None,
        };
        Ok(TokenView {
            status: entry.status,
            diagnosis: None,
            workspace_id: entry.workspace_id.to_string(),
            grant,
            source,
        })
    }

    /// Records that Notion throttles `throttle.subject` until `throttle.until`, for every
    /// process: one small write, made only when Notion answers 429 or 529. This process knows
    /// at once; the others through the change feed.
    pub async fn record_throttle(&self, throttle: &Throttle) -> Result<(), StoreError> {
        self.learn_throttle(throttle);
        let t = throttle.clone();
        in_transaction!(self, |db| rules::record_throttle(db, &t))
    }

    /// Tells this process alone of a throttle, at once (`record_throttle` does it too, then
    /// tells the others).
    pub fn learn_throttle(&self, throttle: &Throttle) {
        self.local().throttles.learn(throttle.clone());
    }

    /// The gate that calls of `(scope, subject)` pass one at a time through, while it is
    /// careful after a throttle (`cache::Throttles`).
    pub fn throttle_gate(
        &self,
        scope: ThrottleScope,
        subject: &str,
    ) -> Option<std::sync::Arc<tokio::sync::Mutex<()>>> {
        self.local()
            .throttles
            .gate(scope, subject, chrono::Utc::now())
    }

    /// The throttle holding `(scope, subject)` now, as this process knows it.
    pub fn throttle(&self, scope: ThrottleScope, subject: &str) -> Option<Throttle> {
        self.local()
            .throttles
            .holding(scope, subject, chrono::Utc::now())
    }

    /// Whether the database answered the last time it was asked (false during an outage).
    pub fn is_up(&self) -> bool {
        *self.health.up.borrow()
    }

    /// Waits until the database answers again (at once when it does).
    pub async fn wait_until_up(&self) {
        let mut up = self.health.up.subscribe();
        let _ = up.wait_for(|up| *up).await;
    }

    pub fn backend(&self) -> Backend {
        match &self.engine {
            Engine::Sqlite(_) => Backend::Sqlite,
            Engine::Postgres(_) => Backend::Postgres,
        }
    }

    /// Applies every pending migration, in order, each in its own transaction; returns the
    /// schema version afterwards. Refuses a schema newer than this binary.
    pub async fn migrate(&self) -> Result<i64, StoreError> {
        match &self.engine {
            Engine::Sqlite(s) => s.migrate().await,
            Engine::Postgres(p) => p.migrate().await,
        }
    }

    /// Checks that the schema is exactly the version this binary knows.
    pub async fn check_schema(&self) -> Result<i64, StoreError> {
        let (found, supported) = match &self.engine {
            Engine::Sqlite(s) => (s.schema_version().await?, sqlite::SCHEMA_VERSION),
            Engine::Postgres(p) => (p.schema_version().await?, postgres::SCHEMA_VERSION),
        };
        match found.cmp(&supported) {
            std::cmp::Ordering::Greater => Err(StoreError::SchemaTooNew { found, supported }),
            std::cmp::Ordering::Less => Err(StoreError::SchemaBehind { found, supported }),
            std::cmp::Ordering::Equal => Ok(found),
        }
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        match &self.engine {
            Engine::Sqlite(s) => s.ping().await,
            Engine::Postgres(p) => p.ping().await,
        }
    }

    /// Connections by status and jobs by kind and status, database-wide, for the metrics'
    /// gauges. Each count scans (at a million connections, tens of milliseconds), so on SQLite
    /// it runs on the blocking pool rather than inline like the other reads, and the metrics
    /// call it at most once per interval, not per scrape.
    pub async fn status_counts(&self) -> Result<StatusCounts, StoreError> {
        let result = match &self.engine {
            Engine::Sqlite(s) => {
                let s = s.clone();
                tokio::task::spawn_blocking(move || {
                    tokio::runtime::Handle::current()
                        .block_on(s.read(|db| sqlite::drive(reads::status_counts(db))))
                })
                .await
                .unwrap_or_else(|e| Err(StoreError::Database(format!("counting failed: {e}"))))
            }
            Engine::Postgres(p) => {
                async {
                    let client = p.client().await?;
                    let db = &p.session(&client, None);
                    reads::status_counts(db).await
                }
                .await
            }
        };
        self.observe(result)
    }

    // Connect sessions.

    pub async fn create_session(&self, session: &ConnectSession) -> Result<(), StoreError> {
        let session = session.clone();
        in_transaction!(self, |db| rules::create_session(db, &session))
    }

    /// The reconnect link that 424 answers carry for `candidate.connection_id`: its live
    /// (unused, unexpired) reusable session with that session's `state`, or else `candidate`,
    /// stored with `state` sealed, and `state`. One transaction under the connection's lock,
    /// so a connection has at most one such session alive however many callers ask at once.
    pub async fn reconnect_link(
        &self,
        candidate: &ConnectSession,
        state: &str,
    ) -> Result<(ConnectSession, String), StoreError> {
        // Almost always the link exists already: hand it out from a read, without taking the
        // connection's lock (on SQLite, the database's write lock). The transaction looks again
        // under the lock before it makes one.
        if let Some(connection) = &candidate.connection_id {
            let live = read_only!(self, |db| reads::live_reconnect_link(db, connection))?;
            if let Some(live) = live {
                return Ok(live);
            }
        }
        let (candidate, state) = (candidate.clone(), state.to_owned());
        in_transaction!(self, |db| rules::reconnect_link(db, &candidate, &state))
    }

    pub async fn get_session(&self, id: &SessionId) -> Result<Option<ConnectSession>, StoreError> {
        read_only!(self, |db| reads::get_session(db, id))
    }

    /// Atomically marks the session whose `state_hash` this is as used, if it is unused and
    /// unexpired now. A second call with the same hash answers `AlreadyUsed`.
    pub async fn consume_session(&self, state_hash: &str) -> Result<SessionLookup, StoreError> {
        let state_hash = state_hash.to_owned();
        in_transaction!(self, |db| rules::consume_session(db, &state_hash))
    }

    // The ledger.

    /// Records a successful authorization (invariants 1, 3, 8). A plain connect lands on the
    /// live connection of its `bot_id`, or creates one; a reconnect always lands on its
    /// connection. A `Reconnect` whose new `bot_id` belongs to another live connection is a
    /// `Conflict`, and nothing is stored.
    pub async fn record_authorization(
        &self,
        auth: NewAuthorization,
    ) -> Result<AuthorizationOutcome, StoreError> {
        in_transaction!(self, |db| rules::record_authorization(db, &auth))
    }

    /// Records many authorizations in one transaction, each exactly as `record_authorization`
    /// records it (same sealing, rows and events); returns their connections in order. For bulk
    /// imports such as the benchmark's seeder. The batch must concern distinct bots and distinct
    /// reconnect targets (PostgreSQL pipelines them); one that does not is a `Conflict`, as is
    /// any authorization `record_authorization` would refuse, and then nothing of the batch is
    /// stored.
    pub async fn import_authorizations(
        &self,
        batch: Vec<NewAuthorization>,
    ) -> Result<Vec<ConnectionId>, StoreError> {
        check_distinct(&batch)?;
        in_transaction!(self, |db| rules::import_authorizations(db, &batch))
    }

    pub async fn get_connection(
        &self,
        id: &ConnectionId,
    ) -> Result<Option<Connection>, StoreError> {
        read_only!(self, |db| reads::get_connection(db, id))
    }

    pub async fn list_connections(
        &self,
        filter: &ConnectionFilter,
    ) -> Result<Vec<Connection>, StoreError> {
        read_only!(self, |db| reads::list_connections(db, filter))
    }

    /// The connection and its current grant with tokens opened; read-only (the hot path of
    /// token reads: one indexed read, no write).
    pub async fn current_grant(
        &self,
        id: &ConnectionId,
    ) -> Result<Option<(Connection, Option<OpenGrant>)>, StoreError> {
        read_only!(self, |db| reads::current_grant(db, id))
    }

    /// One grant with its tokens opened, current or not.
    pub async fn get_grant(
        &self,
        id: &ConnectionId,
        grant: &GrantId,
    ) -> Result<Option<OpenGrant>, StoreError> {
        read_only!(self, |db| reads::get_grant(db, id, grant))
    }

    /// A grant by id, whatever its connection, without its tokens.
    pub async fn grant_by_id(&self, grant: &GrantId) -> Result<Option<GrantRecord>, StoreError> {
        read_only!(self, |db| reads::grant_by_id(db, grant))
    }

    /// Every grant of the connection, oldest first.
    pub async fn list_grants(&self, id: &ConnectionId) -> Result<Vec<GrantRecord>, StoreError> {
        read_only!(self, |db| reads::list_grants(db, id))
    }

    /// Every event of the connection, oldest first.
    pub async fn list_events(&self, id: &ConnectionId) -> Result<Vec<Event>, StoreError> {
        read_only!(self, |db| reads::list_events(db, id))
    }

    /// Takes the connection's refresh lease for `lease` (invariant 4), if the current grant is
    /// `if_grant` (when given) and no unexpired lease is held. On success, bumps the fence,
    /// records the attempt (`refresh_started` event) before the caller calls the provider, and
    /// returns the current grant with its refresh token, read under the lock.
    pub async fn begin_refresh(
        &self,
        id: &ConnectionId,
        if_grant: Option<&GrantId>,
        holder: &LeaseHolder,
        lease: Duration,
    ) -> Result<LeaseOutcome, StoreError> {
        let (id, if_grant, holder) = (id.clone(), if_grant.cloned(), holder.clone());
        in_transaction!(self, |db| rules::begin_refresh(
            db,
            &id,
            if_grant.as_ref(),
            &holder,
            lease
        ))
    }

    /// Records a successful refresh of `parent` as grant `grant` (invariants 1 and 3): the
    /// new grant is always stored; it becomes current only if `parent` is still current, and
    /// then a connection in `needs_reauth` is recovered (the refresh proves it alive). Releases
    /// the lease if `fence` is still the connection's fence, and closes the attempt. Recording
    /// the same `grant` again (a retry whose answer was lost, a replay) changes nothing and
    /// answers what the first recording did.
    pub async fn record_refresh(
        &self,
        id: &ConnectionId,
        parent: &GrantId,
        fence: Fence,
        attempt: &AttemptId,
        grant: &GrantId,
        pair: MintedPair,
    ) -> Result<RefreshRecorded, StoreError> {
        let (id, parent, attempt, grant) =
            (id.clone(), parent.clone(), attempt.clone(), grant.clone());
        in_transaction!(self, |db| rules::record_refresh(
            db, &id, &parent, fence, &attempt, &grant, &pair, None
        ))
    }

    /// Records a rescue (invariant 5): `parent`, another grant of the connection whose refresh
    /// token was never used, was refreshed after the current grant's refresh token was refused.
    /// The new grant becomes current if the refused grant still is (else it is kept superseded
    /// at birth); the refused and the rescuing grants are superseded, and a `rescued` event says
    /// which grant saved the connection. Idempotent on `grant`, like `record_refresh`.
    #[allow(clippy::too_many_arguments)]
    pub async fn record_rescue(
        &self,
        id: &ConnectionId,
        parent: &GrantId,
        fence: Fence,
        attempt: &AttemptId,
        grant: &GrantId,
        pair: MintedPair,
        rescue: &Rescue,
    ) -> Result<RefreshRecorded, StoreError> {
        let (id, parent, attempt, grant, rescue) = (
            id.clone(),
            parent.clone(),
            attempt.clone(),
            grant.clone(),
            rescue.clone(),
        );
        in_transaction!(self, |db| rules::record_refresh(
            db,
            &id,
            &parent,
            fence,
            &attempt,
            &grant,
            &pair,
            Some(&rescue)
        ))
    }

    /// The connection's current grant, and the grants that may rescue it now that `refused`'s
    /// refresh token was refused: not revoked, their refresh token never used, newest first,
    /// at most ten. Read without a lock: the caller holds the refresh lease.
    pub async fn rescue_candidates(
        &self,
        id: &ConnectionId,
        refused: &GrantId,
    ) -> Result<(Option<GrantId>, Vec<OpenGrant>), StoreError> {
        read_only!(self, |db| rules::rescue_candidates(db, id, refused))
    }

    /// Records that the lease holder `fence` is about to try `candidate`'s refresh token for
    /// the refused grant (so that a crash in the middle names it, and it is never used twice);
    /// `None` when the lease has moved on to another holder.
    pub async fn begin_rescue_attempt(
        &self,
        id: &ConnectionId,
        refused: &GrantId,
        candidate: &GrantId,
        fence: Fence,
        holder: &LeaseHolder,
    ) -> Result<Option<AttemptId>, StoreError> {
        let (id, refused, candidate, holder) = (
            id.clone(),
            refused.clone(),
            candidate.clone(),
            holder.clone(),
        );
        in_transaction!(self, |db| rules::begin_rescue_attempt(
            db, &id, &refused, &candidate, fence, &holder
        ))
    }

    /// Records that a rescue candidate's refresh failed too.
    pub async fn record_rescue_refusal(
        &self,
        id: &ConnectionId,
        candidate: &GrantId,
        attempt: &AttemptId,
        failure: &RefreshFailure,
    ) -> Result<(), StoreError> {
        let (id, candidate, attempt, failure) = (
            id.clone(),
            candidate.clone(),
            attempt.clone(),
            failure.clone(),
        );
        in_transaction!(self, |db| rules::record_rescue_refusal(
            db, &id, &candidate, &attempt, &failure
        ))
    }

    /// Records a failed refresh of `parent` (invariant 5). A stale holder (fence moved on)
    /// changes nothing. If `parent` is no longer current, answers `AlreadyRotated`. If the
    /// failure is an auth failure and `parent` is current, the connection becomes
    /// `needs_reauth` with a diagnosis that names the grant, when it was obtained, and any
    /// interrupted earlier attempt with the same refresh token. Otherwise only an event.
    pub async fn record_refresh_failure(
        &self,
        id: &ConnectionId,
        parent: &GrantId,
        fence: Fence,
        attempt: &AttemptId,
        failure: &RefreshFailure,
    ) -> Result<FailureOutcome, StoreError> {
        let (id, parent, attempt, failure) =
            (id.clone(), parent.clone(), attempt.clone(), failure.clone());
        in_transaction!(self, |db| rules::record_refresh_failure(
            db, &id, &parent, fence, &attempt, &failure
        ))
    }

    /// Marks the connection `revoked` and its live grants revoked, keeps the history, and queues
    /// the upstream revocation of every token that may still be alive (`jobs`).
    pub async fn mark_revoked(
        &self,
        id: &ConnectionId,
        reason: &str,
    ) -> Result<Connection, StoreError> {
        let (id, reason) = (id.clone(), reason.to_owned());
        in_transaction!(self, |db| rules::mark_revoked(db, &id, &reason))
    }

    /// Checks the store's key ring against the database (invariant 11), in one transaction under
    /// the key lock: every key id that seals a grant must be in the ring and open, by its check
    /// value or, for a key id from before key checks, by opening one of its grants; and every
    /// registered key id the ring has must open its check value. If the ring opens everything,
    /// registers the key ids proven by grants and, as `registration` allows, the active key;
    /// otherwise writes nothing. The report says which key ids failed.
    pub async fn check_keys(&self, registration: KeyRegistration) -> Result<KeyCheck, StoreError> {
        in_transaction!(self, |db| keys::check_keys(db, registration))
    }

    /// `check_keys`, rolled back: what the check would find and register, with nothing written
    /// (a dry run's).
    pub async fn check_keys_without_writing(
        &self,
        registration: KeyRegistration,
    ) -> Result<KeyCheck, StoreError> {
        in_transaction_then!(self, false, |db| keys::check_keys(db, registration))
    }

    /// Every key id the database holds a sealed value of (grants and key checks); needs no key.
    pub async fn sealed_key_ids(&self) -> Result<std::collections::BTreeSet<String>, StoreError> {
        read_only!(self, |db| keys::sealed_key_ids(db))
    }

    /// Claims up to `limit` due jobs (of one connection, or any; webhook deliveries only with
    /// `webhooks`), for `hold_for`: nobody else claims them until then, and they come due again
    /// then if their worker died. Workers in several processes never claim the same job at once.
    pub async fn claim_jobs(
        &self,
        connection: Option<&ConnectionId>,
        limit: u32,
        hold_for: Duration,
        webhooks: bool,
    ) -> Result<Vec<Job>, StoreError> {
        let connection = connection.cloned();
        in_transaction!(self, |db| rules::claim_jobs(
            db,
            connection.as_ref(),
            limit,
            hold_for,
            webhooks
        ))
    }

    /// Records what a claimed job's attempt came to; a revocation that is done or failed for
    /// good is also an event of its connection.
    pub async fn finish_job(&self, job: &Job, outcome: &JobOutcome) -> Result<(), StoreError> {
        let (job, outcome) = (job.clone(), outcome.clone());
        in_transaction!(self, |db| rules::finish_job(db, &job, &outcome))
    }

    /// Jobs of one kind, newest first (webhook deliveries, for `GET /v1/webhook-deliveries`).
    pub async fn list_jobs(
        &self,
        kind: JobKind,
        status: Option<JobStatus>,
        before: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Job>, StoreError> {
        read_only!(self, |db| reads::list_jobs(db, kind, status, before, limit))
    }

    /// Makes a job of `kind` due again now, whatever became of it; `None` when there is no
    /// such job.
    pub async fn retry_job(&self, id: &str, kind: JobKind) -> Result<Option<Job>, StoreError> {
        let id = id.to_owned();
        in_transaction!(self, |db| rules::retry_job(db, &id, kind))
    }

    /// The connection's jobs of one kind, oldest first.
    pub async fn jobs_of_connection(
        &self,
        id: &ConnectionId,
        kind: JobKind,
    ) -> Result<Vec<Job>, StoreError> {
        read_only!(self, |db| rules::jobs_of_connection(db, id, kind))
    }

    /// How many refresh attempts (rescues included) of the connection since `since`, in every
    /// process, minted or may have minted a pair (refused and throttled ones did not): what
    /// the per-connection refresh cap counts.
    pub async fn refresh_attempts_since(
        &self,
        id: &ConnectionId,
        since: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        read_only!(self, |db| rules::refresh_attempts_since(db, id, since))
    }

    /// Records that the provider refused `grant`'s fresh token (a `token_rejected` event).
    pub async fn record_token_rejected(
        &self,
        id: &ConnectionId,
        grant: &GrantId,
        detail: serde_json::Value,
    ) -> Result<(), StoreError> {
        let (id, grant) = (id.clone(), grant.clone());
        in_transaction!(self, |db| rules::record_token_rejected(
            db, &id, &grant, &detail
        ))
    }

    /// Records bots of an existing token store (`tokenkeeper import`), in one transaction,
    /// each under its bot's lock as every ledger write is, so an import can run while `serve`
    /// does. A pair the ledger already holds for the bot is recognised by its fingerprints and
    /// not written again (a second import writes nothing); a bot with a live connection gets
    /// the pairs it lacks, superseded; any other bot gets a new connection (see
    /// `rules::import_bot`). The batch must name distinct bots; it is sorted by bot id here.
    /// With `commit` false everything is rolled back at the end (`--dry-run`), and the outcomes
    /// say what would have been written.
    pub async fn import_bots(
        &self,
        mut batch: Vec<ImportedBot>,
        commit: bool,
    ) -> Result<Vec<BotImportOutcome>, StoreError> {
        let mut order: Vec<usize> = (0..batch.len()).collect();
        order.sort_by(|&a, &b| batch[a].bot_id.0.cmp(&batch[b].bot_id.0));
        if order.windows(2).any(|w| {
            batch[w[0]].provider == batch[w[1]].provider && batch[w[0]].bot_id == batch[w[1]].bot_id
        }) {
            return Err(StoreError::Conflict(
                "an import batch names one bot twice".into(),
            ));
        }
        // Sorted for the locks; answered in the caller's order.
        let mut sorted: Vec<Option<ImportedBot>> = batch.drain(..).map(Some).collect();
        let sorted_batch: Vec<ImportedBot> = order
            .iter()
            .map(|&i| sorted[i].take().expect("each index once"))
            .collect();
        let outcomes =
            in_transaction_then!(self, commit, |db| rules::import_bots(db, &sorted_batch))?;
        let mut answered: Vec<Option<BotImportOutcome>> = vec![None; order.len()];
        for (outcome, &i) in outcomes.into_iter().zip(&order) {
            answered[i] = Some(outcome);
        }
        Ok(answered
            .into_iter()
            .map(|o| o.expect("every bot answered"))
            .collect())
    }

    /// The fingerprints (access, refresh) of every pair the ledger holds for each bot, in the
    /// order given: what lets `import --verify` skip bots an earlier run already imported.
    pub async fn held_pairs(
        &self,
        bots: &[String],
    ) -> Result<Vec<Vec<(String, Option<String>)>>, StoreError> {
        read_only!(self, |db| reads::held_pairs(db, bots))
    }

    /// Records what the health check found of `grant`'s access token, if `grant` is still the
    /// connection's current grant (an inactive token is also a `token_inactive` event). Says
    /// what the connection is now.
    pub async fn record_check(
        &self,
        id: &ConnectionId,
        grant: &GrantId,
        result: CheckResult,
    ) -> Result<CheckRecorded, StoreError> {
        let (id, grant) = (id.clone(), grant.clone());
        in_transaction!(self, |db| rules::record_check(db, &id, &grant, result))
    }

    /// Introspection found `grant`'s access token inactive and it has no refresh token, so no
    /// refresh can judge it: if it is still the current grant of an active connection, the
    /// connection becomes `needs_reauth` ("introspection found the token inactive"). Answers
    /// whether it did.
    pub async fn mark_inactive_without_refresh(
        &self,
        id: &ConnectionId,
        grant: &GrantId,
    ) -> Result<bool, StoreError> {
        let (id, grant) = (id.clone(), grant.clone());
        in_transaction!(self, |db| rules::mark_inactive_without_refresh(
            db, &id, &grant
        ))
    }

    /// Takes or renews the named lease that lets one process at a time do a job for all (the
    /// health check's sweeper) for `lease`; `None` while another holder's lease is unexpired.
    pub async fn take_sweeper_lease(
        &self,
        name: &str,
        holder: &LeaseHolder,
        lease: Duration,
    ) -> Result<Option<Fence>, StoreError> {
        let (name, holder) = (name.to_owned(), holder.clone());
        in_transaction!(self, |db| rules::take_sweeper_lease(
            db, &name, &holder, lease
        ))
    }

    /// Up to `limit` active connections whose last check is at or before `checked_before`
    /// (or that were never checked), least recently checked first, with their current grant.
    pub async fn due_checks(
        &self,
        checked_before: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<(ConnectionId, GrantId)>, StoreError> {
        read_only!(self, |db| rules::due_checks(db, checked_before, limit))
    }

    /// How many connections are active, and when the least recently checked of them was
    /// checked: what the sweeper paces itself by.
    pub async fn check_schedule(&self) -> Result<(u64, Option<DateTime<Utc>>), StoreError> {
        read_only!(self, |db| rules::check_schedule(db))
    }

    // The admin console's reads.

    /// The connection's newest grants and events, at most `limit` of each, and how many it
    /// has in all.
    pub async fn history(&self, id: &ConnectionId, limit: u32) -> Result<History, StoreError> {
        read_only!(self, |db| reads::history(db, id, limit))
    }

    /// The connection's newest jobs of `kind` (its webhook deliveries), newest first.
    pub async fn recent_jobs_of_connection(
        &self,
        id: &ConnectionId,
        kind: JobKind,
        limit: u32,
    ) -> Result<Vec<Job>, StoreError> {
        read_only!(self, |db| reads::recent_jobs_of_connection(
            db, id, kind, limit
        ))
    }

    /// How far the health check has come since `since` (one interval ago).
    pub async fn check_progress(&self, since: DateTime<Utc>) -> Result<CheckProgress, StoreError> {
        read_only!(self, |db| reads::check_progress(db, since))
    }

    /// The key ids that seal grants and those registered with the database.
    pub async fn key_usage(&self) -> Result<KeyUsage, StoreError> {
        read_only!(self, |db| reads::key_usage(db))
    }

    /// Re-seals up to `batch` grants that are not sealed with the active key, in one
    /// transaction, and says how many remain. Safe to run while serving.
    pub async fn rotate_keys(&self, batch: u32) -> Result<RotateProgress, StoreError> {
        in_transaction!(self, |db| rules::rotate_keys(db, batch))
    }
}

/// Refuses a batch for `import_authorizations` that names one bot, or one reconnect target,
/// twice.
fn check_distinct(batch: &[NewAuthorization]) -> Result<(), StoreError> {
    let mut bots = std::collections::HashSet::new();
    let mut targets = std::collections::HashSet::new();
    for auth in batch {
        if !bots.insert((auth.provider, auth.pair.bot_id.0.as_str())) {
            return Err(StoreError::Conflict(format!(
                "the import names bot {} twice",
                auth.pair.bot_id
            )));
        }
        if let crate::ledger::AuthorizationTarget::Reconnect { connection_id } = &auth.target {
            if !targets.insert(connection_id.as_str()) {
                return Err(StoreError::Conflict(format!(
                    "the import reconnects {connection_id} twice"
                )));
            }
        }
    }
    Ok(())
}

/// Where the data lives, parsed from `TOKENKEEPER_DATABASE_URL`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseUrl {
    /// `sqlite://relative/path.db` or `sqlite:///absolute/path.db`.
    Sqlite(std::path::PathBuf),
    /// `postgres://…` or `postgresql://…`, passed to the driver as is.
    Postgres(String),
}

impl DatabaseUrl {
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("sqlite://") {
            if path.is_empty() {
                return Err("sqlite:// needs a file path, as in sqlite://tokenkeeper.db".into());
            }
            let path = path.split('?').next().unwrap_or(path);
            return Ok(DatabaseUrl::Sqlite(path.into()));
        }
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            s.parse::<tokio_postgres::Config>()
                .map_err(|e| format!("not a valid PostgreSQL URL: {e}"))?;
            return Ok(DatabaseUrl::Postgres(s.to_owned()));
        }
        Err("expected sqlite://<file> or postgres://<user>@<host>/<database>".into())
    }
}

/// Opens the store the URL names. Does not migrate.
pub async fn open(
    url: &DatabaseUrl,
    keys: Arc<KeyRing>,
    clock: Clock,
) -> Result<Store, StoreError> {
    Ok(match url {
        DatabaseUrl::Sqlite(path) => SqliteStore::open(path, keys, clock).await?.into(),
        DatabaseUrl::Postgres(url) => PgStore::connect(url, None, keys, clock).await?.into(),
    })
}
