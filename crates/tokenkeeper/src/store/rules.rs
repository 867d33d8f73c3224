//! The ledger's rules, written once for both backends: each operation is one sequence of
//! statements run inside one transaction (`Store` opens it), against `Db`.
//!
//! Every operation that writes to a connection first takes a lock that names it
//! (`lock_connection`, or `lock_bot` then `lock_live_connection_of_bot` when the connection may
//! not exist yet), and reads `now` after the lock. Lock order, which rules out deadlocks on
//! PostgreSQL: at most one bot lock (the bot of the pair being recorded), then at most one
//! connection row. Grant rows are only updated under their connection's lock, except by
//! `rotate_keys`, which skips locked grants.
//!
//! The invariants these sequences keep are listed in `store/mod.rs`.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use super::db::{Db, Param};
use super::sealed::{open_grant, seal_session_state, seal_tokens, GrantRow};
use super::{sql, ConnectionRow, RefreshRecorded, SessionLookup, StoreError};
use crate::ids::{AttemptId, ConnectionId, EventId, GrantId, RefreshToken};
use crate::ledger::{
    AttemptOutcome, AuthorizationKind, AuthorizationOutcome, AuthorizationTarget, ConnectSession,
    Connection, ConnectionStatus, Diagnosis, DiagnosisReason, EventKind, FailureOutcome, Fence,
    GrantOrigin, Job, JobKind, JobOutcome, JobStatus, LeaseHolder, LeaseOutcome, MintedPair,
    NewAuthorization, OpenGrant, Provider, RefreshCommit, RefreshFailure, Rescue, RotateProgress,
    TokenColumn, WebhookEvent,
};
use crate::ledger::{
    BotImportKind, BotImportOutcome, CheckRecorded, CheckResult, ImportedBot, ImportedPair,
    ImportedPairOutcome,
};

/// An audit record about to be appended.
struct NewEvent<'a> {
    kind: EventKind,
    grant: Option<&'a GrantId>,
    related: Option<&'a GrantId>,
    provider_request_id: Option<&'a str>,
    detail: Value,
}

impl<'a> NewEvent<'a> {
    fn new(kind: EventKind, grant: Option<&'a GrantId>) -> Self {
        NewEvent {
            kind,
            grant,
            related: None,
            provider_request_id: None,
            detail: json!({}),
        }
    }

    fn related(mut self, related: Option<&'a GrantId>) -> Self {
        self.related = related;
        self
    }

    fn request(mut self, id: Option<&'a str>) -> Self {
        self.provider_request_id = id;
        self
    }

    fn detail(mut self, detail: Value) -> Self {
        self.detail = detail;
        self
    }
}

/// A grant about to be inserted.
struct NewGrant<'a> {
    id: &'a GrantId,
    connection: &'a ConnectionId,
    origin: GrantOrigin,
    parent: Option<&'a GrantId>,
    pair: &'a MintedPair,
    /// Set for a refresh that lost its race: kept, never current (invariant 3).
    superseded_at: Option<DateTime<Utc>>,
    revoked_at: Option<DateTime<Utc>>,
}

impl<'a> NewGrant<'a> {
    fn new(
        id: &'a GrantId,
        connection: &'a ConnectionId,
        origin: GrantOrigin,
        pair: &'a MintedPair,
    ) -> Self {
        NewGrant {
            id,
            connection,
            origin,
            parent: None,
            pair,
            superseded_at: None,
            revoked_at: None,
        }
    }
}

fn text(s: &str) -> Param<'_> {
    Param::Text(s)
}

async fn insert_event(
    db: &impl Db,
    connection: &ConnectionId,
    at: DateTime<Utc>,
    e: NewEvent<'_>,
) -> Result<(), StoreError> {
    let id = EventId::generate();
    db.execute(
        sql::INSERT_EVENT,
        &[
            text(id.as_str()),
            text(connection.as_str()),
            text(e.kind.as_str()),
            Param::OptText(e.grant.map(GrantId::as_str)),
            Param::OptText(e.related.map(GrantId::as_str)),
            Param::OptText(e.provider_request_id),
            Param::Json(&e.detail),
            Param::Time(at),
        ],
    )
    .await?;
    Ok(())
}

/// Seals the pair's tokens and inserts the grant.
async fn insert_grant(db: &impl Db, g: NewGrant<'_>) -> Result<(), StoreError> {
    let id = g.id;
    let pair = g.pair;
    let (access, refresh, key_id) = seal_tokens(
        db.keys(),
        g.connection,
        id,
        &pair.access_token,
        pair.refresh_token.as_ref(),
    );
    let access_fp = pair.access_token.fingerprint();
    let refresh_fp = pair.refresh_token.as_ref().map(RefreshToken::fingerprint);
    db.execute(
        sql::INSERT_GRANT,
        &[
            text(id.as_str()),
            text(g.connection.as_str()),
            text(g.origin.as_str()),
            Param::OptText(g.parent.map(GrantId::as_str)),
            text(&pair.bot_id.0),
            Param::Time(pair.obtained_at),
            Param::OptTime(pair.expires_at),
            Param::OptTime(g.superseded_at),
            Param::OptTime(g.revoked_at),
            Param::Bool(g.superseded_at.is_some()),
            Param::Bytes(&access),
            Param::OptBytes(refresh.as_deref()),
            text(&access_fp),
            Param::OptText(refresh_fp.as_deref()),
            text(&key_id),
            Param::OptText(pair.provider_request_id.as_deref()),
            Param::Json(&pair.metadata),
        ],
    )
    .await?;
    Ok(())
}

/// A grant by id, whatever its connection: how a retried recording finds what it wrote.
async fn grant_by_id(db: &impl Db, grant: &GrantId) -> Result<Option<GrantRow>, StoreError> {
    db.query_opt(sql::GRANT_BY_ID, &[text(grant.as_str())], sql::grant)
        .await
}

/// The statement to run: `locking` where reads must lock rows (`Db::locks_rows`), else
/// `plain`, which inside SQLite's write transaction is already locked.
fn pick(db: &impl Db, plain: &'static str, locking: &'static str) -> &'static str {
    if db.locks_rows() {
        locking
    } else {
        plain
    }
}

/// Reads the connection `id` and locks its row until the transaction ends: the lock every
/// write to an existing connection takes first.
async fn lock_connection(db: &impl Db, id: &ConnectionId) -> Result<ConnectionRow, StoreError> {
    db.query_opt(
        pick(db, sql::CONNECTION_BY_ID, sql::CONNECTION_BY_ID_FOR_UPDATE),
        &[text(id.as_str())],
        sql::connection,
    )
    .await?
    .ok_or_else(|| StoreError::UnknownConnection(id.clone()))
}

/// Reads the live connection of `(provider, bot_id)`, if any, and locks its row. Locking
/// re-checks the row after waiting for its lock: if a reconnect moved that connection to
/// another bot meanwhile, it no longer matches.
async fn lock_live_connection_of_bot(
    db: &impl Db,
    provider: Provider,
    bot: &str,
) -> Result<Option<ConnectionRow>, StoreError> {
    db.query_opt(
        pick(
            db,
            sql::LIVE_CONNECTION_OF_BOT,
            sql::LIVE_CONNECTION_OF_BOT_FOR_UPDATE,
        ),
        &[text(provider.as_str()), text(bot)],
        sql::connection,
    )
    .await
}

async fn find_grant(
    db: &impl Db,
    connection: &ConnectionId,
    grant: &GrantId,
) -> Result<Option<GrantRow>, StoreError> {
    db.query_opt(
        sql::GRANT_OF_CONNECTION,
        &[text(grant.as_str()), text(connection.as_str())],
        sql::grant,
    )
    .await
}

/// The connection as the transaction left it.
async fn reload(db: &impl Db, id: &ConnectionId) -> Result<Connection, StoreError> {
    db.query_opt(sql::CONNECTION_BY_ID, &[text(id.as_str())], sql::connection)
        .await?
        .map(|row| row.connection)
        .ok_or_else(|| StoreError::UnknownConnection(id.clone()))
}

async fn live_connection_of_bot(
    db: &impl Db,
    provider: Provider,
    bot: &str,
) -> Result<Option<ConnectionRow>, StoreError> {
    db.query_opt(
        sql::LIVE_CONNECTION_OF_BOT,
        &[text(provider.as_str()), text(bot)],
        sql::connection,
    )
    .await
}

/// Moves the connection's current grant. Like every change of a connection's current grant,
/// status or workspace (`set_status`, `mark_revoked`, `reauthorize`'s `SET_BOT`), it tells this
/// process's token cache first (`Db::touched`); the database's triggers tell the others.
async fn set_current_grant(
    db: &impl Db,
    id: &ConnectionId,
    grant: &GrantId,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    db.touched(id);
    db.execute(
        sql::SET_CURRENT_GRANT,
        &[text(grant.as_str()), Param::Time(now), text(id.as_str())],
    )
    .await?;
    Ok(())
}

async fn supersede(db: &impl Db, grant: &GrantId, now: DateTime<Utc>) -> Result<(), StoreError> {
    db.execute(
        sql::SUPERSEDE_GRANT,
        &[Param::Time(now), text(grant.as_str())],
    )
    .await?;
    Ok(())
}

async fn set_status(
    db: &impl Db,
    id: &ConnectionId,
    status: ConnectionStatus,
    diagnosis: Option<&Diagnosis>,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let diagnosis = diagnosis
        .map(serde_json::to_value)
        .transpose()
        .expect("a diagnosis serializes");
    db.touched(id);
    db.execute(
        sql::SET_STATUS,
        &[
            text(status.as_str()),
            Param::OptJson(diagnosis.as_ref()),
            Param::Time(now),
            text(id.as_str()),
        ],
    )
    .await?;
    Ok(())
}

/// Records a successful authorization (invariants 1, 3, 8); see `Store::record_authorization`.
pub(crate) async fn record_authorization(
    db: &impl Db,
    auth: &NewAuthorization,
) -> Result<AuthorizationOutcome, StoreError> {
    let pair = &auth.pair;
    db.lock_bot(auth.provider, &pair.bot_id.0).await?;
    if let Some(done) = grant_by_id(db, &auth.grant_id).await? {
        // Already recorded, by an earlier try whose answer was lost or by the spill journal.
        let connection = lock_connection(db, &done.record.connection_id).await?;
        return Ok(AuthorizationOutcome {
            connection: connection.connection,
            kind: match done.record.origin {
                GrantOrigin::Authorization => AuthorizationKind::Connected,
                _ => AuthorizationKind::Reauthorized,
            },
            grant_id: done.record.id,
            recovered: false,
        });
    }
    match &auth.target {
        AuthorizationTarget::Connect { end_user_id } => {
            match lock_live_connection_of_bot(db, auth.provider, &pair.bot_id.0).await? {
                Some(existing) => reauthorize(db, auth, existing).await,
                None => connect_new(db, auth, end_user_id).await,
            }
        }
        AuthorizationTarget::Reconnect { connection_id } => {
            let existing = lock_connection(db, connection_id).await?;
            reauthorize(db, auth, existing).await
        }
    }
}

async fn connect_new(
    db: &impl Db,
    auth: &NewAuthorization,
    end_user_id: &str,
) -> Result<AuthorizationOutcome, StoreError> {
    let (provider, pair, grant) = (auth.provider, &auth.pair, &auth.grant_id);
    let now = db.now();
    let id = ConnectionId::generate();
    db.execute(
        sql::INSERT_CONNECTION,
        &[
            text(id.as_str()),
            text(provider.as_str()),
            text(&pair.bot_id.0),
            text(&pair.workspace_id),
            Param::OptText(pair.workspace_name.as_deref()),
            Param::OptText(pair.workspace_icon.as_deref()),
            text(end_user_id),
            Param::Time(now),
        ],
    )
    .await?;
    insert_grant(
        db,
        NewGrant::new(grant, &id, GrantOrigin::Authorization, pair),
    )
    .await?;
    set_current_grant(db, &id, grant, now).await?;
    insert_event(
        db,
        &id,
        now,
        NewEvent::new(EventKind::Authorized, Some(grant))
            .request(pair.provider_request_id.as_deref())
            .detail(json!({ "bot_id": pair.bot_id, "workspace_id": pair.workspace_id })),
    )
    .await?;
    let connection = reload(db, &id).await?;
    emit(db, WebhookEvent::Created, &connection, json!({}), now).await?;
    Ok(AuthorizationOutcome {
        connection,
        kind: AuthorizationKind::Connected,
        grant_id: grant.clone(),
        recovered: false,
    })
}

/// Whether a re-authorization returned the pair the connection already holds (Notion before
/// 2026-06-08): a confirmation, not a new grant (invariant 8). The whole pair must match: a new
/// refresh token with an old access token is still a new pair, and dropping it would lose it
/// (invariant 1).
fn is_confirmation(
    db: &impl Db,
    current: Option<&GrantRow>,
    pair: &MintedPair,
) -> Result<bool, StoreError> {
    match current {
        Some(g) if g.record.revoked_at.is_none() => {
            let open = open_grant(db.keys(), g.clone())?;
            Ok(open.access_token == pair.access_token && open.refresh_token == pair.refresh_token)
        }
        _ => Ok(false),
    }
}

/// An authorization of an existing connection, whose row is locked: a new current grant, or a
/// confirmation when the provider returned exactly the pair we hold.
async fn reauthorize(
    db: &impl Db,
    auth: &NewAuthorization,
    existing: ConnectionRow,
) -> Result<AuthorizationOutcome, StoreError> {
    let (provider, pair) = (auth.provider, &auth.pair);
    let now = db.now();
    let conn = existing.connection;
    let bot_changed = conn.bot_id != pair.bot_id;
    // The connection is about to be live with `pair.bot_id` (whose lock we hold); no other
    // live connection may have it.
    if bot_changed || conn.status == ConnectionStatus::Revoked {
        if let Some(other) = live_connection_of_bot(db, provider, &pair.bot_id.0).await? {
            if other.connection.id != conn.id {
                return Err(StoreError::Conflict(format!(
                    "bot {} already belongs to the live connection {}",
                    pair.bot_id, other.connection.id
                )));
            }
        }
    }

    let current = match &conn.grant_id {
        Some(g) => find_grant(db, &conn.id, g).await?,
        None => None,
    };
    let confirmed = is_confirmation(db, current.as_ref(), pair)?;

    if bot_changed {
        insert_event(
            db,
            &conn.id,
            now,
            NewEvent::new(EventKind::BotChanged, None)
                .request(pair.provider_request_id.as_deref())
                .detail(json!({
                    "from_bot_id": conn.bot_id,
                    "to_bot_id": pair.bot_id,
                    "from_workspace_id": conn.workspace_id,
                    "to_workspace_id": pair.workspace_id,
                })),
        )
        .await?;
    }
    db.touched(&conn.id);
    db.execute(
        sql::SET_BOT,
        &[
            text(&pair.bot_id.0),
            text(&pair.workspace_id),
            Param::OptText(pair.workspace_name.as_deref()),
            Param::OptText(pair.workspace_icon.as_deref()),
            Param::Time(now),
            text(conn.id.as_str()),
        ],
    )
    .await?;

    let (kind, grant_id) = match current {
        Some(current) if confirmed => {
            insert_event(
                db,
                &conn.id,
                now,
                NewEvent::new(
                    EventKind::ReauthorizationConfirmed,
                    Some(&current.record.id),
                )
                .request(pair.provider_request_id.as_deref()),
            )
            .await?;
            (AuthorizationKind::Confirmed, current.record.id)
        }
        previous => {
            let grant = auth.grant_id.clone();
            insert_grant(
                db,
                NewGrant::new(&grant, &conn.id, GrantOrigin::Reauthorization, pair),
            )
            .await?;
            let previous = previous.map(|p| p.record.id);
            if let Some(previous) = &previous {
                supersede(db, previous, now).await?;
            }
            set_current_grant(db, &conn.id, &grant, now).await?;
            insert_event(
                db,
                &conn.id,
                now,
                NewEvent::new(EventKind::Reauthorized, Some(&grant))
                    .related(previous.as_ref())
                    .request(pair.provider_request_id.as_deref()),
            )
            .await?;
            if let Some(previous) = &previous {
                insert_event(
                    db,
                    &conn.id,
                    now,
                    NewEvent::new(EventKind::Superseded, Some(previous))
                        .related(Some(&grant))
                        .detail(json!({ "by": "reauthorization" })),
                )
                .await?;
            }
            (AuthorizationKind::Reauthorized, grant)
        }
    };

    let recovered = conn.status != ConnectionStatus::Active;
    if recovered {
        set_status(db, &conn.id, ConnectionStatus::Active, None, now).await?;
        insert_event(
            db,
            &conn.id,
            now,
            NewEvent::new(EventKind::Recovered, Some(&grant_id))
                .detail(json!({ "from_status": conn.status })),
        )
        .await?;
    }
    let connection = reload(db, &conn.id).await?;
    emit(db, WebhookEvent::Reauthorized, &connection, json!({}), now).await?;
    if recovered {
        let from = json!({ "from_status": conn.status, "by": "reauthorization" });
        emit(db, WebhookEvent::Recovered, &connection, from, now).await?;
    }
    Ok(AuthorizationOutcome {
        connection,
        kind,
        grant_id,
        recovered,
    })
}

/// Operations of one import in flight at once. On PostgreSQL their statements interleave on
/// the one connection, which tokio-postgres pipelines instead of waiting a round trip per
/// statement: that is what makes a large import fast. On SQLite each completes at once.
const IMPORT_PIPELINE: usize = 64;

/// Runs `op` on every item, up to `IMPORT_PIPELINE` at once, and answers their results in the
/// items' order; the first error ends it (the caller's transaction then rolls back).
async fn pipelined<'a, T, O, Fut>(
    items: &'a [T],
    op: impl Fn(&'a T) -> Fut,
) -> Result<Vec<O>, StoreError>
where
    Fut: std::future::Future<Output = Result<O, StoreError>>,
{
    use futures::stream::{FuturesOrdered, StreamExt};
    let mut out = Vec::with_capacity(items.len());
    let mut inflight = FuturesOrdered::new();
    for item in items {
        inflight.push_back(op(item));
        if inflight.len() >= IMPORT_PIPELINE {
            if let Some(result) = inflight.next().await {
                out.push(result?);
            }
        }
    }
    while let Some(result) = inflight.next().await {
        out.push(result?);
    }
    Ok(out)
}

/// See `Store::import_authorizations`; the batch names distinct bots and reconnect targets, so
/// its authorizations may interleave.
pub(crate) async fn import_authorizations(
    db: &impl Db,
    batch: &[NewAuthorization],
) -> Result<Vec<ConnectionId>, StoreError> {
    let recorded = pipelined(batch, |auth| record_authorization(db, auth)).await?;
    Ok(recorded.into_iter().map(|r| r.connection.id).collect())
}

/// Takes the connection's refresh lease; see `Store::begin_refresh`.
pub(crate) async fn begin_refresh(
    db: &impl Db,
    id: &ConnectionId,
    if_grant: Option<&GrantId>,
    holder: &LeaseHolder,
    lease: Duration,
) -> Result<LeaseOutcome, StoreError> {
    let row = lock_connection(db, id).await?;
    let now = db.now();
    let status = row.connection.status;
    if status != ConnectionStatus::Active {
        return Ok(LeaseOutcome::NotRefreshable {
            status,
            reason: format!("the connection is {}", status.as_str()),
        });
    }
    let Some(current_id) = row.connection.grant_id.clone() else {
        return Ok(LeaseOutcome::NotRefreshable {
            status,
            reason: "the connection has no current grant".into(),
        });
    };
    if if_grant.is_some_and(|wanted| *wanted != current_id) {
        return Ok(LeaseOutcome::AlreadyRotated {
            current: current_id,
        });
    }
    let current = find_grant(db, id, &current_id).await?.ok_or_else(|| {
        StoreError::Database(format!("current grant {current_id} of {id} is missing"))
    })?;
    if current.refresh.is_none() {
        return Ok(LeaseOutcome::NotRefreshable {
            status,
            reason: "the current grant has no refresh token".into(),
        });
    }
    if let (Some(_), Some(until)) = (&row.lease_holder, row.lease_until) {
        if until > now {
            return Ok(LeaseOutcome::Busy { until });
        }
    }

    let fence = row.lease_fence.next();
    let lease = chrono::Duration::from_std(lease)
        .map_err(|_| StoreError::Conflict("lease too long".into()))?;
    let until = now + lease;
    db.execute(
        sql::TAKE_LEASE,
        &[
            text(holder.as_str()),
            Param::Time(until),
            Param::Int(fence.0),
            text(id.as_str()),
        ],
    )
    .await?;

    // An unfinished attempt on this same grant means its holder vanished after it may have
    // spent the refresh token: name it, so that an `invalid_grant` now can be explained.
    let interrupted = db
        .query_opt(
            sql::UNFINISHED_ATTEMPT_OF_GRANT,
            &[text(current_id.as_str())],
            sql::attempt,
        )
        .await?;
    db.execute(
        sql::INTERRUPT_UNFINISHED_ATTEMPTS_OF_GRANT,
        &[Param::Time(now), text(current_id.as_str())],
    )
    .await?;

    let started = AttemptStart {
        grant: &current_id,
        fence,
        holder,
        now,
        until,
    };
    let attempt = start_attempt(
        db,
        id,
        started,
        json!({
            "lease_until": crate::ledger::rfc3339_micros::format(until),
            "interrupted_attempt": interrupted.as_ref().map(|i| &i.attempt_id),
        }),
    )
    .await?;
    Ok(LeaseOutcome::Acquired {
        fence,
        attempt_id: attempt,
        grant: open_grant(db.keys(), current)?,
        interrupted,
    })
}

/// Releases the lease if `fence` still holds it, and closes the attempt.
async fn release_lease_and_close(
    db: &impl Db,
    row: &ConnectionRow,
    fence: Fence,
    attempt: &AttemptId,
    outcome: AttemptOutcome,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let id = &row.connection.id;
    if row.lease_fence == fence {
        db.execute(sql::RELEASE_LEASE, &[text(id.as_str())]).await?;
    }
    close_attempt(db, id, attempt, outcome, now).await
}

async fn close_attempt(
    db: &impl Db,
    id: &ConnectionId,
    attempt: &AttemptId,
    outcome: AttemptOutcome,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    db.execute(
        sql::CLOSE_ATTEMPT,
        &[
            Param::Time(now),
            text(outcome.as_str()),
            text(attempt.as_str()),
            text(id.as_str()),
        ],
    )
    .await?;
    Ok(())
}

/// The most rescue candidates tried for one refusal (invariant 10: every loop a bound).
pub(crate) const MAX_RESCUE_CANDIDATES: i64 = 10;

/// See `Store::rescue_candidates`.
pub(crate) async fn rescue_candidates(
    db: &impl Db,
    id: &ConnectionId,
    refused: &GrantId,
) -> Result<(Option<GrantId>, Vec<OpenGrant>), StoreError> {
    let Some(row) = db
        .query_opt(sql::CONNECTION_BY_ID, &[text(id.as_str())], sql::connection)
        .await?
    else {
        return Err(StoreError::UnknownConnection(id.clone()));
    };
    let candidates = db
        .query(
            sql::RESCUE_CANDIDATES,
            &[
                text(id.as_str()),
                text(refused.as_str()),
                Param::Int(MAX_RESCUE_CANDIDATES),
            ],
            sql::grant,
        )
        .await?
        .into_iter()
        .map(|g| open_grant(db.keys(), g))
        .collect::<Result<_, _>>()?;
    Ok((row.connection.grant_id, candidates))
}

/// See `Store::begin_rescue_attempt`.
pub(crate) async fn begin_rescue_attempt(
    db: &impl Db,
    id: &ConnectionId,
    refused: &GrantId,
    candidate: &GrantId,
    fence: Fence,
    holder: &LeaseHolder,
) -> Result<Option<AttemptId>, StoreError> {
    let row = lock_connection(db, id).await?;
    let now = db.now();
    let Some(until) = row.lease_until.filter(|_| row.lease_fence == fence) else {
        return Ok(None);
    };
    let started = AttemptStart {
        grant: candidate,
        fence,
        holder,
        now,
        until,
    };
    let attempt = start_attempt(db, id, started, json!({ "rescue_of": refused })).await?;
    Ok(Some(attempt))
}

/// Who starts a refresh attempt of which grant, under which lease.
struct AttemptStart<'a> {
    grant: &'a GrantId,
    fence: Fence,
    holder: &'a LeaseHolder,
    now: DateTime<Utc>,
    until: DateTime<Utc>,
}

/// Records a refresh attempt and its `refresh_started` event, before the provider is called
/// (invariant 4: an attempt that never reports back is found by the next holder). `detail`
/// adds to the event's detail.
async fn start_attempt(
    db: &impl Db,
    id: &ConnectionId,
    start: AttemptStart<'_>,
    detail: Value,
) -> Result<AttemptId, StoreError> {
    let attempt = AttemptId::generate();
    db.execute(
        sql::INSERT_ATTEMPT,
        &[
            text(attempt.as_str()),
            text(id.as_str()),
            text(start.grant.as_str()),
            Param::Int(start.fence.0),
            text(start.holder.as_str()),
            Param::Time(start.now),
            Param::Time(start.until),
        ],
    )
    .await?;
    let mut all = json!({
        "attempt_id": attempt,
        "fence": start.fence,
        "holder": start.holder,
    });
    if let (Some(all), Value::Object(more)) = (all.as_object_mut(), detail) {
        all.extend(more);
    }
    insert_event(
        db,
        id,
        start.now,
        NewEvent::new(EventKind::RefreshStarted, Some(start.grant)).detail(all),
    )
    .await?;
    Ok(attempt)
}

/// See `Store::record_rescue_refusal`.
pub(crate) async fn record_rescue_refusal(
    db: &impl Db,
    id: &ConnectionId,
    candidate: &GrantId,
    attempt: &AttemptId,
    failure: &RefreshFailure,
) -> Result<(), StoreError> {
    lock_connection(db, id).await?;
    let now = db.now();
    let outcome = if failure.outcome_unknown {
        AttemptOutcome::Interrupted
    } else {
        AttemptOutcome::Failed
    };
    close_attempt(db, id, attempt, outcome, now).await?;
    insert_event(
        db,
        id,
        now,
        NewEvent::new(EventKind::RefreshFailed, Some(candidate))
            .request(failure.provider_request_id.as_deref())
            .detail(json!({
                "attempt_id": attempt,
                "rescue": true,
                "auth_failure": failure.auth_failure,
                "code": failure.code,
                "message": failure.message,
            })),
    )
    .await
}

/// Records a successful refresh (see `Store::record_refresh`), or, with `rescue`, a refresh of
/// another unused grant standing in for the refused current one (see `Store::record_rescue`).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn record_refresh(
    db: &impl Db,
    id: &ConnectionId,
    parent: &GrantId,
    fence: Fence,
    attempt: &AttemptId,
    grant: &GrantId,
    pair: &MintedPair,
    rescue: Option<&Rescue>,
) -> Result<RefreshRecorded, StoreError> {
    let row = lock_connection(db, id).await?;
    let now = db.now();
    let current = row.connection.grant_id.clone();
    if let Some(done) = grant_by_id(db, grant).await? {
        // Already recorded, by an earlier try whose answer was lost or by the spill journal.
        return Ok(RefreshRecorded {
            grant_id: done.record.id,
            commit: if done.record.stale_at_birth {
                RefreshCommit::SupersededAtBirth
            } else {
                RefreshCommit::Current
            },
            current: current.unwrap_or_else(|| grant.clone()),
            recovered: false,
            status: row.connection.status,
        });
    }
    if find_grant(db, id, parent).await?.is_none() {
        return Err(StoreError::Conflict(format!(
            "grant {parent} is not a grant of connection {id}"
        )));
    }
    let revoked = row.connection.status == ConnectionStatus::Revoked;
    let new = NewGrant {
        parent: Some(parent),
        ..NewGrant::new(grant, id, GrantOrigin::Refresh, pair)
    };
    // Invariant 3: only a refresh of the current grant moves the pointer (or, for a rescue, a
    // refresh standing in for the current grant whose refresh token was refused). The fence
    // does not matter here: a pair the provider minted is recorded whoever holds the lease now,
    // even after the lease ended (a commit delayed by an outage, or replayed from the spill
    // journal).
    let replaces = rescue.map_or(parent, |r| &r.failed);
    if let Some(rescue) = rescue {
        close_attempt(db, id, &rescue.failed_attempt, AttemptOutcome::Failed, now).await?;
    }
    let (commit, recovered) = if !revoked && current.as_ref() == Some(replaces) {
        insert_grant(db, new).await?;
        supersede(db, parent, now).await?;
        set_current_grant(db, id, grant, now).await?;
        insert_event(
            db,
            id,
            now,
            NewEvent::new(EventKind::Refreshed, Some(grant))
                .related(Some(parent))
                .request(pair.provider_request_id.as_deref())
                .detail(json!({
                    "attempt_id": attempt,
                    "fence": fence,
                    "rescue_of": rescue.map(|r| &r.failed),
                })),
        )
        .await?;
        if let Some(rescue) = rescue {
            supersede(db, &rescue.failed, now).await?;
            insert_event(
                db,
                id,
                now,
                NewEvent::new(EventKind::Rescued, Some(grant))
                    .related(Some(&rescue.failed))
                    .detail(json!({
                        "refused_grant_id": rescue.failed,
                        "rescued_by_grant_id": parent,
                        "message": "the current grant's refresh token was refused; another \
                                    refresh token of this connection, never used, was refreshed \
                                    in its place",
                    })),
            )
            .await?;
        }
        insert_event(
            db,
            id,
            now,
            NewEvent::new(EventKind::Superseded, Some(parent))
                .related(Some(grant))
                .detail(json!({ "by": "refresh" })),
        )
        .await?;
        // A refresh of the current grant that succeeded proves the connection alive, even if
        // another holder meanwhile judged it dead from the refresh token this one spent.
        let recovered = row.connection.status == ConnectionStatus::NeedsReauth;
        if recovered {
            set_status(db, id, ConnectionStatus::Active, None, now).await?;
            insert_event(
                db,
                id,
                now,
                NewEvent::new(EventKind::Recovered, Some(grant)).detail(json!({
                    "from_status": ConnectionStatus::NeedsReauth,
                    "by": "late_refresh",
                    "attempt_id": attempt,
                })),
            )
            .await?;
            let connection = reload(db, id).await?;
            let from = json!({ "from_status": ConnectionStatus::NeedsReauth, "by": "refresh" });
            emit(db, WebhookEvent::Recovered, &connection, from, now).await?;
        }
        (RefreshCommit::Current, recovered)
    } else {
        insert_grant(
            db,
            NewGrant {
                superseded_at: Some(pair.obtained_at),
                revoked_at: revoked.then_some(now),
                ..new
            },
        )
        .await?;
        db.execute(
            sql::TOUCH_CONNECTION,
            &[Param::Time(now), text(id.as_str())],
        )
        .await?;
        if revoked {
            // A pair minted after the connection was revoked is never handed out, and it is
            // revoked upstream at once.
            enqueue_revocations(db, id, Some(grant), now).await?;
        }
        let reason = if revoked {
            "connection_revoked"
        } else {
            "parent_superseded"
        };
        insert_event(
            db,
            id,
            now,
            NewEvent::new(EventKind::Superseded, Some(grant))
                .related(current.as_ref())
                .request(pair.provider_request_id.as_deref())
                .detail(json!({
                    "by": "superseded_at_birth",
                    "reason": reason,
                    "parent_grant_id": parent,
                    "current_grant_id": current,
                    "attempt_id": attempt,
                    "fence": fence,
                    "message": "this refresh finished after its parent grant stopped being current \
                                (it lost the race); it is kept and never becomes current",
                })),
        )
        .await?;
        (RefreshCommit::SupersededAtBirth, false)
    };
    release_lease_and_close(db, &row, fence, attempt, AttemptOutcome::Refreshed, now).await?;
    let current = match commit {
        RefreshCommit::Current => grant.clone(),
        RefreshCommit::SupersededAtBirth => current.unwrap_or_else(|| grant.clone()),
    };
    Ok(RefreshRecorded {
        grant_id: grant.clone(),
        commit,
        current,
        recovered,
        status: if recovered {
            ConnectionStatus::Active
        } else {
            row.connection.status
        },
    })
}

/// Records a failed refresh; see `Store::record_refresh_failure`.
pub(crate) async fn record_refresh_failure(
    db: &impl Db,
    id: &ConnectionId,
    parent: &GrantId,
    fence: Fence,
    attempt: &AttemptId,
    failure: &RefreshFailure,
) -> Result<FailureOutcome, StoreError> {
    let row = lock_connection(db, id).await?;
    let now = db.now();
    let fenced = row.lease_fence != fence;
    insert_event(
        db,
        id,
        now,
        NewEvent::new(EventKind::RefreshFailed, Some(parent))
            .request(failure.provider_request_id.as_deref())
            .detail(json!({
                "attempt_id": attempt,
                "fence": fence,
                "fenced": fenced,
                "auth_failure": failure.auth_failure,
                "code": failure.code,
                "message": failure.message,
            })),
    )
    .await?;
    // A stale holder changes nothing: its lease was taken over, and whatever it learned is
    // about a refresh token someone else is now responsible for.
    if fenced {
        return Ok(FailureOutcome::Fenced);
    }
    let outcome = if failure.outcome_unknown {
        AttemptOutcome::Interrupted
    } else {
        AttemptOutcome::Failed
    };
    release_lease_and_close(db, &row, fence, attempt, outcome, now).await?;
    match row.connection.grant_id {
        Some(current) if current != *parent => {
            return Ok(FailureOutcome::AlreadyRotated { current })
        }
        None => return Ok(FailureOutcome::Recorded),
        Some(_) => {}
    }
    if !failure.auth_failure || row.connection.status != ConnectionStatus::Active {
        return Ok(FailureOutcome::Recorded);
    }

    let grant = find_grant(db, id, parent).await?.ok_or_else(|| {
        StoreError::Database(format!("current grant {parent} of {id} is missing"))
    })?;
    let interrupted = db
        .query_opt(
            sql::INTERRUPTED_ATTEMPT_OF_GRANT,
            &[text(parent.as_str())],
            sql::attempt,
        )
        .await?;
    let mut diagnosis = Diagnosis {
        code: failure.code.clone(),
        grant_id: Some(parent.clone()),
        grant_obtained_at: Some(grant.record.obtained_at),
        provider_request_id: failure.provider_request_id.clone(),
        attempt_id: Some(attempt.clone()),
        interrupted_attempt: interrupted,
        tried: failure.tried.clone(),
        ..Diagnosis::new(DiagnosisReason::RefreshRejected, failure.message.clone())
    };
    // The refresh was the health check's (or an import's) answer to an inactive token: say so,
    // whoever's refresh it was that found the refresh token refused too.
    if row.connection.last_check_result == Some(CheckResult::Inactive)
        && row.last_checked_grant.as_ref() == Some(parent)
    {
        diagnosis.reason = DiagnosisReason::IntrospectionInactive;
        diagnosis.message = format!(
            "introspection found the token inactive, and refreshing it failed: {}",
            diagnosis.message
        );
    }
    needs_reauth(db, id, parent, &diagnosis, now).await?;
    Ok(FailureOutcome::NeedsReauth {
        diagnosis: Box::new(diagnosis),
    })
}

/// Moves an active connection to `needs_reauth` and records why.
async fn needs_reauth(
    db: &impl Db,
    id: &ConnectionId,
    grant: &GrantId,
    diagnosis: &Diagnosis,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    set_status(db, id, ConnectionStatus::NeedsReauth, Some(diagnosis), now).await?;
    let detail = serde_json::to_value(diagnosis).expect("a diagnosis serializes");
    insert_event(
        db,
        id,
        now,
        NewEvent::new(EventKind::NeedsReauth, Some(grant))
            .request(diagnosis.provider_request_id.as_deref())
            .detail(detail.clone()),
    )
    .await?;
    let connection = reload(db, id).await?;
    // The reconnect link is added at each delivery attempt (`webhooks.rs`).
    let data = json!({ "diagnosis": detail });
    emit(db, WebhookEvent::NeedsReauth, &connection, data, now).await
}

/// See `Store::mark_revoked`.
pub(crate) async fn mark_revoked(
    db: &impl Db,
    id: &ConnectionId,
    reason: &str,
) -> Result<Connection, StoreError> {
    let row = lock_connection(db, id).await?;
    let now = db.now();
    if row.connection.status == ConnectionStatus::Revoked {
        return Ok(row.connection);
    }
    db.touched(id);
    db.execute(sql::SET_REVOKED, &[Param::Time(now), text(id.as_str())])
        .await?;
    db.execute(
        sql::REVOKE_GRANTS_OF_CONNECTION,
        &[Param::Time(now), text(id.as_str())],
    )
    .await?;
    let queued = enqueue_revocations(db, id, None, now).await?;
    insert_event(
        db,
        id,
        now,
        NewEvent::new(EventKind::Revoked, row.connection.grant_id.as_ref())
            .detail(json!({ "reason": reason, "tokens_to_revoke_upstream": queued })),
    )
    .await?;
    let connection = reload(db, id).await?;
    emit(db, WebhookEvent::Revoked, &connection, json!({}), now).await?;
    Ok(connection)
}

/// Queues the upstream revocation of every token of the connection (or of one grant) that may
/// still be alive: every access token, and every refresh token not spent on a refresh that
/// succeeded; tokens already queued (or revoked) before are skipped. Returns how many were
/// queued.
async fn enqueue_revocations(
    db: &impl Db,
    id: &ConnectionId,
    only: Option<&GrantId>,
    now: DateTime<Utc>,
) -> Result<usize, StoreError> {
    let known: std::collections::HashSet<String> = db
        .query(
            sql::JOBS_OF_CONNECTION,
            &[text(id.as_str()), text(JobKind::RevokeToken.as_str())],
            sql::job,
        )
        .await?
        .into_iter()
        .map(|j| j.subject)
        .collect();
    let tokens = db
        .query(sql::TOKENS_OF_CONNECTION, &[text(id.as_str())], |row| {
            Ok((
                GrantId::from_trusted(row.text(0)?),
                row.bool(1)?,
                row.bool(2)?,
            ))
        })
        .await?;
    let mut queued = 0;
    for (grant, has_refresh, refresh_spent) in tokens {
        if only.is_some_and(|g| *g != grant) {
            continue;
        }
        let mut columns = vec![TokenColumn::AccessToken];
        if has_refresh && !refresh_spent {
            columns.push(TokenColumn::RefreshToken);
        }
        for column in columns {
            let subject = format!("{grant}:{}", column.as_str());
            if known.contains(&subject) {
                continue;
            }
            enqueue_job(
                db,
                JobKind::RevokeToken,
                Some(id),
                &subject,
                &json!({ "grant_id": grant, "column": column }),
                now,
            )
            .await?;
            queued += 1;
        }
    }
    Ok(queued)
}

async fn enqueue_job(
    db: &impl Db,
    kind: JobKind,
    connection: Option<&ConnectionId>,
    subject: &str,
    payload: &Value,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let id = format!("job_{}", uuid::Uuid::now_v7().simple());
    db.execute(
        sql::INSERT_JOB,
        &[
            text(&id),
            text(kind.as_str()),
            Param::OptText(connection.map(ConnectionId::as_str)),
            text(subject),
            Param::Json(payload),
            Param::Time(now),
        ],
    )
    .await?;
    Ok(())
}

/// Emits a webhook event about `connection` as it is now: one delivery job per endpoint, in the
/// transaction of the change (invariant 9: the app is told once per change, durably). `data`
/// adds to the event's data (a diagnosis, what caused it).
async fn emit(
    db: &impl Db,
    event: WebhookEvent,
    connection: &Connection,
    data: Value,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    if db.webhook_endpoints().is_empty() {
        return Ok(());
    }
    let mut body_data = json!({ "connection": connection });
    if let (Some(all), Value::Object(more)) = (body_data.as_object_mut(), data) {
        all.extend(more);
    }
    let payload = json!({
        "webhook_id": format!("msg_{}", uuid::Uuid::now_v7().simple()),
        "event": {
            "type": event,
            "timestamp": crate::ledger::rfc3339_micros::format(now),
            "data": body_data,
        },
    });
    for endpoint in db.webhook_endpoints() {
        enqueue_job(
            db,
            JobKind::Webhook,
            Some(&connection.id),
            endpoint,
            &payload,
            now,
        )
        .await?;
    }
    Ok(())
}

/// See `Store::claim_jobs`.
pub(crate) async fn claim_jobs(
    db: &impl Db,
    connection: Option<&ConnectionId>,
    limit: u32,
    hold_for: Duration,
    webhooks: bool,
) -> Result<Vec<Job>, StoreError> {
    let now = db.now();
    let limit = Param::Int(i64::from(limit));
    let webhooks = Param::Int(i64::from(webhooks));
    let mut jobs = match connection {
        None => {
            db.query(
                pick(db, sql::DUE_JOBS, sql::DUE_JOBS_SKIP_LOCKED),
                &[Param::Time(now), webhooks, limit],
                sql::job,
            )
            .await?
        }
        Some(id) => {
            db.query(
                pick(
                    db,
                    sql::DUE_JOBS_OF_CONNECTION,
                    sql::DUE_JOBS_OF_CONNECTION_SKIP_LOCKED,
                ),
                &[text(id.as_str()), Param::Time(now), webhooks, limit],
                sql::job,
            )
            .await?
        }
    };
    let until = now
        + chrono::Duration::from_std(hold_for)
            .map_err(|_| StoreError::Conflict("claim too long".into()))?;
    for job in &mut jobs {
        db.execute(
            sql::CLAIM_JOB,
            &[Param::Time(until), Param::Time(now), text(&job.id)],
        )
        .await?;
        job.attempts += 1;
        job.next_attempt_at = until;
    }
    Ok(jobs)
}

/// See `Store::finish_job`.
pub(crate) async fn finish_job(
    db: &impl Db,
    job: &Job,
    outcome: &JobOutcome,
) -> Result<(), StoreError> {
    let now = db.now();
    let (status, at, error) = match outcome {
        JobOutcome::Done => (JobStatus::Done, now, None),
        JobOutcome::Retry { at, error } => (JobStatus::Pending, *at, Some(error.as_str())),
        JobOutcome::Failed { error } => (JobStatus::Failed, now, Some(error.as_str())),
    };
    db.execute(
        sql::FINISH_JOB,
        &[
            text(status.as_str()),
            Param::Time(at),
            Param::OptText(error),
            Param::Time(now),
            text(&job.id),
        ],
    )
    .await?;
    if let (JobKind::RevokeToken, Some(id), JobStatus::Done | JobStatus::Failed) =
        (job.kind, &job.connection_id, status)
    {
        let grant = job
            .payload
            .get("grant_id")
            .and_then(Value::as_str)
            .map(|g| GrantId::from_trusted(g.to_owned()));
        insert_event(
            db,
            id,
            now,
            NewEvent::new(EventKind::UpstreamRevocation, grant.as_ref()).detail(json!({
                "column": job.payload.get("column"),
                "outcome": status,
                "attempts": job.attempts,
                "error": error,
            })),
        )
        .await?;
    }
    Ok(())
}

/// See `Store::jobs_of_connection`.
pub(crate) async fn jobs_of_connection(
    db: &impl Db,
    id: &ConnectionId,
    kind: JobKind,
) -> Result<Vec<Job>, StoreError> {
    db.query(
        sql::JOBS_OF_CONNECTION,
        &[text(id.as_str()), text(kind.as_str())],
        sql::job,
    )
    .await
}

/// See `Store::create_session`.
pub(crate) async fn create_session(db: &impl Db, s: &ConnectSession) -> Result<(), StoreError> {
    db.execute(
        sql::INSERT_SESSION,
        &[
            text(s.id.as_str()),
            text(s.provider.as_str()),
            text(&s.state_hash),
            text(&s.end_user_id),
            text(&s.return_to),
            Param::OptText(s.connection_id.as_ref().map(ConnectionId::as_str)),
            Param::Time(s.created_at),
            Param::Time(s.expires_at),
            Param::OptTime(s.used_at),
        ],
    )
    .await?;
    Ok(())
}

/// See `Store::reconnect_link`.
pub(crate) async fn reconnect_link(
    db: &impl Db,
    candidate: &ConnectSession,
    state: &str,
) -> Result<(ConnectSession, String), StoreError> {
    let connection = candidate.connection_id.as_ref().ok_or_else(|| {
        StoreError::Conflict("a reusable reconnect session needs its connection".into())
    })?;
    // Under the connection's lock, so that concurrent 424s of one connection find the session
    // the first of them made instead of each making its own.
    lock_connection(db, connection).await?;
    if let Some(live) = super::reads::live_reconnect_link(db, connection).await? {
        return Ok(live);
    }
    let sealed = seal_session_state(db.keys(), connection, &candidate.id, state);
    db.execute(
        sql::INSERT_REUSABLE_SESSION,
        &[
            text(candidate.id.as_str()),
            text(candidate.provider.as_str()),
            text(&candidate.state_hash),
            text(&candidate.end_user_id),
            text(&candidate.return_to),
            text(connection.as_str()),
            Param::Time(candidate.created_at),
            Param::Time(candidate.expires_at),
            Param::OptTime(candidate.used_at),
            Param::Bytes(&sealed),
        ],
    )
    .await?;
    Ok((candidate.clone(), state.to_owned()))
}

/// See `Store::consume_session`.
pub(crate) async fn consume_session(
    db: &impl Db,
    state_hash: &str,
) -> Result<SessionLookup, StoreError> {
    let Some(mut session) = db
        .query_opt(
            pick(db, sql::SESSION_BY_STATE, sql::SESSION_BY_STATE_FOR_UPDATE),
            &[text(state_hash)],
            sql::session,
        )
        .await?
    else {
        return Ok(SessionLookup::Unknown);
    };
    let now = db.now();
    if session.used_at.is_some() {
        return Ok(SessionLookup::AlreadyUsed(session));
    }
    if session.expires_at <= now {
        return Ok(SessionLookup::Expired(session));
    }
    db.execute(
        sql::MARK_SESSION_USED,
        &[Param::Time(now), text(session.id.as_str())],
    )
    .await?;
    session.used_at = Some(now);
    Ok(SessionLookup::Consumed(session))
}

/// See `Store::rotate_keys`.
pub(crate) async fn rotate_keys(db: &impl Db, batch: u32) -> Result<RotateProgress, StoreError> {
    let keys = db.keys();
    let active = keys.active_key_id();
    // Where rows lock, a grant that a ledger write is updating right now is skipped and left
    // for the next batch, so rotation never waits on (or deadlocks with) the serving path.
    let stale = db
        .query(
            pick(
                db,
                sql::GRANTS_SEALED_WITH_OTHER_KEYS,
                sql::GRANTS_SEALED_WITH_OTHER_KEYS_SKIP_LOCKED,
            ),
            &[text(active), Param::Int(i64::from(batch))],
            sql::grant,
        )
        .await?;
    let mut resealed = 0;
    for row in stale {
        let open = open_grant(keys, row)?;
        let (access, refresh, key_id) = seal_tokens(
            keys,
            &open.record.connection_id,
            &open.record.id,
            &open.access_token,
            open.refresh_token.as_ref(),
        );
        db.execute(
            sql::RESEAL_GRANT,
            &[
                Param::Bytes(&access),
                Param::OptBytes(refresh.as_deref()),
                text(&key_id),
                text(open.record.id.as_str()),
            ],
        )
        .await?;
        resealed += 1;
    }
    let remaining = db
        .query_opt(
            sql::COUNT_GRANTS_SEALED_WITH_OTHER_KEYS,
            &[text(active)],
            sql::count,
        )
        .await?
        .unwrap_or(0);
    Ok(RotateProgress {
        resealed,
        remaining: remaining as u64,
    })
}

/// See `Store::refresh_attempts_since`.
pub(crate) async fn refresh_attempts_since(
    db: &impl Db,
    id: &ConnectionId,
    since: DateTime<Utc>,
) -> Result<u64, StoreError> {
    Ok(db
        .query_opt(
            sql::ATTEMPTS_OF_CONNECTION_SINCE,
            &[text(id.as_str()), Param::Time(since)],
            sql::count,
        )
        .await?
        .unwrap_or(0) as u64)
}

/// See `Store::record_token_rejected`.
pub(crate) async fn record_token_rejected(
    db: &impl Db,
    id: &ConnectionId,
    grant: &GrantId,
    detail: &Value,
) -> Result<(), StoreError> {
    lock_connection(db, id).await?;
    let now = db.now();
    insert_event(
        db,
        id,
        now,
        NewEvent::new(EventKind::TokenRejected, Some(grant)).detail(detail.clone()),
    )
    .await
}

/// See `Store::retry_job`.
pub(crate) async fn retry_job(
    db: &impl Db,
    id: &str,
    kind: JobKind,
) -> Result<Option<Job>, StoreError> {
    let now = db.now();
    let changed = db
        .execute(
            sql::RETRY_JOB,
            &[Param::Time(now), text(id), text(kind.as_str())],
        )
        .await?;
    if changed == 0 {
        return Ok(None);
    }
    db.query_opt(sql::JOB_BY_ID, &[text(id)], sql::job).await
}

/// See `Store::import_bots`; the batch names distinct bots, sorted by bot id, so that two
/// imports of overlapping bots take their bot locks in one order and cannot deadlock.
pub(crate) async fn import_bots(
    db: &impl Db,
    batch: &[ImportedBot],
) -> Result<Vec<BotImportOutcome>, StoreError> {
    pipelined(batch, |bot| import_bot(db, bot)).await
}

/// Records one bot's pairs (invariants 1 and 2: every pair kept, none overwritten). Under the
/// bot's lock, a pair the ledger already holds for this bot (the same access and refresh
/// fingerprints, in any connection) is recognised and not written again, which is what makes
/// an import idempotent. A bot with a live connection gets the pairs it lacks as superseded
/// grants: an import never moves a live connection's current grant (invariant 3), and the
/// rescue still finds their unused refresh tokens. A bot without one gets a new connection
/// whose current grant is `bot.current`.
async fn import_bot(db: &impl Db, bot: &ImportedBot) -> Result<BotImportOutcome, StoreError> {
    db.lock_bot(bot.provider, &bot.bot_id.0).await?;
    let held = db
        .query(
            sql::GRANT_FINGERPRINTS_OF_BOT,
            &[text(&bot.bot_id.0)],
            |row| {
                Ok((
                    GrantId::from_trusted(row.text(0)?),
                    row.text(1)?,
                    row.opt_text(2)?,
                ))
            },
        )
        .await?;
    let mut pairs = Vec::with_capacity(bot.pairs.len());
    let mut fresh = Vec::new();
    for (i, pair) in bot.pairs.iter().enumerate() {
        let access = pair.access_token.fingerprint();
        let refresh = pair.refresh_token.as_ref().map(RefreshToken::fingerprint);
        match held.iter().find(|(_, a, r)| *a == access && *r == refresh) {
            Some((grant, _, _)) => pairs.push(ImportedPairOutcome {
                grant_id: grant.clone(),
                new: false,
            }),
            None => {
                pairs.push(ImportedPairOutcome {
                    grant_id: pair.grant_id.clone(),
                    new: true,
                });
                fresh.push(i);
            }
        }
    }
    let live = lock_live_connection_of_bot(db, bot.provider, &bot.bot_id.0).await?;
    if fresh.is_empty() {
        return Ok(BotImportOutcome {
            kind: BotImportKind::Known,
            status: live.as_ref().map(|c| c.connection.status),
            current: live.as_ref().and_then(|c| c.connection.grant_id.clone()),
            connection_id: live.map(|c| c.connection.id),
            pairs,
        });
    }
    let now = db.now();
    let minted = |pair: &ImportedPair| MintedPair {
        access_token: pair.access_token.clone(),
        refresh_token: pair.refresh_token.clone(),
        bot_id: bot.bot_id.clone(),
        workspace_id: bot.workspace_id.clone(),
        workspace_name: bot.workspace_name.clone(),
        workspace_icon: None,
        metadata: json!({ "imported": true, "revoked_in_source_at": pair.revoked_at }),
        provider_request_id: None,
        obtained_at: pair.obtained_at,
        expires_at: None,
    };
    // A pair revoked in the source was superseded then; any other non-current pair now.
    let superseded_at = |pair: &ImportedPair| Some(pair.revoked_at.map_or(now, |r| r.min(now)));
    if let Some(existing) = live {
        let id = existing.connection.id;
        for &i in &fresh {
            let pair = &bot.pairs[i];
            let pair_minted = minted(pair);
            insert_grant(
                db,
                NewGrant {
                    superseded_at: superseded_at(pair),
                    ..NewGrant::new(&pair.grant_id, &id, GrantOrigin::Import, &pair_minted)
                },
            )
            .await?;
        }
        db.execute(
            sql::TOUCH_CONNECTION,
            &[Param::Time(now), text(id.as_str())],
        )
        .await?;
        let added: Vec<&GrantId> = fresh.iter().map(|&i| &bot.pairs[i].grant_id).collect();
        insert_event(
            db,
            &id,
            now,
            NewEvent::new(EventKind::Imported, None).detail(json!({
                "grants": added,
                "current_unchanged": true,
                "message": "pairs of this bot from an existing token store, kept superseded: \
                            the connection already had a current grant",
            })),
        )
        .await?;
        return Ok(BotImportOutcome {
            kind: BotImportKind::Added,
            connection_id: Some(id),
            status: Some(existing.connection.status),
            current: existing.connection.grant_id,
            pairs,
        });
    }
    // The current pair must be one this import writes: the newest live one the caller chose,
    // or, when the ledger holds that one already (on a revoked connection), the newest fresh
    // one not revoked in the source, else the newest fresh one.
    let current = if fresh.contains(&bot.current) {
        bot.current
    } else {
        fresh
            .iter()
            .rev()
            .copied()
            .find(|&i| bot.pairs[i].revoked_at.is_none())
            .unwrap_or(fresh[fresh.len() - 1])
    };
    let id = ConnectionId::generate();
    db.execute(
        sql::INSERT_CONNECTION,
        &[
            text(id.as_str()),
            text(bot.provider.as_str()),
            text(&bot.bot_id.0),
            text(&bot.workspace_id),
            Param::OptText(bot.workspace_name.as_deref()),
            Param::OptText(None),
            text(&bot.end_user_id),
            Param::Time(now),
        ],
    )
    .await?;
    for &i in &fresh {
        let pair = &bot.pairs[i];
        let pair_minted = minted(pair);
        insert_grant(
            db,
            NewGrant {
                superseded_at: if i == current {
                    None
                } else {
                    superseded_at(pair)
                },
                ..NewGrant::new(&pair.grant_id, &id, GrantOrigin::Import, &pair_minted)
            },
        )
        .await?;
    }
    let current_grant = &bot.pairs[current].grant_id;
    set_current_grant(db, &id, current_grant, now).await?;
    let written: Vec<&GrantId> = fresh.iter().map(|&i| &bot.pairs[i].grant_id).collect();
    insert_event(
        db,
        &id,
        now,
        NewEvent::new(EventKind::Imported, Some(current_grant)).detail(json!({
            "bot_id": bot.bot_id,
            "workspace_id": bot.workspace_id,
            "grants": written,
            "message": "a connection from an existing token store: every distinct pair is a \
                        grant, the newest live one current",
        })),
    )
    .await?;
    if !db.webhook_endpoints().is_empty() {
        let connection = reload(db, &id).await?;
        let data = json!({ "imported": true });
        emit(db, WebhookEvent::Created, &connection, data, now).await?;
    }
    if let (Some((at, result)), true) = (bot.checked, current == bot.current) {
        set_last_check(db, &id, current_grant, result, at).await?;
        if result == CheckResult::Inactive {
            insert_event(
                db,
                &id,
                now,
                NewEvent::new(EventKind::TokenInactive, Some(current_grant))
                    .detail(json!({ "by": "import" })),
            )
            .await?;
        }
    }
    let mut status = ConnectionStatus::Active;
    if let Some(dead) = &bot.dead {
        let diagnosis = Diagnosis {
            grant_id: Some(current_grant.clone()),
            grant_obtained_at: Some(bot.pairs[current].obtained_at),
            ..dead.clone()
        };
        needs_reauth(db, &id, current_grant, &diagnosis, now).await?;
        status = ConnectionStatus::NeedsReauth;
    }
    Ok(BotImportOutcome {
        kind: BotImportKind::Created,
        connection_id: Some(id),
        status: Some(status),
        current: Some(current_grant.clone()),
        pairs,
    })
}

async fn set_last_check(
    db: &impl Db,
    id: &ConnectionId,
    grant: &GrantId,
    result: CheckResult,
    at: DateTime<Utc>,
) -> Result<(), StoreError> {
    db.execute(
        sql::SET_LAST_CHECK,
        &[
            Param::Time(at),
            text(result.as_str()),
            text(grant.as_str()),
            text(id.as_str()),
        ],
    )
    .await?;
    Ok(())
}

/// See `Store::record_check`.
pub(crate) async fn record_check(
    db: &impl Db,
    id: &ConnectionId,
    grant: &GrantId,
    result: CheckResult,
) -> Result<CheckRecorded, StoreError> {
    let row = lock_connection(db, id).await?;
    let now = db.now();
    let still_current = row.connection.grant_id.as_ref() == Some(grant);
    // A check of a grant that was replaced meanwhile says nothing about the connection now.
    if still_current {
        set_last_check(db, id, grant, result, now).await?;
        if result == CheckResult::Inactive && row.connection.status == ConnectionStatus::Active {
            insert_event(
                db,
                id,
                now,
                NewEvent::new(EventKind::TokenInactive, Some(grant))
                    .detail(json!({ "by": "health_check" })),
            )
            .await?;
        }
    }
    Ok(CheckRecorded {
        status: row.connection.status,
        still_current,
    })
}

/// See `Store::mark_inactive_without_refresh`.
pub(crate) async fn mark_inactive_without_refresh(
    db: &impl Db,
    id: &ConnectionId,
    grant: &GrantId,
) -> Result<bool, StoreError> {
    let row = lock_connection(db, id).await?;
    let now = db.now();
    if row.connection.status != ConnectionStatus::Active
        || row.connection.grant_id.as_ref() != Some(grant)
    {
        return Ok(false);
    }
    let Some(current) = find_grant(db, id, grant).await? else {
        return Ok(false);
    };
    if current.refresh.is_some() {
        return Ok(false);
    }
    let diagnosis = Diagnosis {
        grant_id: Some(grant.clone()),
        grant_obtained_at: Some(current.record.obtained_at),
        ..Diagnosis::new(
            DiagnosisReason::IntrospectionInactive,
            "introspection found the token inactive, and its grant has no refresh token",
        )
    };
    needs_reauth(db, id, grant, &diagnosis, now).await?;
    Ok(true)
}

/// See `Store::take_sweeper_lease`.
pub(crate) async fn take_sweeper_lease(
    db: &impl Db,
    name: &str,
    holder: &LeaseHolder,
    lease: Duration,
) -> Result<Option<Fence>, StoreError> {
    db.execute(sql::INSERT_SWEEPER_LEASE, &[text(name)]).await?;
    let (current, until, fence) = db
        .query_opt(
            pick(db, sql::SWEEPER_LEASE, sql::SWEEPER_LEASE_FOR_UPDATE),
            &[text(name)],
            |row| Ok((row.opt_text(0)?, row.opt_time(1)?, Fence(row.int(2)?))),
        )
        .await?
        .ok_or_else(|| StoreError::Database(format!("the sweeper lease {name} vanished")))?;
    let now = db.now();
    let mine = current.as_deref() == Some(holder.as_str());
    if !mine && until.is_some_and(|until| until > now) {
        return Ok(None);
    }
    let fence = if mine { fence } else { fence.next() };
    let until = now
        + chrono::Duration::from_std(lease)
            .map_err(|_| StoreError::Conflict("lease too long".into()))?;
    db.execute(
        sql::TAKE_SWEEPER_LEASE,
        &[
            text(holder.as_str()),
            Param::Time(until),
            Param::Int(fence.0),
            text(name),
        ],
    )
    .await?;
    Ok(Some(fence))
}

/// See `Store::due_checks`.
pub(crate) async fn due_checks(
    db: &impl Db,
    checked_before: DateTime<Utc>,
    limit: u32,
) -> Result<Vec<(ConnectionId, GrantId)>, StoreError> {
    db.query(
        sql::DUE_CHECKS,
        &[Param::Time(checked_before), Param::Int(i64::from(limit))],
        |row| {
            Ok((
                ConnectionId::from_trusted(row.text(0)?),
                GrantId::from_trusted(row.text(1)?),
            ))
        },
    )
    .await
}

/// See `Store::check_schedule`.
pub(crate) async fn check_schedule(
    db: &impl Db,
) -> Result<(u64, Option<DateTime<Utc>>), StoreError> {
    let active = db
        .query_opt(sql::COUNT_ACTIVE, &[], sql::count)
        .await?
        .unwrap_or(0);
    let oldest = db
        .query_opt(sql::OLDEST_CHECK, &[], |row| row.opt_time(0))
        .await?
        .flatten();
    Ok((active.max(0) as u64, oldest))
}

/// See `Store::record_throttle`: the later of the known end and `until` is kept; expired
/// throttles are removed on the way.
pub(crate) async fn record_throttle(
    db: &impl Db,
    throttle: &super::cache::Throttle,
) -> Result<(), StoreError> {
    let now = db.now();
    db.execute(sql::DELETE_EXPIRED_THROTTLES, &[Param::Time(now)])
        .await?;
    db.execute(
        sql::UPSERT_THROTTLE,
        &[
            text(throttle.scope.as_str()),
            text(&throttle.subject),
            Param::Time(throttle.until),
            text(&throttle.reason),
        ],
    )
    .await?;
    Ok(())
}
