//! Webhook deliveries, for an operator: what is pending, delivered or failed, and a way to send
//! one again (`webhooks.rs` delivers them).

use axum::extract::{Extension, Path, Query, State};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::auth::Scope;
use super::error::ApiError;
use super::{require_admin, SharedState};
use crate::ledger::{Job, JobKind, JobStatus};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveriesQuery {
    status: Option<String>,
    before: Option<String>,
    limit: Option<u32>,
}

/// A delivery as the API shows it: `pending`, `delivered` or `failed`.
fn delivery(job: &Job) -> Value {
    let event = job.payload.get("event");
    json!({
        "id": job.id,
        "webhook_id": job.payload.get("webhook_id"),
        "type": event.and_then(|e| e.get("type")),
        "endpoint": job.subject,
        "connection_id": job.connection_id,
        "status": match job.status {
            JobStatus::Pending => "pending",
            JobStatus::Done => "delivered",
            JobStatus::Failed => "failed",
        },
        "attempts": job.attempts,
        "next_attempt_at": (job.status == JobStatus::Pending).then_some(job.next_attempt_at),
        "last_error": job.last_error,
        "created_at": job.created_at,
        "updated_at": job.updated_at,
    })
}

/// `GET /v1/webhook-deliveries?status=pending|delivered|failed`: newest first.
pub async fn list(
    State(state): State<SharedState>,
    Extension(scope): Extension<Scope>,
    Query(q): Query<DeliveriesQuery>,
) -> Result<Json<Value>, ApiError> {
    require_admin(scope, "reading webhook deliveries")?;
    let status = match q.status.as_deref() {
        None => None,
        Some("pending") => Some(JobStatus::Pending),
        Some("delivered") => Some(JobStatus::Done),
        Some("failed") => Some(JobStatus::Failed),
        Some(_) => {
            return Err(ApiError::invalid(
                "status must be pending, delivered or failed",
            ))
        }
    };
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let jobs = state
        .store
        .list_jobs(JobKind::Webhook, status, q.before.as_deref(), limit)
        .await?;
    let next = (jobs.len() as u32 == limit)
        .then(|| jobs.last().map(|j| j.id.clone()))
        .flatten();
    Ok(Json(json!({
        "data": jobs.iter().map(delivery).collect::<Vec<_>>(),
        "next_before": next,
    })))
}

/// `POST /v1/webhook-deliveries/{id}/retry`: due again now, with the same `webhook-id`.
pub async fn retry(
    State(state): State<SharedState>,
    Extension(scope): Extension<Scope>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    require_admin(scope, "retrying webhook deliveries")?;
    let job = state
        .store
        .retry_job(&id, JobKind::Webhook)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("webhook delivery {id:?} does not exist")))?;
    state.jobs.wake();
    Ok(Json(delivery(&job)))
}
