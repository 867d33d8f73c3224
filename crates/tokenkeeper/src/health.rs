//! The health check: finds dead connections before the app does (issue 13 §3).
//!
//! Every `TOKENKEEPER_HEALTH_CHECK_INTERVAL`, each active connection's current access token is
//! introspected at Notion. One process at a time sweeps, across every process on the database
//! (a lease in `sweeper_leases`, renewed while it works, taken over when its holder dies), and
//! it spreads the checks evenly over the interval: with N active connections, one check every
//! interval / N, never faster than `TOKENKEEPER_HEALTH_CHECK_RATE`, so the checks are a steady
//! trickle rather than a burst, and together never exceed the rate.
//!
//! A token Notion calls inactive goes to the refresh coordinator with `if_grant`, which judges
//! as it always does (invariant 5): a refresh token that works rescues the connection, and
//! otherwise it becomes `needs_reauth`, its diagnosis saying that introspection found the token
//! inactive (the store reads the check it recorded). Introspection's own failures and
//! throttling are `unknown` and change nothing (invariant 6). Each check is recorded on the
//! connection (`last_checked_at`, `last_check_result`), which `GET /v1/connections/{id}` shows.

use std::time::Duration;

use tokio::time::Instant;

use crate::api::SharedState;
use crate::ids::{ConnectionId, GrantId};
use crate::import::verify::Rate;
use crate::ledger::{CheckResult, ConnectionStatus, LeaseHolder};
use crate::refresh::RefreshError;

/// The health check's settings.
#[derive(Debug, Clone, Copy)]
pub struct HealthSettings {
    /// How often each active connection is checked; zero turns the checks off.
    pub interval: Duration,
    /// The most checks per second, across every process.
    pub rate: Rate,
}

/// The lease's name in `sweeper_leases`.
pub const SWEEPER: &str = "health_check";

/// How long the sweeper's lease lasts; it is renewed at a third of that, so a sweeper that
/// dies is replaced within this long.
pub const LEASE: Duration = Duration::from_secs(30);

/// How often the active connections are counted again (the spacing follows their number).
const RECOUNT: Duration = Duration::from_secs(10);

/// Starts the sweeper of this process, unless the interval is zero. Every process runs one;
/// the lease lets one of them work at a time.
pub fn spawn(state: SharedState, settings: HealthSettings) -> Option<tokio::task::JoinHandle<()>> {
    if settings.interval.is_zero() {
        return None;
    }
    let holder = crate::app::holder_name();
    Some(tokio::spawn(sweep(state, settings, holder)))
}

async fn sweep(state: SharedState, settings: HealthSettings, holder: LeaseHolder) {
    let store = &state.store;
    // Never sleep longer than this between looks: the lease must be renewed, and new
    // connections (due at once) noticed.
    let idle = settings.interval.min(LEASE / 3);
    let mut held_since: Option<Instant> = None;
    let mut spacing = settings.rate.spacing();
    let mut counted: Option<Instant> = None;
    let mut next_check = Instant::now();
    loop {
        if held_since.is_none_or(|t| t.elapsed() >= LEASE / 3) {
            match store.take_sweeper_lease(SWEEPER, &holder, LEASE).await {
                Ok(Some(_)) => {
                    if held_since.is_none() {
                        tracing::info!(interval = %humantime::format_duration(settings.interval), rate = %settings.rate, "this process sweeps the health checks");
                    }
                    held_since = Some(Instant::now());
                }
                Ok(None) => {
                    held_since = None;
                    tokio::time::sleep(LEASE / 3).await;
                    continue;
                }
                Err(e) => {
                    tracing::debug!("the health check's lease could not be taken: {e}");
                    held_since = None;
                    tokio::time::sleep(idle).await;
                    continue;
                }
            }
        }
        if counted.is_none_or(|t| t.elapsed() >= RECOUNT) {
            if let Ok((active, _)) = store.check_schedule().await {
                let even = settings.interval / u32::try_from(active.max(1)).unwrap_or(u32::MAX);
                spacing = even.max(settings.rate.spacing());
                if even < settings.rate.spacing() && counted.is_none() {
                    tracing::warn!(
                        active,
                        "checking every active connection once per interval would exceed \
                         TOKENKEEPER_HEALTH_CHECK_RATE; each is checked less often"
                    );
                }
                counted = Some(Instant::now());
            }
        }
        let now = Instant::now();
        if now < next_check {
            tokio::time::sleep((next_check - now).min(idle)).await;
            continue;
        }
        let before = state.clock.now()
            - chrono::Duration::from_std(settings.interval).unwrap_or(chrono::Duration::days(1));
        let due = match store.due_checks(before, 1).await {
            Ok(due) => due,
            Err(e) => {
                tracing::debug!("the health check could not read due connections: {e}");
                tokio::time::sleep(idle).await;
                continue;
            }
        };
        let Some((id, grant)) = due.into_iter().next() else {
            // Nothing due: look again a little later (a new connection is due at once).
            next_check = Instant::now() + idle;
            continue;
        };
        let started = Instant::now();
        check(&state, &id, &grant).await;
        next_check = started + spacing;
    }
}

/// Checks one connection's current access token and acts on what Notion says.
pub async fn check(state: &SharedState, id: &ConnectionId, grant: &GrantId) {
    let store = &state.store;
    let current = match store.current_grant(id).await {
        Ok(Some((connection, Some(current))))
            if connection.status == ConnectionStatus::Active && current.record.id == *grant =>
        {
            current
        }
        // Changed since it was found due: the next round sees it as it is now.
        Ok(_) => return,
        Err(e) => {
            tracing::debug!(connection = %id, "the health check could not read the connection: {e}");
            return;
        }
    };
    let result = match state.notion.introspect(&current.access_token).await {
        Ok(true) => CheckResult::Active,
        Ok(false) => CheckResult::Inactive,
        Err(e) => {
            // Throttling and failures of introspection say nothing about the token.
            tracing::info!(connection = %id, "the health check's introspection failed; nothing changes: {e}");
            CheckResult::Unknown
        }
    };
    let recorded = match store.record_check(id, grant, result).await {
        Ok(recorded) => recorded,
        Err(e) => {
            tracing::debug!(connection = %id, "the health check could not record a check: {e}");
            return;
        }
    };
    if result != CheckResult::Inactive
        || !recorded.still_current
        || recorded.status != ConnectionStatus::Active
    {
        return;
    }
    tracing::info!(connection = %id, grant = %grant, "the health check found the access token inactive; refreshing");
    match state.coordinator.refresh(id, Some(grant)).await {
        Ok(done) => tracing::info!(
            connection = %id,
            grant = %done.grant.record.id,
            "the health check's refresh brought the connection back"
        ),
        Err(RefreshError::NeedsReauth { .. }) => {
            tracing::warn!(connection = %id, "the health check found a dead connection: needs_reauth");
        }
        Err(RefreshError::NotRefreshable(_)) => {
            match store.mark_inactive_without_refresh(id, grant).await {
                Ok(true) => tracing::warn!(
                    connection = %id,
                    "the health check found a dead connection without a refresh token: needs_reauth"
                ),
                Ok(false) => {}
                Err(e) => tracing::debug!(connection = %id, "could not mark a dead connection: {e}"),
            }
        }
        Err(e) => tracing::info!(
            connection = %id,
            "the health check could not refresh an inactive token now; it will look again: {e}"
        ),
    }
}
