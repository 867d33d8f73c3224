//! The PostgreSQL backend: several tokenkeeper processes behind a load balancer, one database.
//!
//! Every write is one transaction that first locks what it changes (see `postgres/ledger.rs`):
//! the connection's row with `SELECT … FOR UPDATE`, or an advisory lock on `(provider, bot_id)`
//! when the connection may not exist yet. A partial unique index backs "one live connection per
//! `(provider, bot_id)`". Reads take no lock.
//!
//! The schema lives in the first schema of the session's `search_path`: the URL may name one
//! (`?options=-csearch_path%3Dtk`), or `PgStore::connect` may be given one, which it creates.

mod ledger;
mod rows;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;

use self::rows::{
    connection_at, event_at, find_connection, find_grant, grant_at, micros, open_grant, query,
    query_opt, CONNECTION_COLUMNS, CONNECTION_WIDTH, EVENT_COLUMNS, GRANT_COLUMNS,
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
const MIGRATIONS: &[(i64, &str)] =
    &[(1, include_str!("../../migrations/postgres/0001_ledger.sql"))];

/// The schema version this binary runs against.
pub const SCHEMA_VERSION: i64 = MIGRATIONS[MIGRATIONS.len() - 1].0;

/// Pooled connections per process.
const POOL_SIZE: usize = 16;

/// How long a caller waits for a pooled connection, or for a new one to be made.
const POOL_TIMEOUT: Duration = Duration::from_secs(10);

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
            _ => StoreError::Database(match e.as_db_error() {
                Some(db) => format!("{}: {}", db.code().code(), db.message()),
                None => e.to_string(),
            }),
        }
    }
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            deadpool_postgres::PoolError::Timeout(_) => StoreError::Timeout,
            deadpool_postgres::PoolError::Backend(e) => e.into(),
            other => StoreError::Database(other.to_string()),
        }
    }
}

#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
    keys: Arc<KeyRing>,
    clock: Clock,
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
            config.connect_timeout(POOL_TIMEOUT);
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
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .wait_timeout(Some(POOL_TIMEOUT))
            .create_timeout(Some(POOL_TIMEOUT))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| {
                StoreError::Database(format!("could not build the connection pool: {e}"))
            })?;
        // Fail at start, with the driver's reason, rather than on the first request.
        drop(pool.get().await?);
        Ok(PgStore { pool, keys, clock })
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        Ok(self.pool.get().await?)
    }
}

/// Runs `$body` (an expression using `tx`) in one transaction on a pooled connection and
/// commits it; an error drops the transaction, which rolls it back.
macro_rules! in_transaction {
    ($self:ident, |$tx:ident| $body:expr) => {{
        let mut client = $self.client().await?;
        let $tx = client.transaction().await?;
        let out = $body.await?;
        $tx.commit().await?;
        Ok::<_, StoreError>(out)
    }};
}

async fn schema_version(client: &impl deadpool_postgres::GenericClient) -> Result<i64, StoreError> {
    let exists: bool = query_opt(
        client,
        "SELECT to_regclass('schema_migrations') IS NOT NULL",
        &[],
    )
    .await?
    .map(|r| r.try_get(0))
    .transpose()?
    .unwrap_or(false);
    if !exists {
        return Ok(0);
    }
    Ok(query_opt(
        client,
        "SELECT coalesce(max(version), 0)::bigint FROM schema_migrations",
        &[],
    )
    .await?
    .map(|r| r.try_get(0))
    .transpose()?
    .unwrap_or(0))
}

/// Authorizations of one import in flight at once on its connection.
const IMPORT_PIPELINE: usize = 64;

#[async_trait]
impl Store for PgStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn migrate(&self) -> Result<i64, StoreError> {
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
                &[version, &micros(self.clock.now())],
            )
            .await?;
            tx.commit().await?;
        }
    }

    async fn check_schema(&self) -> Result<i64, StoreError> {
        let found = schema_version(&self.client().await?).await?;
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
        self.client().await?.simple_query("SELECT 1").await?;
        Ok(())
    }

    async fn create_session(&self, s: &ConnectSession) -> Result<(), StoreError> {
        let client = self.client().await?;
        rows::exec(
            &client,
            "INSERT INTO connect_sessions (id, provider, state_hash, end_user_id, return_to, connection_id, \
                 created_at, expires_at, used_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            &[
                &s.id.as_str(),
                &s.provider.as_str(),
                &s.state_hash,
                &s.end_user_id,
                &s.return_to,
                &s.connection_id.as_ref().map(ConnectionId::as_str),
                &micros(s.created_at),
                &micros(s.expires_at),
                &s.used_at.map(micros),
            ],
        )
        .await?;
        Ok(())
    }

    async fn get_session(&self, id: &SessionId) -> Result<Option<ConnectSession>, StoreError> {
        let client = self.client().await?;
        query_opt(
            &client,
            &format!(
                "SELECT {} FROM connect_sessions WHERE id = $1",
                ledger::SESSION_COLUMNS
            ),
            &[&id.as_str()],
        )
        .await?
        .map(|r| ledger::session_at(&r))
        .transpose()
    }

    async fn consume_session(&self, state_hash: &str) -> Result<SessionLookup, StoreError> {
        in_transaction!(self, |tx| ledger::consume_session(
            &tx,
            &self.clock,
            state_hash
        ))
    }

    async fn record_authorization(
        &self,
        auth: NewAuthorization,
    ) -> Result<AuthorizationOutcome, StoreError> {
        in_transaction!(self, |tx| ledger::record_authorization(
            &tx,
            &self.keys,
            &self.clock,
            &auth
        ))
    }

    async fn import_authorizations(
        &self,
        batch: Vec<NewAuthorization>,
    ) -> Result<Vec<ConnectionId>, StoreError> {
        use futures::stream::{FuturesOrdered, StreamExt};
        super::check_distinct(&batch)?;
        // The authorizations concern distinct bots and connections, so their statements may
        // interleave; tokio-postgres then pipelines them over the one connection instead of
        // waiting a round trip per statement, which is what makes a large import fast.
        // (A plain loop over `FuturesOrdered`: a `map` closure over borrowed futures trips
        // async-trait's `Send` check.)
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let mut ids = Vec::with_capacity(batch.len());
        let mut inflight = FuturesOrdered::new();
        for auth in &batch {
            inflight.push_back(ledger::record_authorization(
                &tx,
                &self.keys,
                &self.clock,
                auth,
            ));
            if inflight.len() >= IMPORT_PIPELINE {
                if let Some(outcome) = inflight.next().await {
                    ids.push(outcome?.connection.id);
                }
            }
        }
        while let Some(outcome) = inflight.next().await {
            ids.push(outcome?.connection.id);
        }
        drop(inflight);
        tx.commit().await?;
        Ok(ids)
    }

    async fn get_connection(&self, id: &ConnectionId) -> Result<Option<Connection>, StoreError> {
        let client = self.client().await?;
        Ok(find_connection(&client, id).await?.map(|r| r.connection))
    }

    async fn list_connections(
        &self,
        filter: &ConnectionFilter,
    ) -> Result<Vec<Connection>, StoreError> {
        let mut clauses = Vec::new();
        let mut values: Vec<String> = Vec::new();
        let mut push = |clause: &str, value: String| {
            values.push(value);
            clauses.push(format!("{clause} ${}", values.len()));
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
        let limit = i64::from(match filter.limit {
            0 => 100,
            n => n.min(1000),
        });
        let filter_sql = if clauses.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", clauses.join(" AND "))
        };
        let sql = format!(
            "SELECT {CONNECTION_COLUMNS} FROM connections c {filter_sql} ORDER BY c.id LIMIT ${}",
            values.len() + 1
        );
        let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = values
            .iter()
            .map(|v| v as &(dyn tokio_postgres::types::ToSql + Sync))
            .collect();
        params.push(&limit);
        let client = self.client().await?;
        query(&client, &sql, &params)
            .await?
            .iter()
            .map(|r| connection_at(r, 0).map(|c| c.connection))
            .collect()
    }

    async fn current_grant(
        &self,
        id: &ConnectionId,
    ) -> Result<Option<(Connection, Option<OpenGrant>)>, StoreError> {
        let client = self.client().await?;
        let Some(row) = query_opt(
            &client,
            &format!(
                "SELECT {CONNECTION_COLUMNS}, {GRANT_COLUMNS} FROM connections c \
                 LEFT JOIN grants g ON g.id = c.current_grant_id WHERE c.id = $1"
            ),
            &[&id.as_str()],
        )
        .await?
        else {
            return Ok(None);
        };
        drop(client);
        let connection = connection_at(&row, 0)?.connection;
        let grant = match row.try_get::<_, Option<String>>(CONNECTION_WIDTH)? {
            Some(_) => Some(open_grant(&self.keys, grant_at(&row, CONNECTION_WIDTH)?)?),
            None => None,
        };
        Ok(Some((connection, grant)))
    }

    async fn get_grant(
        &self,
        id: &ConnectionId,
        grant: &GrantId,
    ) -> Result<Option<OpenGrant>, StoreError> {
        let client = self.client().await?;
        find_grant(&client, id, grant)
            .await?
            .map(|g| open_grant(&self.keys, g))
            .transpose()
    }

    async fn list_grants(&self, id: &ConnectionId) -> Result<Vec<GrantRecord>, StoreError> {
        let client = self.client().await?;
        query(
            &client,
            &format!(
                "SELECT {GRANT_COLUMNS} FROM grants g WHERE g.connection_id = $1 ORDER BY g.seq"
            ),
            &[&id.as_str()],
        )
        .await?
        .iter()
        .map(|r| grant_at(r, 0).map(|g| g.record))
        .collect()
    }

    async fn list_events(&self, id: &ConnectionId) -> Result<Vec<Event>, StoreError> {
        let client = self.client().await?;
        query(
            &client,
            &format!("SELECT {EVENT_COLUMNS} FROM events WHERE connection_id = $1 ORDER BY seq"),
            &[&id.as_str()],
        )
        .await?
        .iter()
        .map(event_at)
        .collect()
    }

    async fn begin_refresh(
        &self,
        id: &ConnectionId,
        if_grant: Option<&GrantId>,
        holder: &str,
        lease: Duration,
    ) -> Result<LeaseOutcome, StoreError> {
        in_transaction!(self, |tx| ledger::begin_refresh(
            &tx,
            &self.keys,
            &self.clock,
            id,
            if_grant,
            holder,
            lease
        ))
    }

    async fn record_refresh(
        &self,
        id: &ConnectionId,
        parent: &GrantId,
        fence: i64,
        attempt: &AttemptId,
        pair: MintedPair,
    ) -> Result<RefreshRecorded, StoreError> {
        in_transaction!(self, |tx| ledger::record_refresh(
            &tx,
            &self.keys,
            &self.clock,
            id,
            parent,
            fence,
            attempt,
            &pair
        ))
    }

    async fn record_refresh_failure(
        &self,
        id: &ConnectionId,
        parent: &GrantId,
        fence: i64,
        attempt: &AttemptId,
        failure: &RefreshFailure,
    ) -> Result<FailureOutcome, StoreError> {
        in_transaction!(self, |tx| ledger::record_refresh_failure(
            &tx,
            &self.clock,
            id,
            parent,
            fence,
            attempt,
            failure
        ))
    }

    async fn mark_needs_reauth(
        &self,
        id: &ConnectionId,
        grant: &GrantId,
        diagnosis: serde_json::Value,
    ) -> Result<Connection, StoreError> {
        let row: rows::ConnectionRow = in_transaction!(self, |tx| ledger::mark_needs_reauth(
            &tx,
            &self.clock,
            id,
            grant,
            &diagnosis
        ))?;
        Ok(row.connection)
    }

    async fn mark_revoked(
        &self,
        id: &ConnectionId,
        reason: &str,
    ) -> Result<Connection, StoreError> {
        let row: rows::ConnectionRow = in_transaction!(self, |tx| ledger::mark_revoked(
            &tx,
            &self.clock,
            id,
            reason
        ))?;
        Ok(row.connection)
    }

    async fn rotate_keys(&self, batch: u32) -> Result<RotateProgress, StoreError> {
        in_transaction!(self, |tx| ledger::rotate_keys(&tx, &self.keys, batch))
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
