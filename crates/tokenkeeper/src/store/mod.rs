//! The store: one trait, two backends (SQLite for the embedded default, PostgreSQL for several
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

use async_trait::async_trait;

use crate::clock::Clock;
use crate::ids::{AttemptId, ConnectionId, GrantId, SessionId};
use crate::ledger::{
    AuthorizationOutcome, ConnectSession, Connection, ConnectionFilter, Event, FailureOutcome,
    GrantRecord, LeaseOutcome, MintedPair, NewAuthorization, OpenGrant, RefreshCommit,
    RefreshFailure, RotateProgress,
};
use crate::seal::{KeyRing, SealError};

mod common;
pub mod postgres;
mod sealed;
pub mod sqlite;

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
    #[error("the database did not answer in time")]
    Timeout,
    #[error("database error: {0}")]
    Database(String),
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
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// `"sqlite"` or `"postgres"`.
    fn backend(&self) -> &'static str;

    /// Applies every pending migration, in order, each in its own transaction; returns the
    /// schema version afterwards. Refuses a schema newer than this binary.
    async fn migrate(&self) -> Result<i64, StoreError>;

    /// Checks that the schema is exactly the version this binary knows.
    async fn check_schema(&self) -> Result<i64, StoreError>;

    async fn ping(&self) -> Result<(), StoreError>;

    // Connect sessions.

    async fn create_session(&self, session: &ConnectSession) -> Result<(), StoreError>;
    async fn get_session(&self, id: &SessionId) -> Result<Option<ConnectSession>, StoreError>;
    /// Atomically marks the session whose `state_hash` this is as used, if it is unused and
    /// unexpired now. A second call with the same hash answers `AlreadyUsed`.
    async fn consume_session(&self, state_hash: &str) -> Result<SessionLookup, StoreError>;

    // The ledger.

    /// Records a successful authorization (invariants 1, 3, 8). See `AuthorizationTarget` for
    /// where it lands. A `Reconnect` whose new `bot_id` belongs to another live connection is a
    /// `Conflict`, and nothing is stored.
    async fn record_authorization(
        &self,
        auth: NewAuthorization,
    ) -> Result<AuthorizationOutcome, StoreError>;

    /// Records many authorizations in one transaction, each exactly as `record_authorization`
    /// records it (same sealing, rows and events); returns their connections in order. For bulk
    /// imports such as the benchmark's seeder. The batch must concern distinct bots and distinct
    /// reconnect targets (the PostgreSQL backend pipelines them); one that does not is a
    /// `Conflict`, as is any authorization `record_authorization` would refuse, and then
    /// nothing of the batch is stored.
    async fn import_authorizations(
        &self,
        batch: Vec<NewAuthorization>,
    ) -> Result<Vec<ConnectionId>, StoreError>;

    async fn get_connection(&self, id: &ConnectionId) -> Result<Option<Connection>, StoreError>;
    async fn list_connections(
        &self,
        filter: &ConnectionFilter,
    ) -> Result<Vec<Connection>, StoreError>;

    /// The connection and its current grant with tokens opened; read-only (the hot path of
    /// token reads: one indexed read, no write).
    async fn current_grant(
        &self,
        id: &ConnectionId,
    ) -> Result<Option<(Connection, Option<OpenGrant>)>, StoreError>;

    /// One grant with its tokens opened, current or not.
    async fn get_grant(
        &self,
        id: &ConnectionId,
        grant: &GrantId,
    ) -> Result<Option<OpenGrant>, StoreError>;

    /// Every grant of the connection, oldest first.
    async fn list_grants(&self, id: &ConnectionId) -> Result<Vec<GrantRecord>, StoreError>;

    /// Every event of the connection, oldest first.
    async fn list_events(&self, id: &ConnectionId) -> Result<Vec<Event>, StoreError>;

    /// Takes the connection's refresh lease for `lease` (invariant 4), if the current grant is
    /// `if_grant` (when given) and no unexpired lease is held. On success, bumps the fence,
    /// records the attempt (`refresh_started` event) before the caller calls the provider, and
    /// returns the current grant with its refresh token, read under the lock.
    async fn begin_refresh(
        &self,
        id: &ConnectionId,
        if_grant: Option<&GrantId>,
        holder: &str,
        lease: Duration,
    ) -> Result<LeaseOutcome, StoreError>;

    /// Records a successful refresh of `parent` (invariants 1 and 3): the new grant is always
    /// stored; it becomes current only if `parent` is still current. Releases the lease if
    /// `fence` is still the connection's fence, and closes the attempt.
    async fn record_refresh(
        &self,
        id: &ConnectionId,
        parent: &GrantId,
        fence: i64,
        attempt: &AttemptId,
        pair: MintedPair,
    ) -> Result<RefreshRecorded, StoreError>;

    /// Records a failed refresh of `parent` (invariant 5). A stale holder (fence moved on)
    /// changes nothing. If `parent` is no longer current, answers `AlreadyRotated`. If the
    /// failure is an auth failure and `parent` is current, the connection becomes
    /// `needs_reauth` with a diagnosis that names the grant, when it was obtained, and any
    /// interrupted earlier attempt with the same refresh token. Otherwise only an event.
    async fn record_refresh_failure(
        &self,
        id: &ConnectionId,
        parent: &GrantId,
        fence: i64,
        attempt: &AttemptId,
        failure: &RefreshFailure,
    ) -> Result<FailureOutcome, StoreError>;

    /// Marks the connection `needs_reauth` because `grant` was found dead (for example a 401
    /// after a refresh), if `grant` is still current. Returns the connection afterwards.
    async fn mark_needs_reauth(
        &self,
        id: &ConnectionId,
        grant: &GrantId,
        diagnosis: serde_json::Value,
    ) -> Result<Connection, StoreError>;

    /// Marks the connection `revoked` and its live grants revoked; keeps the history.
    async fn mark_revoked(&self, id: &ConnectionId, reason: &str)
        -> Result<Connection, StoreError>;

    /// Re-seals up to `batch` grants that are not sealed with the active key, in one
    /// transaction, and says how many remain. Safe to run while serving.
    async fn rotate_keys(&self, batch: u32) -> Result<RotateProgress, StoreError>;
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
) -> Result<Arc<dyn Store>, StoreError> {
    Ok(match url {
        DatabaseUrl::Sqlite(path) => Arc::new(sqlite::SqliteStore::open(path, keys, clock).await?),
        DatabaseUrl::Postgres(url) => {
            Arc::new(postgres::PgStore::connect(url, None, keys, clock).await?)
        }
    })
}
