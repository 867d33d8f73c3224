//! Webhook deliveries, for an operator: what is pending, delivered or failed, and a way to send
//! one again (`webhooks.rs` delivers them).

use axum::extract::{Extension, Path, Query, State};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiError, ErrorEnvelope};
use super::{require_admin, SharedState};
use crate::api_keys::Scope;
use crate::ids::ConnectionId;
use crate::ledger::{Job, JobKind, JobStatus};

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeliveriesQuery {
    /// Only deliveries in this state.
    #[param(inline, value_type = Option<DeliveryStatus>)]
    status: Option<String>,
    /// The `next_before` of the previous page.
    before: Option<String>,
    /// How many to answer, 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
}

/// Where a delivery stands.
#[derive(Serialize, ToSchema, Clone, Copy)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryStatus {
    /// Not delivered yet; tried again at `next_attempt_at`.
    Pending,
    /// An endpoint answered 2xx.
    Delivered,
    /// Given up after three days of failed attempts; `retry` sends it again.
    Failed,
}

/// One event's delivery to one endpoint.
#[derive(Serialize, ToSchema)]
pub struct Delivery {
    pub id: String,
    /// The `webhook-id` header, the same on every attempt: receivers drop repeats by it.
    pub webhook_id: Option<String>,
    /// The event's type, `connection.created` and so on.
    #[serde(rename = "type")]
    pub event_type: Option<String>,
    pub endpoint: String,
    pub connection_id: Option<ConnectionId>,
    pub status: DeliveryStatus,
    pub attempts: i64,
    /// When it is tried next, while it is pending.
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// What went wrong at the last attempt, in tokenkeeper's words.
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl Delivery {
    pub(crate) fn of(job: &Job) -> Delivery {
        let text = |v: Option<&serde_json::Value>| v.and_then(|v| v.as_str()).map(str::to_owned);
        Delivery {
            id: job.id.clone(),
            webhook_id: text(job.payload.get("webhook_id")),
            event_type: text(job.payload.get("event").and_then(|e| e.get("type"))),
            endpoint: job.subject.clone(),
            connection_id: job.connection_id.clone(),
            status: match job.status {
                JobStatus::Pending => DeliveryStatus::Pending,
                JobStatus::Done => DeliveryStatus::Delivered,
                JobStatus::Failed => DeliveryStatus::Failed,
            },
            attempts: job.attempts,
            next_attempt_at: (job.status == JobStatus::Pending).then_some(job.next_attempt_at),
            last_error: job.last_error.clone(),
            created_at: job.created_at,
            updated_at: job.updated_at,
        }
    }
}

/// A page of deliveries, newest first.
#[derive(Serialize, ToSchema)]
pub struct DeliveryList {
    pub data: Vec<Delivery>,
    /// The `before` that asks for the next page; null on the last page.
    pub next_before: Option<String>,
}

/// `GET /v1/webhook-deliveries?status=pending|delivered|failed` (admin): newest first.
#[utoipa::path(
    get,
    path = "/v1/webhook-deliveries",
    operation_id = "list_webhook_deliveries",
    tag = "webhooks",
    params(DeliveriesQuery),
    responses(
        (status = 200, description = "A page of webhook deliveries, newest first", body = DeliveryList),
        (status = 400, description = "`invalid_request`: a bad `status`, `before` or `limit`", body = ErrorEnvelope),
        (status = 401, description = "`unauthorized`", body = ErrorEnvelope),
        (status = 403, description = "`forbidden`: needs an admin key", body = ErrorEnvelope),
        (status = 503, description = "`database_unavailable`", body = ErrorEnvelope),
    )
)]
pub async fn list(
    State(state): State<SharedState>,
    Extension(scope): Extension<Scope>,
    Query(q): Query<DeliveriesQuery>,
) -> Result<Json<DeliveryList>, ApiError> {
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
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::invalid("limit must be between 1 and 1000"));
    }
    let jobs = state
        .store
        .list_jobs(JobKind::Webhook, status, q.before.as_deref(), limit)
        .await?;
    let next_before = (jobs.len() as u32 == limit)
        .then(|| jobs.last().map(|j| j.id.clone()))
        .flatten();
    Ok(Json(DeliveryList {
        data: jobs.iter().map(Delivery::of).collect(),
        next_before,
    }))
}

/// `POST /v1/webhook-deliveries/{id}/retry` (admin): due again now, with the same `webhook-id`.
#[utoipa::path(
    post,
    path = "/v1/webhook-deliveries/{id}/retry",
    operation_id = "retry_webhook_delivery",
    tag = "webhooks",
    params(("id" = String, Path, description = "The delivery's id")),
    responses(
        (status = 200, description = "The delivery, pending and due now", body = Delivery),
        (status = 401, description = "`unauthorized`", body = ErrorEnvelope),
        (status = 403, description = "`forbidden`: needs an admin key", body = ErrorEnvelope),
        (status = 404, description = "`not_found`: no such delivery", body = ErrorEnvelope),
        (status = 503, description = "`database_unavailable`", body = ErrorEnvelope),
    )
)]
pub async fn retry(
    State(state): State<SharedState>,
    Extension(scope): Extension<Scope>,
    Path(id): Path<String>,
) -> Result<Json<Delivery>, ApiError> {
    require_admin(scope, "retrying webhook deliveries")?;
    Ok(Json(retry_delivery(&state, &id).await?))
}

/// Makes a delivery due now, for the API and the console alike; 404 for an unknown id.
pub(crate) async fn retry_delivery(state: &SharedState, id: &str) -> Result<Delivery, ApiError> {
    let job = state
        .store
        .retry_job(id, JobKind::Webhook)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("webhook delivery {id:?} does not exist")))?;
    state.jobs.wake();
    Ok(Delivery::of(&job))
}
