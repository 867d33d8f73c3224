//! The database of one scenario: a fresh SQLite file or a fresh PostgreSQL database, the bulk
//! seeder (tokenkeeper's own store code), and the write counters that tell whether a phase
//! wrote to the database.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use tokenkeeper::clock::Clock;
use tokenkeeper::ids::{AccessToken, BotId, ConnectionId, RefreshToken};
use tokenkeeper::ledger::{AuthorizationTarget, MintedPair, NewAuthorization, Provider};
use tokenkeeper::seal::KeyRing;
use tokenkeeper::store::{DatabaseUrl, Store};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }
}

pub struct Database {
    /// What `TOKENKEEPER_DATABASE_URL` is set to.
    pub url: String,
    sqlite_path: Option<PathBuf>,
    /// The server's URL with its own database, and the name of the database we created.
    postgres: Option<(String, String)>,
}

impl Database {
    /// A new, empty database for `scenario`: a file in the run directory, or a database created
    /// on the PostgreSQL server of `pg_url` (dropped again by `drop_database`).
    pub async fn fresh(
        backend: Backend,
        scenario: &str,
        run_dir: &std::path::Path,
        pg_url: Option<&str>,
    ) -> anyhow::Result<Database> {
        let tag = format!("{}_{}", scenario.replace('-', "_"), std::process::id());
        match backend {
            Backend::Sqlite => {
                let path = run_dir.join(format!("{tag}.db"));
                Ok(Database {
                    url: format!("sqlite://{}", path.display()),
                    sqlite_path: Some(path),
                    postgres: None,
                })
            }
            Backend::Postgres => {
                let admin = pg_url.context(
                    "PostgreSQL needs TOKENKEEPER_TEST_POSTGRES_URL: run under scripts/with-postgres, or use --backend sqlite",
                )?;
                let name = format!("tkbench_{tag}");
                let client = pg_connect(admin).await?;
                // Two statements, each its own transaction: neither may run inside one.
                client
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await?;
                client
                    .batch_execute(&format!("CREATE DATABASE {name}"))
                    .await
                    .with_context(|| format!("cannot create database {name}"))?;
                let mut url =
                    url::Url::parse(admin).context("TOKENKEEPER_TEST_POSTGRES_URL is not a URL")?;
                url.set_path(&format!("/{name}"));
                Ok(Database {
                    url: url.to_string(),
                    sqlite_path: None,
                    postgres: Some((admin.to_owned(), name)),
                })
            }
        }
    }

    /// Opens the store with tokenkeeper's own code and applies its migrations.
    pub async fn open_store(&self, keys: Arc<KeyRing>) -> anyhow::Result<Arc<Store>> {
        let url = DatabaseUrl::parse(&self.url).map_err(anyhow::Error::msg)?;
        let store = tokenkeeper::store::open(&url, keys, Clock::System).await?;
        store.migrate().await?;
        Ok(Arc::new(store))
    }

    pub async fn probe(&self) -> anyhow::Result<Probe> {
        Ok(match (&self.sqlite_path, &self.postgres) {
            (Some(path), _) => {
                let conn = rusqlite::Connection::open_with_flags(
                    path,
                    rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
                )?;
                Probe::Sqlite {
                    conn: Mutex::new(conn),
                    path: path.clone(),
                }
            }
            (None, Some(_)) => Probe::Postgres {
                client: pg_connect(&self.url).await?,
            },
            (None, None) => unreachable!("a database is SQLite or PostgreSQL"),
        })
    }

    /// PostgreSQL: `VACUUM ANALYZE` after a bulk seed, as a database in steady state would be,
    /// so that autovacuum does not start on the new rows in the middle of a measurement.
    pub async fn settle(&self) -> anyhow::Result<()> {
        if self.postgres.is_some() {
            pg_connect(&self.url)
                .await?
                .batch_execute("VACUUM ANALYZE")
                .await?;
        }
        Ok(())
    }

    /// Size on disk (SQLite: the file and its WAL) or as PostgreSQL reports it.
    pub async fn size_mib(&self) -> anyhow::Result<f64> {
        match (&self.sqlite_path, &self.postgres) {
            (Some(path), _) => {
                let mut bytes = std::fs::metadata(path)?.len();
                bytes += std::fs::metadata(wal_path(path))
                    .map(|m| m.len())
                    .unwrap_or(0);
                Ok(bytes as f64 / (1024.0 * 1024.0))
            }
            (None, Some((_, name))) => {
                let client = pg_connect(&self.url).await?;
                let row = client
                    .query_one("SELECT pg_database_size($1)::bigint", &[name])
                    .await?;
                Ok(row.get::<_, i64>(0) as f64 / (1024.0 * 1024.0))
            }
            (None, None) => unreachable!(),
        }
    }

    /// Removes the database (PostgreSQL) or its files (SQLite).
    pub async fn remove(self) -> anyhow::Result<()> {
        if let Some(path) = &self.sqlite_path {
            for p in [path.clone(), wal_path(path), path.with_extension("db-shm")] {
                let _ = std::fs::remove_file(p);
            }
        }
        if let Some((admin, name)) = &self.postgres {
            let client = pg_connect(admin).await?;
            client
                .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .await?;
        }
        Ok(())
    }
}

fn wal_path(path: &std::path::Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push("-wal");
    PathBuf::from(p)
}

pub async fn pg_connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("cannot connect to PostgreSQL at {}", redact(url)))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            let _ = u.set_password(None);
            u.to_string()
        }
        Err(_) => "<unparseable url>".into(),
    }
}

/// Reads the database's write counters from outside tokenkeeper.
pub enum Probe {
    Sqlite {
        conn: Mutex<rusqlite::Connection>,
        path: PathBuf,
    },
    Postgres {
        client: tokio_postgres::Client,
    },
}

/// Counters that move when something writes.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Counters {
    /// SQLite: `PRAGMA data_version` on a connection held open by the probe; it changes when
    /// any other connection commits a write.
    pub sqlite_data_version: Option<i64>,
    /// SQLite: size of the WAL file, bytes (it grows with every committed write until a
    /// checkpoint restarts it).
    pub sqlite_wal_bytes: Option<u64>,
    /// SQLite: modification time of the WAL file, nanoseconds since the epoch.
    pub sqlite_wal_mtime_ns: Option<u128>,
    /// PostgreSQL: n_tup_ins + n_tup_upd + n_tup_del over the database's tables
    /// (`pg_stat_user_tables`). Flushed by each backend at most once a second, and at exit.
    pub pg_tuples_written: Option<i64>,
    /// PostgreSQL: `pg_stat_database.xact_commit` (read-only transactions count too).
    pub pg_xact_commit: Option<i64>,
    /// PostgreSQL: the next transaction id to be assigned. Only a transaction that writes gets
    /// one, so its delta counts write transactions exactly and at once.
    pub pg_next_xid: Option<i64>,
}

impl Probe {
    /// PostgreSQL: the server processes serving this database's other sessions (tokenkeeper's
    /// pool), to count their CPU time. SQLite: none, it runs inside tokenkeeper.
    pub async fn backend_pids(&self) -> anyhow::Result<Vec<u32>> {
        match self {
            Probe::Sqlite { .. } => Ok(Vec::new()),
            Probe::Postgres { client } => Ok(client
                .query(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()",
                    &[],
                )
                .await?
                .iter()
                .map(|r| r.get::<_, i32>(0) as u32)
                .collect()),
        }
    }

    pub async fn sample(&self) -> anyhow::Result<Counters> {
        match self {
            Probe::Sqlite { conn, path } => {
                let version: i64 = conn.lock().unwrap_or_else(|e| e.into_inner()).query_row(
                    "PRAGMA data_version",
                    [],
                    |r| r.get(0),
                )?;
                let wal = std::fs::metadata(wal_path(path)).ok();
                Ok(Counters {
                    sqlite_data_version: Some(version),
                    sqlite_wal_bytes: wal.as_ref().map(|m| m.len()),
                    sqlite_wal_mtime_ns: wal
                        .and_then(|m| m.modified().ok())
                        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                        .map(|d| d.as_nanos()),
                    ..Counters::default()
                })
            }
            Probe::Postgres { client } => {
                // One statement, so one transaction with a fresh statistics snapshot.
                let row = client
                    .query_one(
                        "SELECT \
                           (SELECT coalesce(sum(n_tup_ins + n_tup_upd + n_tup_del), 0)::bigint FROM pg_stat_user_tables), \
                           (SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()), \
                           pg_snapshot_xmax(pg_current_snapshot())::text::bigint",
                        &[],
                    )
                    .await?;
                Ok(Counters {
                    pg_tuples_written: Some(row.get(0)),
                    pg_xact_commit: Some(row.get(1)),
                    pg_next_xid: Some(row.get(2)),
                    ..Counters::default()
                })
            }
        }
    }
}

/// The difference between two samples, as the results report it.
pub fn writes_between(before: &Counters, after: &Counters) -> serde_json::Value {
    let d = |a: Option<i64>, b: Option<i64>| a.zip(b).map(|(a, b)| b - a);
    serde_json::json!({
        "sqlite_data_version_changed": before.sqlite_data_version.zip(after.sqlite_data_version).map(|(a, b)| a != b),
        "sqlite_wal_bytes_delta": before.sqlite_wal_bytes.zip(after.sqlite_wal_bytes).map(|(a, b)| b as i64 - a as i64),
        "sqlite_wal_touched": before.sqlite_wal_mtime_ns.zip(after.sqlite_wal_mtime_ns).map(|(a, b)| a != b),
        "pg_tuples_written_delta": d(before.pg_tuples_written, after.pg_tuples_written),
        "pg_xact_commit_delta": d(before.pg_xact_commit, after.pg_xact_commit),
        "pg_write_transactions": d(before.pg_next_xid, after.pg_next_xid),
    })
}

/// Whether anything was written between the samples: SQLite by every counter it has;
/// PostgreSQL by the tuples written to tokenkeeper's tables. (The transaction id counter is
/// reported beside it but not judged: autovacuum's ANALYZE takes one to update the server's
/// own statistics catalog.)
pub fn wrote(before: &Counters, after: &Counters) -> bool {
    before.sqlite_data_version != after.sqlite_data_version
        || before.sqlite_wal_bytes != after.sqlite_wal_bytes
        || before.sqlite_wal_mtime_ns != after.sqlite_wal_mtime_ns
        || before.pg_tuples_written != after.pg_tuples_written
}

/// A token pair as Notion mints them, with made-up tokens: enough to be sealed, stored and read
/// back, unknown to any simulator (token reads never call Notion).
fn fake_authorization(i: usize) -> NewAuthorization {
    let workspace = uuid::Uuid::new_v4().to_string();
    NewAuthorization::new(
        Provider::Notion,
        AuthorizationTarget::Connect {
            end_user_id: format!("bench-user-{i}"),
        },
        MintedPair {
            access_token: AccessToken::new(format!("ntn_{}", tokenkeeper::ids::random_token(30))),
            refresh_token: Some(RefreshToken::new(format!(
                "nrt_{}",
                tokenkeeper::ids::random_token(30)
            ))),
            bot_id: BotId(uuid::Uuid::new_v4().to_string()),
            workspace_id: workspace,
            workspace_name: Some(format!("Bench workspace {i}")),
            workspace_icon: None,
            metadata: serde_json::json!({"owner": {"type": "user"}, "duplicated_template_id": null}),
            provider_request_id: None,
            obtained_at: chrono::Utc::now(),
            expires_at: None,
        },
    )
}

/// Seeds `n` connections with tokenkeeper's own store code, `batch` per transaction and up to
/// `parallel` transactions at once (PostgreSQL runs them side by side; SQLite queues them on
/// its one writer, which still lets the next batch be generated while one commits); prints
/// progress. Returns the ids and how long it took.
pub async fn seed(
    store: &Arc<Store>,
    n: usize,
    batch: usize,
    parallel: usize,
) -> anyhow::Result<(Vec<ConnectionId>, Duration)> {
    let start = Instant::now();
    let mut ids = Vec::with_capacity(n);
    let mut last_report = Instant::now();
    let mut next = 0;
    let mut inflight = tokio::task::JoinSet::new();
    while ids.len() < n {
        while next < n && inflight.len() < parallel.max(1) {
            let (first, size) = (next, batch.min(n - next));
            next += size;
            let store = store.clone();
            inflight.spawn(async move {
                let auths: Vec<NewAuthorization> =
                    (first..first + size).map(fake_authorization).collect();
                store.import_authorizations(auths).await
            });
        }
        let Some(done) = inflight.join_next().await else {
            anyhow::bail!("the seeder ran out of work before {n} connections");
        };
        ids.append(&mut done??);
        if last_report.elapsed() > Duration::from_secs(2) || ids.len() == n {
            last_report = Instant::now();
            eprintln!(
                "    seeded {}/{n} connections ({:.0}/s)",
                ids.len(),
                ids.len() as f64 / start.elapsed().as_secs_f64()
            );
        }
    }
    Ok((ids, start.elapsed()))
}
