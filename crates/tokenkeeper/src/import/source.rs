//! Reading an existing token store: a `.csv` or `.jsonl` file, or a query on a SQLite or
//! PostgreSQL database (docs/DESIGN.md, "Bringing existing integrations in").
//!
//! Columns or fields are matched by name, case-insensitively: `bot_id` and `access_token` are
//! required, `refresh_token`, `workspace_id`, `workspace_name`, `end_user_id`, `authorized_at`
//! and `revoked_at` optional, anything else ignored. Tokens become `AccessToken` and
//! `RefreshToken` the moment they are read, so nothing downstream can print them; errors name
//! rows and columns, never values.
//!
//! Nothing here writes: a SQLite source is opened read-only, and a PostgreSQL query runs in a
//! `READ ONLY` transaction that is rolled back.

use std::path::{Path, PathBuf};

use chrono::{DateTime, NaiveDate, NaiveDateTime, TimeZone, Utc};

use crate::ids::{AccessToken, RefreshToken};
use crate::store::DatabaseUrl;

/// Where the rows come from.
#[derive(Debug, Clone)]
pub enum Source {
    Csv(PathBuf),
    Jsonl(PathBuf),
    Sqlite { path: PathBuf, query: String },
    Postgres { url: String, query: String },
}

/// Why a source could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The command line names no usable source (exit status 2).
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Read(String),
}

/// One row of the source, its tokens already secrets.
#[derive(Debug, Clone)]
pub struct SourceRow {
    /// The row's number among the data rows, from 1 (a file's header is not counted).
    pub number: usize,
    pub bot_id: Option<String>,
    pub access_token: Option<AccessToken>,
    pub refresh_token: Option<RefreshToken>,
    pub workspace_id: Option<String>,
    pub workspace_name: Option<String>,
    pub end_user_id: Option<String>,
    pub authorized_at: Option<DateTime<Utc>>,
    /// Whether the row is revoked: its `revoked_at` holds anything at all.
    pub revoked: bool,
    /// When, if `revoked_at` could be read as a time.
    pub revoked_at: Option<DateTime<Utc>>,
    /// A time column held something that is not a time (kept as unknown, never guessed).
    pub unreadable_time: bool,
    /// Why the row cannot be imported (a required column is empty, the line is not JSON).
    pub problem: Option<String>,
}

/// Everything read from a source.
#[derive(Debug)]
pub struct SourceData {
    pub rows: Vec<SourceRow>,
    /// For a database source: whether the table that `bot_id` comes from makes it unique (a
    /// primary key or a unique index on that column alone): the first hazard of
    /// docs/notion-wire.md §6. `None` for files, or when the query's `bot_id` cannot be traced
    /// to one table's column.
    pub bot_id_unique: Option<bool>,
    /// The table `bot_id` was traced to, when it was.
    pub table: Option<String>,
}

/// The columns we read; any other is ignored.
const FIELDS: [&str; 8] = [
    "bot_id",
    "access_token",
    "refresh_token",
    "workspace_id",
    "workspace_name",
    "end_user_id",
    "authorized_at",
    "revoked_at",
];

impl Source {
    /// The source `--from` names, with `--query` for a database.
    pub fn parse(from: &str, query: Option<&str>) -> Result<Source, SourceError> {
        let query = query.map(|q| q.trim().trim_end_matches(';').trim().to_owned());
        if from.starts_with("sqlite://")
            || from.starts_with("postgres://")
            || from.starts_with("postgresql://")
        {
            let query = query.filter(|q| !q.is_empty()).ok_or_else(|| {
                SourceError::Usage(
                    "--query is required with a database source, e.g. --query 'SELECT * FROM \
                     notion_tokens'"
                        .into(),
                )
            })?;
            return match DatabaseUrl::parse(from).map_err(SourceError::Usage)? {
                DatabaseUrl::Sqlite(path) => Ok(Source::Sqlite { path, query }),
                DatabaseUrl::Postgres(url) => Ok(Source::Postgres { url, query }),
            };
        }
        if query.is_some() {
            return Err(SourceError::Usage(
                "--query goes with a database source (sqlite://… or postgres://…), not a file"
                    .into(),
            ));
        }
        let path = PathBuf::from(from);
        match path.extension().and_then(|e| e.to_str()) {
            Some(e) if e.eq_ignore_ascii_case("csv") => Ok(Source::Csv(path)),
            Some(e) if e.eq_ignore_ascii_case("jsonl") => Ok(Source::Jsonl(path)),
            _ => Err(SourceError::Usage(format!(
                "--from {from:?}: expected a .csv or .jsonl file, or sqlite://… or postgres://… \
                 with --query"
            ))),
        }
    }

    /// A description for reports, without any password.
    pub fn describe(&self) -> String {
        match self {
            Source::Csv(p) => format!("CSV file {}", p.display()),
            Source::Jsonl(p) => format!("JSON lines file {}", p.display()),
            Source::Sqlite { path, .. } => format!("SQLite database {}", path.display()),
            Source::Postgres { url, .. } => match url::Url::parse(url) {
                Ok(mut u) => {
                    let _ = u.set_password(None);
                    u.set_query(None);
                    format!("PostgreSQL database {u}")
                }
                Err(_) => "PostgreSQL database".into(),
            },
        }
    }

    pub fn is_database(&self) -> bool {
        matches!(self, Source::Sqlite { .. } | Source::Postgres { .. })
    }

    /// Reads every row.
    pub async fn read(&self) -> Result<SourceData, SourceError> {
        match self {
            Source::Csv(path) => {
                let file = std::fs::File::open(path)
                    .map_err(|e| SourceError::Read(format!("{}: {e}", path.display())))?;
                Ok(SourceData {
                    rows: read_csv(file, &path.display().to_string())?,
                    bot_id_unique: None,
                    table: None,
                })
            }
            Source::Jsonl(path) => Ok(SourceData {
                rows: read_jsonl(path)?,
                bot_id_unique: None,
                table: None,
            }),
            Source::Sqlite { path, query } => {
                let (path, query) = (path.clone(), query.clone());
                tokio::task::spawn_blocking(move || read_sqlite(&path, &query))
                    .await
                    .map_err(|e| SourceError::Read(format!("the SQLite reader failed: {e}")))?
            }
            Source::Postgres { url, query } => read_postgres(url, query).await,
        }
    }
}

/// Builds a row from a lookup of its fields by name (already lowercase).
pub(crate) fn row_of_fields(number: usize, field: impl Fn(&str) -> Option<String>) -> SourceRow {
    let get = |name: &str| field(name).filter(|v| !v.trim().is_empty());
    let mut unreadable_time = false;
    let mut time = |name: &str| {
        let raw = get(name)?;
        let parsed = parse_time(raw.trim());
        unreadable_time |= parsed.is_none();
        parsed
    };
    let authorized_at = time("authorized_at");
    let revoked_at = time("revoked_at");
    let revoked = get("revoked_at").is_some();
    let bot_id = get("bot_id").map(|b| b.trim().to_owned());
    let access_token = get("access_token").map(|t| AccessToken::new(t.trim().to_owned()));
    let problem = match (&bot_id, &access_token) {
        (None, _) => Some("bot_id is empty".to_owned()),
        (_, None) => Some("access_token is empty".to_owned()),
        _ => None,
    };
    SourceRow {
        number,
        bot_id,
        access_token,
        refresh_token: get("refresh_token").map(|t| RefreshToken::new(t.trim().to_owned())),
        workspace_id: get("workspace_id").map(|v| v.trim().to_owned()),
        workspace_name: get("workspace_name"),
        end_user_id: get("end_user_id").map(|v| v.trim().to_owned()),
        authorized_at,
        revoked,
        revoked_at,
        unreadable_time,
        problem,
    }
}

/// The index of each field we read among `headers`, or an error naming a missing required one.
fn locate(headers: &[String], what: &str) -> Result<[Option<usize>; 8], SourceError> {
    let mut at = [None; 8];
    for (i, name) in FIELDS.iter().enumerate() {
        at[i] = headers
            .iter()
            .position(|h| h.trim().eq_ignore_ascii_case(name));
    }
    for (i, name) in FIELDS.iter().enumerate().take(2) {
        if at[i].is_none() {
            return Err(SourceError::Read(format!(
                "{what} has no column named {name} (found: {})",
                headers.join(", ")
            )));
        }
    }
    Ok(at)
}

fn read_csv(reader: impl std::io::Read, what: &str) -> Result<Vec<SourceRow>, SourceError> {
    let mut csv = csv::ReaderBuilder::new().flexible(true).from_reader(reader);
    let headers: Vec<String> = csv
        .headers()
        .map_err(|e| SourceError::Read(format!("{what}: the header row: {e}")))?
        .iter()
        .map(str::to_owned)
        .collect();
    let at = locate(&headers, what)?;
    let mut rows = Vec::new();
    let mut record = csv::StringRecord::new();
    let mut number = 0;
    loop {
        // csv's errors name a position and field counts, never a field's content.
        match csv.read_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {
                number += 1;
                rows.push(row_of_fields(number, |name| {
                    let i = FIELDS.iter().position(|f| *f == name)?;
                    at[i].and_then(|col| record.get(col)).map(str::to_owned)
                }));
            }
            Err(e) => return Err(SourceError::Read(format!("{what}: {e}"))),
        }
    }
    Ok(rows)
}

fn read_jsonl(path: &Path) -> Result<Vec<SourceRow>, SourceError> {
    use std::io::BufRead;
    let file = std::fs::File::open(path)
        .map_err(|e| SourceError::Read(format!("{}: {e}", path.display())))?;
    let mut rows = Vec::new();
    let mut number = 0;
    for line in std::io::BufReader::new(file).lines() {
        let line = line.map_err(|e| SourceError::Read(format!("{}: {e}", path.display())))?;
        if line.trim().is_empty() {
            continue;
        }
        number += 1;
        let object = match serde_json::from_str::<serde_json::Value>(&line) {
            Ok(serde_json::Value::Object(map)) => map,
            // serde_json's messages give a line and column, never the text.
            Ok(_) => {
                rows.push(problem_row(number, "the line is not a JSON object".into()));
                continue;
            }
            Err(e) => {
                rows.push(problem_row(number, format!("the line is not JSON ({e})")));
                continue;
            }
        };
        let lower: Vec<(String, &serde_json::Value)> = object
            .iter()
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v))
            .collect();
        rows.push(row_of_fields(number, |name| {
            lower
                .iter()
                .find(|(k, _)| k == name)
                .and_then(|(_, v)| match v {
                    serde_json::Value::Null => None,
                    serde_json::Value::String(s) => Some(s.clone()),
                    other => Some(other.to_string()),
                })
        }));
    }
    Ok(rows)
}

fn problem_row(number: usize, problem: String) -> SourceRow {
    SourceRow {
        problem: Some(problem),
        ..row_of_fields(number, |_| None)
    }
}

fn read_sqlite(path: &Path, query: &str) -> Result<SourceData, SourceError> {
    use rusqlite::hooks::{AuthAction, Authorization};
    use rusqlite::types::ValueRef;
    use rusqlite::OpenFlags;
    use std::sync::{Arc, Mutex};

    let what = format!("SQLite database {}", path.display());
    let read_error = |e: rusqlite::Error| SourceError::Read(format!("{what}: {e}"));
    if !path.exists() {
        return Err(SourceError::Read(format!("{what} does not exist")));
    }
    let conn = rusqlite::Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(read_error)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(read_error)?;
    // The authorizer sees every table and column the query reads while it is prepared: how
    // `bot_id` is traced to its table without parsing SQL.
    let tables: Arc<Mutex<Vec<String>>> = Arc::default();
    let seen = tables.clone();
    conn.authorizer(Some(move |ctx: rusqlite::hooks::AuthContext<'_>| {
        if let AuthAction::Read { table_name, .. } = ctx.action {
            let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
            if !table_name.starts_with("sqlite_") && !seen.iter().any(|t| t == table_name) {
                seen.push(table_name.to_owned());
            }
        }
        Authorization::Allow
    }));
    let mut stmt = conn.prepare(query).map_err(read_error)?;
    conn.authorizer(None::<fn(rusqlite::hooks::AuthContext<'_>) -> Authorization>);
    if !stmt.readonly() {
        return Err(SourceError::Usage(
            "--query must only read (a SELECT): audit and import never write to the source".into(),
        ));
    }
    let headers: Vec<String> = stmt.column_names().iter().map(|c| c.to_string()).collect();
    let at = locate(&headers, &what)?;
    let mut rows = Vec::new();
    let mut cursor = stmt.query([]).map_err(read_error)?;
    let mut number = 0;
    while let Some(row) = cursor.next().map_err(read_error)? {
        number += 1;
        let mut values: [Option<String>; 8] = Default::default();
        for (i, col) in at.iter().enumerate() {
            let Some(col) = col else { continue };
            values[i] = match row.get_ref(*col).map_err(read_error)? {
                ValueRef::Null => None,
                ValueRef::Integer(n) => Some(n.to_string()),
                ValueRef::Real(f) => Some(f.to_string()),
                ValueRef::Text(t) => Some(String::from_utf8_lossy(t).into_owned()),
                ValueRef::Blob(b) => Some(String::from_utf8_lossy(b).into_owned()),
            };
        }
        rows.push(row_of_fields(number, |name| {
            let i = FIELDS.iter().position(|f| *f == name)?;
            values[i].clone()
        }));
    }
    drop(cursor);
    drop(stmt);
    let tables = tables.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let (bot_id_unique, table) = match tables.as_slice() {
        [table] => (
            sqlite_column_unique(&conn, table, "bot_id").map_err(read_error)?,
            Some(table.clone()),
        ),
        _ => (None, None),
    };
    Ok(SourceData {
        rows,
        bot_id_unique,
        table,
    })
}

/// Whether `table.column` is unique on its own: the table's only primary-key column, or the
/// only column of a unique, non-partial index. `None` when the table has no such column.
fn sqlite_column_unique(
    conn: &rusqlite::Connection,
    table: &str,
    column: &str,
) -> rusqlite::Result<Option<bool>> {
    let mut info = conn.prepare("SELECT name, pk FROM pragma_table_info(?1)")?;
    let columns: Vec<(String, i64)> = info
        .query_map([table], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    if !columns.iter().any(|(n, _)| n.eq_ignore_ascii_case(column)) {
        return Ok(None);
    }
    let pk: Vec<&String> = columns
        .iter()
        .filter(|(_, pk)| *pk > 0)
        .map(|(n, _)| n)
        .collect();
    if pk.len() == 1 && pk[0].eq_ignore_ascii_case(column) {
        return Ok(Some(true));
    }
    let mut list = conn.prepare("SELECT name, \"unique\", partial FROM pragma_index_list(?1)")?;
    let indexes: Vec<(String, bool, bool)> = list
        .query_map([table], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<_, _>>()?;
    let mut cols = conn.prepare("SELECT name FROM pragma_index_info(?1)")?;
    for (index, unique, partial) in indexes {
        if !unique || partial {
            continue;
        }
        let names: Vec<Option<String>> = cols
            .query_map([&index], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        if let [Some(only)] = names.as_slice() {
            if only.eq_ignore_ascii_case(column) {
                return Ok(Some(true));
            }
        }
    }
    Ok(Some(false))
}

async fn read_postgres(url: &str, query: &str) -> Result<SourceData, SourceError> {
    use futures::StreamExt;
    let what = "the PostgreSQL source";
    let read_error = |e: tokio_postgres::Error| {
        SourceError::Read(format!(
            "{what}: {}",
            e.as_db_error()
                .map(|db| db.message().to_owned())
                .unwrap_or_else(|| e.to_string())
        ))
    };
    let (mut client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .map_err(read_error)?;
    let driver = tokio::spawn(connection);
    let tx = client.transaction().await.map_err(read_error)?;
    // Read only, whatever the query says; times as ISO 8601 in UTC, which `parse_time` reads.
    tx.batch_execute(
        "SET TRANSACTION READ ONLY; SET LOCAL DateStyle TO 'ISO, YMD'; SET LOCAL TimeZone TO 'UTC'",
    )
    .await
    .map_err(read_error)?;
    let statement = tx.prepare(query).await.map_err(read_error)?;
    let traced = statement
        .columns()
        .iter()
        .find(|c| c.name().eq_ignore_ascii_case("bot_id"))
        .and_then(|c| Some((c.table_oid()?, c.column_id()?)));
    let (bot_id_unique, table) = match traced {
        Some((oid, column)) => {
            let row = tx
                .query_one(
                    "SELECT $1::oid::regclass::text, EXISTS (SELECT 1 FROM pg_index i \
                     WHERE i.indrelid = $1 AND i.indisunique AND i.indpred IS NULL \
                     AND i.indnkeyatts = 1 AND i.indkey[0] = $2)",
                    &[&oid, &column],
                )
                .await
                .map_err(read_error)?;
            (Some(row.get::<_, bool>(1)), Some(row.get::<_, String>(0)))
        }
        None => (None, None),
    };
    // COPY streams the answer with every value as text, whatever its type.
    let copy = format!("COPY ({query}) TO STDOUT WITH (FORMAT csv, HEADER true)");
    let stream = tx.copy_out(&copy).await.map_err(read_error)?;
    futures::pin_mut!(stream);
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.next().await {
        bytes.extend_from_slice(&chunk.map_err(read_error)?);
    }
    tx.rollback().await.map_err(read_error)?;
    drop(client);
    let _ = driver.await;
    let rows = read_csv(bytes.as_slice(), what)?;
    Ok(SourceData {
        rows,
        bot_id_unique,
        table,
    })
}

/// Reads a time as an existing token store may hold it: RFC 3339, PostgreSQL's ISO form
/// (`2026-06-08 09:00:00+00`), a time without zone (taken as UTC), a date, or seconds or
/// milliseconds since the epoch.
pub fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.to_utc());
    }
    for format in ["%Y-%m-%d %H:%M:%S%.f%#z", "%Y-%m-%dT%H:%M:%S%.f%#z"] {
        if let Ok(t) = DateTime::parse_from_str(s, format) {
            return Some(t.to_utc());
        }
    }
    for format in ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(s, format) {
            return Some(t.and_utc());
        }
    }
    if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return d.and_hms_opt(0, 0, 0).map(|t| t.and_utc());
    }
    if let Ok(n) = s.parse::<i64>() {
        // Seconds until the year 5138, milliseconds after: no store holds times that far off.
        return if n.abs() < 100_000_000_000 {
            Utc.timestamp_opt(n, 0).single()
        } else {
            Utc.timestamp_millis_opt(n).single()
        };
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_read_in_every_form_stores_use_and_never_guessed() {
        let at = Utc.with_ymd_and_hms(2026, 6, 8, 9, 30, 0).unwrap();
        for s in [
            "2026-06-08T09:30:00Z",
            "2026-06-08T11:30:00+02:00",
            "2026-06-08 09:30:00+00",
            "2026-06-08 09:30:00.000+00",
            "2026-06-08 09:30:00",
            "2026-06-08T09:30:00",
            "1780911000",
            "1780911000000",
        ] {
            assert_eq!(parse_time(s), Some(at), "{s}");
        }
        assert_eq!(
            parse_time("2026-06-08"),
            Some(Utc.with_ymd_and_hms(2026, 6, 8, 0, 0, 0).unwrap())
        );
        assert_eq!(parse_time("yesterday"), None);
        assert_eq!(parse_time("08/06/2026"), None);
    }

    #[test]
    fn csv_columns_are_matched_by_name_and_others_ignored() {
        let text = "id,Bot_ID,access_token,refresh_token,extra,revoked_at\n\
                    1,b1,ntn_a,nrt_a,x,\n\
                    2,b1,ntn_b,,y,2026-06-08 09:30:00+00\n\
                    3,,ntn_c,nrt_c,z,\n";
        let rows = read_csv(text.as_bytes(), "test").unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0].bot_id.as_deref(), Some("b1"));
        assert_eq!(
            rows[0].access_token.as_ref().unwrap().expose_secret(),
            "ntn_a"
        );
        assert!(!rows[0].revoked && rows[0].problem.is_none());
        assert!(rows[1].refresh_token.is_none() && rows[1].revoked);
        assert!(rows[1].revoked_at.is_some());
        assert_eq!(rows[2].problem.as_deref(), Some("bot_id is empty"));
        let missing = read_csv("bot_id,token\nb,t\n".as_bytes(), "test").unwrap_err();
        assert!(missing.to_string().contains("access_token"), "{missing}");
    }

    #[test]
    fn sources_are_told_apart_and_database_sources_need_a_query() {
        assert!(matches!(Source::parse("x.csv", None), Ok(Source::Csv(_))));
        assert!(matches!(
            Source::parse("x.JSONL", None),
            Ok(Source::Jsonl(_))
        ));
        assert!(Source::parse("x.txt", None).is_err());
        assert!(Source::parse("sqlite://x.db", None).is_err());
        assert!(Source::parse("x.csv", Some("SELECT 1")).is_err());
        let pg = Source::parse("postgres://u:hunter2@h/db", Some("SELECT * FROM t;")).unwrap();
        assert!(!pg.describe().contains("hunter2"), "{}", pg.describe());
        assert!(matches!(pg, Source::Postgres { query, .. } if query == "SELECT * FROM t"));
    }
}
