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

use std::sync::Arc;

use crate::clock::Clock;
use crate::ids::{ConnectionId, GrantId};
use crate::ledger::{CheckResult, ConnectionStatus, LeaseHolder};
use crate::provider::notion::NotionClient;
use crate::refresh::{Coordinator, RefreshError};
use crate::store::Store;

/// What the health check works with: the ledger, Notion's introspection, and the coordinator
/// that judges a token Notion calls inactive.
#[derive(Clone)]
pub struct Checker {
    pub store: Arc<Store>,
    pub notion: NotionClient,
    pub coordinator: Arc<Coordinator>,
    pub clock: Clock,
}

use crate::config::HealthSettings;

/// The lease's name in `sweeper_leases`.
pub const SWEEPER: &str = "health_check";

/// How long the sweeper's lease lasts; it is renewed at a third of that, so a sweeper that
/// dies is replaced within this long.
pub const LEASE: Duration = Duration::from_secs(30);

/// How often the active connections are counted again (the spacing follows their number).
const RECOUNT: Duration = Duration::from_secs(10);

/// The most a connection's check may come early (see `sweep`).
const MAX_SLACK: Duration = Duration::from_secs(5);

/// Starts the sweeper of this process, unless the interval is zero. Every process runs one;
/// the lease lets one of them work at a time.
pub fn spawn(state: Checker, settings: HealthSettings) -> Option<tokio::task::JoinHandle<()>> {
    if settings.interval.is_zero() {
        return None;
    }
    let holder = crate::ledger::LeaseHolder::for_this_process();
    Some(tokio::spawn(sweep(state, settings, holder)))
}

async fn sweep(state: Checker, settings: HealthSettings, holder: LeaseHolder) {
    let store = &state.store;
    // Never sleep longer than this between looks: the lease must be renewed, and new
    // connections (due at once) noticed.
    let idle = settings.interval.min(LEASE / 3);
    let mut held_since: Option<Instant> = None;
    let mut spacing = settings.rate.spacing();
    let mut counted: Option<Instant> = None;
    // Recount often enough that a change in the number of connections soon changes the pace.
    let recount = RECOUNT.min(settings.interval);
    let mut last_check: Option<Instant> = None;
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
        if counted.is_none_or(|t| t.elapsed() >= recount) {
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
        // The next check comes `spacing` after the last one began, with the spacing as it is
        // now (it follows the number of active connections).
        if let Some(next) = last_check.map(|t| t + spacing) {
            let now = Instant::now();
            if now < next {
                tokio::time::sleep((next - now).min(idle).min(recount)).await;
                continue;
            }
        }
        // A check is recorded when its answer arrives, a moment after it began; without some
        // slack a connection checked at t would not be due at t + interval, and would wait
        // for the next look.
        let slack = (spacing / 2).min(MAX_SLACK);
        let period = chrono::Duration::from_std(settings.interval - slack)
            .unwrap_or(chrono::Duration::days(1));
        let before = state.clock.now() - period;
        let due = match store.due_checks(before, 1).await {
            Ok(due) => due,
            Err(e) => {
                tracing::debug!("the health check could not read due connections: {e}");
                tokio::time::sleep(idle).await;
                continue;
            }
        };
        let Some((id, grant)) = due.into_iter().next() else {
            // Nothing due: sleep until the least recently checked connection is (a new
            // connection is due at once, and is noticed within `idle`).
            let wake = match store.check_schedule().await {
                Ok((_, Some(oldest))) => (oldest + period - state.clock.now())
                    .to_std()
                    .unwrap_or_default(),
                _ => idle,
            };
            tokio::time::sleep(wake.clamp(Duration::from_millis(20), idle)).await;
            continue;
        };
        let started = Instant::now();
        last_check = Some(started);
        check(&state, &id, &grant).await;
        tracing::debug!(connection = %id, took_ms = started.elapsed().as_millis() as u64, spacing_ms = spacing.as_millis() as u64, "checked");
    }
}

/// Checks one connection's current access token and acts on what Notion says.
pub async fn check(state: &Checker, id: &ConnectionId, grant: &GrantId) {
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
                Err(e) => {
                    tracing::debug!(connection = %id, "could not mark a dead connection: {e}")
                }
            }
        }
        Err(e) => tracing::info!(
            connection = %id,
            "the health check could not refresh an inactive token now; it will look again: {e}"
        ),
    }
}
