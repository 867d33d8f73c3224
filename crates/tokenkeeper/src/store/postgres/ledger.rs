//! The ledger's write operations on PostgreSQL. Each function runs inside one transaction
//! (READ COMMITTED) that first locks the connection's row with `SELECT … FOR UPDATE`, or, for
//! an authorization that may create the connection, first takes a transaction-scoped advisory
//! lock on `(provider, bot_id)`. Every statement after the lock sees the latest commits, and no
//! other writer of that connection can commit in between. `now` is read after the lock, so
//! lease times are ordered like the commits.
//!
//! Lock order, to rule out deadlocks: at most one advisory lock (the bot of the pair being
//! recorded), then at most one connection row. Grant rows are only updated under their
//! connection's lock; `rotate_keys` skips grant rows that are locked.

use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::Transaction;
use serde_json::json;

use super::rows::{
    connection_at, exec, find_grant, grant_at, insert_event, insert_grant, lock_connection, micros,
    open_grant, query, query_opt, seal_tokens, ConnectionRow, NewEvent, NewGrant,
    CONNECTION_COLUMNS, GRANT_COLUMNS,
};
use crate::clock::Clock;
use crate::ids::{AttemptId, BotId, ConnectionId, GrantId};
use crate::ledger::{
    AuthorizationKind, AuthorizationOutcome, AuthorizationTarget, ConnectSession, ConnectionStatus,
    EventKind, FailureOutcome, GrantOrigin, InterruptedAttempt, LeaseOutcome, MintedPair,
    NewAuthorization, Provider, RefreshCommit, RefreshFailure, RotateProgress,
};
use crate::seal::KeyRing;
use crate::store::common::{
    bot_changed_detail, is_confirmation, refresh_rejected_diagnosis, rfc3339,
};
use crate::store::{RefreshRecorded, SessionLookup, StoreError};

type Tx<'a> = Transaction<'a>;

/// Serializes everyone who may make `(provider, bot_id)` live, in this schema, until commit.
async fn lock_bot(tx: &Tx<'_>, provider: Provider, bot: &BotId) -> Result<(), StoreError> {
    let key = format!("{}|{}", provider.as_str(), bot.0);
    exec(
        tx,
        "SELECT pg_advisory_xact_lock(hashtextextended('tokenkeeper/bot|' || coalesce(current_schema(), '') || '|' || $1, 0))",
        &[&key],
    )
    .await?;
    Ok(())
}

async fn live_by_bot(
    tx: &Tx<'_>,
    provider: Provider,
    bot: &BotId,
    lock: bool,
) -> Result<Option<ConnectionRow>, StoreError> {
    let sql = format!(
        "SELECT {CONNECTION_COLUMNS} FROM connections c \
         WHERE c.provider = $1 AND c.bot_id = $2 AND c.status <> 'revoked'{}",
        if lock { " FOR UPDATE" } else { "" }
    );
    query_opt(tx, &sql, &[&provider.as_str(), &bot.0])
        .await?
        .map(|r| connection_at(&r, 0))
        .transpose()
}

pub(super) async fn record_authorization(
    tx: &Tx<'_>,
    keys: &KeyRing,
    clock: &Clock,
    auth: &NewAuthorization,
) -> Result<AuthorizationOutcome, StoreError> {
    let pair = &auth.pair;
    lock_bot(tx, auth.provider, &pair.bot_id).await?;
    match &auth.target {
        AuthorizationTarget::Connect { end_user_id } => {
            // FOR UPDATE re-checks the row after waiting for its lock: if a reconnect moved
            // that connection to another bot meanwhile, it no longer matches.
            match live_by_bot(tx, auth.provider, &pair.bot_id, true).await? {
                Some(existing) => {
                    reauthorize(tx, keys, micros(clock.now()), auth.provider, existing, pair).await
                }
                None => {
                    connect_new(
                        tx,
                        keys,
                        micros(clock.now()),
                        auth.provider,
                        end_user_id,
                        pair,
                    )
                    .await
                }
            }
        }
        AuthorizationTarget::Reconnect { connection_id } => {
            let existing = lock_connection(tx, connection_id).await?;
            reauthorize(tx, keys, micros(clock.now()), auth.provider, existing, pair).await
        }
    }
}

async fn load(tx: &Tx<'_>, id: &ConnectionId) -> Result<ConnectionRow, StoreError> {
    super::rows::find_connection(tx, id)
        .await?
        .ok_or_else(|| StoreError::UnknownConnection(id.clone()))
}

async fn connect_new(
    tx: &Tx<'_>,
    keys: &KeyRing,
    now: DateTime<Utc>,
    provider: Provider,
    end_user_id: &str,
    pair: &MintedPair,
) -> Result<AuthorizationOutcome, StoreError> {
    let id = ConnectionId::generate();
    let grant = GrantId::generate();
    exec(
        tx,
        "INSERT INTO connections (id, provider, bot_id, workspace_id, workspace_name, workspace_icon, end_user_id, \
             status, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, 'active', $8, $8)",
        &[
            &id.as_str(),
            &provider.as_str(),
            &pair.bot_id.0,
            &pair.workspace_id,
            &pair.workspace_name,
            &pair.workspace_icon,
            &end_user_id,
            &now,
        ],
    )
    .await?;
    insert_grant(
        tx,
        keys,
        NewGrant {
            id: &grant,
            connection: &id,
            origin: GrantOrigin::Authorization,
            parent: None,
            pair,
            superseded_at: None,
            revoked_at: None,
            stale_at_birth: false,
        },
    )
    .await?;
    exec(
        tx,
        "UPDATE connections SET current_grant_id = $1 WHERE id = $2",
        &[&grant.as_str(), &id.as_str()],
    )
    .await?;
    insert_event(
        tx,
        &id,
        now,
        NewEvent::new(EventKind::Authorized, Some(&grant))
            .request(pair.provider_request_id.as_deref())
            .detail(json!({ "bot_id": pair.bot_id, "workspace_id": pair.workspace_id })),
    )
    .await?;
    Ok(AuthorizationOutcome {
        connection: load(tx, &id).await?.connection,
        kind: AuthorizationKind::Connected,
        grant_id: grant,
        recovered: false,
    })
}

/// An authorization of an existing connection (whose row is locked): a new current grant, or
/// a confirmation when the provider returned exactly the pair we hold.
async fn reauthorize(
    tx: &Tx<'_>,
    keys: &KeyRing,
    now: DateTime<Utc>,
    provider: Provider,
    existing: ConnectionRow,
    pair: &MintedPair,
) -> Result<AuthorizationOutcome, StoreError> {
    let conn = existing.connection;
    let bot_changed = conn.bot_id != pair.bot_id;
    // The connection is about to be live with `pair.bot_id` (whose advisory lock we hold); no
    // other live connection may have it.
    if bot_changed || conn.status == ConnectionStatus::Revoked {
        if let Some(other) = live_by_bot(tx, provider, &pair.bot_id, false).await? {
            if other.connection.id != conn.id {
                return Err(StoreError::Conflict(format!(
                    "bot {} already belongs to the live connection {}",
                    pair.bot_id, other.connection.id
                )));
            }
        }
    }

    let current = match &conn.grant_id {
        Some(g) => find_grant(tx, &conn.id, g).await?,
        None => None,
    };
    let confirmed = is_confirmation(keys, current.as_ref(), pair)?;

    if bot_changed {
        insert_event(
            tx,
            &conn.id,
            now,
            NewEvent::new(EventKind::BotChanged, None)
                .request(pair.provider_request_id.as_deref())
                .detail(bot_changed_detail(&conn, pair)),
        )
        .await?;
    }
    exec(
        tx,
        "UPDATE connections SET bot_id = $1, workspace_id = $2, workspace_name = $3, workspace_icon = $4, \
             updated_at = $5 \
         WHERE id = $6",
        &[
            &pair.bot_id.0,
            &pair.workspace_id,
            &pair.workspace_name,
            &pair.workspace_icon,
            &now,
            &conn.id.as_str(),
        ],
    )
    .await?;

    let (kind, grant_id) = match current {
        Some(current) if confirmed => {
            insert_event(
                tx,
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
            let grant = GrantId::generate();
            insert_grant(
                tx,
                keys,
                NewGrant {
                    id: &grant,
                    connection: &conn.id,
                    origin: GrantOrigin::Reauthorization,
                    parent: None,
                    pair,
                    superseded_at: None,
                    revoked_at: None,
                    stale_at_birth: false,
                },
            )
            .await?;
            let previous = previous.map(|p| p.record.id);
            if let Some(previous) = &previous {
                exec(
                    tx,
                    "UPDATE grants SET superseded_at = $1 WHERE id = $2 AND superseded_at IS NULL",
                    &[&now, &previous.as_str()],
                )
                .await?;
            }
            exec(
                tx,
                "UPDATE connections SET current_grant_id = $1 WHERE id = $2",
                &[&grant.as_str(), &conn.id.as_str()],
            )
            .await?;
            insert_event(
                tx,
                &conn.id,
                now,
                NewEvent::new(EventKind::Reauthorized, Some(&grant))
                    .related(previous.as_ref())
                    .request(pair.provider_request_id.as_deref()),
            )
            .await?;
            if let Some(previous) = &previous {
                insert_event(
                    tx,
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
        exec(
            tx,
            "UPDATE connections SET status = 'active', diagnosis = NULL WHERE id = $1",
            &[&conn.id.as_str()],
        )
        .await?;
        insert_event(
            tx,
            &conn.id,
            now,
            NewEvent::new(EventKind::Recovered, Some(&grant_id))
                .detail(json!({ "from_status": conn.status })),
        )
        .await?;
    }
    Ok(AuthorizationOutcome {
        connection: load(tx, &conn.id).await?.connection,
        kind,
        grant_id,
        recovered,
    })
}

pub(super) async fn begin_refresh(
    tx: &Tx<'_>,
    keys: &KeyRing,
    clock: &Clock,
    id: &ConnectionId,
    if_grant: Option<&GrantId>,
    holder: &str,
    lease: Duration,
) -> Result<LeaseOutcome, StoreError> {
    let row = lock_connection(tx, id).await?;
    let now = micros(clock.now());
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
    let current = find_grant(tx, id, &current_id).await?.ok_or_else(|| {
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

    let fence = row.lease_fence + 1;
    let lease = chrono::Duration::from_std(lease)
        .map_err(|_| StoreError::Conflict("lease too long".into()))?;
    let until = now + lease;
    exec(
        tx,
        "UPDATE connections SET lease_holder = $1, lease_until = $2, lease_fence = $3 WHERE id = $4",
        &[&holder, &until, &fence, &id.as_str()],
    )
    .await?;

    // An unfinished attempt on this same grant means its holder vanished after it may have
    // spent the refresh token: name it, so that an `invalid_grant` now can be explained.
    let interrupted = query_opt(
        tx,
        "SELECT id, started_at, holder FROM refresh_attempts \
         WHERE grant_id = $1 AND finished_at IS NULL ORDER BY fence DESC LIMIT 1",
        &[&current_id.as_str()],
    )
    .await?
    .map(|r| -> Result<_, StoreError> {
        Ok(InterruptedAttempt {
            attempt_id: AttemptId::from_trusted(r.try_get(0)?),
            grant_id: current_id.clone(),
            started_at: r.try_get(1)?,
            holder: r.try_get(2)?,
        })
    })
    .transpose()?;
    exec(
        tx,
        "UPDATE refresh_attempts SET finished_at = $1, outcome = 'interrupted' \
         WHERE grant_id = $2 AND finished_at IS NULL",
        &[&now, &current_id.as_str()],
    )
    .await?;

    let attempt = AttemptId::generate();
    exec(
        tx,
        "INSERT INTO refresh_attempts (id, connection_id, grant_id, fence, holder, started_at, lease_until) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
        &[
            &attempt.as_str(),
            &id.as_str(),
            &current_id.as_str(),
            &fence,
            &holder,
            &now,
            &until,
        ],
    )
    .await?;
    insert_event(
        tx,
        id,
        now,
        NewEvent::new(EventKind::RefreshStarted, Some(&current_id)).detail(json!({
            "attempt_id": attempt,
            "fence": fence,
            "holder": holder,
            "lease_until": rfc3339(until),
            "interrupted_attempt": interrupted.as_ref().map(|i| &i.attempt_id),
        })),
    )
    .await?;
    Ok(LeaseOutcome::Acquired {
        fence,
        attempt_id: attempt,
        grant: open_grant(keys, current)?,
        interrupted,
    })
}

async fn release_lease_and_close(
    tx: &Tx<'_>,
    row: &ConnectionRow,
    fence: i64,
    attempt: &AttemptId,
    outcome: &str,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let id = &row.connection.id;
    if row.lease_fence == fence {
        exec(
            tx,
            "UPDATE connections SET lease_holder = NULL, lease_until = NULL WHERE id = $1",
            &[&id.as_str()],
        )
        .await?;
    }
    exec(
        tx,
        "UPDATE refresh_attempts SET finished_at = $1, outcome = $2 WHERE id = $3 AND connection_id = $4",
        &[&now, &outcome, &attempt.as_str(), &id.as_str()],
    )
    .await?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn record_refresh(
    tx: &Tx<'_>,
    keys: &KeyRing,
    clock: &Clock,
    id: &ConnectionId,
    parent: &GrantId,
    fence: i64,
    attempt: &AttemptId,
    pair: &MintedPair,
) -> Result<RefreshRecorded, StoreError> {
    let row = lock_connection(tx, id).await?;
    let now = micros(clock.now());
    if find_grant(tx, id, parent).await?.is_none() {
        return Err(StoreError::Conflict(format!(
            "grant {parent} is not a grant of connection {id}"
        )));
    }
    let grant = GrantId::generate();
    let current = row.connection.grant_id.clone();
    let revoked = row.connection.status == ConnectionStatus::Revoked;
    // Invariant 3: only a refresh of the current grant moves the pointer. The fence does not
    // matter here: a pair the provider minted is recorded whoever holds the lease now.
    let commit = if !revoked && current.as_ref() == Some(parent) {
        insert_grant(
            tx,
            keys,
            NewGrant {
                id: &grant,
                connection: id,
                origin: GrantOrigin::Refresh,
                parent: Some(parent),
                pair,
                superseded_at: None,
                revoked_at: None,
                stale_at_birth: false,
            },
        )
        .await?;
        exec(
            tx,
            "UPDATE grants SET superseded_at = $1 WHERE id = $2 AND superseded_at IS NULL",
            &[&now, &parent.as_str()],
        )
        .await?;
        exec(
            tx,
            "UPDATE connections SET current_grant_id = $1, updated_at = $2 WHERE id = $3",
            &[&grant.as_str(), &now, &id.as_str()],
        )
        .await?;
        insert_event(
            tx,
            id,
            now,
            NewEvent::new(EventKind::Refreshed, Some(&grant))
                .related(Some(parent))
                .request(pair.provider_request_id.as_deref())
                .detail(json!({ "attempt_id": attempt, "fence": fence })),
        )
        .await?;
        insert_event(
            tx,
            id,
            now,
            NewEvent::new(EventKind::Superseded, Some(parent))
                .related(Some(&grant))
                .detail(json!({ "by": "refresh" })),
        )
        .await?;
        RefreshCommit::Current
    } else {
        insert_grant(
            tx,
            keys,
            NewGrant {
                id: &grant,
                connection: id,
                origin: GrantOrigin::Refresh,
                parent: Some(parent),
                pair,
                superseded_at: Some(pair.obtained_at),
                revoked_at: revoked.then_some(now),
                stale_at_birth: true,
            },
        )
        .await?;
        exec(
            tx,
            "UPDATE connections SET updated_at = $1 WHERE id = $2",
            &[&now, &id.as_str()],
        )
        .await?;
        let reason = if revoked {
            "connection_revoked"
        } else {
            "parent_superseded"
        };
        insert_event(
            tx,
            id,
            now,
            NewEvent::new(EventKind::Superseded, Some(&grant))
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
        RefreshCommit::SupersededAtBirth
    };
    release_lease_and_close(tx, &row, fence, attempt, "refreshed", now).await?;
    let current = match commit {
        RefreshCommit::Current => grant.clone(),
        RefreshCommit::SupersededAtBirth => current.unwrap_or_else(|| grant.clone()),
    };
    Ok(RefreshRecorded {
        grant_id: grant,
        commit,
        current,
    })
}

pub(super) async fn record_refresh_failure(
    tx: &Tx<'_>,
    clock: &Clock,
    id: &ConnectionId,
    parent: &GrantId,
    fence: i64,
    attempt: &AttemptId,
    failure: &RefreshFailure,
) -> Result<FailureOutcome, StoreError> {
    let row = lock_connection(tx, id).await?;
    let now = micros(clock.now());
    let fenced = row.lease_fence != fence;
    insert_event(
        tx,
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
    release_lease_and_close(
        tx,
        &row,
        fence,
        attempt,
        if failure.outcome_unknown {
            "interrupted"
        } else {
            "failed"
        },
        now,
    )
    .await?;
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

    let grant = find_grant(tx, id, parent).await?.ok_or_else(|| {
        StoreError::Database(format!("current grant {parent} of {id} is missing"))
    })?;
    let interrupted = query_opt(
        tx,
        "SELECT id, started_at, holder FROM refresh_attempts \
         WHERE grant_id = $1 AND outcome = 'interrupted' ORDER BY fence DESC LIMIT 1",
        &[&parent.as_str()],
    )
    .await?
    .map(|r| -> Result<_, StoreError> {
        Ok(json!({
            "attempt_id": r.try_get::<_, String>(0)?,
            "started_at": rfc3339(r.try_get(1)?),
            "holder": r.try_get::<_, String>(2)?,
        }))
    })
    .transpose()?;
    let diagnosis = refresh_rejected_diagnosis(
        failure,
        parent,
        grant.record.obtained_at,
        attempt,
        interrupted,
    );
    exec(
        tx,
        "UPDATE connections SET status = 'needs_reauth', diagnosis = $1, updated_at = $2 WHERE id = $3",
        &[&diagnosis, &now, &id.as_str()],
    )
    .await?;
    insert_event(
        tx,
        id,
        now,
        NewEvent::new(EventKind::NeedsReauth, Some(parent))
            .request(failure.provider_request_id.as_deref())
            .detail(diagnosis.clone()),
    )
    .await?;
    Ok(FailureOutcome::NeedsReauth { diagnosis })
}

pub(super) async fn mark_needs_reauth(
    tx: &Tx<'_>,
    clock: &Clock,
    id: &ConnectionId,
    grant: &GrantId,
    diagnosis: &serde_json::Value,
) -> Result<ConnectionRow, StoreError> {
    let row = lock_connection(tx, id).await?;
    let now = micros(clock.now());
    if row.connection.status != ConnectionStatus::Active
        || row.connection.grant_id.as_ref() != Some(grant)
    {
        return Ok(row);
    }
    exec(
        tx,
        "UPDATE connections SET status = 'needs_reauth', diagnosis = $1, updated_at = $2 WHERE id = $3",
        &[diagnosis, &now, &id.as_str()],
    )
    .await?;
    insert_event(
        tx,
        id,
        now,
        NewEvent::new(EventKind::NeedsReauth, Some(grant)).detail(diagnosis.clone()),
    )
    .await?;
    load(tx, id).await
}

pub(super) async fn mark_revoked(
    tx: &Tx<'_>,
    clock: &Clock,
    id: &ConnectionId,
    reason: &str,
) -> Result<ConnectionRow, StoreError> {
    let row = lock_connection(tx, id).await?;
    let now = micros(clock.now());
    if row.connection.status == ConnectionStatus::Revoked {
        return Ok(row);
    }
    exec(
        tx,
        "UPDATE connections SET status = 'revoked', diagnosis = NULL, lease_holder = NULL, lease_until = NULL, \
             updated_at = $1 \
         WHERE id = $2",
        &[&now, &id.as_str()],
    )
    .await?;
    exec(
        tx,
        "UPDATE grants SET revoked_at = $1 WHERE connection_id = $2 AND revoked_at IS NULL",
        &[&now, &id.as_str()],
    )
    .await?;
    insert_event(
        tx,
        id,
        now,
        NewEvent::new(EventKind::Revoked, row.connection.grant_id.as_ref())
            .detail(json!({ "reason": reason })),
    )
    .await?;
    load(tx, id).await
}

pub(super) const SESSION_COLUMNS: &str =
    "id, provider, state_hash, end_user_id, return_to, connection_id, created_at, expires_at, used_at";

pub(super) fn session_at(r: &tokio_postgres::Row) -> Result<ConnectSession, StoreError> {
    let provider: String = r.try_get(1)?;
    Ok(ConnectSession {
        id: crate::ids::SessionId::from_trusted(r.try_get(0)?),
        provider: Provider::parse(&provider).ok_or_else(|| {
            StoreError::Database(format!("unexpected provider {provider:?} in the database"))
        })?,
        state_hash: r.try_get(2)?,
        end_user_id: r.try_get(3)?,
        return_to: r.try_get(4)?,
        connection_id: r
            .try_get::<_, Option<String>>(5)?
            .map(ConnectionId::from_trusted),
        created_at: r.try_get(6)?,
        expires_at: r.try_get(7)?,
        used_at: r.try_get(8)?,
    })
}

pub(super) async fn consume_session(
    tx: &Tx<'_>,
    clock: &Clock,
    state_hash: &str,
) -> Result<SessionLookup, StoreError> {
    let Some(row) = query_opt(
        tx,
        &format!("SELECT {SESSION_COLUMNS} FROM connect_sessions WHERE state_hash = $1 FOR UPDATE"),
        &[&state_hash],
    )
    .await?
    else {
        return Ok(SessionLookup::Unknown);
    };
    let now = micros(clock.now());
    let mut session = session_at(&row)?;
    if session.used_at.is_some() {
        return Ok(SessionLookup::AlreadyUsed(session));
    }
    if session.expires_at <= now {
        return Ok(SessionLookup::Expired(session));
    }
    exec(
        tx,
        "UPDATE connect_sessions SET used_at = $1 WHERE id = $2",
        &[&now, &session.id.as_str()],
    )
    .await?;
    session.used_at = Some(now);
    Ok(SessionLookup::Consumed(session))
}

pub(super) async fn rotate_keys(
    tx: &Tx<'_>,
    keys: &KeyRing,
    batch: u32,
) -> Result<RotateProgress, StoreError> {
    let active = keys.active_key_id();
    // SKIP LOCKED: a grant a ledger write is updating right now is left for the next batch,
    // so rotation never waits on (or deadlocks with) the serving path.
    let rows = query(
        tx,
        &format!(
            "SELECT {GRANT_COLUMNS} FROM grants g WHERE g.key_id <> $1 ORDER BY g.seq LIMIT $2 \
             FOR UPDATE SKIP LOCKED"
        ),
        &[&active, &i64::from(batch)],
    )
    .await?;
    let mut resealed = 0;
    for row in rows {
        let open = open_grant(keys, grant_at(&row, 0)?)?;
        let (access, refresh, key_id) = seal_tokens(
            keys,
            &open.record.connection_id,
            &open.record.id,
            &open.access_token,
            open.refresh_token.as_ref(),
        );
        exec(
            tx,
            "UPDATE grants SET access_token = $1, refresh_token = $2, key_id = $3 WHERE id = $4",
            &[&access, &refresh, &key_id, &open.record.id.as_str()],
        )
        .await?;
        resealed += 1;
    }
    let remaining: i64 = query_opt(
        tx,
        "SELECT count(*) FROM grants WHERE key_id <> $1",
        &[&active],
    )
    .await?
    .map(|r| r.try_get(0))
    .transpose()?
    .unwrap_or(0);
    Ok(RotateProgress {
        resealed,
        remaining: remaining as u64,
    })
}
