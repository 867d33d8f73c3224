//! The scenarios of issue 6, one module each. Every scenario builds its own stack (a fresh
//! database, a simulator, one or more `serve` processes), measures side by side, stops
//! everything it started and returns its figures.

pub mod connect;
pub mod proxy;
pub mod refresh;
pub mod sim_ceiling;
pub mod staleness;
pub mod stampede;
pub mod throttle;
pub mod token_read;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokenkeeper::seal::KeyRing;

use crate::db::{Backend, Database};
use crate::procs::{Broker, BrokerSpec, Sim};

/// Settings shared by every scenario of one run.
pub struct Ctx {
    /// The release `tokenkeeper` binary.
    pub bin: PathBuf,
    /// Scratch space: SQLite files and process logs.
    pub run_dir: PathBuf,
    pub duration: Duration,
    pub concurrency: usize,
    /// Overrides each scenario's own number of connections.
    pub connections: Option<usize>,
    pub pg_url: Option<String>,
    /// Connections per transaction of the bulk seeder.
    pub seed_batch: usize,
    /// Where earlier results are (`scale` compares with `token-read`'s p99).
    pub results_dir: PathBuf,
    /// More settings for every `serve` (`--serve-env`).
    pub serve_env: Vec<(String, String)>,
}

/// A fresh database, a simulator and what `serve` needs to use them.
pub struct Stack {
    pub db: Database,
    pub sim: Sim,
    pub spec: BrokerSpec,
    pub keys: Arc<KeyRing>,
}

impl Stack {
    pub async fn new(
        ctx: &Ctx,
        backend: Backend,
        scenario: &str,
        sim_flags: &[&str],
    ) -> anyhow::Result<Stack> {
        let db = Database::fresh(backend, scenario, &ctx.run_dir, ctx.pg_url.as_deref()).await?;
        let sim = Sim::start(
            &ctx.bin,
            &ctx.run_dir,
            &format!("{scenario}-{}-sim", backend.name()),
            sim_flags,
        )
        .await?;
        let entry = KeyRing::generate_entry();
        let keys = Arc::new(KeyRing::parse(&entry)?);
        let spec = BrokerSpec {
            bin: ctx.bin.clone(),
            log_dir: ctx.run_dir.clone(),
            database_url: db.url.clone(),
            encryption_key: entry,
            api_key: format!("bench-{}", tokenkeeper::ids::random_token(24)),
            sim_url: sim.url.clone(),
            extra_env: ctx.serve_env.clone(),
        };
        Ok(Stack {
            db,
            sim,
            spec,
            keys,
        })
    }

    pub async fn broker(&self, name: &str) -> anyhow::Result<Broker> {
        Broker::start(&self.spec, name).await
    }

    /// A `serve` with more `TOKENKEEPER_*` settings.
    pub async fn broker_with(
        &self,
        name: &str,
        extra: &[(&str, String)],
    ) -> anyhow::Result<Broker> {
        Broker::start_with(&self.spec, name, extra).await
    }

    /// Stops the simulator and removes the database.
    pub async fn finish(self) -> anyhow::Result<()> {
        self.sim.stop().await?;
        self.db.remove().await
    }
}
