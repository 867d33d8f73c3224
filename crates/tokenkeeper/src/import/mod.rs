//! Bringing existing integrations in (issue 13): `tokenkeeper audit` reads an existing token
//! store and says what is wrong with it; `tokenkeeper import` and `POST /v1/connections/import`
//! record what it holds in the ledger.
//!
//! The steps, shared by the command and the API:
//! 1. `source` reads rows (a file, or a query on a database), tokens wrapped as secrets at once.
//! 2. `plan` groups them by bot into distinct pairs, oldest first; identical rows become one
//!    pair (invariant 1 keeps every distinct pair; nothing needs a duplicate twice).
//! 3. With `--verify`, `verify` introspects every distinct access token at a paced rate.
//! 4. `Importer` hands bots to the store in batches (`Store::import_bots`: each bot under its
//!    lock, as every ledger write, so it is safe while `serve` runs; pairs the ledger holds are
//!    recognised by fingerprint, so a second run writes nothing), then, with `--verify`, asks
//!    the refresh coordinator to refresh every new connection whose tokens are all dead: the
//!    coordinator judges as usual (invariant 5), so the connection is rescued by a refresh
//!    token that still works, or ends `needs_reauth` with a diagnosis.

pub mod cli;
pub mod source;
pub mod verify;

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::ids::{AccessToken, BotId, ConnectionId, GrantId, RefreshToken};
use crate::ledger::{
    BotImportKind, CheckResult, ConnectionStatus, Diagnosis, DiagnosisReason, ImportedBot,
    ImportedPair, Provider,
};
use crate::provider::notion::NotionClient;
use crate::refresh::{Coordinator, RefreshError};
use crate::store::{Store, StoreError};
use source::SourceRow;
use verify::{Pacer, StateFile};

/// One distinct pair of a bot, and the rows that hold it.
#[derive(Debug, Clone)]
pub struct PlannedPair {
    pub access_token: AccessToken,
    pub refresh_token: Option<RefreshToken>,
    /// The earliest `authorized_at` of its rows.
    pub authorized_at: Option<DateTime<Utc>>,
    /// Revoked only if every row holding it is.
    pub revoked: bool,
    pub revoked_at: Option<DateTime<Utc>>,
    /// The rows holding this pair; all but the first are duplicates.
    pub rows: Vec<usize>,
}

impl PlannedPair {
    /// The key verdicts are kept under.
    pub fn access_fingerprint(&self) -> String {
        self.access_token.fingerprint()
    }
}

/// One bot of the source, its pairs oldest first.
#[derive(Debug, Clone)]
pub struct PlannedBot {
    pub bot_id: String,
    pub workspace_id: Option<String>,
    pub workspace_name: Option<String>,
    pub end_user_id: Option<String>,
    pub pairs: Vec<PlannedPair>,
    pub rows: usize,
}

/// The source's rows, grouped by bot.
#[derive(Debug, Default)]
pub struct Plan {
    pub rows: usize,
    /// Rows that cannot be imported, and why.
    pub invalid: Vec<(usize, String)>,
    pub bots: Vec<PlannedBot>,
    pub unreadable_times: usize,
    /// Rows (that can be imported) marked revoked.
    pub rows_revoked: usize,
}

/// Groups rows by bot into distinct pairs. A bot's pairs are ordered by `authorized_at` when
/// every one has it, and otherwise by the order of the rows (a serial id, or the file's order).
pub fn plan(rows: Vec<SourceRow>) -> Plan {
    let mut plan = Plan {
        rows: rows.len(),
        ..Plan::default()
    };
    let mut index: HashMap<String, usize> = HashMap::new();
    for row in rows {
        plan.unreadable_times += usize::from(row.unreadable_time);
        if let Some(problem) = row.problem {
            plan.invalid.push((row.number, problem));
            continue;
        }
        let (Some(bot_id), Some(access_token)) = (row.bot_id, row.access_token) else {
            continue;
        };
        plan.rows_revoked += usize::from(row.revoked);
        let i = *index.entry(bot_id.clone()).or_insert_with(|| {
            plan.bots.push(PlannedBot {
                bot_id,
                workspace_id: None,
                workspace_name: None,
                end_user_id: None,
                pairs: Vec::new(),
                rows: 0,
            });
            plan.bots.len() - 1
        });
        let bot = &mut plan.bots[i];
        bot.rows += 1;
        // The latest row that names them wins: a table's later rows are its newer state.
        bot.workspace_id = row.workspace_id.or(bot.workspace_id.take());
        bot.workspace_name = row.workspace_name.or(bot.workspace_name.take());
        bot.end_user_id = row.end_user_id.or(bot.end_user_id.take());
        let same = bot
            .pairs
            .iter_mut()
            .find(|p| p.access_token == access_token && p.refresh_token == row.refresh_token);
        match same {
            Some(pair) => {
                pair.rows.push(row.number);
                pair.revoked &= row.revoked;
                if !pair.revoked {
                    pair.revoked_at = None;
                }
                pair.authorized_at = match (pair.authorized_at, row.authorized_at) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
            None => bot.pairs.push(PlannedPair {
                access_token,
                refresh_token: row.refresh_token,
                authorized_at: row.authorized_at,
                revoked: row.revoked,
                revoked_at: row.revoked_at,
                rows: vec![row.number],
            }),
        }
    }
    for bot in &mut plan.bots {
        if bot.pairs.iter().all(|p| p.authorized_at.is_some()) {
            bot.pairs.sort_by_key(|p| (p.authorized_at, p.rows[0]));
        }
    }
    plan
}

/// What `audit` reports, and the first part of what `import` reports.
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct Audit {
    pub source: String,
    pub rows: usize,
    /// Rows without a `bot_id` or an `access_token`.
    pub rows_invalid: usize,
    pub bots: usize,
    /// Distinct pairs over all bots.
    pub pairs: usize,
    pub bots_with_several_rows: usize,
    /// Bots whose several rows all hold one pair.
    pub bots_with_several_rows_same_pair: usize,
    /// Bots whose rows hold different pairs.
    pub bots_with_several_rows_different_pairs: usize,
    /// Rows that repeat a pair an earlier row of the same bot holds.
    pub duplicate_rows: usize,
    pub rows_revoked: usize,
    pub rows_without_refresh_token: usize,
    /// Rows with a time column that is not a time (taken as unknown).
    pub rows_with_unreadable_times: usize,
    /// For a database source: whether its table makes `bot_id` unique (one row per bot, so
    /// every new pair must overwrite the last: the first hazard). `null` for files, or when
    /// `bot_id` could not be traced to one table's column.
    pub bot_id_unique: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub table: Option<String>,
    // In the OpenAPI document the counts of `Verified` are properties of the report that may
    // be absent (utoipa would describe a flattened `Option` as "null or Verified", which no
    // object is).
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Verified)]
    pub verified: Option<Verified>,
}

/// What `--verify` found, by distinct access token (present only with `--verify`).
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct Verified {
    #[schema(required = false)]
    pub access_tokens_live: usize,
    #[schema(required = false)]
    pub access_tokens_dead: usize,
    #[schema(required = false)]
    pub access_tokens_unknown: usize,
    /// Bots none of whose access tokens is live.
    #[schema(required = false)]
    pub bots_without_a_live_access_token: usize,
    /// Pairs revoked in the source whose access token Notion still calls active.
    #[schema(required = false)]
    pub revoked_pairs_still_live: usize,
}

impl Audit {
    pub fn of(
        source: String,
        plan: &Plan,
        bot_id_unique: Option<bool>,
        table: Option<String>,
    ) -> Audit {
        let mut audit = Audit {
            source,
            rows: plan.rows,
            rows_invalid: plan.invalid.len(),
            bots: plan.bots.len(),
            rows_with_unreadable_times: plan.unreadable_times,
            rows_revoked: plan.rows_revoked,
            bot_id_unique,
            table,
            ..Audit::default()
        };
        for bot in &plan.bots {
            audit.pairs += bot.pairs.len();
            if bot.rows > 1 {
                audit.bots_with_several_rows += 1;
                if bot.pairs.len() == 1 {
                    audit.bots_with_several_rows_same_pair += 1;
                } else {
                    audit.bots_with_several_rows_different_pairs += 1;
                }
            }
            for pair in &bot.pairs {
                let n = pair.rows.len();
                audit.duplicate_rows += n - 1;
                if pair.refresh_token.is_none() {
                    audit.rows_without_refresh_token += n;
                }
            }
        }
        audit
    }

    /// Adds what verification found.
    pub fn verified(&mut self, plan: &Plan, verdicts: &HashMap<String, CheckResult>) {
        let mut v = Verified::default();
        let mut seen = std::collections::HashSet::new();
        for bot in &plan.bots {
            let mut live = false;
            for pair in &bot.pairs {
                let fp = pair.access_fingerprint();
                let verdict = verdicts.get(&fp).copied().unwrap_or(CheckResult::Unknown);
                live |= verdict == CheckResult::Active;
                if pair.revoked && verdict == CheckResult::Active {
                    v.revoked_pairs_still_live += 1;
                }
                if seen.insert(fp) {
                    match verdict {
                        CheckResult::Active => v.access_tokens_live += 1,
                        CheckResult::Inactive => v.access_tokens_dead += 1,
                        CheckResult::Unknown => v.access_tokens_unknown += 1,
                    }
                }
            }
            v.bots_without_a_live_access_token += usize::from(!live);
        }
        self.verified = Some(v);
    }

    /// The findings, in words: what is wrong with the store, and what import will do about it.
    pub fn words(&self) -> String {
        use std::fmt::Write;
        let mut w = String::new();
        let _ = writeln!(w, "Source: {}", self.source);
        let _ = writeln!(
            w,
            "{} rows, {} bots, {} distinct token pairs.",
            self.rows, self.bots, self.pairs
        );
        let mut findings = Vec::new();
        match self.bot_id_unique {
            Some(true) => findings.push(format!(
                "bot_id is unique in {}: the table holds one pair per bot, so every new pair \
                 overwrites the last. Since 2026-06-08 Notion mints a fresh pair on every \
                 authorization, and an older pair written last (an upsert racing a refresh, a \
                 late callback) replaces the only refresh token that still works. This is the \
                 first hazard of docs/notion-wire.md §6.",
                self.table.as_deref().unwrap_or("the table")
            )),
            Some(false) => findings.push(format!(
                "bot_id is not unique in {}: the table can keep several pairs per bot.",
                self.table.as_deref().unwrap_or("the table")
            )),
            None => {}
        }
        if self.bots_with_several_rows_different_pairs > 0 {
            findings.push(format!(
                "{} bots have several rows with different pairs: only one of each can be what \
                 the app uses; import keeps them all and makes the newest live one current.",
                self.bots_with_several_rows_different_pairs
            ));
        }
        if self.bots_with_several_rows_same_pair > 0 || self.duplicate_rows > 0 {
            findings.push(format!(
                "{} rows repeat a pair another row of the same bot holds ({} bots have only \
                 such copies): import records each pair once.",
                self.duplicate_rows, self.bots_with_several_rows_same_pair
            ));
        }
        if self.rows_revoked > 0 {
            findings.push(format!(
                "{} rows are marked revoked: import keeps their pairs, superseded.",
                self.rows_revoked
            ));
        }
        if self.rows_without_refresh_token > 0 {
            findings.push(format!(
                "{} rows have no refresh token: when their access token dies, only the user \
                 can bring the connection back.",
                self.rows_without_refresh_token
            ));
        }
        if self.rows_invalid > 0 {
            findings.push(format!(
                "{} rows lack a bot_id or an access_token and cannot be imported.",
                self.rows_invalid
            ));
        }
        if self.rows_with_unreadable_times > 0 {
            findings.push(format!(
                "{} rows have a time that is not a time; it is taken as unknown.",
                self.rows_with_unreadable_times
            ));
        }
        if let Some(v) = &self.verified {
            findings.push(format!(
                "Notion calls {} access tokens live, {} dead; {} could not be checked.",
                v.access_tokens_live, v.access_tokens_dead, v.access_tokens_unknown
            ));
            if v.bots_without_a_live_access_token > 0 {
                findings.push(format!(
                    "{} bots have no live access token: `import --verify` refreshes them with \
                     a refresh token that still works, or marks them needs_reauth.",
                    v.bots_without_a_live_access_token
                ));
            }
            if v.revoked_pairs_still_live > 0 {
                findings.push(format!(
                    "{} pairs marked revoked are still live at Notion.",
                    v.revoked_pairs_still_live
                ));
            }
        }
        if findings.is_empty() {
            findings.push("Nothing looks wrong.".into());
        }
        for finding in findings {
            let _ = writeln!(w, "- {finding}");
        }
        w
    }
}

/// What `import` did, besides the audit.
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct Imported {
    /// Bots that became new connections.
    pub imported_connections: usize,
    /// Pairs written as grants.
    pub imported_grants: usize,
    /// Rows that wrote nothing because their pair was written already: by an earlier row of
    /// this source, or by an earlier import (or tokenkeeper's own flows).
    pub skipped_duplicates: usize,
    /// Of those, rows whose pair the ledger held before this run.
    pub rows_already_in_ledger: usize,
    /// Bots that had a live connection already and got pairs it lacked.
    pub connections_added_to: usize,
    /// New connections that are active after the import, and that need their user back.
    pub connections_active: usize,
    pub connections_needs_reauth: usize,
    /// With `--verify`: new connections whose tokens were all dead, refreshed back to life
    /// through the coordinator, refused (now `needs_reauth`), or left as they were because the
    /// refresh could not be judged (Notion throttled or failing).
    pub rescued: usize,
    pub rescue_failed: usize,
    pub rescue_undecided: usize,
    pub dry_run: bool,
    /// How long the import took, and valid rows per second over that time (the command fills
    /// these in).
    pub seconds: f64,
    pub rows_per_second: f64,
}

/// `audit`'s findings and what the import did.
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct ImportReport {
    #[serde(flatten)]
    pub audit: Audit,
    #[serde(flatten)]
    pub imported: Imported,
}

impl ImportReport {
    pub fn words(&self) -> String {
        use std::fmt::Write;
        let i = &self.imported;
        let mut w = self.audit.words();
        let verb = if i.dry_run {
            "would import"
        } else {
            "imported"
        };
        let _ =
            writeln!(
            w,
            "{}{verb} {} connections and {} grants; {} rows skipped as duplicates ({} already in \
             the ledger); {} existing connections got pairs they lacked.",
            if i.dry_run { "Dry run: nothing was written. It " } else { "It " },
            i.imported_connections,
            i.imported_grants,
            i.skipped_duplicates,
            i.rows_already_in_ledger,
            i.connections_added_to,
        );
        if i.imported_connections + i.imported_grants == 0 && !i.dry_run {
            let _ = writeln!(
                w,
                "Nothing new to import: every pair is in the ledger already."
            );
        }
        let _ = writeln!(
            w,
            "New connections: {} active, {} needs_reauth.",
            i.connections_active, i.connections_needs_reauth
        );
        if i.rescued + i.rescue_failed + i.rescue_undecided > 0 {
            let _ = writeln!(
                w,
                "Connections with no live access token: {} rescued by a refresh, {} refused \
                 (needs_reauth), {} undecided (Notion did not answer; the health check will \
                 look again).",
                i.rescued, i.rescue_failed, i.rescue_undecided
            );
        }
        w
    }
}

/// What happened to one row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RowResult {
    /// Its pair is a grant of a new connection.
    Imported,
    /// Its pair was added, superseded, to the bot's existing connection.
    Added,
    /// Another row of this source holds the same pair.
    Duplicate,
    /// The ledger held its pair before this run.
    AlreadyImported,
    /// It lacks a `bot_id` or an `access_token`.
    Invalid,
}

/// One row's result, as the API answers it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct RowOutcome {
    pub row: usize,
    pub result: RowResult,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bot_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_id: Option<ConnectionId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grant_id: Option<GrantId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<ConnectionStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// How to verify: Notion, the pace, and where verdicts are kept across runs.
pub struct Verification<'a> {
    pub notion: &'a NotionClient,
    pub pacer: &'a Pacer,
    pub state: Option<&'a StateFile>,
}

/// Bots handed to the store per transaction. On SQLite a transaction holds the database's
/// write lock, so a batch must stay short enough for a serving process not to wait long.
pub const BATCH: usize = 250;

pub struct Importer<'a> {
    pub store: &'a Store,
    /// Refreshes the new connections whose tokens are all dead (with `--verify`).
    pub coordinator: Option<&'a Arc<Coordinator>>,
    pub verification: Option<Verification<'a>>,
    pub dry_run: bool,
    pub batch: usize,
}

/// Progress callbacks: tokens verified, rows imported.
pub trait Progress: Sync {
    fn verified(&self, _n: u64) {}
    fn imported(&self, _n: u64) {}
}

/// No progress shown (the API).
pub struct Quiet;
impl Progress for Quiet {}

impl Importer<'_> {
    /// Imports the plan; answers the report (without the audit's source fields, which the
    /// caller fills) and one outcome per row.
    pub async fn run(
        &self,
        plan: &Plan,
        audit: Audit,
        progress: &dyn Progress,
    ) -> Result<(ImportReport, Vec<RowOutcome>), StoreError> {
        let mut report = ImportReport {
            audit,
            imported: Imported {
                dry_run: self.dry_run,
                ..Imported::default()
            },
        };
        let mut outcomes: Vec<RowOutcome> = plan
            .invalid
            .iter()
            .map(|(row, problem)| RowOutcome {
                row: *row,
                result: RowResult::Invalid,
                bot_id: None,
                connection_id: None,
                grant_id: None,
                status: None,
                problem: Some(problem.clone()),
            })
            .collect();
        let mut all_verdicts = HashMap::new();
        for chunk in plan.bots.chunks(self.batch.max(1)) {
            let verdicts = match &self.verification {
                Some(v) => {
                    let verdicts = self.verify_chunk(v, chunk, progress).await?;
                    all_verdicts.extend(verdicts.iter().map(|(k, v)| (k.clone(), *v)));
                    Some(verdicts)
                }
                None => None,
            };
            let now = Utc::now();
            let mut rescue = Vec::new();
            let bots: Vec<ImportedBot> = chunk
                .iter()
                .map(|bot| {
                    let choice = choose(bot, verdicts.as_ref());
                    rescue.push(choice.rescue);
                    ImportedBot {
                        provider: Provider::Notion,
                        bot_id: BotId(bot.bot_id.clone()),
                        workspace_id: bot.workspace_id.clone().unwrap_or_default(),
                        workspace_name: bot.workspace_name.clone(),
                        end_user_id: bot.end_user_id.clone().unwrap_or_default(),
                        pairs: bot
                            .pairs
                            .iter()
                            .map(|p| ImportedPair {
                                grant_id: GrantId::generate(),
                                access_token: p.access_token.clone(),
                                refresh_token: p.refresh_token.clone(),
                                obtained_at: p.authorized_at.unwrap_or(now),
                                revoked_at: p.revoked.then(|| p.revoked_at.unwrap_or(now)),
                            })
                            .collect(),
                        current: choice.current,
                        dead: choice.dead,
                        checked: choice.checked.map(|c| (now, c)),
                    }
                })
                .collect();
            let results = self.store.import_bots(bots, !self.dry_run).await?;
            for ((bot, result), rescue) in chunk.iter().zip(results).zip(rescue) {
                let i = &mut report.imported;
                let mut status = result.status;
                match result.kind {
                    BotImportKind::Created => {
                        i.imported_connections += 1;
                        if rescue && !self.dry_run {
                            status = self.rescue(&result.connection_id, &result.current, i).await;
                        }
                        match status {
                            Some(ConnectionStatus::Active) => i.connections_active += 1,
                            Some(ConnectionStatus::NeedsReauth) => i.connections_needs_reauth += 1,
                            _ => {}
                        }
                    }
                    BotImportKind::Added => i.connections_added_to += 1,
                    BotImportKind::Known => {}
                }
                for (pair, written) in bot.pairs.iter().zip(&result.pairs) {
                    let first = if written.new {
                        i.imported_grants += 1;
                        if result.kind == BotImportKind::Added {
                            RowResult::Added
                        } else {
                            RowResult::Imported
                        }
                    } else {
                        i.rows_already_in_ledger += pair.rows.len();
                        i.skipped_duplicates += 1;
                        RowResult::AlreadyImported
                    };
                    i.skipped_duplicates += pair.rows.len() - 1;
                    for (n, row) in pair.rows.iter().enumerate() {
                        outcomes.push(RowOutcome {
                            row: *row,
                            result: match (n, first) {
                                (0, r) => r,
                                (_, RowResult::AlreadyImported) => RowResult::AlreadyImported,
                                _ => RowResult::Duplicate,
                            },
                            bot_id: Some(bot.bot_id.clone()),
                            connection_id: result.connection_id.clone(),
                            grant_id: Some(written.grant_id.clone()),
                            status,
                            problem: None,
                        });
                    }
                }
                progress.imported(bot.rows as u64);
            }
        }
        if self.verification.is_some() {
            report.audit.verified(plan, &all_verdicts);
        }
        outcomes.sort_by_key(|o| o.row);
        Ok((report, outcomes))
    }

    /// Introspects the access tokens of the chunk's bots that the ledger does not hold in full
    /// already: an interrupted `import --verify` run again skips what it imported.
    async fn verify_chunk(
        &self,
        v: &Verification<'_>,
        chunk: &[PlannedBot],
        progress: &dyn Progress,
    ) -> Result<HashMap<String, CheckResult>, StoreError> {
        let names: Vec<String> = chunk.iter().map(|b| b.bot_id.clone()).collect();
        let held = self.store.held_pairs(&names).await?;
        let mut tokens = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut skipped = 0u64;
        for (bot, held) in chunk.iter().zip(&held) {
            let all_held = bot.pairs.iter().all(|p| {
                let refresh = p.refresh_token.as_ref().map(RefreshToken::fingerprint);
                held.iter()
                    .any(|(a, r)| *a == p.access_fingerprint() && *r == refresh)
            });
            for pair in &bot.pairs {
                if all_held {
                    skipped += 1;
                } else if seen.insert(pair.access_fingerprint()) {
                    tokens.push((pair.access_fingerprint(), pair.access_token.clone()));
                }
            }
        }
        progress.verified(skipped);
        Ok(verify::verify_all(v.notion, v.pacer, tokens, v.state, &|| progress.verified(1)).await)
    }

    /// Refreshes a new connection whose tokens were all dead, through the coordinator, which
    /// judges the answer (invariant 5): a refresh token that works rescues it (the current
    /// one, or another never used), and otherwise it becomes `needs_reauth`, the diagnosis
    /// saying that introspection found the token inactive and what was tried.
    async fn rescue(
        &self,
        id: &Option<ConnectionId>,
        grant: &Option<GrantId>,
        i: &mut Imported,
    ) -> Option<ConnectionStatus> {
        let (Some(id), Some(grant), Some(coordinator)) = (id, grant, self.coordinator) else {
            return Some(ConnectionStatus::Active);
        };
        if let Some(v) = &self.verification {
            // A refresh is a call to Notion too, and counts against the same pace.
            v.pacer.turn().await;
        }
        match coordinator.refresh(id, Some(grant)).await {
            Ok(_) => {
                i.rescued += 1;
                tracing::info!(connection = %id, "an imported connection whose access tokens were dead was refreshed");
                Some(ConnectionStatus::Active)
            }
            Err(RefreshError::NeedsReauth { .. }) => {
                i.rescue_failed += 1;
                Some(ConnectionStatus::NeedsReauth)
            }
            Err(e) => {
                i.rescue_undecided += 1;
                tracing::warn!(connection = %id, "an imported connection whose access tokens were dead could not be refreshed now: {e}");
                Some(ConnectionStatus::Active)
            }
        }
    }
}

/// Which pair of a new connection is current, and what is known of it.
struct Choice {
    current: usize,
    dead: Option<Diagnosis>,
    checked: Option<CheckResult>,
    /// Every access token is dead and some pair has a refresh token: refresh after the import.
    rescue: bool,
}

/// The newest live pair is current: without verification, "live" means not revoked in the
/// source; with it, an access token Notion calls active. When nothing is live, the newest pair
/// that can be refreshed is current, and the coordinator refreshes it after the import.
fn choose(bot: &PlannedBot, verdicts: Option<&HashMap<String, CheckResult>>) -> Choice {
    let pairs = &bot.pairs;
    let last = pairs.len() - 1;
    let newest = |f: &dyn Fn(&PlannedPair) -> bool| pairs.iter().rposition(f);
    let not_revoked = newest(&|p| !p.revoked);
    let Some(verdicts) = verdicts else {
        return Choice {
            current: not_revoked.unwrap_or(last),
            dead: not_revoked.is_none().then(|| {
                Diagnosis::new(
                    DiagnosisReason::ImportedDead,
                    "imported from an existing token store in which every row of this bot was \
                     revoked (revoked_at)",
                )
            }),
            checked: None,
            rescue: false,
        };
    };
    let verdict = |p: &PlannedPair| {
        verdicts
            .get(&p.access_fingerprint())
            .copied()
            .unwrap_or(CheckResult::Unknown)
    };
    if let Some(live) = newest(&|p| verdict(p) == CheckResult::Active) {
        return Choice {
            current: live,
            dead: None,
            checked: Some(CheckResult::Active),
            rescue: false,
        };
    }
    if pairs.iter().any(|p| verdict(p) == CheckResult::Unknown) {
        // Not every token could be asked about: nothing is judged, and the health check will
        // ask again.
        let current = not_revoked.unwrap_or(last);
        return Choice {
            current,
            dead: None,
            checked: Some(verdict(&pairs[current])),
            rescue: false,
        };
    }
    let refreshable = newest(&|p| !p.revoked && p.refresh_token.is_some())
        .or_else(|| newest(&|p| p.refresh_token.is_some()));
    match refreshable {
        Some(current) => Choice {
            current,
            dead: None,
            checked: Some(CheckResult::Inactive),
            rescue: true,
        },
        None => Choice {
            current: not_revoked.unwrap_or(last),
            dead: Some(Diagnosis::new(
                DiagnosisReason::ImportedDead,
                "imported from an existing token store: introspection found every access token \
                 of this bot inactive, and it has no refresh token",
            )),
            checked: Some(CheckResult::Inactive),
            rescue: false,
        },
    }
}

/// Rows as the API receives them: the same fields as a file's columns. No `Debug`: it holds
/// tokens as plain strings until `into_source_row` makes them secrets.
#[derive(Clone, Default, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ApiRow {
    /// Required: the row is `invalid` without it.
    pub bot_id: Option<String>,
    /// Required: the row is `invalid` without it.
    pub access_token: Option<String>,
    pub refresh_token: Option<String>,
    pub workspace_id: Option<String>,
    pub workspace_name: Option<String>,
    /// Your app's id for the user; empty when absent.
    pub end_user_id: Option<String>,
    /// When the pair was obtained (RFC 3339, or a Unix time in seconds or milliseconds).
    pub authorized_at: Option<String>,
    /// When the source marked the row revoked; the pair is kept, superseded.
    pub revoked_at: Option<String>,
}

impl ApiRow {
    /// The row as a source row (numbered from 1, like a file's).
    pub fn into_source_row(self, number: usize) -> SourceRow {
        source::row_of_fields(number, |name| match name {
            "bot_id" => self.bot_id.clone(),
            "access_token" => self.access_token.clone(),
            "refresh_token" => self.refresh_token.clone(),
            "workspace_id" => self.workspace_id.clone(),
            "workspace_name" => self.workspace_name.clone(),
            "end_user_id" => self.end_user_id.clone(),
            "authorized_at" => self.authorized_at.clone(),
            "revoked_at" => self.revoked_at.clone(),
            _ => None,
        })
    }
}
