//! Putting the parts together: the store (migrated), Notion or the built-in simulator, the
//! refresh coordinator, and the HTTP state. `main` calls `App::build`; tests build the same
//! `AppState` with their own store and simulator.

use std::sync::Arc;
use std::time::Duration;

use crate::api::{AppState, SharedState};
use crate::clock::Clock;
use crate::config::Config;
use crate::ids::ClientSecret;
use crate::ledger::LeaseHolder;
use crate::provider::notion::{NotionClient, NotionSettings};
use crate::refresh::{Coordinator, CoordinatorSettings};
use crate::store::{Backend, Store};

pub struct App {
    pub state: SharedState,
    /// The built-in simulator, when no Notion credentials were configured. Dropping it stops it.
    pub simulator: Option<notion_sim::SimServer>,
    pub schema_version: i64,
}

/// A lease holder name unique to this process: host, process id and a random suffix.
pub fn holder_name() -> LeaseHolder {
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "host".into());
    LeaseHolder(format!(
        "{host}-{}-{}",
        std::process::id(),
        &crate::ids::random_token(6)
    ))
}

/// What the state needs besides the store and Notion's address.
pub struct StateSettings {
    pub public_url: url::Url,
    pub allowed_return_urls: crate::api::return_to::AllowedReturnUrls,
    pub api_keys: crate::api::auth::ApiKeys,
    pub session_ttl: Duration,
    pub provider_timeout: Duration,
    pub refresh_budget: Duration,
    pub notion_version: String,
    /// Mount the benchmarks' baseline route (`--bench-baseline-route`).
    pub bench_baseline_route: bool,
}

/// Builds the shared state from its parts.
pub fn state(
    store: Arc<Store>,
    notion: NotionSettings,
    settings: StateSettings,
    clock: Clock,
    simulator: Option<String>,
) -> SharedState {
    let client = NotionClient::new(notion, settings.provider_timeout);
    let coordinator = Coordinator::new(
        store.clone(),
        client.clone(),
        CoordinatorSettings {
            holder: holder_name(),
            provider_timeout: settings.provider_timeout,
            budget: settings.refresh_budget,
        },
    );
    let http = reqwest::Client::builder()
        // The proxy hands Notion's answers back as they are, redirects included.
        .redirect(reqwest::redirect::Policy::none())
        .pool_max_idle_per_host(256)
        .connect_timeout(Duration::from_secs(5))
        .build()
        .expect("a reqwest client builds");
    Arc::new(AppState {
        store,
        coordinator,
        notion: client,
        api_keys: settings.api_keys,
        public_url: settings.public_url,
        allowed_return_urls: settings.allowed_return_urls,
        session_ttl: settings.session_ttl,
        clock,
        notion_version: settings.notion_version,
        http,
        simulator,
        bench_baseline_route: settings.bench_baseline_route,
    })
}

impl App {
    pub async fn build(config: &Config) -> anyhow::Result<App> {
        let clock = Clock::System;
        let store =
            crate::store::open(&config.database_url, config.keys.clone(), clock.clone()).await?;
        let schema_version = store.migrate().await?;
        // Open the pool's connections now, not inside the first burst of traffic: a refresh
        // stampede right after start would otherwise pay for connection setup in its slowest
        // callers. Pings run concurrently so that each takes its own connection.
        if store.backend() == Backend::Postgres {
            let pings: Vec<_> = (0..16).map(|_| store.ping()).collect();
            for result in futures::future::join_all(pings).await {
                result?;
            }
        }
        let callback = format!(
            "{}/oauth/callback",
            config.public_url.as_str().trim_end_matches('/')
        );
        let (notion, simulator) = match &config.notion {
            Some(n) => (n.clone(), None),
            None => {
                let sim_config = notion_sim::SimConfig {
                    redirect_uris: vec![callback],
                    ..Default::default()
                };
                let sim = notion_sim::SimServer::start(sim_config.clone()).await?;
                let settings = NotionSettings {
                    client_id: sim_config.client_id.clone(),
                    client_secret: ClientSecret::new(sim_config.client_secret.clone()),
                    base_url: url::Url::parse(&sim.base_url())?,
                    version: config.notion_version.clone(),
                };
                (settings, Some(sim))
            }
        };
        let state = state(
            Arc::new(store),
            notion,
            StateSettings {
                public_url: config.public_url.clone(),
                allowed_return_urls: config.allowed_return_urls.clone(),
                api_keys: config.api_keys.clone(),
                session_ttl: config.session_ttl,
                provider_timeout: config.provider_timeout,
                refresh_budget: config.refresh_budget,
                notion_version: config.notion_version.clone(),
                bench_baseline_route: config.bench_baseline_route,
            },
            clock,
            simulator.as_ref().map(|s| s.base_url()),
        );
        Ok(App {
            state,
            simulator,
            schema_version,
        })
    }
}
