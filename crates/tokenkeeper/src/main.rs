//! The `tokenkeeper` binary: a thin layer over the library.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use tokenkeeper::clock::Clock;
use tokenkeeper::config::{Config, LogArgs, ServeArgs, StoreArgs};
use tokenkeeper::keycheck::{self, Command as Checked};
use tokenkeeper::seal::KeyRing;

/// A self-hosted OAuth token broker for Notion: keeps every token pair Notion ever mints,
/// hands out a working access token, and refreshes with exactly one refresh in flight per
/// connection, across processes.
///
/// Every option can also be set with the TOKENKEEPER_* environment variable shown beside it.
#[derive(Parser)]
#[command(name = "tokenkeeper", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    log: LogArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker's HTTP API (migrates the database first). Without Notion credentials it
    /// starts a built-in Notion simulator and uses it, so the whole flow works on a fresh machine.
    Serve(Box<ServeArgs>),
    /// Apply database migrations and exit.
    Migrate(StoreArgs),
    /// Manage the encryption keys that seal tokens at rest.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Run notion-sim, a faithful simulator of Notion's OAuth endpoints and a slice of its API.
    NotionSim(notion_sim::SimArgs),
    /// Read an existing token store (a CSV or JSONL file, or a table through --query) and say
    /// what is wrong with it; with --verify, ask Notion which access tokens are alive. Writes
    /// nothing.
    Audit(Box<tokenkeeper::import::cli::AuditArgs>),
    /// Record an existing token store in the ledger: one connection per bot, every distinct pair
    /// a grant, the newest live one current. Idempotent, and safe while `serve` runs.
    Import(Box<tokenkeeper::import::cli::ImportArgs>),
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Print a new key ring entry (`<key id>:<base64 key>`). To rotate, add it after the active
    /// key in every process's key ring and restart them, then run `keys rotate` with it first.
    Generate,
    /// Register the key ring's active key with the database, then re-seal every grant with it,
    /// in batches, while tokenkeeper keeps serving. Refuses a ring that does not open every key
    /// id in use.
    Rotate {
        #[command(flatten)]
        store: StoreArgs,
        /// Grants re-sealed per transaction.
        #[arg(long, default_value_t = 500)]
        batch: u32,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // The log format is needed before anything can log, so it is checked before the rest of
    // the configuration, with the same one-line error and exit status.
    match cli.log.format() {
        Ok(format) => tokenkeeper::logging::init(format),
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    }
    let result = match cli.command {
        Command::Serve(args) => serve(&args).await,
        Command::Migrate(args) => migrate(&args).await,
        Command::Keys(KeysCommand::Generate) => {
            println!("{}", KeyRing::generate_entry());
            Ok(())
        }
        Command::Keys(KeysCommand::Rotate { store, batch }) => rotate(&store, batch).await,
        Command::NotionSim(args) => notion_sim::run_cli(args).await,
        Command::Audit(args) => tokenkeeper::import::cli::audit(&args).await,
        Command::Import(args) => tokenkeeper::import::cli::import(&args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => match e.downcast_ref::<tokenkeeper::config::ConfigError>() {
            Some(config) => {
                eprintln!("error: {config}");
                ExitCode::from(2)
            }
            None => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

async fn serve(args: &ServeArgs) -> anyhow::Result<()> {
    let mut config = Config::resolve(args)?;
    if let Some(warning) = tokenkeeper::api::server::fit_descriptor_limit(&mut config.server) {
        tracing::warn!("{warning}");
    }
    // Invariant 11: the key ring is checked against the database before anything listens.
    let opened = keycheck::open(
        &config.database_url,
        &config.keys,
        Checked::Serve,
        Clock::System,
    )
    .await?;
    let listener = tokenkeeper::api::server::bind(config.listen)
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listener.local_addr()?;
    // On port 0 the default public URL (`http://<listen address>`) is only known once bound;
    // without this, connect links and the callback would point at port 0.
    if args.public_url.is_none() && config.listen.port() == 0 {
        config.public_url = url::Url::parse(&format!("http://{addr}"))?;
        if args.allowed_return_urls.is_none() {
            config.allowed_return_urls =
                tokenkeeper::return_to::AllowedReturnUrls::only(&config.public_url);
        }
    }
    let app = tokenkeeper::app::App::build(&config, opened).await?;
    println!(
        "tokenkeeper {} listening on http://{addr}",
        env!("CARGO_PKG_VERSION")
    );
    match &app.simulator {
        Some(sim) => println!(
            "No Notion credentials configured: Notion is played by the built-in notion-sim at {} \
             (set TOKENKEEPER_NOTION_CLIENT_ID and _SECRET to use Notion)",
            sim.base_url()
        ),
        None => println!("Notion: {}", args.notion.notion_base_url),
    }
    println!(
        "Database: {} ({} schema v{})",
        args.store.database_url,
        app.state.store.backend(),
        app.schema_version
    );
    if let Some(path) = &app.created_key_file {
        println!("Created the encryption key ring {} (mode 0600): back it up; without it the tokens cannot be read", path.display());
    }
    if !app.registered_keys.is_empty() {
        println!(
            "Registered encryption key ids {} with the database",
            app.registered_keys.join(", ")
        );
    }
    if let Some(path) = &config.created_webhook_secret_file {
        println!(
            "Created the webhook signing secret {} (mode 0600): give it to your endpoints to verify events",
            path.display()
        );
    }
    if let Some(path) = &config.created_api_key_file {
        println!("Created an admin API key in {} (mode 0600)", path.display());
    }
    if app.simulator.is_some() {
        println!(
            "Open {} in a browser to connect a simulated Notion workspace",
            config.public_url
        );
    }
    println!(
        "The admin console is at {}/admin: sign in with an admin API key",
        config.public_url.as_str().trim_end_matches('/')
    );
    tokenkeeper::api::serve(listener, app.state.clone(), shutdown_signal()).await?;
    drop(app);
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down");
}

async fn migrate(args: &StoreArgs) -> anyhow::Result<()> {
    let url = args.database_url()?;
    let opened = keycheck::open(&url, &args.key_source()?, Checked::Migrate, Clock::System).await?;
    println!(
        "{}: schema at version {}",
        opened.store.backend(),
        opened.schema_version
    );
    match &opened.check {
        Some(check) => {
            let in_use: Vec<&str> = check.in_use.iter().map(String::as_str).collect();
            println!(
                "key ring: opens every key id in use ({})",
                if in_use.is_empty() {
                    "none".to_owned()
                } else {
                    in_use.join(", ")
                }
            );
        }
        None => println!("no key ring configured: keys not checked"),
    }
    Ok(())
}

async fn rotate(args: &StoreArgs, batch: u32) -> anyhow::Result<()> {
    let url = args.database_url()?;
    // Refuses, before re-sealing anything, a ring that does not open every key id in use; and
    // registers the active key, so that processes restarted with it active may seal with it.
    let opened = keycheck::open(&url, &args.key_source()?, Checked::Rotate, Clock::System).await?;
    let check = opened.check.expect("a key ring was checked");
    let active = check.active;
    if check.newly_registered.contains(&active) {
        eprintln!("registered key {active} with the database");
    }
    let store = opened.store;
    let mut total = 0;
    loop {
        let progress = store.rotate_keys(batch.max(1)).await?;
        total += progress.resealed;
        eprintln!(
            "re-sealed {total} grants with key {active}; {} remaining",
            progress.remaining
        );
        if progress.remaining == 0 || progress.resealed == 0 {
            println!("done: {total} grants re-sealed; every grant is sealed with {active}");
            return Ok(());
        }
    }
}
