//! The job worker: work that must happen at least once after the transaction that called for
//! it, and survive restarts and crashes: revoking tokens upstream when a connection is revoked,
//! and delivering webhooks (`webhooks.rs`).
//!
//! Jobs are rows (`store`, table `jobs`), written in the same transaction as the ledger change
//! that calls for them. Every process runs a worker that claims due jobs (claims never overlap
//! across processes), runs them with a deadline each, and records the outcome: done, another
//! try later with exponential backoff and jitter, or failed once `GIVE_UP_AFTER` has passed.
//! A worker that dies mid-job leaves a claim that expires, and the job comes due again: at
//! least once, never lost.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::Rng;
use serde_json::Value;

use crate::clock::Clock;
use crate::ids::{ConnectionId, GrantId};
use crate::ledger::{Job, JobKind, JobOutcome, JobStatus, TokenColumn, WebhookEvent};
use crate::provider::notion::NotionClient;
use crate::store::{Store, StoreError};
use crate::webhooks::{self, WebhookSettings};

/// How long a claimed job is its worker's beyond the longest an attempt may take (the
/// provider's or the webhook endpoint's timeout); then it comes due again, in case its worker
/// died.
const CLAIM_MARGIN: Duration = Duration::from_secs(5);
/// Jobs claimed at once by one worker.
const BATCH: u32 = 16;
/// How often a worker looks for due jobs that no one woke it for (other processes', retries).
const POLL: Duration = Duration::from_secs(1);
/// The first retry waits about this long; each later one twice as long, up to `MAX_BACKOFF`.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(3600);
/// A job still failing this long after it was created is given up (and shown as failed).
pub const GIVE_UP_AFTER: Duration = Duration::from_secs(3 * 24 * 3600);

pub struct Jobs {
    store: Arc<Store>,
    notion: NotionClient,
    clock: Clock,
    wake: tokio::sync::Notify,
    /// How this process signs and sends webhooks; `None` when none are configured.
    webhooks: Option<WebhookSettings>,
    http: reqwest::Client,
    /// Who makes the reconnect links of `connection.needs_reauth` events (the HTTP state); set
    /// once it is built (it holds this worker).
    links: std::sync::OnceLock<std::sync::Weak<dyn ReconnectLinks>>,
    /// How long a claim lasts: longer than any attempt.
    claim: Duration,
    /// Where deliveries are counted (`/metrics`); `None` in commands that serve no metrics.
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

/// Makes a connection's reconnect link, and says when it expires (the HTTP state does, in
/// `api::connect`); `None` when it cannot.
pub trait ReconnectLinks: Send + Sync {
    fn reconnect_link<'a>(
        &'a self,
        id: &'a ConnectionId,
    ) -> futures::future::BoxFuture<'a, Option<(String, DateTime<Utc>)>>;
}

/// A connection's upstream revocations, counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Revocations {
    pub revoked: usize,
    pub pending: usize,
    pub failed: usize,
}

impl Jobs {
    /// `longest_attempt`: the longest one attempt may take (the provider call's timeout);
    /// webhook attempts take at most their own timeout.
    pub fn new(
        store: Arc<Store>,
        notion: NotionClient,
        clock: Clock,
        webhooks: Option<WebhookSettings>,
        longest_attempt: Duration,
        metrics: Option<Arc<crate::metrics::Metrics>>,
    ) -> Arc<Jobs> {
        let longest = webhooks
            .as_ref()
            .map_or(longest_attempt, |w| w.timeout.max(longest_attempt));
        Arc::new(Jobs {
            claim: longest + CLAIM_MARGIN,
            store,
            notion,
            clock,
            wake: tokio::sync::Notify::new(),
            webhooks,
            // Events are answered by the app's endpoint, never redirected elsewhere.
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("a reqwest client builds"),
            links: std::sync::OnceLock::new(),
            metrics,
        })
    }

    /// Gives the worker what makes reconnect links (the HTTP state), once it exists.
    pub fn attach(&self, links: std::sync::Weak<dyn ReconnectLinks>) {
        let _ = self.links.set(links);
    }

    /// Asks the worker to look for due jobs now.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Runs due jobs until the process ends.
    pub async fn run_worker(self: Arc<Self>) {
        loop {
            let ran = match self
                .store
                .claim_jobs(None, BATCH, self.claim, self.webhooks.is_some())
                .await
            {
                Ok(jobs) => {
                    let n = jobs.len();
                    futures::future::join_all(jobs.iter().map(|job| self.run(job))).await;
                    n
                }
                // An outage is logged by the store; the jobs wait for its end.
                Err(_) => 0,
            };
            if ran == 0 {
                let _ = tokio::time::timeout(POLL, self.wake.notified()).await;
            }
        }
    }

    /// Runs the connection's due jobs now, waiting at most `deadline` for them, and counts its
    /// revocations: what the API answers right after a `DELETE`. Jobs still running at the
    /// deadline finish in the background; failed ones are retried by the worker.
    pub async fn run_for_connection(
        self: &Arc<Self>,
        id: &ConnectionId,
        deadline: Duration,
    ) -> Result<Revocations, StoreError> {
        let jobs = self
            .store
            .claim_jobs(Some(id), 64, self.claim, self.webhooks.is_some())
            .await?;
        let this = self.clone();
        let run = tokio::spawn(async move {
            futures::future::join_all(jobs.iter().map(|job| this.run(job))).await;
        });
        let _ = tokio::time::timeout(deadline, run).await;
        self.revocations(id).await
    }

    pub async fn revocations(&self, id: &ConnectionId) -> Result<Revocations, StoreError> {
        let mut counts = Revocations::default();
        for job in self
            .store
            .jobs_of_connection(id, JobKind::RevokeToken)
            .await?
        {
            match job.status {
                JobStatus::Done => counts.revoked += 1,
                JobStatus::Pending => counts.pending += 1,
                JobStatus::Failed => counts.failed += 1,
            }
        }
        Ok(counts)
    }

    /// One attempt at a claimed job, and its outcome recorded.
    async fn run(&self, job: &Job) {
        let outcome = match job.kind {
            JobKind::RevokeToken => self.revoke(job).await,
            JobKind::Webhook => self.deliver(job).await,
        };
        let outcome = match outcome {
            Ok(()) => JobOutcome::Done,
            Err(error) => self.retry_or_give_up(job, error),
        };
        if job.kind == JobKind::Webhook {
            self.log_delivery(job, &outcome);
        } else if let JobOutcome::Failed { error } = &outcome {
            tracing::error!(job = %job.id, kind = job.kind.as_str(), "gave up on a job: {error}")
        }
        if let Err(e) = self.store.finish_job(job, &outcome).await {
            // The claim expires and the job comes due again: at least once.
            tracing::warn!(job = %job.id, "could not record a job's outcome: {e}");
        }
    }

    /// One line and one count per webhook delivery attempt (`op = "webhook_delivery"`).
    fn log_delivery(&self, job: &Job, outcome: &JobOutcome) {
        let event = job.payload.get("event").and_then(|e| e.get("type"));
        let event = event.and_then(Value::as_str).unwrap_or("");
        let webhook_id = job.payload.get("webhook_id").and_then(Value::as_str);
        let webhook_id = webhook_id.unwrap_or("");
        let connection = job.connection_id.as_ref().map(|c| c.as_str());
        let attempts = job.attempts;
        let label = match outcome {
            JobOutcome::Done => {
                tracing::debug!(op = "webhook_delivery", outcome = "delivered", event, webhook_id, connection, endpoint = %job.subject, attempts, "delivered a webhook");
                "delivered"
            }
            JobOutcome::Retry { at, error } => {
                tracing::warn!(op = "webhook_delivery", outcome = "retry", event, webhook_id, connection, endpoint = %job.subject, attempts, next_attempt_at = %at, cause = %error, "a webhook delivery failed; it is tried again later");
                "retry"
            }
            JobOutcome::Failed { error } => {
                tracing::error!(op = "webhook_delivery", outcome = "failed", event, webhook_id, connection, endpoint = %job.subject, attempts, cause = %error, "gave up on a webhook delivery after three days; POST /v1/webhook-deliveries/{{id}}/retry sends it again");
                "failed"
            }
        };
        if let Some(metrics) = &self.metrics {
            metrics.webhook_delivery(label);
        }
    }

    fn retry_or_give_up(&self, job: &Job, error: String) -> JobOutcome {
        let now = self.clock.now();
        let age = (now - job.created_at).to_std().unwrap_or_default();
        if age >= GIVE_UP_AFTER {
            return JobOutcome::Failed { error };
        }
        JobOutcome::Retry {
            at: next_attempt(now, job.attempts),
            error,
        }
    }

    async fn revoke(&self, job: &Job) -> Result<(), String> {
        let field = |name: &str| job.payload.get(name).and_then(Value::as_str);
        let (Some(id), Some(grant), Some(column)) = (
            &job.connection_id,
            field("grant_id").map(|g| GrantId::from_trusted(g.to_owned())),
            field("column").and_then(TokenColumn::parse),
        ) else {
            return Err("the revocation job names no token".into());
        };
        let open = self
            .store
            .get_grant(id, &grant)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("grant {grant} is not in the ledger"))?;
        let result = match column {
            TokenColumn::AccessToken => self.notion.revoke(&open.access_token).await,
            TokenColumn::RefreshToken => match &open.refresh_token {
                Some(token) => self.notion.revoke_refresh(token).await,
                None => Ok(()),
            },
        };
        result.map_err(|e| e.to_string())
    }
}

impl Jobs {
    /// One attempt at a webhook delivery.
    async fn deliver(&self, job: &Job) -> Result<(), String> {
        let settings = self
            .webhooks
            .as_ref()
            .ok_or("this process has no webhook secret configured")?;
        let mut event = job
            .payload
            .get("event")
            .cloned()
            .ok_or("the delivery holds no event")?;
        let is_needs_reauth =
            event.get("type").and_then(Value::as_str) == Some(WebhookEvent::NeedsReauth.as_str());
        if let (true, Some(id)) = (is_needs_reauth, &job.connection_id) {
            // A link that works now: the one made for the first attempt may have expired.
            let links = self.links.get().and_then(std::sync::Weak::upgrade);
            let link = match links {
                Some(links) => links.reconnect_link(id).await,
                None => None,
            };
            let (url, expires_at) = match link {
                Some((url, expires_at)) => (Value::from(url), serde_json::json!(expires_at)),
                None => (Value::Null, Value::Null),
            };
            event["data"]["reconnect_url"] = url;
            event["data"]["reconnect_url_expires_at"] = expires_at;
        }
        webhooks::deliver(&self.http, settings, job, &event, self.clock.now()).await
    }
}

/// When to try again after `attempts` attempts: exponential backoff with ±20 % jitter, so that
/// many jobs failing together do not come back together.
fn next_attempt(now: DateTime<Utc>, attempts: i64) -> DateTime<Utc> {
    let doublings = u32::try_from(attempts.saturating_sub(1).clamp(0, 20)).unwrap_or(20);
    let base = FIRST_BACKOFF
        .saturating_mul(1 << doublings)
        .min(MAX_BACKOFF);
    let jitter = rand::thread_rng().gen_range(0.8..1.2);
    now + chrono::Duration::from_std(base.mul_f64(jitter)).unwrap_or(chrono::Duration::hours(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_within_bounds_and_jitters() {
        let now = Utc::now();
        let after = |n| (next_attempt(now, n) - now).to_std().unwrap();
        let secs = |s: f64| Duration::from_secs_f64(s);
        assert!(after(1) >= secs(0.8) && after(1) <= secs(1.2));
        assert!(after(2) >= secs(1.6) && after(2) <= secs(2.4));
        assert!(after(5) >= secs(12.8) && after(5) <= secs(19.2));
        assert!(after(30) >= secs(2880.0) && after(30) <= secs(4320.0));
    }
}
