//! `tokenkeeper-bench`: starts notion-sim and tokenkeeper (the release binaries) on loopback,
//! seeds them, drives them with a closed-loop load generator, and writes
//! `bench/results/<scenario>.json` and the results table of `BENCHMARKS.md`.
//!
//! Every figure is a ratio or a count measured side by side in one run, because the machines
//! this runs on are noisy; every phase is bounded in time and in requests; everything talks to
//! 127.0.0.1 only.

mod client;
mod db;
mod flows;
mod load;
mod procs;
mod report;
mod scenarios;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use serde_json::json;

use db::Backend;
use report::{BackendResult, Machine, ScenarioResult};
use scenarios::{token_read, Ctx};

/// Benchmarks of tokenkeeper against notion-sim on loopback.
///
/// Starts `tokenkeeper notion-sim` and `tokenkeeper serve` from the release build as separate
/// processes, seeds connections (tokenkeeper's own store code in batched transactions, or the
/// real connect flow where the simulator must know the tokens), drives them with N concurrent
/// workers over keep-alive connections recording every latency in an HDR histogram, and writes
/// bench/results/<scenario>.json and the table in BENCHMARKS.md. Every comparison is measured
/// side by side in the same run (alternating slices), since absolute numbers on a shared
/// 2-core machine mean little.
///
/// PostgreSQL: run under `scripts/with-postgres`, which exports TOKENKEEPER_TEST_POSTGRES_URL;
/// each scenario gets a fresh database on that server.
///
/// Example: scripts/with-postgres cargo run --release -p tokenkeeper-bench -- all
#[derive(Parser)]
#[command(name = "tokenkeeper-bench", version)]
struct Cli {
    /// What to measure.
    #[arg(value_enum)]
    scenario: Which,

    /// Which store backend(s). Default: both when TOKENKEEPER_TEST_POSTGRES_URL is set,
    /// otherwise sqlite.
    #[arg(long, value_enum)]
    backend: Option<BackendChoice>,

    /// Length of each measured phase (token-read and scale measure token reads and the
    /// baseline for this long each; proxy measures proxied and direct calls for this long each).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,

    /// Number of connections, overriding the scenario's own (token-read 10,000; scale
    /// 1,000,000; refresh 10,000; proxy 100; stampede: the number of concurrent callers,
    /// 1,000; connect: a cap on the flows).
    #[arg(long)]
    connections: Option<usize>,

    /// Concurrent clients of the closed-loop load generator (each on its own keep-alive
    /// connection).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,

    /// The tokenkeeper binary. Default: `tokenkeeper` beside this binary (under `cargo run`, it
    /// is built first with `cargo build --release -p tokenkeeper`).
    #[arg(long)]
    tokenkeeper: Option<PathBuf>,

    /// PostgreSQL server on which a database is created per scenario.
    #[arg(long, env = "TOKENKEEPER_TEST_POSTGRES_URL", hide_env_values = true)]
    postgres_url: Option<String>,

    /// Connections per transaction of the bulk seeder.
    #[arg(long, default_value_t = 5_000)]
    seed_batch: usize,

    /// Directory of the JSON results. Default: bench/results of the repository.
    #[arg(long)]
    out: Option<PathBuf>,

    /// Do not rewrite the results table of BENCHMARKS.md.
    #[arg(long)]
    no_markdown: bool,

    /// Keep the scratch directory (SQLite files, process logs) instead of deleting it.
    #[arg(long)]
    keep: bool,

    /// A `TOKENKEEPER_*` setting for every `serve` the scenarios start, as `NAME=VALUE`
    /// (repeatable), e.g. `--serve-env TOKENKEEPER_TOKEN_CACHE_SIZE=0` to measure without the
    /// token cache.
    #[arg(long, value_parser = parse_env_pair)]
    serve_env: Vec<(String, String)>,
}

fn parse_env_pair(text: &str) -> Result<(String, String), String> {
    let (name, value) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not NAME=VALUE"))?;
    if !name.starts_with("TOKENKEEPER_") {
        return Err(format!("{name} is not a TOKENKEEPER_* setting"));
    }
    Ok((name.to_owned(), value.to_owned()))
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Debug)]
enum Which {
    /// notion-sim's own ceiling: users.me and refresh grants at the token endpoint, straight at the simulator.
    SimCeiling,
    /// 1. Random GET /v1/connections/{id}/access-token over 10,000 connections, side by side with GET /v1/_baseline; database writes, memory.
    TokenRead,
    /// 2. The same over 1,000,000 connections: p99 against token-read's, memory, seeding and start-up time.
    Scale,
    /// 3. 1,000 concurrent refreshes with the same if_grant over 3 processes (PostgreSQL) or 2 (SQLite), the simulator answering after 100 ms.
    Stampede,
    /// 4. 10,000 connections each refreshed once, 64 at a time: refreshes/s and database transactions per refresh.
    Refresh,
    /// 5. users.me through the proxy versus straight at the simulator: added p50, throughput ratio.
    Proxy,
    /// 6. Complete connect flows (session, link, consent, callback) per second.
    Connect,
    /// Issue 14: how long another process's token cache serves a superseded grant, under a refresh storm over two processes.
    Staleness,
    /// Issue 14: Notion-side 429s per 1,000 proxied calls with and without the shared throttle, at equal offered load, over two processes.
    Throttle,
    /// Every scenario above, in this order.
    All,
}

impl Which {
    fn name(self) -> &'static str {
        match self {
            Which::SimCeiling => "sim-ceiling",
            Which::TokenRead => "token-read",
            Which::Scale => "scale",
            Which::Stampede => "stampede",
            Which::Refresh => "refresh",
            Which::Proxy => "proxy",
            Which::Connect => "connect",
            Which::Staleness => "staleness",
            Which::Throttle => "throttle",
            Which::All => "all",
        }
    }

    fn title(self) -> &'static str {
        match self {
            Which::SimCeiling => "the simulator's own ceiling",
            Which::TokenRead => "token read over 10,000 connections, against the baseline route",
            Which::Scale => "token read over 1,000,000 connections",
            Which::Stampede => {
                "1,000 concurrent refreshes of one connection over several processes"
            }
            Which::Refresh => "refresh throughput, each connection refreshed once",
            Which::Proxy => "proxy overhead on users.me",
            Which::Connect => "complete connect flows",
            Which::Staleness => "staleness of another process's token cache under a refresh storm",
            Which::Throttle => "Notion-side 429s with and without the shared throttle",
            Which::All => "",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Debug)]
enum BackendChoice {
    Sqlite,
    Postgres,
    Both,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 10s or 500ms"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("{text:?}: unknown unit {unit:?} (ms, s, m)")),
    };
    if !(0.5..=600.0).contains(&secs) {
        return Err("a phase lasts between 0.5 s and 10 min".into());
    }
    Ok(Duration::from_secs_f64(secs))
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The repository root: two levels above this crate's manifest when that exists (the usual
/// case), otherwise the current directory.
fn repo_root() -> PathBuf {
    let from_manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    from_manifest
        .canonicalize()
        .ok()
        .filter(|p| p.join("Cargo.toml").exists())
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Finds (and under `cargo run`, builds) the release `tokenkeeper` binary.
fn tokenkeeper_binary(cli: &Cli, root: &Path) -> anyhow::Result<PathBuf> {
    if let Some(path) = &cli.tokenkeeper {
        return Ok(path.clone());
    }
    let me = std::env::current_exe()?;
    let dir = me.parent().context("this binary has no directory")?;
    if let Ok(cargo) = std::env::var("CARGO") {
        eprintln!("building the tokenkeeper binary (cargo build --release -p tokenkeeper)");
        let status = std::process::Command::new(cargo)
            .args([
                "build",
                "--release",
                "-p",
                "tokenkeeper",
                "--bin",
                "tokenkeeper",
            ])
            .current_dir(root)
            .status()?;
        if !status.success() {
            bail!("cargo build --release -p tokenkeeper failed");
        }
    }
    let path = dir.join("tokenkeeper");
    if !path.exists() {
        bail!(
            "{} does not exist: build it with `cargo build --release -p tokenkeeper`, or pass --tokenkeeper",
            path.display()
        );
    }
    if dir.file_name().is_some_and(|d| d != "release") {
        eprintln!(
            "warning: {} is not a release build; figures will not mean much",
            path.display()
        );
    }
    Ok(path)
}

async fn run(cli: Cli) -> anyhow::Result<bool> {
    if cfg!(debug_assertions) {
        eprintln!("warning: this is a debug build of the bench; run it with --release");
    }
    let root = repo_root();
    let backends: Vec<Backend> = match (cli.backend, &cli.postgres_url) {
        (Some(BackendChoice::Sqlite), _) => vec![Backend::Sqlite],
        (Some(BackendChoice::Postgres), Some(_)) => vec![Backend::Postgres],
        (Some(BackendChoice::Both), Some(_)) | (None, Some(_)) => {
            vec![Backend::Sqlite, Backend::Postgres]
        }
        (Some(BackendChoice::Postgres | BackendChoice::Both), None) => {
            bail!("PostgreSQL needs TOKENKEEPER_TEST_POSTGRES_URL: run under scripts/with-postgres")
        }
        (None, None) => {
            eprintln!("note: TOKENKEEPER_TEST_POSTGRES_URL is not set; running SQLite only (use scripts/with-postgres for both)");
            vec![Backend::Sqlite]
        }
    };
    let bin = tokenkeeper_binary(&cli, &root)?;
    let results_dir = cli
        .out
        .clone()
        .unwrap_or_else(|| root.join("bench/results"));
    let scratch = tempfile::Builder::new()
        .prefix("tokenkeeper-bench-")
        .tempdir()?;
    eprintln!(
        "scratch directory (SQLite files, process logs): {}",
        scratch.path().display()
    );
    let ctx = Ctx {
        bin,
        run_dir: scratch.path().to_path_buf(),
        duration: cli.duration,
        concurrency: cli.concurrency.max(1),
        connections: cli.connections,
        pg_url: cli.postgres_url.clone(),
        seed_batch: cli.seed_batch.max(1),
        results_dir: results_dir.clone(),
        serve_env: cli.serve_env.clone(),
    };
    let command = command_line(&backends);
    let machine = Machine::detect();
    let which: Vec<Which> = match cli.scenario {
        Which::All => vec![
            Which::SimCeiling,
            Which::TokenRead,
            Which::Scale,
            Which::Stampede,
            Which::Refresh,
            Which::Proxy,
            Which::Connect,
            Which::Staleness,
            Which::Throttle,
        ],
        one => vec![one],
    };
    let started = Instant::now();
    let mut ok = true;
    // token-read's p99 per backend, for scale.
    let mut reference_p99: HashMap<&'static str, f64> = HashMap::new();
    for scenario in which {
        eprintln!("\n== {}: {}", scenario.name(), scenario.title());
        let mut backends_done: Vec<BackendResult> = Vec::new();
        let mut notes = Vec::new();
        let runs: Vec<Option<Backend>> = if scenario == Which::SimCeiling {
            vec![None]
        } else {
            backends.iter().copied().map(Some).collect()
        };
        for backend in runs {
            if let Some(b) = backend {
                eprintln!("-- {} on {}", scenario.name(), b.name());
            }
            let t = Instant::now();
            let result = run_one(&ctx, scenario, backend, &reference_p99).await;
            match result {
                Ok(r) => {
                    if scenario == Which::TokenRead {
                        if let (Some(b), Some(p99)) = (
                            backend,
                            r.details["token_read"]["latency_ms"]["p99"].as_f64(),
                        ) {
                            reference_p99.insert(b.name(), p99);
                        }
                    }
                    for f in &r.figures {
                        let mark = match f.met {
                            Some(true) => " [met]",
                            Some(false) => " [MISSED]",
                            None => "",
                        };
                        eprintln!("  {}: {} {}{}", f.name, f.value, f.unit, mark);
                    }
                    backends_done.push(r);
                }
                Err(e) => {
                    ok = false;
                    let which = backend.map(|b| b.name()).unwrap_or("simulator");
                    eprintln!("  {} on {which} FAILED: {e:#}", scenario.name());
                    notes.push(format!("{which}: the run failed: {e:#}"));
                }
            }
            eprintln!("  ({:.0} s)", t.elapsed().as_secs_f64());
        }
        if backends_done.is_empty() {
            continue;
        }
        let result = ScenarioResult {
            scenario: scenario.name().to_owned(),
            title: scenario.title().to_owned(),
            command: command.replace("<scenario>", scenario.name()),
            commit: report::commit(&root),
            finished_at: chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
            machine: machine.clone(),
            settings: json!({
                "duration_s": ctx.duration.as_secs_f64(),
                "concurrency": ctx.concurrency,
                "connections": ctx.connections,
                "seed_batch": ctx.seed_batch,
            }),
            backends: backends_done,
            notes,
        };
        report::write_json(&results_dir, &result)?;
        if !cli.no_markdown {
            report::update_markdown(&root.join("BENCHMARKS.md"), &results_dir)?;
        }
    }
    eprintln!("\ndone in {:.0} s", started.elapsed().as_secs_f64());
    if cli.keep {
        let kept = scratch.keep();
        eprintln!("kept {}", kept.display());
    }
    Ok(ok)
}

async fn run_one(
    ctx: &Ctx,
    scenario: Which,
    backend: Option<Backend>,
    reference_p99: &HashMap<&'static str, f64>,
) -> anyhow::Result<BackendResult> {
    let backend = match (scenario, backend) {
        (Which::SimCeiling, _) => return scenarios::sim_ceiling::run(ctx).await,
        (_, Some(b)) => b,
        (_, None) => bail!("a backend is needed"),
    };
    match scenario {
        Which::TokenRead => {
            let params = token_read::Params {
                scenario: "token-read",
                connections: ctx.connections.unwrap_or(10_000),
                memory_target_mb: 50.0,
                reference_p99_ms: None,
            };
            token_read::run(ctx, backend, &params).await
        }
        Which::Scale => {
            let reference = match reference_p99.get(backend.name()) {
                Some(p) => Some(*p),
                None => earlier_p99(&ctx.results_dir, backend.name()),
            };
            let params = token_read::Params {
                scenario: "scale",
                connections: ctx.connections.unwrap_or(1_000_000),
                memory_target_mb: 150.0,
                reference_p99_ms: reference,
            };
            token_read::run(ctx, backend, &params).await
        }
        Which::Stampede => scenarios::stampede::run(ctx, backend).await,
        Which::Refresh => scenarios::refresh::run(ctx, backend).await,
        Which::Proxy => scenarios::proxy::run(ctx, backend).await,
        Which::Connect => scenarios::connect::run(ctx, backend).await,
        Which::Staleness => scenarios::staleness::run(ctx, backend).await,
        Which::Throttle => scenarios::throttle::run(ctx, backend).await,
        Which::SimCeiling | Which::All => unreachable!("handled above"),
    }
}

/// token-read's p99 for `backend` from an earlier run's JSON, for `scale` run on its own.
fn earlier_p99(results_dir: &Path, backend: &str) -> Option<f64> {
    let text = std::fs::read_to_string(results_dir.join("token-read.json")).ok()?;
    let result: ScenarioResult = serde_json::from_str(&text).ok()?;
    let b = result.backends.iter().find(|b| b.backend == backend)?;
    b.details["token_read"]["latency_ms"]["p99"].as_f64()
}

/// The command that reproduces a scenario, with `<scenario>` to fill in.
fn command_line(backends: &[Backend]) -> String {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut rest: Vec<String> = Vec::new();
    let mut skip_next = false;
    for a in &args {
        if skip_next {
            skip_next = false;
            continue;
        }
        if Which::from_str(a, true).is_ok() {
            continue;
        }
        if a == "--postgres-url" || a == "--tokenkeeper" || a == "--out" {
            skip_next = true;
            continue;
        }
        if ["--postgres-url=", "--tokenkeeper=", "--out="]
            .iter()
            .any(|p| a.starts_with(p))
            || a == "--keep"
        {
            continue;
        }
        rest.push(a.clone());
    }
    let with_pg = if backends.contains(&Backend::Postgres) {
        "scripts/with-postgres "
    } else {
        ""
    };
    let mut cmd = format!("{with_pg}cargo run --release -p tokenkeeper-bench -- <scenario>");
    if !backends.contains(&Backend::Postgres) && !rest.iter().any(|a| a.starts_with("--backend")) {
        cmd.push_str(" --backend sqlite");
    }
    for a in rest {
        cmd.push(' ');
        cmd.push_str(&a);
    }
    cmd
}
