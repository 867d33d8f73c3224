//! A database the tests can take away and give back: the outage tests (`outage.rs`) and the
//! token cache's (`token_cache.rs`).

use std::path::PathBuf;
use std::time::Duration;

use super::db::Backend;
use super::pg_server::PgServer;

/// A database the test can take away and give back.
pub enum Database {
    Sqlite {
        path: PathBuf,
        _dir: tempfile::TempDir,
        /// Holds `BEGIN EXCLUSIVE` during an outage.
        locker: Option<rusqlite::Connection>,
    },
    Postgres(PgServer),
}

impl Database {
    pub fn new(backend: Backend) -> Database {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().unwrap();
                Database::Sqlite {
                    path: dir.path().join("outage.db"),
                    _dir: dir,
                    locker: None,
                }
            }
            Backend::Postgres => Database::Postgres(PgServer::start()),
        }
    }

    pub fn url(&self) -> String {
        match self {
            Database::Sqlite { path, .. } => format!("sqlite://{}", path.display()),
            Database::Postgres(pg) => pg.url(),
        }
    }

    /// SQLite: a connection holds `BEGIN EXCLUSIVE`; PostgreSQL: the server stops.
    pub fn go_away(&mut self) {
        match self {
            Database::Sqlite { path, locker, .. } => {
                let conn = rusqlite::Connection::open(&*path).unwrap();
                conn.busy_timeout(Duration::from_secs(30)).unwrap();
                conn.execute_batch("BEGIN EXCLUSIVE").unwrap();
                *locker = Some(conn);
            }
            Database::Postgres(pg) => pg.down(),
        }
    }

    pub fn come_back(&mut self) {
        match self {
            Database::Sqlite { locker, .. } => {
                let conn = locker.take().expect("the database was locked");
                conn.execute_batch("ROLLBACK").unwrap();
            }
            Database::Postgres(pg) => pg.up(),
        }
    }
}
