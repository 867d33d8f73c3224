//! What the ledger's rules need from a database, and nothing more: run a statement, read rows,
//! and take the locks that make a transaction safe across processes. Each backend implements
//! `Db` natively (`sqlite.rs`, `postgres.rs`); the rules (`rules.rs`) and the reads
//! (`reads.rs`) are written once against it.
//!
//! Statements are shared text (`sql.rs`) with `$1, $2, …` placeholders, which both databases
//! accept: PostgreSQL natively, SQLite as named parameters numbered in order of first
//! appearance (so every shared statement introduces `$n` in increasing order; the SQLite
//! backend checks this on every statement in debug builds).

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::StoreError;
use crate::clock::Clock;
use crate::ids::ConnectionId;
use crate::ledger::Provider;
use crate::seal::KeyRing;

/// A value bound to a placeholder. Nulls carry their type, because PostgreSQL checks it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Param<'a> {
    Text(&'a str),
    OptText(Option<&'a str>),
    Int(i64),
    Bool(bool),
    Time(DateTime<Utc>),
    OptTime(Option<DateTime<Utc>>),
    Bytes(&'a [u8]),
    OptBytes(Option<&'a [u8]>),
    /// A JSON document: `jsonb` on PostgreSQL, text on SQLite.
    Json(&'a Value),
    OptJson(Option<&'a Value>),
}

/// One value of an answer, as the database holds it. Each backend turns its native values
/// into cells (`Row::cell`); the typed reads below turn cells into our types, once for both
/// (SQLite keeps timestamps and JSON as text, and booleans as integers).
#[derive(Debug)]
pub(crate) enum Cell {
    Null,
    Text(String),
    Int(i64),
    Bool(bool),
    Time(DateTime<Utc>),
    Bytes(Vec<u8>),
    Json(Value),
}

/// One row of an answer, read by column index.
pub(crate) trait Row {
    fn cell(&self, i: usize) -> Result<Cell, StoreError>;
}

fn unexpected(i: usize, wanted: &str, found: &Cell) -> StoreError {
    let kind = match found {
        Cell::Null => "null",
        Cell::Text(_) => "text",
        Cell::Int(_) => "an integer",
        Cell::Bool(_) => "a boolean",
        Cell::Time(_) => "a timestamp",
        Cell::Bytes(_) => "bytes",
        Cell::Json(_) => "JSON",
    };
    StoreError::Database(format!(
        "column {i} holds {kind} where {wanted} was expected"
    ))
}

/// Typed reads, written once over `cell`. The `opt_` forms read null as `None`.
impl dyn Row + '_ {
    pub fn opt_text(&self, i: usize) -> Result<Option<String>, StoreError> {
        match self.cell(i)? {
            Cell::Null => Ok(None),
            Cell::Text(s) => Ok(Some(s)),
            other => Err(unexpected(i, "text", &other)),
        }
    }

    pub fn text(&self, i: usize) -> Result<String, StoreError> {
        self.opt_text(i)?
            .ok_or_else(|| unexpected(i, "text", &Cell::Null))
    }

    pub fn int(&self, i: usize) -> Result<i64, StoreError> {
        match self.cell(i)? {
            Cell::Int(n) => Ok(n),
            other => Err(unexpected(i, "an integer", &other)),
        }
    }

    pub fn bool(&self, i: usize) -> Result<bool, StoreError> {
        match self.cell(i)? {
            Cell::Bool(b) => Ok(b),
            Cell::Int(n @ (0 | 1)) => Ok(n == 1),
            other => Err(unexpected(i, "a boolean", &other)),
        }
    }

    pub fn opt_time(&self, i: usize) -> Result<Option<DateTime<Utc>>, StoreError> {
        match self.cell(i)? {
            Cell::Null => Ok(None),
            Cell::Time(t) => Ok(Some(t)),
            Cell::Text(s) => DateTime::parse_from_rfc3339(&s)
                .map(|t| Some(t.with_timezone(&Utc)))
                .map_err(|e| StoreError::Database(format!("column {i}: {e}"))),
            other => Err(unexpected(i, "a timestamp", &other)),
        }
    }

    pub fn time(&self, i: usize) -> Result<DateTime<Utc>, StoreError> {
        self.opt_time(i)?
            .ok_or_else(|| unexpected(i, "a timestamp", &Cell::Null))
    }

    pub fn opt_bytes(&self, i: usize) -> Result<Option<Vec<u8>>, StoreError> {
        match self.cell(i)? {
            Cell::Null => Ok(None),
            Cell::Bytes(b) => Ok(Some(b)),
            other => Err(unexpected(i, "bytes", &other)),
        }
    }

    pub fn bytes(&self, i: usize) -> Result<Vec<u8>, StoreError> {
        self.opt_bytes(i)?
            .ok_or_else(|| unexpected(i, "bytes", &Cell::Null))
    }

    pub fn opt_json(&self, i: usize) -> Result<Option<Value>, StoreError> {
        match self.cell(i)? {
            Cell::Null => Ok(None),
            Cell::Json(v) => Ok(Some(v)),
            Cell::Text(s) => serde_json::from_str(&s)
                .map(Some)
                .map_err(|e| StoreError::Database(format!("column {i}: {e}"))),
            other => Err(unexpected(i, "JSON", &other)),
        }
    }
}

/// A decoder of one row.
pub(crate) type Decode<T> = fn(&dyn Row) -> Result<T, StoreError>;

/// The decoded rows of an answer.
pub(crate) type Rows<T> = Result<Vec<T>, StoreError>;

/// A database session: a transaction for writes, a plain connection for reads.
///
/// What a session of either backend carries besides its connection: the key ring, the clock,
/// the webhook endpoints of this process, and, in a write transaction, the token cache's marks.
pub(crate) struct Context<'a> {
    pub keys: &'a KeyRing,
    pub clock: &'a Clock,
    pub endpoints: std::sync::Arc<[String]>,
    pub touched: Option<&'a super::cache::Touched>,
}

impl<'a> Context<'a> {
    pub fn new(
        keys: &'a KeyRing,
        clock: &'a Clock,
        endpoints: &Endpoints,
        touched: Option<&'a super::cache::Touched>,
    ) -> Context<'a> {
        Context {
            keys,
            clock,
            endpoints: endpoints.get(),
            touched,
        }
    }
}

/// The methods are `async` because PostgreSQL's are; SQLite's never wait (rusqlite is
/// synchronous, and its transaction already holds the write lock), so a sequence written
/// against `Db` completes on SQLite in its first poll (see `sqlite::drive`).
pub(crate) trait Db {
    /// What every session carries whatever its backend.
    fn context(&self) -> &Context<'_>;

    /// The key ring that seals and opens tokens.
    fn keys(&self) -> &KeyRing {
        self.context().keys
    }

    /// Where this process delivers webhooks: each event the ledger emits becomes one delivery
    /// job per endpoint, in the transaction of the change.
    fn webhook_endpoints(&self) -> &[String] {
        &self.context().endpoints
    }

    /// The time now, at the database's precision (microseconds). Read it after taking the
    /// lock, so that lease times are ordered like the commits.
    fn now(&self) -> DateTime<Utc> {
        use chrono::SubsecRound;
        self.context().clock.now().trunc_subsecs(6)
    }

    async fn execute(&self, sql: &str, params: &[Param<'_>]) -> Result<u64, StoreError>;

    async fn query<T>(&self, sql: &str, params: &[Param<'_>], decode: Decode<T>) -> Rows<T>;

    async fn query_opt<T>(
        &self,
        sql: &str,
        params: &[Param<'_>],
        decode: Decode<T>,
    ) -> Result<Option<T>, StoreError> {
        Ok(self.query(sql, params, decode).await?.into_iter().next())
    }

    /// Whether reads inside a write transaction must lock the rows they read: true on
    /// PostgreSQL (`… FOR UPDATE`); false on SQLite, whose write transaction holds the whole
    /// database's lock from its first statement (`BEGIN IMMEDIATE`). The locking reads are
    /// written once, in `rules.rs`, and pick their statement by this.
    fn locks_rows(&self) -> bool;

    /// The transaction is about to change this connection's current grant, status or
    /// workspace: this process's token cache must not serve or fill it until the transaction is
    /// over (`cache::Touched`). Other processes learn of the change from the database's own
    /// triggers (migration 0007), whoever wrote it. A no-op in a read-only session.
    fn touched(&self, id: &ConnectionId) {
        if let Some(touched) = self.context().touched {
            touched.touch(id);
        }
    }

    /// Serializes everyone who may make `(provider, bot_id)` live, until commit: taken before
    /// an authorization that may create a connection for this bot. A no-op on SQLite.
    async fn lock_bot(&self, provider: Provider, bot: &str) -> Result<(), StoreError>;

    /// Serializes everyone who checks or registers keys (`keys.rs`), until commit, so that two
    /// processes starting at once on an empty database cannot both register their own key. A
    /// no-op on SQLite.
    async fn lock_keys(&self) -> Result<(), StoreError>;
}

/// The webhook endpoints of a store, set once the configuration is known (`Store::
/// set_webhook_endpoints`) and read by every transaction.
#[derive(Debug, Default)]
pub(crate) struct Endpoints(std::sync::RwLock<std::sync::Arc<[String]>>);

impl Endpoints {
    pub fn get(&self) -> std::sync::Arc<[String]> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set(&self, endpoints: Vec<String>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = endpoints.into();
    }
}
