//! `tokenkeeper audit` and `tokenkeeper import`: their flags, the progress bars, and the report
//! at the end (words, or JSON with `--json`) on standard output.
//!
//! Progress goes to standard error, and only when it is a terminal: a bar in a log file or a
//! pipe is noise. The summary is printed whatever standard error is.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::source::{Source, SourceError};
use super::verify::{self, Pacer, StateFile};
use super::{plan, Audit, Importer, Progress, Verification};
use crate::clock::Clock;
use crate::clock::Rate;
use crate::config::{ConfigError, StoreArgs};
use crate::provider::notion::NotionClient;
use crate::refresh::{Coordinator, CoordinatorSettings};
use crate::store::DatabaseUrl;

/// Where the existing tokens are.
#[derive(Debug, Clone, clap::Args)]
pub struct SourceArgs {
    /// The existing token store: a `.csv` or `.jsonl` file, or a database URL (`sqlite://<file>`,
    /// `postgres://…`) together with --query. Columns are matched by name: `bot_id` and
    /// `access_token` are required; `refresh_token`, `workspace_id`, `workspace_name`,
    /// `end_user_id`, `authorized_at` and `revoked_at` are read when present; others are ignored.
    #[arg(long)]
    pub from: String,

    /// For a database source: the query that reads the token table, e.g.
    /// `SELECT * FROM notion_tokens`. It runs read-only.
    #[arg(long)]
    pub query: Option<String>,
}

/// How `--verify` asks Notion.
#[derive(Debug, Clone, clap::Args)]
pub struct VerifyArgs {
    /// Ask Notion's introspection endpoint about every distinct access token, and count the
    /// live, the dead and the unknown (needs the Notion client id and secret).
    #[arg(long)]
    pub verify: bool,

    /// How fast --verify asks Notion, as `<count>/<window>` (`2/s`, `120/1m`). Notion's
    /// documented average is about 3 requests a second per integration; the default stays
    /// under it, whatever else the integration is doing.
    #[arg(long, default_value = "2/s")]
    pub rate: String,

    /// A file that keeps each verdict as it arrives (by token fingerprint, never the token;
    /// created mode 0600): a run given the same file skips the tokens it already holds, so an
    /// interrupted verification resumes where it stopped, and `import --verify` can reuse what
    /// `audit --verify` found.
    #[arg(long)]
    pub state: Option<PathBuf>,

    #[command(flatten)]
    pub notion: crate::config::NotionArgs,

    /// Timeout of one call to Notion.
    #[arg(long, env = "TOKENKEEPER_PROVIDER_TIMEOUT", default_value = "10s")]
    pub provider_timeout: String,
}

/// `tokenkeeper audit`.
#[derive(Debug, Clone, clap::Args)]
pub struct AuditArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    #[command(flatten)]
    pub verify: VerifyArgs,
    /// Print the report as one JSON object instead of words.
    #[arg(long)]
    pub json: bool,
}

/// `tokenkeeper import`.
#[derive(Debug, Clone, clap::Args)]
pub struct ImportArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub source: SourceArgs,
    #[command(flatten)]
    pub verify: VerifyArgs,
    /// Do everything but commit: read, verify, and record every batch in a transaction that
    /// is rolled back. No refresh is made (it would spend a refresh token).
    #[arg(long)]
    pub dry_run: bool,
    /// Print the report as one JSON object instead of words.
    #[arg(long)]
    pub json: bool,
    /// Where a pair refreshed by --verify waits if the database cannot take it, as for `serve`.
    /// Default: `<database file>.spill` with SQLite, `tokenkeeper-spill` with PostgreSQL.
    #[arg(long, env = "TOKENKEEPER_SPILL_DIR")]
    pub spill_dir: Option<PathBuf>,
    /// Bots recorded per transaction.
    #[arg(long, default_value_t = super::BATCH)]
    pub batch: usize,
    /// The webhook endpoints of the `serve` processes on this database: each imported
    /// connection is announced to them (`connection.created`, and `connection.needs_reauth` for
    /// one imported with nothing alive), delivered by `serve`, which holds the signing secret.
    #[arg(long, env = "TOKENKEEPER_WEBHOOK_URLS")]
    pub webhook_urls: Option<String>,
}

fn usage(flag: &str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        setting: flag.to_owned(),
        message: message.into(),
    }
}

fn source_of(args: &SourceArgs) -> Result<Source, ConfigError> {
    Source::parse(&args.from, args.query.as_deref()).map_err(|e| match e {
        SourceError::Usage(m) | SourceError::Read(m) => usage("--from", m),
    })
}

/// The Notion client and pace of `--verify`, checked before anything is read.
fn verification_of(args: &VerifyArgs) -> Result<Option<(NotionClient, Rate)>, ConfigError> {
    if !args.verify {
        return Ok(None);
    }
    let rate = crate::clock::parse_rate(&args.rate).map_err(|m| usage("--rate", m))?;
    let Some(settings) = args.notion.settings()? else {
        return Err(ConfigError::new(
            "TOKENKEEPER_NOTION_CLIENT_ID",
            "--verify asks Notion: set the client id and secret (TOKENKEEPER_NOTION_CLIENT_ID \
             and TOKENKEEPER_NOTION_CLIENT_SECRET)",
        ));
    };
    let timeout = crate::config::parse_duration(&args.provider_timeout)
        .map_err(|m| ConfigError::new("TOKENKEEPER_PROVIDER_TIMEOUT", m))?;
    Ok(Some((NotionClient::new(settings, timeout), rate)))
}

fn open_state(args: &VerifyArgs) -> Result<Option<StateFile>, ConfigError> {
    args.state
        .as_deref()
        .map(|path| {
            StateFile::open(path)
                .map_err(|e| usage("--state", format!("cannot open {}: {e}", path.display())))
        })
        .transpose()
}

/// A progress bar on standard error when it is a terminal, hidden otherwise.
fn bar(len: u64, what: &str) -> ProgressBar {
    let target = if std::io::stderr().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let bar = ProgressBar::with_draw_target(Some(len), target);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg:>10} [{elapsed_precise}] {wide_bar} {human_pos}/{human_len} ({per_sec}, {eta} left)",
        )
        .expect("a valid template"),
    );
    bar.set_message(what.to_owned());
    bar
}

struct Bars {
    verify: Option<ProgressBar>,
    import: Option<ProgressBar>,
}

impl Progress for Bars {
    fn verified(&self, n: u64) {
        if let Some(b) = &self.verify {
            b.inc(n);
        }
    }

    fn imported(&self, n: u64) {
        if let Some(b) = &self.import {
            b.inc(n);
        }
    }
}

/// `tokenkeeper audit`: reads, and reports; writes nothing anywhere (but `--state`, if given).
pub async fn audit(args: &AuditArgs) -> anyhow::Result<()> {
    let source = source_of(&args.source)?;
    let verification = verification_of(&args.verify)?;
    let state = open_state(&args.verify)?;
    eprintln!("Reading {}", source.describe());
    let data = source.read().await.map_err(read_error)?;
    let plan = plan(data.rows);
    let mut audit = Audit::of(source.describe(), &plan, data.bot_id_unique, data.table);
    if let Some((notion, rate)) = verification {
        let mut seen = std::collections::HashSet::new();
        let tokens: Vec<_> = plan
            .bots
            .iter()
            .flat_map(|b| &b.pairs)
            .filter(|p| seen.insert(p.access_fingerprint()))
            .map(|p| (p.access_fingerprint(), p.access_token.clone()))
            .collect();
        eprintln!(
            "Asking Notion about {} access tokens at {rate} ({}){}",
            tokens.len(),
            estimate(tokens.len(), rate, state.as_ref()),
            state
                .as_ref()
                .map(|s| format!("; verdicts kept in {}", s.path().display()))
                .unwrap_or_default()
        );
        let progress = bar(tokens.len() as u64, "verify");
        let pacer = Pacer::new(rate);
        let verdicts =
            verify::verify_all(&notion, &pacer, tokens, state.as_ref(), &|| progress.inc(1)).await;
        progress.finish_and_clear();
        audit.verified(&plan, &verdicts);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&audit)?);
    } else {
        print!("{}", audit.words());
        print_invalid(&plan.invalid);
    }
    Ok(())
}

fn read_error(e: SourceError) -> anyhow::Error {
    match e {
        SourceError::Usage(m) => usage("--query", m).into(),
        SourceError::Read(m) => anyhow::anyhow!(m),
    }
}

/// How long a verification at `rate` will take, for the line that announces it.
fn estimate(tokens: usize, rate: Rate, state: Option<&StateFile>) -> String {
    let known = state.map_or(0, StateFile::len).min(tokens);
    let secs = (tokens - known) as f64 / rate.per_second();
    let d = Duration::from_secs(secs.ceil() as u64);
    format!("about {}", humantime::format_duration(d))
}

fn print_invalid(invalid: &[(usize, String)]) {
    for (row, problem) in invalid.iter().take(20) {
        println!("  row {row}: {problem}");
    }
    if invalid.len() > 20 {
        println!("  … and {} more", invalid.len() - 20);
    }
}

/// `tokenkeeper import`.
pub async fn import(args: &ImportArgs) -> anyhow::Result<()> {
    let source = source_of(&args.source)?;
    let verification = verification_of(&args.verify)?;
    let state = open_state(&args.verify)?;
    let url = args.store.database_url()?;
    let command = if args.dry_run {
        crate::keycheck::Command::DryRun
    } else {
        crate::keycheck::Command::Serve
    };
    let opened =
        crate::keycheck::open(&url, &args.store.key_source()?, command, Clock::System).await?;
    let store = Arc::new(opened.store);
    store.set_webhook_endpoints(
        crate::config::webhook_endpoints(args.webhook_urls.as_deref())?
            .iter()
            .map(|e| e.to_string())
            .collect(),
    );
    eprintln!("Reading {}", source.describe());
    let data = source.read().await.map_err(read_error)?;
    let plan = plan(data.rows);
    let audit = Audit::of(source.describe(), &plan, data.bot_id_unique, data.table);

    let pacer = verification.as_ref().map(|(_, rate)| Pacer::new(*rate));
    // A refresh spends a refresh token; a dry run must not, so it has no coordinator.
    let coordinator = match (&verification, args.dry_run) {
        (Some((notion, _)), false) => {
            let spill = args.spill_dir.clone().unwrap_or_else(|| match &url {
                DatabaseUrl::Sqlite(path) => PathBuf::from(format!("{}.spill", path.display())),
                DatabaseUrl::Postgres(_) => PathBuf::from("tokenkeeper-spill"),
            });
            let journal = crate::journal::Journal::start(&spill, &store).await?;
            // No webhook settings: this process delivers nothing; `serve` does.
            let jobs = crate::jobs::Jobs::new(
                store.clone(),
                notion.clone(),
                Clock::System,
                None,
                Duration::from_secs(10),
                None,
            );
            let timeout = crate::config::parse_duration(&args.verify.provider_timeout)
                .map_err(|m| ConfigError::new("TOKENKEEPER_PROVIDER_TIMEOUT", m))?;
            Some(Coordinator::new(
                store.clone(),
                notion.clone(),
                CoordinatorSettings {
                    holder: crate::ledger::LeaseHolder::for_this_process(),
                    provider_timeout: timeout,
                    budget: Duration::from_secs(30),
                    rate: Default::default(),
                },
                journal,
                jobs,
                Arc::new(crate::metrics::Metrics::detached()),
            ))
        }
        _ => None,
    };
    let tokens: usize = {
        let mut seen = std::collections::HashSet::new();
        plan.bots
            .iter()
            .flat_map(|b| &b.pairs)
            .filter(|p| seen.insert(p.access_fingerprint()))
            .count()
    };
    if let Some((_, rate)) = &verification {
        eprintln!(
            "Asking Notion about {tokens} access tokens at {rate} ({}, less any an earlier run \
             imported)",
            estimate(tokens, *rate, state.as_ref()),
        );
    }
    let valid_rows = (plan.rows - plan.invalid.len()) as u64;
    let bars = Bars {
        verify: verification.as_ref().map(|_| bar(tokens as u64, "verify")),
        import: Some(bar(
            valid_rows,
            if args.dry_run { "dry run" } else { "import" },
        )),
    };
    let importer = Importer {
        store: &store,
        coordinator: coordinator.as_ref(),
        verification: match (&verification, &pacer) {
            (Some((notion, _)), Some(pacer)) => Some(Verification {
                notion,
                pacer,
                state: state.as_ref(),
            }),
            _ => None,
        },
        dry_run: args.dry_run,
        batch: args.batch,
    };
    let started = Instant::now();
    let (mut report, _rows) = importer.run(&plan, audit, &bars).await?;
    let elapsed = started.elapsed();
    for b in [&bars.verify, &bars.import].into_iter().flatten() {
        b.finish_and_clear();
    }
    report.imported.seconds = (elapsed.as_secs_f64() * 1000.0).round() / 1000.0;
    report.imported.rows_per_second = if elapsed.as_secs_f64() > 0.0 {
        (valid_rows as f64 / elapsed.as_secs_f64()).round()
    } else {
        0.0
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.words());
        println!(
            "{} rows in {:.1} s ({} rows/s).",
            valid_rows, report.imported.seconds, report.imported.rows_per_second
        );
        print_invalid(&plan.invalid);
    }
    Ok(())
}
