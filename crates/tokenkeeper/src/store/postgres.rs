//! The PostgreSQL backend: several tokenkeeper processes behind a load balancer, one database.
//!
//! Every write is one transaction that first locks what it changes (see `postgres/ledger.rs`):
//! the connection's row with `SELECT … FOR UPDATE`, or an advisory lock on `(provider, bot_id)`
//! when the connection may not exist yet. A partial unique index backs "one live connection per
//! `(provider, bot_id)`". Reads take no lock.
//!
//! The schema lives in the first schema of the session's `search_path`: the URL may name one
//! (`?options=-csearch_path%3Dtk`), or `PgStore::connect` may be given one, which it creates.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use chrono::{DateTime, SubsecRound, Utc};
use deadpool_postgres::{GenericClient, Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{IsNull, ToSql, Type};
use tokio_postgres::NoTls;

use super::cache::{Local, Touched};
use super::db::{Cell, Context, Db, Decode, Endpoints, Param, Row, Rows};
use super::StoreError;
use crate::clock::Clock;
use crate::ledger::Provider;
use crate::seal::KeyRing;

/// The migrations this binary knows, in order (`store::migrations!`).
const MIGRATIONS: &[(i64, &str)] = super::migrations!("postgres");

/// The schema version this binary runs against.
pub const SCHEMA_VERSION: i64 = MIGRATIONS[MIGRATIONS.len() - 1].0;

/// Pooled connections per process.
const POOL_SIZE: usize = 16;

/// How long a caller waits for a new connection to be made, and for a pooled one to be free:
/// beyond this the database counts as unavailable, and the caller hears so at once
/// (invariant 10: no call waits on a dead pool for more than a couple of seconds).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const POOL_WAIT_TIMEOUT: Duration = Duration::from_secs(2);

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        match e.code() {
            Some(c) if *c == SqlState::UNIQUE_VIOLATION => {
                StoreError::Conflict(match e.as_db_error() {
                    Some(db) => db.message().to_owned(),
                    None => e.to_string(),
                })
            }
            Some(c) if *c == SqlState::LOCK_NOT_AVAILABLE || *c == SqlState::QUERY_CANCELED => {
                StoreError::Timeout
            }
            // No answer from the server at all (a closed or refused connection, a timeout), or
            // the server says it is going away or cannot take us now: an outage, not a bug. An
            // error of our own making (a parameter that does not serialize) is neither.
            None if is_transport(&e) => StoreError::Unavailable(e.to_string()),
            None => StoreError::Database(e.to_string()),
            Some(c)
                if c.code().starts_with("08")
                    || *c == SqlState::ADMIN_SHUTDOWN
                    || *c == SqlState::CRASH_SHUTDOWN
                    || *c == SqlState::CANNOT_CONNECT_NOW
                    || *c == SqlState::TOO_MANY_CONNECTIONS =>
            {
                StoreError::Unavailable(e.to_string())
            }
            _ => StoreError::Database(match e.as_db_error() {
                Some(db) => format!("{}: {}", db.code().code(), db.message()),
                None => e.to_string(),
            }),
        }
    }
}

/// Whether an error without a SQL state comes from the connection itself rather than from us.
fn is_transport(e: &tokio_postgres::Error) -> bool {
    use std::error::Error;
    e.is_closed()
        || e.source().is_some_and(|s| s.is::<std::io::Error>())
        || e.to_string().starts_with("error connecting to server")
        || e.to_string().starts_with("timeout")
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            deadpool_postgres::PoolError::Timeout(_) => {
                StoreError::Unavailable("no database connection within the pool's deadline".into())
            }
            deadpool_postgres::PoolError::Backend(e) => e.into(),
            other => StoreError::Unavailable(other.to_string()),
        }
    }
}

#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
    keys: Arc<KeyRing>,
    clock: Clock,
    endpoints: Arc<Endpoints>,
    /// How the pool connects (schema included): the change feed's connection is made the same
    /// way, outside the pool. Boxed: it is large, and only the feed reads it.
    config: Box<tokio_postgres::Config>,
    /// The token cache, throttles and waiters this store shares with its change feed.
    local: Arc<Local>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").finish_non_exhaustive()
    }
}

/// A schema name we are willing to splice into SQL and startup options.
fn valid_schema(s: &str) -> bool {
    let mut bytes = s.bytes();
    matches!(bytes.next(), Some(b'a'..=b'z' | b'_'))
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && s.len() <= 63
}

impl PgStore {
    /// Connects a pool to `url`. With `schema`, the schema is created if missing and every
    /// pooled connection works in it. Does not migrate.
    pub async fn connect(
        url: &str,
        schema: Option<&str>,
        keys: Arc<KeyRing>,
        clock: Clock,
    ) -> Result<Self, StoreError> {
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| StoreError::Database(format!("not a valid PostgreSQL URL: {e}")))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if let Some(schema) = schema {
            if !valid_schema(schema) {
                return Err(StoreError::Database(format!(
                    "schema name {schema:?} is not valid: use lowercase letters, digits and '_'"
                )));
            }
            let (client, connection) = config.connect(NoTls).await?;
            let driver = tokio::spawn(connection);
            let created = client
                .batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {schema}"))
                .await;
            drop(client);
            let _ = driver.await;
            match created {
                // Two processes creating the same schema at once: the loser sees a duplicate.
                Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {}
                other => other?,
            }
            let options = match config.get_options() {
                Some(existing) => format!("{existing} -c search_path={schema}"),
                None => format!("-c search_path={schema}"),
            };
            config.options(&options);
        }
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .wait_timeout(Some(POOL_WAIT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| {
                StoreError::Database(format!("could not build the connection pool: {e}"))
            })?;
        // Fail at start, with the driver's reason, rather than on the first request.
        drop(pool.get().await?);
        Ok(PgStore {
            pool,
            keys,
            clock,
            endpoints: Arc::default(),
            config: Box::new(config),
            local: Local::new(0),
        })
    }

    pub(super) fn local(&self) -> &Arc<Local> {
        &self.local
    }

    pub(super) fn keys(&self) -> &KeyRing {
        &self.keys
    }

    pub(super) fn endpoints(&self) -> &Endpoints {
        &self.endpoints
    }

    pub(super) async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        Ok(self.pool.get().await?)
    }

    /// A session for the shared sequences on `client`: a transaction (with the guard of the
    /// connections it changes), or a pooled connection.
    pub(super) fn session<'a, C: GenericClient>(
        &'a self,
        client: &'a C,
        touched: Option<&'a Touched>,
    ) -> PgDb<'a, C> {
        PgDb {
            client,
            cx: Context::new(&self.keys, &self.clock, &self.endpoints, touched),
            local: &self.local,
        }
    }

    pub(super) async fn migrate(&self) -> Result<i64, StoreError> {
        // One migration per transaction, each under an advisory lock (per schema) and re-reading
        // the version, so two processes migrating at once apply each migration exactly once.
        loop {
            let mut client = self.client().await?;
            let tx = client.transaction().await?;
            tx.batch_execute(
                "SELECT pg_advisory_xact_lock(hashtextextended('tokenkeeper/migrate|' || coalesce(current_schema(), ''), 0));
                 CREATE TABLE IF NOT EXISTS schema_migrations (version bigint PRIMARY KEY, applied_at timestamptz NOT NULL);",
            )
            .await?;
            let found = schema_version(&tx).await?;
            if found > SCHEMA_VERSION {
                return Err(StoreError::SchemaTooNew {
                    found,
                    supported: SCHEMA_VERSION,
                });
            }
            let Some((version, sql)) = MIGRATIONS.iter().find(|(v, _)| *v > found) else {
                tx.commit().await?;
                return Ok(SCHEMA_VERSION);
            };
            tx.batch_execute(sql).await?;
            tx.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)",
                &[version, &self.session(&tx, None).now()],
            )
            .await?;
            tx.commit().await?;
        }
    }

    pub(super) async fn schema_version(&self) -> Result<i64, StoreError> {
        schema_version(&self.client().await?).await
    }

    pub(super) async fn ping(&self) -> Result<(), StoreError> {
        self.client().await?.simple_query("SELECT 1").await?;
        Ok(())
    }
}

/// The channel of the change feed (migration 0007).
const CHANNEL: &str = "tokenkeeper_changes";
/// How often the feed's connection is asked whether it is still there: a connection that died
/// without a word (a network partition) is noticed within this plus `CONNECT_TIMEOUT`.
const FEED_PING: Duration = Duration::from_secs(5);
/// Notifications waiting to be applied at most; beyond, the feed reconnects and re-validates
/// everything rather than queue without bound (invariant 10).
const FEED_QUEUE: usize = 10_000;

impl PgStore {
    /// Starts the change feed: a task that listens on `tokenkeeper_changes` on a connection of
    /// its own, applies each notification of this schema as it arrives, and reconnects when the
    /// connection drops (every entry of the cache is then read again before it is served). It
    /// ends when the store is dropped.
    pub(super) fn start_feed(&self) {
        let config = (*self.config).clone();
        let local = Arc::downgrade(&self.local);
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                if local.strong_count() == 0 {
                    return;
                }
                let result = listen(&config, &local).await;
                if let Some(local) = local.upgrade() {
                    if local.tokens.is_live() {
                        tracing::debug!("the change feed's connection ended ({result:?}); the token cache is set aside until it is back");
                        local.feed_lost();
                        backoff = Duration::from_millis(100);
                    }
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        });
    }
}

/// One connection of the change feed, until it fails or the store is dropped.
async fn listen(
    config: &tokio_postgres::Config,
    local: &std::sync::Weak<Local>,
) -> Result<(), StoreError> {
    use futures::StreamExt;
    use tokio_postgres::AsyncMessage;
    let (client, mut connection) = config.connect(NoTls).await?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<tokio_postgres::Notification>(FEED_QUEUE);
    // The connection is driven here; a full queue ends it, and with it the feed's connection.
    let driver = tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let AsyncMessage::Notification(n) = message {
                if tx.try_send(n).is_err() {
                    return;
                }
            }
        }
    });
    let _stop_driver = AbortOnDrop(driver);
    let schema: String = client
        .query_one("SELECT current_schema()::text", &[])
        .await?
        .try_get(0)?;
    client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
    // Listening from here: every later commit is delivered. Entries filled before are read
    // again, and reads that began before cannot fill (`cache.rs`, rule 4).
    let throttles = client
        .query(
            "SELECT scope, subject, until, reason FROM throttles WHERE until > now()",
            &[],
        )
        .await?
        .into_iter()
        .filter_map(|row| {
            Some(super::cache::Throttle {
                scope: super::cache::ThrottleScope::parse(row.try_get::<_, &str>(0).ok()?)?,
                subject: row.try_get(1).ok()?,
                until: row.try_get(2).ok()?,
                reason: row.try_get(3).ok()?,
            })
        })
        .collect();
    {
        let Some(local) = local.upgrade() else {
            return Ok(());
        };
        local.tokens.distrust_all();
        local.resynced(throttles);
    }
    let mut ping = tokio::time::interval(FEED_PING);
    ping.tick().await;
    loop {
        tokio::select! {
            notification = rx.recv() => {
                let Some(n) = notification else {
                    return Err(StoreError::Unavailable("the change feed's connection closed".into()));
                };
                let Some(local) = local.upgrade() else { return Ok(()) };
                let Ok(doc) = serde_json::from_str::<serde_json::Value>(n.payload()) else { continue };
                if doc.get("schema").and_then(|s| s.as_str()) != Some(schema.as_str()) {
                    continue;
                }
                let kind = doc.get("kind").and_then(|k| k.as_str()).unwrap_or_default();
                let subject = doc.get("subject").and_then(|k| k.as_str()).unwrap_or_default();
                local.apply(kind, subject, &doc);
            }
            _ = ping.tick() => {
                if local.strong_count() == 0 {
                    return Ok(());
                }
                tokio::time::timeout(CONNECT_TIMEOUT, client.simple_query("SELECT 1"))
                    .await
                    .map_err(|_| StoreError::Unavailable("the change feed's connection stopped answering".into()))??;
            }
        }
    }
}

/// Aborts a task when dropped: the feed's connection driver ends with the feed.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn schema_version(client: &impl GenericClient) -> Result<i64, StoreError> {
    let exists: bool = client
        .query_one("SELECT to_regclass('schema_migrations') IS NOT NULL", &[])
        .await?
        .try_get(0)?;
    if !exists {
        return Ok(0);
    }
    Ok(client
        .query_one(
            "SELECT coalesce(max(version), 0)::bigint FROM schema_migrations",
            &[],
        )
        .await?
        .try_get(0)?)
}

/// A PostgreSQL session for the shared sequences, on a transaction or a pooled connection.
/// Statements are prepared once per pooled connection (`prepare_cached`).
pub(crate) struct PgDb<'a, C> {
    client: &'a C,
    cx: Context<'a>,
    local: &'a Local,
}

impl<C> PgDb<'_, C> {
    fn count(&self) {
        self.local
            .counters
            .statements
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl ToSql for Param<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        self.to_sql_checked(ty, out)
    }

    /// Any column type: each variant checks its own value against it in `to_sql_checked`.
    fn accepts(_: &Type) -> bool {
        true
    }

    fn to_sql_checked(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match *self {
            Param::Text(s) => s.to_sql_checked(ty, out),
            Param::OptText(s) => s.to_sql_checked(ty, out),
            Param::Int(n) => n.to_sql_checked(ty, out),
            Param::Bool(b) => b.to_sql_checked(ty, out),
            Param::Time(t) => t.trunc_subsecs(6).to_sql_checked(ty, out),
            Param::OptTime(t) => t.map(|t| t.trunc_subsecs(6)).to_sql_checked(ty, out),
            Param::Bytes(b) => b.to_sql_checked(ty, out),
            Param::OptBytes(b) => b.to_sql_checked(ty, out),
            Param::Json(v) => v.to_sql_checked(ty, out),
            Param::OptJson(v) => v.to_sql_checked(ty, out),
        }
    }
}

struct PgRow<'r>(&'r tokio_postgres::Row);

impl Row for PgRow<'_> {
    fn cell(&self, i: usize) -> Result<Cell, StoreError> {
        let row = self.0;
        let ty = row.columns()[i].type_();
        let cell = if *ty == Type::TEXT || *ty == Type::VARCHAR {
            row.try_get::<_, Option<String>>(i)?.map(Cell::Text)
        } else if *ty == Type::INT8 {
            row.try_get::<_, Option<i64>>(i)?.map(Cell::Int)
        } else if *ty == Type::BOOL {
            row.try_get::<_, Option<bool>>(i)?.map(Cell::Bool)
        } else if *ty == Type::TIMESTAMPTZ {
            row.try_get::<_, Option<DateTime<Utc>>>(i)?.map(Cell::Time)
        } else if *ty == Type::BYTEA {
            row.try_get::<_, Option<Vec<u8>>>(i)?.map(Cell::Bytes)
        } else if *ty == Type::JSONB || *ty == Type::JSON {
            row.try_get::<_, Option<serde_json::Value>>(i)?
                .map(Cell::Json)
        } else {
            return Err(StoreError::Database(format!(
                "column {i} has type {ty}, which no column of ours has"
            )));
        };
        Ok(cell.unwrap_or(Cell::Null))
    }
}

fn bind<'p>(params: &'p [Param<'_>]) -> Vec<&'p (dyn ToSql + Sync)> {
    params.iter().map(|p| p as &(dyn ToSql + Sync)).collect()
}

impl<C: GenericClient> Db for PgDb<'_, C> {
    fn context(&self) -> &Context<'_> {
        &self.cx
    }

    async fn execute(&self, sql: &str, params: &[Param<'_>]) -> Result<u64, StoreError> {
        self.count();
        let stmt = self.client.prepare_cached(sql).await?;
        Ok(self.client.execute(&stmt, &bind(params)).await?)
    }

    async fn query<T>(&self, sql: &str, params: &[Param<'_>], decode: Decode<T>) -> Rows<T> {
        self.count();
        let stmt = self.client.prepare_cached(sql).await?;
        self.client
            .query(&stmt, &bind(params))
            .await?
            .iter()
            .map(|row| decode(&PgRow(row)))
            .collect()
    }

    fn locks_rows(&self) -> bool {
        true
    }

    /// A transaction-scoped advisory lock, per schema, so that test schemas sharing one server
    /// do not serialize on each other.
    async fn lock_bot(&self, provider: Provider, bot: &str) -> Result<(), StoreError> {
        let key = format!("{}|{bot}", provider.as_str());
        self.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended('tokenkeeper/bot|' || coalesce(current_schema(), '') || '|' || $1, 0))",
            &[Param::Text(&key)],
        )
        .await?;
        Ok(())
    }

    /// A transaction-scoped advisory lock, per schema, on the key checks.
    async fn lock_keys(&self) -> Result<(), StoreError> {
        self.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended('tokenkeeper/keys|' || coalesce(current_schema(), ''), 0))",
            &[],
        )
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::valid_schema;

    #[test]
    fn schema_names_are_plain_identifiers() {
        assert!(valid_schema("tk_test_0123abc"));
        assert!(!valid_schema("public; DROP TABLE x"));
        assert!(!valid_schema("9abc"));
        assert!(!valid_schema(""));
        assert!(!valid_schema("Upper"));
    }
}
