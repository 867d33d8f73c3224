//! The store's reads, written once for both backends. None of them locks or writes.

use super::db::{Db, Param};
use super::sealed::{open_grant, open_session_state};
use super::{sql, CheckProgress, History, KeyUsage, StatusCounts, StoreError};
use crate::ids::{ConnectionId, GrantId, SessionId};
use crate::ledger::{
    ConnectSession, Connection, ConnectionFilter, Event, GrantRecord, Job, JobKind, JobStatus,
    OpenGrant,
};
use chrono::{DateTime, Utc};

pub(crate) async fn get_connection(
    db: &impl Db,
    id: &ConnectionId,
) -> Result<Option<Connection>, StoreError> {
    Ok(db
        .query_opt(
            sql::CONNECTION_BY_ID,
            &[Param::Text(id.as_str())],
            sql::connection,
        )
        .await?
        .map(|row| row.connection))
}

/// Connections matching `filter`, by id, at most `filter.limit` (1 to 1000; 0 means 100).
///
/// Each filter is an equality on a column whose index continues with the id (migrations 0001
/// and 0006), so a page is one short index range at any number of connections. A search is one
/// such range per way the text may name a connection (`SEARCHED`), merged here by id, rather
/// than one `OR` that a planner may answer by scanning the table.
pub(crate) async fn list_connections(
    db: &impl Db,
    filter: &ConnectionFilter,
) -> Result<Vec<Connection>, StoreError> {
    let limit = match filter.limit {
        0 => 100,
        n => n.min(1000),
    };
    let Some(search) = filter
        .search
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
    else {
        return connections_where(db, filter, None, limit).await;
    };
    let folded = search.to_lowercase();
    let mut found = Vec::new();
    for (column, folds) in SEARCHED {
        let value = if folds { folded.as_str() } else { search };
        found.extend(connections_where(db, filter, Some((column, value)), limit).await?);
    }
    found.sort_by(|a, b| a.id.as_str().cmp(b.id.as_str()));
    found.dedup_by(|a, b| a.id == b.id);
    found.truncate(limit as usize);
    Ok(found)
}

/// What the search box matches, each exactly and through an index in id order: the column's
/// expression, and whether the text is compared in lower case (a workspace's name, in any
/// case; SQLite's `lower` folds ASCII letters only).
pub(crate) const SEARCHED: [(&str, bool); 5] = [
    ("c.id =", false),
    ("c.bot_id =", false),
    ("c.workspace_id =", false),
    ("c.end_user_id =", false),
    ("lower(c.workspace_name) =", true),
];

/// One page of `list_connections`, with at most one searched column.
async fn connections_where(
    db: &impl Db,
    filter: &ConnectionFilter,
    searched: Option<(&str, &str)>,
    limit: u32,
) -> Result<Vec<Connection>, StoreError> {
    let (sql, params) = connections_sql(filter, searched, limit);
    Ok(db
        .query(&sql, &params, sql::connection)
        .await?
        .into_iter()
        .map(|row| row.connection)
        .collect())
}

/// The statement of `connections_where` and its parameters (a unit test of the SQLite
/// backend reads its query plans).
pub(crate) fn connections_sql<'a>(
    filter: &'a ConnectionFilter,
    searched: Option<(&str, &'a str)>,
    limit: u32,
) -> (String, Vec<Param<'a>>) {
    let mut clauses = Vec::new();
    let mut params: Vec<Param<'_>> = Vec::new();
    let mut push = |clause: &str, value| {
        params.push(value);
        clauses.push(format!("{clause} ${}", params.len()));
    };
    if let Some((column, value)) = searched {
        push(column, Param::Text(value));
    }
    if let Some(p) = filter.provider {
        push("c.provider =", Param::Text(p.as_str()));
    }
    if let Some(u) = &filter.end_user_id {
        push("c.end_user_id =", Param::Text(u));
    }
    if let Some(w) = &filter.workspace_id {
        push("c.workspace_id =", Param::Text(w));
    }
    if let Some(b) = &filter.bot_id {
        push("c.bot_id =", Param::Text(b));
    }
    if let Some(s) = filter.status {
        // Three statuses split a million connections into a few large ranges: beside a
        // narrower filter, the status must not be the index the planner reads by. SQLite has no
        // statistics to tell, so the status is written as an expression no index answers.
        let narrower = searched.is_some()
            || filter.end_user_id.is_some()
            || filter.workspace_id.is_some()
            || filter.bot_id.is_some();
        let clause = if narrower {
            "c.status || '' ="
        } else {
            "c.status ="
        };
        push(clause, Param::Text(s.as_str()));
    }
    if let Some(after) = &filter.after {
        push("c.id >", Param::Text(after.as_str()));
    }
    params.push(Param::Int(i64::from(limit)));
    let filter_sql = if clauses.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", clauses.join(" AND "))
    };
    let sql = format!(
        "SELECT {} FROM connections c {filter_sql} ORDER BY c.id LIMIT ${}",
        sql::CONNECTION_COLUMNS,
        params.len()
    );
    (sql, params)
}

/// The connection and its current grant with tokens opened: one indexed read.
pub(crate) async fn current_grant(
    db: &impl Db,
    id: &ConnectionId,
) -> Result<Option<(Connection, Option<OpenGrant>)>, StoreError> {
    let Some((row, grant)) = db
        .query_opt(
            sql::CURRENT_GRANT,
            &[Param::Text(id.as_str())],
            sql::connection_and_grant,
        )
        .await?
    else {
        return Ok(None);
    };
    let grant = grant.map(|g| open_grant(db.keys(), g)).transpose()?;
    Ok(Some((row.connection, grant)))
}

/// What a token read needs of the connection (`sql::TOKEN_OF_CONNECTION`): one indexed read,
/// the access token left sealed.
pub(crate) async fn token_of_connection(
    db: &impl Db,
    id: &ConnectionId,
) -> Result<Option<sql::TokenRow>, StoreError> {
    db.query_opt(
        sql::TOKEN_OF_CONNECTION,
        &[Param::Text(id.as_str())],
        sql::token_row,
    )
    .await
}

pub(crate) async fn get_grant(
    db: &impl Db,
    id: &ConnectionId,
    grant: &GrantId,
) -> Result<Option<OpenGrant>, StoreError> {
    db.query_opt(
        sql::GRANT_OF_CONNECTION,
        &[Param::Text(grant.as_str()), Param::Text(id.as_str())],
        sql::grant,
    )
    .await?
    .map(|g| open_grant(db.keys(), g))
    .transpose()
}

pub(crate) async fn list_grants(
    db: &impl Db,
    id: &ConnectionId,
) -> Result<Vec<GrantRecord>, StoreError> {
    Ok(db
        .query(
            sql::GRANTS_OF_CONNECTION,
            &[Param::Text(id.as_str())],
            sql::grant,
        )
        .await?
        .into_iter()
        .map(|g| g.record)
        .collect())
}

pub(crate) async fn list_events(db: &impl Db, id: &ConnectionId) -> Result<Vec<Event>, StoreError> {
    db.query(
        sql::EVENTS_OF_CONNECTION,
        &[Param::Text(id.as_str())],
        sql::event,
    )
    .await
}

pub(crate) async fn get_session(
    db: &impl Db,
    id: &SessionId,
) -> Result<Option<ConnectSession>, StoreError> {
    db.query_opt(
        sql::SESSION_BY_ID,
        &[Param::Text(id.as_str())],
        sql::session,
    )
    .await
}

/// The connection's live reusable reconnect session (unused, unexpired, its state still
/// opening with our key ring) and its `state`.
pub(crate) async fn live_reconnect_link(
    db: &impl Db,
    connection: &ConnectionId,
) -> Result<Option<(ConnectSession, String)>, StoreError> {
    let now = db.now();
    let Some((session, sealed)) = db
        .query_opt(
            sql::REUSABLE_SESSION_OF_CONNECTION,
            &[Param::Text(connection.as_str())],
            sql::reusable_session,
        )
        .await?
    else {
        return Ok(None);
    };
    if session.expires_at <= now {
        return Ok(None);
    }
    // A state sealed with a key this ring no longer has cannot be handed out again: a new
    // link replaces it rather than failing the caller's read.
    Ok(
        open_session_state(db.keys(), connection, &session.id, &sealed)
            .ok()
            .map(|state| (session, state)),
    )
}

/// Jobs of one kind, newest first, optionally of one status, at most `limit` (1 to 1000),
/// older than the job `before` (keyset pagination by id, which sorts by creation).
pub(crate) async fn list_jobs(
    db: &impl Db,
    kind: JobKind,
    status: Option<JobStatus>,
    before: Option<&str>,
    limit: u32,
) -> Result<Vec<Job>, StoreError> {
    let mut clauses = vec!["kind = $1".to_owned()];
    let mut params: Vec<Param<'_>> = vec![Param::Text(kind.as_str())];
    if let Some(status) = status {
        params.push(Param::Text(status.as_str()));
        clauses.push(format!("status = ${}", params.len()));
    }
    if let Some(before) = before {
        params.push(Param::Text(before));
        clauses.push(format!("id < ${}", params.len()));
    }
    params.push(Param::Int(i64::from(limit.clamp(1, 1000))));
    let sql = format!(
        "SELECT {} FROM jobs WHERE {} ORDER BY id DESC LIMIT ${}",
        sql::JOB_COLUMNS,
        clauses.join(" AND "),
        params.len()
    );
    db.query(&sql, &params, sql::job).await
}

/// A grant by id, whatever its connection (without its tokens).
pub(crate) async fn grant_by_id(
    db: &impl Db,
    grant: &GrantId,
) -> Result<Option<GrantRecord>, StoreError> {
    Ok(db
        .query_opt(sql::GRANT_BY_ID, &[Param::Text(grant.as_str())], sql::grant)
        .await?
        .map(|g| g.record))
}

/// What the metrics' gauges report: connections by status, jobs by kind and status. Each is a
/// scan (of an index, for connections), so the metrics call it at most once per interval.
pub(crate) async fn status_counts(db: &impl Db) -> Result<StatusCounts, StoreError> {
    Ok(StatusCounts {
        connections: db
            .query(sql::CONNECTIONS_BY_STATUS, &[], sql::status_count)
            .await?,
        jobs: db
            .query(sql::JOBS_BY_KIND_AND_STATUS, &[], sql::kind_status_count)
            .await?,
    })
}

/// The fingerprints (access, refresh) of every pair the ledger holds for each of `bots`, in
/// order; on PostgreSQL the lookups pipeline on one connection.
pub(crate) async fn held_pairs(
    db: &impl Db,
    bots: &[String],
) -> Result<Vec<Vec<(String, Option<String>)>>, StoreError> {
    use futures::stream::{FuturesOrdered, StreamExt};
    let mut held = Vec::with_capacity(bots.len());
    let mut inflight = FuturesOrdered::new();
    for bot in bots {
        inflight.push_back(async move {
            db.query(sql::GRANT_FINGERPRINTS_OF_BOT, &[Param::Text(bot)], |row| {
                Ok((row.text(1)?, row.opt_text(2)?))
            })
            .await
        });
    }
    while let Some(pairs) = inflight.next().await {
        held.push(pairs?);
    }
    Ok(held)
}

/// A connection's newest grants and events (at most `limit` of each, newest first) and how
/// many it has in all: what the console's page of one connection shows.
pub(crate) async fn history(
    db: &impl Db,
    id: &ConnectionId,
    limit: u32,
) -> Result<History, StoreError> {
    let limit = Param::Int(i64::from(limit.clamp(1, 1000)));
    let key = Param::Text(id.as_str());
    let count = |statement| async move {
        Ok::<_, StoreError>(
            db.query_opt(statement, &[Param::Text(id.as_str())], sql::count)
                .await?
                .unwrap_or(0),
        )
    };
    Ok(History {
        grants: db
            .query(sql::RECENT_GRANTS_OF_CONNECTION, &[key, limit], sql::grant)
            .await?
            .into_iter()
            .map(|g| g.record)
            .collect(),
        grant_count: count(sql::COUNT_GRANTS_OF_CONNECTION).await?,
        events: db
            .query(sql::RECENT_EVENTS_OF_CONNECTION, &[key, limit], sql::event)
            .await?,
        event_count: count(sql::COUNT_EVENTS_OF_CONNECTION).await?,
    })
}

/// A connection's newest jobs of one kind (its webhook deliveries), newest first.
pub(crate) async fn recent_jobs_of_connection(
    db: &impl Db,
    id: &ConnectionId,
    kind: JobKind,
    limit: u32,
) -> Result<Vec<Job>, StoreError> {
    db.query(
        sql::RECENT_JOBS_OF_CONNECTION,
        &[
            Param::Text(id.as_str()),
            Param::Text(kind.as_str()),
            Param::Int(i64::from(limit.clamp(1, 1000))),
        ],
        sql::job,
    )
    .await
}

/// How far the health check has come: active connections, how many were checked since
/// `since` (one interval ago), how many never were, and the oldest check. Index ranges of
/// `connections_due_check`, except the count of active connections, which the sweeper makes too.
pub(crate) async fn check_progress(
    db: &impl Db,
    since: DateTime<Utc>,
) -> Result<CheckProgress, StoreError> {
    let count = |statement, params: Vec<Param<'static>>| async move {
        Ok::<_, StoreError>(
            db.query_opt(statement, &params, sql::count)
                .await?
                .unwrap_or(0),
        )
    };
    Ok(CheckProgress {
        active: count(sql::COUNT_ACTIVE, vec![]).await?,
        checked_since: count(sql::COUNT_ACTIVE_CHECKED_SINCE, vec![Param::Time(since)]).await?,
        never_checked: count(sql::COUNT_ACTIVE_NEVER_CHECKED, vec![]).await?,
        oldest_check: db
            .query_opt(sql::OLDEST_CHECK, &[], |row| row.opt_time(0))
            .await?
            .flatten(),
    })
}

/// The key ids that seal grants, and those registered with the database (`key_checks`).
pub(crate) async fn key_usage(db: &impl Db) -> Result<KeyUsage, StoreError> {
    Ok(KeyUsage {
        sealing_grants: db
            .query(sql::KEY_IDS_IN_USE, &[], sql::key_id)
            .await?
            .into_iter()
            .collect(),
        registered: db
            .query(sql::KEY_CHECKS, &[], sql::key_check)
            .await?
            .into_iter()
            .map(|(id, _)| id)
            .collect(),
    })
}
