//! The ledger's write operations on SQLite. Each function body runs inside one
//! `BEGIN IMMEDIATE` transaction (see `SqliteStore::write`), which holds the database's write
//! lock from its first statement: every read below sees the latest commit of any process, and
//! nothing else can commit in between. That is the connection lock `store/mod.rs` promises.

use std::time::Duration;

use chrono::{DateTime, Utc};
use rusqlite::{params, OptionalExtension, Transaction};
use serde_json::json;

use super::rows::{
    connection_at, find_grant, grant_at, insert_event, insert_grant, load_connection, open_grant,
    seal_tokens, time, ts, ConnectionRow, NewEvent, NewGrant, CONNECTION_COLUMNS, GRANT_COLUMNS,
};
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

fn live_by_bot(
    tx: &Transaction<'_>,
    provider: Provider,
    bot: &BotId,
) -> Result<Option<ConnectionRow>, StoreError> {
    Ok(tx
        .prepare_cached(&format!(
            "SELECT {CONNECTION_COLUMNS} FROM connections c \
             WHERE c.provider = ?1 AND c.bot_id = ?2 AND c.status <> 'revoked'"
        ))?
        .query_row([provider.as_str(), bot.0.as_str()], |row| {
            connection_at(row, 0)
        })
        .optional()?)
}

pub(super) fn record_authorization(
    tx: &Transaction<'_>,
    keys: &KeyRing,
    now: DateTime<Utc>,
    auth: &NewAuthorization,
) -> Result<AuthorizationOutcome, StoreError> {
    let pair = &auth.pair;
    match &auth.target {
        AuthorizationTarget::Connect { end_user_id } => {
            match live_by_bot(tx, auth.provider, &pair.bot_id)? {
                Some(existing) => reauthorize(tx, keys, now, auth.provider, existing, pair),
                None => connect_new(tx, keys, now, auth.provider, end_user_id, pair),
            }
        }
        AuthorizationTarget::Reconnect { connection_id } => {
            let existing = load_connection(tx, connection_id)?;
            reauthorize(tx, keys, now, auth.provider, existing, pair)
        }
    }
}

fn connect_new(
    tx: &Transaction<'_>,
    keys: &KeyRing,
    now: DateTime<Utc>,
    provider: Provider,
    end_user_id: &str,
    pair: &MintedPair,
) -> Result<AuthorizationOutcome, StoreError> {
    let id = ConnectionId::generate();
    let grant = GrantId::generate();
    tx.prepare_cached(
        "INSERT INTO connections (id, provider, bot_id, workspace_id, workspace_name, workspace_icon, end_user_id, \
             status, created_at, updated_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'active', ?8, ?8)",
    )?
    .execute(params![
        id.as_str(),
        provider.as_str(),
        pair.bot_id.0,
        pair.workspace_id,
        pair.workspace_name,
        pair.workspace_icon,
        end_user_id,
        ts(now),
    ])?;
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
    )?;
    tx.prepare_cached("UPDATE connections SET current_grant_id = ?1 WHERE id = ?2")?
        .execute([grant.as_str(), id.as_str()])?;
    insert_event(
        tx,
        &id,
        now,
        NewEvent::new(EventKind::Authorized, Some(&grant))
            .request(pair.provider_request_id.as_deref())
            .detail(json!({ "bot_id": pair.bot_id, "workspace_id": pair.workspace_id })),
    )?;
    Ok(AuthorizationOutcome {
        connection: load_connection(tx, &id)?.connection,
        kind: AuthorizationKind::Connected,
        grant_id: grant,
        recovered: false,
    })
}

/// An authorization of an existing connection: a new current grant, or a confirmation when the
/// provider returned exactly the pair we hold.
fn reauthorize(
    tx: &Transaction<'_>,
    keys: &KeyRing,
    now: DateTime<Utc>,
    provider: Provider,
    existing: ConnectionRow,
    pair: &MintedPair,
) -> Result<AuthorizationOutcome, StoreError> {
    let conn = existing.connection;
    let bot_changed = conn.bot_id != pair.bot_id;
    // The connection is about to be live with `pair.bot_id`; no other live connection may have it.
    if bot_changed || conn.status == ConnectionStatus::Revoked {
        if let Some(other) = live_by_bot(tx, provider, &pair.bot_id)? {
            if other.connection.id != conn.id {
                return Err(StoreError::Conflict(format!(
                    "bot {} already belongs to the live connection {}",
                    pair.bot_id, other.connection.id
                )));
            }
        }
    }

    let current = match &conn.grant_id {
        Some(g) => find_grant(tx, &conn.id, g)?,
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
        )?;
    }
    tx.prepare_cached(
        "UPDATE connections SET bot_id = ?1, workspace_id = ?2, workspace_name = ?3, workspace_icon = ?4, \
             updated_at = ?5 \
         WHERE id = ?6",
    )?
    .execute(params![
        pair.bot_id.0,
        pair.workspace_id,
        pair.workspace_name,
        pair.workspace_icon,
        ts(now),
        conn.id.as_str(),
    ])?;

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
            )?;
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
            )?;
            let previous = previous.map(|p| p.record.id);
            if let Some(previous) = &previous {
                tx.prepare_cached(
                    "UPDATE grants SET superseded_at = ?1 WHERE id = ?2 AND superseded_at IS NULL",
                )?
                .execute([ts(now), previous.as_str().to_owned()])?;
            }
            tx.prepare_cached("UPDATE connections SET current_grant_id = ?1 WHERE id = ?2")?
                .execute([grant.as_str(), conn.id.as_str()])?;
            insert_event(
                tx,
                &conn.id,
                now,
                NewEvent::new(EventKind::Reauthorized, Some(&grant))
                    .related(previous.as_ref())
                    .request(pair.provider_request_id.as_deref()),
            )?;
            if let Some(previous) = &previous {
                insert_event(
                    tx,
                    &conn.id,
                    now,
                    NewEvent::new(EventKind::Superseded, Some(previous))
                        .related(Some(&grant))
                        .detail(json!({ "by": "reauthorization" })),
                )?;
            }
            (AuthorizationKind::Reauthorized, grant)
        }
    };

    let recovered = conn.status != ConnectionStatus::Active;
    if recovered {
        tx.prepare_cached(
            "UPDATE connections SET status = 'active', diagnosis = NULL WHERE id = ?1",
        )?
        .execute([conn.id.as_str()])?;
        insert_event(
            tx,
            &conn.id,
            now,
            NewEvent::new(EventKind::Recovered, Some(&grant_id))
                .detail(json!({ "from_status": conn.status })),
        )?;
    }
    Ok(AuthorizationOutcome {
        connection: load_connection(tx, &conn.id)?.connection,
        kind,
        grant_id,
        recovered,
    })
}

pub(super) fn begin_refresh(
    tx: &Transaction<'_>,
    keys: &KeyRing,
    now: DateTime<Utc>,
    id: &ConnectionId,
    if_grant: Option<&GrantId>,
    holder: &str,
    lease: Duration,
) -> Result<LeaseOutcome, StoreError> {
    let row = load_connection(tx, id)?;
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
    let current = find_grant(tx, id, &current_id)?.ok_or_else(|| {
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
    tx.prepare_cached("UPDATE connections SET lease_holder = ?1, lease_until = ?2, lease_fence = ?3 WHERE id = ?4")?
        .execute(params![holder, ts(until), fence, id.as_str()])?;

    // An unfinished attempt on this same grant means its holder vanished after it may have
    // spent the refresh token: name it, so that an `invalid_grant` now can be explained.
    let interrupted = tx
        .prepare_cached(
            "SELECT id, started_at, holder FROM refresh_attempts \
             WHERE grant_id = ?1 AND finished_at IS NULL ORDER BY fence DESC LIMIT 1",
        )?
        .query_row([current_id.as_str()], |r| {
            Ok(InterruptedAttempt {
                attempt_id: AttemptId::from_trusted(r.get(0)?),
                grant_id: current_id.clone(),
                started_at: time(r, 1)?,
                holder: r.get(2)?,
            })
        })
        .optional()?;
    tx.prepare_cached(
        "UPDATE refresh_attempts SET finished_at = ?1, outcome = 'interrupted' \
         WHERE grant_id = ?2 AND finished_at IS NULL",
    )?
    .execute([ts(now), current_id.as_str().to_owned()])?;

    let attempt = AttemptId::generate();
    tx.prepare_cached(
        "INSERT INTO refresh_attempts (id, connection_id, grant_id, fence, holder, started_at, lease_until) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
        attempt.as_str(),
        id.as_str(),
        current_id.as_str(),
        fence,
        holder,
        ts(now),
        ts(until)
    ])?;
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
    )?;
    Ok(LeaseOutcome::Acquired {
        fence,
        attempt_id: attempt,
        grant: open_grant(keys, current)?,
        interrupted,
    })
}

fn release_lease_and_close(
    tx: &Transaction<'_>,
    row: &ConnectionRow,
    fence: i64,
    attempt: &AttemptId,
    outcome: &str,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let id = &row.connection.id;
    if row.lease_fence == fence {
        tx.prepare_cached(
            "UPDATE connections SET lease_holder = NULL, lease_until = NULL WHERE id = ?1",
        )?
        .execute([id.as_str()])?;
    }
    tx.prepare_cached(
        "UPDATE refresh_attempts SET finished_at = ?1, outcome = ?2 WHERE id = ?3 AND connection_id = ?4",
    )?
    .execute([ts(now).as_str(), outcome, attempt.as_str(), id.as_str()])?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub(super) fn record_refresh(
    tx: &Transaction<'_>,
    keys: &KeyRing,
    now: DateTime<Utc>,
    id: &ConnectionId,
    parent: &GrantId,
    fence: i64,
    attempt: &AttemptId,
    pair: &MintedPair,
) -> Result<RefreshRecorded, StoreError> {
    let row = load_connection(tx, id)?;
    if find_grant(tx, id, parent)?.is_none() {
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
        )?;
        tx.prepare_cached(
            "UPDATE grants SET superseded_at = ?1 WHERE id = ?2 AND superseded_at IS NULL",
        )?
        .execute([ts(now), parent.as_str().to_owned()])?;
        tx.prepare_cached(
            "UPDATE connections SET current_grant_id = ?1, updated_at = ?2 WHERE id = ?3",
        )?
        .execute([grant.as_str(), ts(now).as_str(), id.as_str()])?;
        insert_event(
            tx,
            id,
            now,
            NewEvent::new(EventKind::Refreshed, Some(&grant))
                .related(Some(parent))
                .request(pair.provider_request_id.as_deref())
                .detail(json!({ "attempt_id": attempt, "fence": fence })),
        )?;
        insert_event(
            tx,
            id,
            now,
            NewEvent::new(EventKind::Superseded, Some(parent))
                .related(Some(&grant))
                .detail(json!({ "by": "refresh" })),
        )?;
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
        )?;
        tx.prepare_cached("UPDATE connections SET updated_at = ?1 WHERE id = ?2")?
            .execute([ts(now), id.as_str().to_owned()])?;
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
        )?;
        RefreshCommit::SupersededAtBirth
    };
    release_lease_and_close(tx, &row, fence, attempt, "refreshed", now)?;
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

pub(super) fn record_refresh_failure(
    tx: &Transaction<'_>,
    now: DateTime<Utc>,
    id: &ConnectionId,
    parent: &GrantId,
    fence: i64,
    attempt: &AttemptId,
    failure: &RefreshFailure,
) -> Result<FailureOutcome, StoreError> {
    let row = load_connection(tx, id)?;
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
    )?;
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
    )?;
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

    let grant = find_grant(tx, id, parent)?.ok_or_else(|| {
        StoreError::Database(format!("current grant {parent} of {id} is missing"))
    })?;
    let interrupted = tx
        .prepare_cached(
            "SELECT id, started_at, holder FROM refresh_attempts \
             WHERE grant_id = ?1 AND outcome = 'interrupted' ORDER BY fence DESC LIMIT 1",
        )?
        .query_row([parent.as_str()], |r| {
            Ok(json!({
                "attempt_id": r.get::<_, String>(0)?,
                "started_at": rfc3339(time(r, 1)?),
                "holder": r.get::<_, String>(2)?,
            }))
        })
        .optional()?;
    let diagnosis = refresh_rejected_diagnosis(
        failure,
        parent,
        grant.record.obtained_at,
        attempt,
        interrupted,
    );
    tx.prepare_cached(
        "UPDATE connections SET status = 'needs_reauth', diagnosis = ?1, updated_at = ?2 WHERE id = ?3",
    )?
    .execute([diagnosis.to_string(), ts(now), id.as_str().to_owned()])?;
    insert_event(
        tx,
        id,
        now,
        NewEvent::new(EventKind::NeedsReauth, Some(parent))
            .request(failure.provider_request_id.as_deref())
            .detail(diagnosis.clone()),
    )?;
    Ok(FailureOutcome::NeedsReauth { diagnosis })
}

pub(super) fn mark_needs_reauth(
    tx: &Transaction<'_>,
    now: DateTime<Utc>,
    id: &ConnectionId,
    grant: &GrantId,
    diagnosis: &serde_json::Value,
) -> Result<ConnectionRow, StoreError> {
    let row = load_connection(tx, id)?;
    if row.connection.status != ConnectionStatus::Active
        || row.connection.grant_id.as_ref() != Some(grant)
    {
        return Ok(row);
    }
    tx.prepare_cached(
        "UPDATE connections SET status = 'needs_reauth', diagnosis = ?1, updated_at = ?2 WHERE id = ?3",
    )?
    .execute([diagnosis.to_string(), ts(now), id.as_str().to_owned()])?;
    insert_event(
        tx,
        id,
        now,
        NewEvent::new(EventKind::NeedsReauth, Some(grant)).detail(diagnosis.clone()),
    )?;
    load_connection(tx, id)
}

pub(super) fn mark_revoked(
    tx: &Transaction<'_>,
    now: DateTime<Utc>,
    id: &ConnectionId,
    reason: &str,
) -> Result<ConnectionRow, StoreError> {
    let row = load_connection(tx, id)?;
    if row.connection.status == ConnectionStatus::Revoked {
        return Ok(row);
    }
    tx.prepare_cached(
        "UPDATE connections SET status = 'revoked', diagnosis = NULL, lease_holder = NULL, lease_until = NULL, \
             updated_at = ?1 \
         WHERE id = ?2",
    )?
    .execute([ts(now), id.as_str().to_owned()])?;
    tx.prepare_cached(
        "UPDATE grants SET revoked_at = ?1 WHERE connection_id = ?2 AND revoked_at IS NULL",
    )?
    .execute([ts(now), id.as_str().to_owned()])?;
    insert_event(
        tx,
        id,
        now,
        NewEvent::new(EventKind::Revoked, row.connection.grant_id.as_ref())
            .detail(json!({ "reason": reason })),
    )?;
    load_connection(tx, id)
}

pub(super) const SESSION_COLUMNS: &str =
    "id, provider, state_hash, end_user_id, return_to, connection_id, created_at, expires_at, used_at";

pub(super) fn session_at(r: &rusqlite::Row<'_>) -> rusqlite::Result<ConnectSession> {
    let provider: String = r.get(1)?;
    Ok(ConnectSession {
        id: crate::ids::SessionId::from_trusted(r.get(0)?),
        provider: Provider::parse(&provider).ok_or_else(|| {
            rusqlite::Error::FromSqlConversionFailure(
                1,
                rusqlite::types::Type::Text,
                "unknown provider".into(),
            )
        })?,
        state_hash: r.get(2)?,
        end_user_id: r.get(3)?,
        return_to: r.get(4)?,
        connection_id: r
            .get::<_, Option<String>>(5)?
            .map(ConnectionId::from_trusted),
        created_at: time(r, 6)?,
        expires_at: time(r, 7)?,
        used_at: super::rows::opt_time(r, 8)?,
    })
}

pub(super) fn consume_session(
    tx: &Transaction<'_>,
    now: DateTime<Utc>,
    state_hash: &str,
) -> Result<SessionLookup, StoreError> {
    let Some(mut session) = tx
        .prepare_cached(&format!(
            "SELECT {SESSION_COLUMNS} FROM connect_sessions WHERE state_hash = ?1"
        ))?
        .query_row([state_hash], session_at)
        .optional()?
    else {
        return Ok(SessionLookup::Unknown);
    };
    if session.used_at.is_some() {
        return Ok(SessionLookup::AlreadyUsed(session));
    }
    if session.expires_at <= now {
        return Ok(SessionLookup::Expired(session));
    }
    tx.prepare_cached("UPDATE connect_sessions SET used_at = ?1 WHERE id = ?2")?
        .execute([ts(now), session.id.as_str().to_owned()])?;
    session.used_at = Some(now);
    Ok(SessionLookup::Consumed(session))
}

pub(super) fn rotate_keys(
    tx: &Transaction<'_>,
    keys: &KeyRing,
    batch: u32,
) -> Result<RotateProgress, StoreError> {
    let active = keys.active_key_id();
    let stale = tx
        .prepare_cached(&format!(
            "SELECT {GRANT_COLUMNS} FROM grants g WHERE g.key_id <> ?1 ORDER BY g.seq LIMIT ?2"
        ))?
        .query_map(params![active, batch], |row| grant_at(row, 0))?
        .collect::<Result<Vec<_>, _>>()?;
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
        tx.prepare_cached(
            "UPDATE grants SET access_token = ?1, refresh_token = ?2, key_id = ?3 WHERE id = ?4",
        )?
        .execute(params![access, refresh, key_id, open.record.id.as_str()])?;
        resealed += 1;
    }
    let remaining: i64 = tx
        .prepare_cached("SELECT count(*) FROM grants WHERE key_id <> ?1")?
        .query_row([active], |r| r.get(0))?;
    Ok(RotateProgress {
        resealed,
        remaining: remaining as u64,
    })
}
