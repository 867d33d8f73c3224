//! Test databases: SQLite on a temp file, or PostgreSQL on a fresh schema of
//! `TOKENKEEPER_TEST_POSTGRES_URL`; raw access for tests that tamper with rows or read the
//! bytes at rest; and fixtures for the ledger (distinctive token pairs, authorizations).

use std::path::PathBuf;
use std::sync::Arc;

use chrono::{TimeZone, Utc};
use tokenkeeper::clock::Clock;
use tokenkeeper::ids::{AccessToken, BotId, ConnectionId, RefreshToken};
use tokenkeeper::ledger::{AuthorizationTarget, MintedPair, NewAuthorization, Provider};
use tokenkeeper::seal::KeyRing;
use tokenkeeper::store::postgres::PgStore;
use tokenkeeper::store::sqlite::SqliteStore;
use tokenkeeper::store::{self, DatabaseUrl, Store};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The server `scripts/with-postgres` started. PostgreSQL cases fail without it, never skip:
/// a suite that silently ran half its cases would prove half of what it claims.
pub fn postgres_url() -> String {
    match std::env::var("TOKENKEEPER_TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => url,
        _ => panic!(
            "TOKENKEEPER_TEST_POSTGRES_URL is not set. PostgreSQL cases never skip: run the suite with \
             `scripts/test`, or `scripts/with-postgres cargo test -p tokenkeeper --test it`"
        ),
    }
}

/// `url` with `key=value` appended to its query.
fn with_query(url: &str, pair: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{pair}")
}

pub struct TestDb {
    pub store: Arc<Store>,
    /// A `TOKENKEEPER_DATABASE_URL` that another process can open: `sqlite:///…` or a
    /// PostgreSQL URL whose `options` put the test's schema first on the search_path.
    pub url: String,
    pub backend: Backend,
    pub keys: Arc<KeyRing>,
    pub clock: Clock,
    /// The SQLite file, for tests that read the bytes at rest.
    pub sqlite_path: Option<PathBuf>,
    /// The PostgreSQL schema, for `pg_dump --schema`.
    pub pg_schema: Option<String>,
    _dir: Option<tempfile::TempDir>,
}

impl TestDb {
    /// A fresh, migrated database.
    pub async fn new(backend: Backend, keys: Arc<KeyRing>, clock: Clock) -> TestDb {
        let db = TestDb::unmigrated(backend, keys, clock).await;
        db.store
            .migrate()
            .await
            .expect("migrations apply to a fresh database");
        db
    }

    /// A fresh database without any migration applied.
    pub async fn unmigrated(backend: Backend, keys: Arc<KeyRing>, clock: Clock) -> TestDb {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("a temp dir");
                let path = dir.path().join("tokenkeeper.db");
                let store = SqliteStore::open(&path, keys.clone(), clock.clone())
                    .await
                    .expect("SQLite opens a temp file");
                TestDb {
                    store: Arc::new(store.into()),
                    url: format!("sqlite://{}", path.display()),
                    backend,
                    keys,
                    clock,
                    sqlite_path: Some(path),
                    pg_schema: None,
                    _dir: Some(dir),
                }
            }
            Backend::Postgres => {
                let base = postgres_url();
                let schema = format!("tk_test_{}", uuid::Uuid::new_v4().simple());
                let store = PgStore::connect(&base, Some(&schema), keys.clone(), clock.clone())
                    .await
                    .expect("PostgreSQL accepts a fresh schema");
                TestDb {
                    store: Arc::new(store.into()),
                    url: with_query(&base, &format!("options=-csearch_path%3D{schema}")),
                    backend,
                    keys,
                    clock,
                    sqlite_path: None,
                    pg_schema: Some(schema),
                    _dir: None,
                }
            }
        }
    }

    /// Another store on the same database, opened from `url` the way the binary opens it.
    pub async fn open_another(&self, keys: Arc<KeyRing>, clock: Clock) -> Arc<Store> {
        let url = DatabaseUrl::parse(&self.url).expect("the test URL parses");
        Arc::new(
            store::open(&url, keys, clock)
                .await
                .expect("the database opens again"),
        )
    }

    /// Runs raw SQL (for tests that tamper with rows); returns the rows it changed.
    pub async fn execute(&self, sql: &str) -> u64 {
        match self.backend {
            Backend::Sqlite => {
                let path = self.sqlite_path.clone().unwrap();
                let sql = sql.to_owned();
                tokio::task::spawn_blocking(move || {
                    let conn = rusqlite::Connection::open(path).unwrap();
                    conn.busy_timeout(std::time::Duration::from_secs(10))
                        .unwrap();
                    conn.execute(&sql, []).unwrap() as u64
                })
                .await
                .unwrap()
            }
            Backend::Postgres => {
                let (client, connection) =
                    tokio_postgres::connect(&self.url, tokio_postgres::NoTls)
                        .await
                        .expect("raw PostgreSQL connection");
                tokio::spawn(connection);
                client.execute(sql, &[]).await.expect("raw SQL runs")
            }
        }
    }

    /// Runs a query answering one integer (a `count(*)`), for tests that count rows.
    pub async fn count(&self, sql: &str) -> i64 {
        match self.backend {
            Backend::Sqlite => {
                let path = self.sqlite_path.clone().unwrap();
                let sql = sql.to_owned();
                tokio::task::spawn_blocking(move || {
                    let conn = rusqlite::Connection::open(path).unwrap();
                    conn.busy_timeout(std::time::Duration::from_secs(10))
                        .unwrap();
                    conn.query_row(&sql, [], |row| row.get::<_, i64>(0))
                        .unwrap()
                })
                .await
                .unwrap()
            }
            Backend::Postgres => {
                let (client, connection) =
                    tokio_postgres::connect(&self.url, tokio_postgres::NoTls)
                        .await
                        .expect("raw PostgreSQL connection");
                tokio::spawn(connection);
                client
                    .query_one(sql, &[])
                    .await
                    .expect("the count runs")
                    .get::<_, i64>(0)
            }
        }
    }

    /// Every byte the database holds at rest: the SQLite file and its WAL, or a `pg_dump` of
    /// the test's schema.
    pub async fn bytes_at_rest(&self) -> Vec<u8> {
        match self.backend {
            Backend::Sqlite => {
                let path = self.sqlite_path.clone().unwrap();
                let mut bytes = std::fs::read(&path).unwrap();
                for suffix in ["-wal", "-journal"] {
                    let mut p = path.clone().into_os_string();
                    p.push(suffix);
                    if let Ok(more) = std::fs::read(PathBuf::from(p)) {
                        bytes.extend(more);
                    }
                }
                bytes
            }
            Backend::Postgres => {
                let out = tokio::process::Command::new(pg_dump())
                    .arg("--schema")
                    .arg(self.pg_schema.as_ref().unwrap())
                    .arg("--no-owner")
                    .arg("--dbname")
                    .arg(postgres_url())
                    .output()
                    .await
                    .expect("pg_dump runs");
                assert!(
                    out.status.success(),
                    "pg_dump failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                out.stdout
            }
        }
    }
}

/// `pg_dump` of the same version as the server: next to `initdb` (what `scripts/with-postgres`
/// runs), else on PATH.
fn pg_dump() -> PathBuf {
    if let Ok(out) = std::process::Command::new("sh")
        .arg("-c")
        .arg("readlink -f \"$(command -v initdb)\"")
        .output()
    {
        let initdb = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if let Some(dir) = initdb.parent() {
            let candidate = dir.join("pg_dump");
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    PathBuf::from("pg_dump")
}

/// A fresh key ring of one key, and its text (for child processes).
pub fn key_ring() -> (Arc<KeyRing>, String) {
    let entry = KeyRing::generate_entry();
    (Arc::new(KeyRing::parse(&entry).unwrap()), entry)
}

/// A manual clock at a fixed, recognisable instant.
pub fn manual_clock() -> Clock {
    Clock::manual(Utc.with_ymd_and_hms(2026, 6, 8, 9, 0, 0).unwrap())
}

/// A token pair as Notion would return it, with tokens nobody could mistake for anything else.
pub fn minted(bot: &str, tag: &str, clock: &Clock) -> MintedPair {
    MintedPair {
        access_token: AccessToken::new(format!("ntn_access_{tag}_Zq7Xv")),
        refresh_token: Some(RefreshToken::new(format!("nrt_refresh_{tag}_Kp3Wm"))),
        bot_id: BotId(bot.to_owned()),
        workspace_id: format!("ws-{bot}"),
        workspace_name: Some(format!("Workspace of {bot}")),
        workspace_icon: None,
        metadata: serde_json::json!({ "owner": { "type": "user" }, "tag": tag }),
        provider_request_id: Some(format!("req-{tag}")),
        obtained_at: clock.now(),
        expires_at: None,
    }
}

pub fn connect(end_user: &str, pair: MintedPair) -> NewAuthorization {
    NewAuthorization::new(
        Provider::Notion,
        AuthorizationTarget::Connect {
            end_user_id: end_user.to_owned(),
        },
        pair,
    )
}

pub fn reconnect(id: &ConnectionId, pair: MintedPair) -> NewAuthorization {
    NewAuthorization::new(
        Provider::Notion,
        AuthorizationTarget::Reconnect {
            connection_id: id.clone(),
        },
        pair,
    )
}
