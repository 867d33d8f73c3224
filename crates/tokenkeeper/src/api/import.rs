//! `POST /v1/connections/import` (admin): an app sends the rows of its existing token store in
//! batches, and each is recorded exactly as `tokenkeeper import` records a file's rows (the
//! same code: `import::Importer`), answering one result per row.

use axum::extract::{Extension, State};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, ErrorEnvelope};
use super::{require_admin, SharedState};
use crate::api_keys::Scope;
use crate::import::verify::Pacer;
use crate::import::{
    plan, ApiRow, Audit, ImportReport, Importer, Quiet, RowOutcome, Verification, BATCH,
};

/// The most rows one call takes.
pub const MAX_ROWS: usize = 1000;

/// The most rows one call takes with `"verify": true`: each is introspected at `VERIFY_RATE`,
/// so this bounds the call to about 20 seconds of introspection (plus a refresh for a new
/// connection found dead), well within an HTTP client's patience.
pub const MAX_VERIFIED_ROWS: usize = 40;

/// The body limit of this call: a thousand rows with long tokens and names.
pub const BODY_LIMIT: usize = 1024 * 1024;

/// How fast `"verify": true` asks Notion, per call (docs/API.md).
pub const VERIFY_RATE: &str = "2/s";

/// Rows of an existing token store, at most 1,000 per call.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ImportBody {
    #[schema(max_items = 1000)]
    connections: Vec<ApiRow>,
    /// Ask Notion which access tokens are alive (introspection at 2 a second) and refresh the
    /// new connections whose tokens are all dead.
    #[serde(default)]
    verify: bool,
    /// Do everything but commit.
    #[serde(default)]
    dry_run: bool,
}

/// One result per row, in the order sent, and the whole call's report.
#[derive(Serialize, ToSchema)]
pub struct ImportAnswer {
    results: Vec<RowOutcome>,
    /// The report `tokenkeeper import --json` prints: the audit's counts and what was imported.
    summary: ImportReport,
}

#[utoipa::path(
    post,
    path = "/v1/connections/import",
    operation_id = "import_connections",
    tag = "connections",
    request_body = ImportBody,
    responses(
        (status = 200, description = "One result per row (`imported`, `added`, `duplicate`, `already_imported`, `invalid`) and the report", body = ImportAnswer),
        (status = 400, description = "`invalid_request`: a body of another shape (its content is never quoted back), or more than 1,000 rows (40 with `verify`)", body = ErrorEnvelope),
        (status = 401, description = "`unauthorized`", body = ErrorEnvelope),
        (status = 403, description = "`forbidden`: needs an admin key", body = ErrorEnvelope),
        (status = 413, description = "`payload_too_large`: a body over 1 MiB", body = ErrorEnvelope),
        (status = 503, description = "`database_unavailable`", body = ErrorEnvelope),
    )
)]
pub async fn import(
    State(state): State<SharedState>,
    Extension(scope): Extension<Scope>,
    body: axum::body::Bytes,
) -> Result<Json<ImportAnswer>, ApiError> {
    require_admin(scope, "importing connections")?;
    // serde's messages can quote a value of the wrong type, which here may be a token: say
    // where the body is wrong, never what it holds.
    let body: ImportBody = serde_json::from_slice(&body).map_err(|e| {
        let what = match e.classify() {
            serde_json::error::Category::Data => "does not have the shape {\"connections\":[{\"bot_id\",\"access_token\",…}], \"verify\"?, \"dry_run\"?}",
            _ => "is not valid JSON",
        };
        ApiError::invalid(format!(
            "the body {what} (line {}, column {})",
            e.line(),
            e.column()
        ))
    })?;
    if body.connections.len() > MAX_ROWS {
        return Err(ApiError::invalid(format!(
            "at most {MAX_ROWS} connections per call; send the rest in further calls"
        )));
    }
    if body.verify && body.connections.len() > MAX_VERIFIED_ROWS {
        return Err(ApiError::invalid(format!(
            "at most {MAX_VERIFIED_ROWS} connections per call with \"verify\": true (each is \
             introspected at {VERIFY_RATE}); send the rest in further calls, or run \
             `tokenkeeper import --verify`, which paces a whole file"
        )));
    }
    let rows = body
        .connections
        .into_iter()
        .enumerate()
        .map(|(i, row)| row.into_source_row(i + 1))
        .collect();
    let plan = plan(rows);
    let audit = Audit::of("POST /v1/connections/import".into(), &plan, None, None);
    let pacer = Pacer::new(crate::clock::parse_rate(VERIFY_RATE).expect("a valid rate"));
    let importer = Importer {
        store: &state.store,
        coordinator: Some(&state.coordinator),
        verification: body.verify.then(|| Verification {
            notion: &state.notion,
            pacer: &pacer,
            state: None,
        }),
        dry_run: body.dry_run,
        batch: BATCH,
    };
    let (report, results) = importer.run(&plan, audit, &Quiet).await?;
    Ok(Json(ImportAnswer {
        results,
        summary: report,
    }))
}
