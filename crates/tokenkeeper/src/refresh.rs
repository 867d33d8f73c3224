//! The refresh coordinator: one refresh in flight per connection (invariant 4), and
//! `invalid_grant` judged rather than trusted (invariant 5).
//!
//! Two layers keep the promise:
//! - in this process, callers that want to replace the same grant share one *flight*, a spawned
//!   task (so a caller that goes away cannot cancel a refresh between the provider's answer and
//!   the commit);
//! - across processes, the flight first takes the connection's lease in the database
//!   (`Store::begin_refresh`), which also reads the refresh token under the lock and records the
//!   attempt before the provider is called. The lease always outlives the provider call's
//!   timeout, and its fence stops a stale holder from committing a failure over a newer holder.
//!
//! A flight that finds the lease held waits for the holder's result by re-reading the current
//! grant, and takes the lease over if it expires (the holder died).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::{BoxFuture, FutureExt, Shared};
use tokio::time::Instant;

use crate::ids::{AttemptId, ConnectionId, GrantId};
use crate::ledger::{
    ConnectionStatus, Diagnosis, FailureOutcome, Fence, LeaseHolder, LeaseOutcome, MintedPair,
    OpenGrant, RefreshFailure,
};
use crate::provider::notion::NotionClient;
use crate::provider::text::{ProviderCode, ProviderText};
use crate::provider::ProviderError;
use crate::store::{Store, StoreError};

/// Why a caller did not get a refreshed token.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RefreshError {
    #[error("connection {0} does not exist")]
    UnknownConnection(ConnectionId),
    #[error("the connection needs to be re-authorized")]
    NeedsReauth { diagnosis: Option<Box<Diagnosis>> },
    #[error("the connection was revoked")]
    Revoked,
    #[error("the connection cannot be refreshed: {0}")]
    NotRefreshable(String),
    /// Another holder kept the refresh lease for longer than this caller could wait.
    #[error("another refresh of this connection is still in flight; try again shortly")]
    LockTimeout,
    /// Throttling, 5xx, timeouts: the credentials are fine, the provider is not.
    #[error("the provider is unavailable ({reason}); the connection is unchanged")]
    ProviderUnavailable {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// The provider refused our client or the request (not the grant): a configuration problem.
    #[error("the provider rejected the refresh request: {code}")]
    ProviderRejected {
        code: ProviderCode,
        message: Option<ProviderText>,
    },
    /// The database failed. Shared (`Arc`) because every caller of a flight gets the result.
    #[error("storage failed: {0}")]
    Store(Arc<StoreError>),
    /// The flight's task ended without a result (it panicked).
    #[error("the refresh task failed: {0}")]
    Task(String),
}

impl From<StoreError> for RefreshError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::UnknownConnection(id) => RefreshError::UnknownConnection(id),
            other => RefreshError::Store(Arc::new(other)),
        }
    }
}

/// A refresh's result: the grant that is current now.
#[derive(Debug, Clone)]
pub struct Refreshed {
    pub grant: OpenGrant,
    /// False when the caller's `if_grant` was already replaced and no refresh was needed.
    pub refreshed: bool,
}

type Flight = Shared<BoxFuture<'static, Result<OpenGrant, RefreshError>>>;

/// Settings of the coordinator.
#[derive(Debug, Clone)]
pub struct CoordinatorSettings {
    /// Who we are in lease records: unique per process.
    pub holder: LeaseHolder,
    /// The provider call's timeout; the lease is derived from it.
    pub provider_timeout: Duration,
    /// How long one caller may wait in total, retries included.
    pub budget: Duration,
}

impl CoordinatorSettings {
    /// The lease outlives the provider call's timeout with room for the commit after it.
    pub fn lease(&self) -> Duration {
        self.provider_timeout * 2 + Duration::from_secs(5)
    }
}

pub struct Coordinator {
    store: Arc<Store>,
    provider: NotionClient,
    settings: CoordinatorSettings,
    flights: Mutex<HashMap<(ConnectionId, GrantId), Flight>>,
}

/// The first retry of a transient failure waits this long; later ones double it.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Waiters re-read the current grant at most this far apart: a waiting process learns of
/// another process's refresh within this long (one cheap indexed read per poll per process).
const MAX_POLL: Duration = Duration::from_millis(5);

impl Coordinator {
    pub fn new(
        store: Arc<Store>,
        provider: NotionClient,
        settings: CoordinatorSettings,
    ) -> Arc<Self> {
        Arc::new(Coordinator {
            store,
            provider,
            settings,
            flights: Mutex::new(HashMap::new()),
        })
    }

    /// Refreshes the connection's token unless `if_grant` names a grant that was already
    /// replaced, in which case the current one comes back without calling the provider.
    pub async fn refresh(
        self: &Arc<Self>,
        id: &ConnectionId,
        if_grant: Option<&GrantId>,
    ) -> Result<Refreshed, RefreshError> {
        // A caller naming a grant that a flight is already replacing joins it at once, without
        // reading the database: in a stampede, only the first caller pays for a read.
        if let Some(wanted) = if_grant {
            let joined = self
                .flights
                .lock()
                .expect("flights lock is never poisoned")
                .get(&(id.clone(), wanted.clone()))
                .cloned();
            if let Some(flight) = joined {
                let grant = flight.await?;
                return Ok(Refreshed {
                    grant,
                    refreshed: true,
                });
            }
        }
        let (connection, current) = self
            .store
            .current_grant(id)
            .await?
            .ok_or_else(|| RefreshError::UnknownConnection(id.clone()))?;
        check_status(connection.status, connection.diagnosis)?;
        let current = current
            .ok_or_else(|| RefreshError::NotRefreshable("the connection has no grant".into()))?;
        if let Some(wanted) = if_grant {
            if *wanted != current.record.id {
                return Ok(Refreshed {
                    grant: current,
                    refreshed: false,
                });
            }
        }
        let key = (id.clone(), current.record.id.clone());
        let flight = {
            let mut flights = self.flights.lock().expect("flights lock is never poisoned");
            flights
                .entry(key.clone())
                .or_insert_with(|| {
                    let this = Arc::clone(self);
                    let key = key.clone();
                    // Spawned, so that it runs to its commit even if every caller goes away.
                    let task = tokio::spawn(async move {
                        let result = this.fly(&key.0, &key.1).await;
                        this.flights
                            .lock()
                            .expect("flights lock is never poisoned")
                            .remove(&key);
                        result
                    });
                    async move {
                        task.await
                            .unwrap_or_else(|e| Err(RefreshError::Task(e.to_string())))
                    }
                    .boxed()
                    .shared()
                })
                .clone()
        };
        let grant = flight.await?;
        Ok(Refreshed {
            grant,
            refreshed: true,
        })
    }

    /// One flight: replace grant `target` of connection `id`, or learn who already did.
    async fn fly(&self, id: &ConnectionId, target: &GrantId) -> Result<OpenGrant, RefreshError> {
        let deadline = Instant::now() + self.settings.budget;
        let mut poll = Duration::from_millis(2);
        let mut backoff = FIRST_BACKOFF;
        loop {
            let lease = self
                .store
                .begin_refresh(
                    id,
                    Some(target),
                    &self.settings.holder,
                    self.settings.lease(),
                )
                .await?;
            let (fence, attempt_id, grant) = match lease {
                LeaseOutcome::AlreadyRotated { current } => {
                    return self.read_grant(id, &current).await
                }
                LeaseOutcome::NotRefreshable { status, reason } => {
                    let diagnosis = self
                        .store
                        .get_connection(id)
                        .await?
                        .and_then(|c| c.diagnosis);
                    check_status(status, diagnosis)?;
                    return Err(RefreshError::NotRefreshable(reason));
                }
                LeaseOutcome::Busy { .. } => {
                    if Instant::now() + poll > deadline {
                        return Err(RefreshError::LockTimeout);
                    }
                    tokio::time::sleep(poll).await;
                    poll = (poll * 2).min(MAX_POLL);
                    if let Some(done) = self.replaced(id, target).await? {
                        return Ok(done);
                    }
                    continue;
                }
                LeaseOutcome::Acquired {
                    fence,
                    attempt_id,
                    grant,
                    interrupted: _,
                } => (fence, attempt_id, grant),
            };
            let Some(refresh_token) = grant.refresh_token.clone() else {
                return Err(RefreshError::NotRefreshable(
                    "the current grant has no refresh token".into(),
                ));
            };
            let parent = grant.record.id.clone();
            match self.provider.refresh(&refresh_token).await {
                Ok(pair) => {
                    let recorded = self.commit(id, &parent, fence, &attempt_id, pair).await?;
                    return self.read_grant(id, &recorded).await;
                }
                Err(error) => {
                    let failure = RefreshFailure {
                        auth_failure: error.is_invalid_grant(),
                        code: Some(error.code()),
                        message: error.to_string(),
                        provider_request_id: error.request_id(),
                        outcome_unknown: error.maybe_processed(),
                    };
                    let outcome = self
                        .store
                        .record_refresh_failure(id, &parent, fence, &attempt_id, &failure)
                        .await?;
                    match outcome {
                        FailureOutcome::AlreadyRotated { current } => {
                            return self.read_grant(id, &current).await
                        }
                        FailureOutcome::NeedsReauth { diagnosis } => {
                            return Err(RefreshError::NeedsReauth {
                                diagnosis: Some(Box::new(diagnosis)),
                            })
                        }
                        // A newer holder took over while we were slow: wait for its result.
                        FailureOutcome::Fenced => continue,
                        FailureOutcome::Recorded => {}
                    }
                    if !error.is_transient() {
                        return Err(match error {
                            ProviderError::Rejected { code, message, .. } => {
                                RefreshError::ProviderRejected { code, message }
                            }
                            other => RefreshError::ProviderUnavailable {
                                reason: other.to_string(),
                                retry_after: None,
                            },
                        });
                    }
                    let retry_after = match &error {
                        ProviderError::Throttled { retry_after, .. } => *retry_after,
                        _ => None,
                    };
                    let wait = retry_after.unwrap_or(backoff);
                    if Instant::now() + wait > deadline {
                        return Err(RefreshError::ProviderUnavailable {
                            reason: error.to_string(),
                            retry_after,
                        });
                    }
                    tracing::info!(connection = %id, wait_ms = wait.as_millis() as u64, "refresh failed transiently; retrying: {error}");
                    tokio::time::sleep(wait).await;
                    backoff *= 2;
                }
            }
        }
    }

    /// Commits a minted pair. The pair exists only in memory until this succeeds, so a failing
    /// database is retried for as long as our lease lasts (invariant 1).
    async fn commit(
        &self,
        id: &ConnectionId,
        parent: &GrantId,
        fence: Fence,
        attempt: &AttemptId,
        pair: MintedPair,
    ) -> Result<GrantId, RefreshError> {
        let give_up = Instant::now() + self.settings.lease();
        let mut wait = Duration::from_millis(50);
        loop {
            match self
                .store
                .record_refresh(id, parent, fence, attempt, pair.clone())
                .await
            {
                Ok(recorded) => return Ok(recorded.current),
                Err(e) if Instant::now() + wait < give_up => {
                    tracing::error!(connection = %id, "could not commit a refreshed pair yet, retrying: {e}");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(2));
                }
                Err(e) => {
                    tracing::error!(connection = %id, "a refreshed pair could not be committed: {e}");
                    return Err(e.into());
                }
            }
        }
    }

    /// The current grant, if it is no longer `target` (someone else finished the refresh).
    async fn replaced(
        &self,
        id: &ConnectionId,
        target: &GrantId,
    ) -> Result<Option<OpenGrant>, RefreshError> {
        let (connection, current) = self
            .store
            .current_grant(id)
            .await?
            .ok_or_else(|| RefreshError::UnknownConnection(id.clone()))?;
        check_status(connection.status, connection.diagnosis)?;
        Ok(current.filter(|g| g.record.id != *target))
    }

    async fn read_grant(
        &self,
        id: &ConnectionId,
        grant: &GrantId,
    ) -> Result<OpenGrant, RefreshError> {
        self.store.get_grant(id, grant).await?.ok_or_else(|| {
            RefreshError::Store(Arc::new(StoreError::Database(format!(
                "grant {grant} vanished"
            ))))
        })
    }
}

fn check_status(
    status: ConnectionStatus,
    diagnosis: Option<Diagnosis>,
) -> Result<(), RefreshError> {
    match status {
        ConnectionStatus::Active => Ok(()),
        ConnectionStatus::NeedsReauth => Err(RefreshError::NeedsReauth {
            diagnosis: diagnosis.map(Box::new),
        }),
        ConnectionStatus::Revoked => Err(RefreshError::Revoked),
    }
}
