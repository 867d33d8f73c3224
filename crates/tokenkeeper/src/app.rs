//! Putting the parts together: the store (migrated, its key ring checked by `keycheck::open`
//! before anything listens), Notion or the built-in simulator, the refresh coordinator, and the
//! HTTP state. `main` calls `keycheck::open`, then `App::build`; tests build the same `AppState`
//! with their own store and simulator.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::api::{AppState, SharedState};
use crate::clock::Clock;
use crate::config::Config;
use crate::ids::ClientSecret;
use crate::jobs::Jobs;
use crate::journal::Journal;
use crate::keycheck::Opened;
use crate::ledger::LeaseHolder;
use crate::metrics::Metrics;
use crate::provider::notion::{NotionClient, NotionSettings};
use crate::refresh::{Coordinator, CoordinatorSettings};
use crate::store::{Backend, Store};

pub struct App {
    pub state: SharedState,
    /// The built-in simulator, when no Notion credentials were configured. Dropping it stops it.
    pub simulator: Option<notion_sim::SimServer>,
    pub schema_version: i64,
    /// The embedded default's key ring file, when this start created it.
    pub created_key_file: Option<PathBuf>,
    /// The key ids this start registered with the database (a first start, or a database from
    /// before key checks).
    pub registered_keys: Vec<String>,
}

/// What the state needs besides the store and Notion's address.
pub struct StateSettings {
    pub public_url: url::Url,
    pub allowed_return_urls: crate::return_to::AllowedReturnUrls,
    pub api_keys: crate::api_keys::ApiKeys,
    pub session_ttl: Duration,
    pub provider_timeout: Duration,
    pub refresh_budget: Duration,
    pub refresh_rate: crate::refresh::RefreshRate,
    pub notion_version: String,
    /// Mount the benchmarks' baseline route (`--bench-baseline-route`).
    pub bench_baseline_route: bool,
    /// Where to deliver webhooks and how to sign them.
    pub webhooks: Option<crate::webhooks::WebhookSettings>,
    /// The server's deadlines and connection cap.
    pub server: crate::config::ServerLimits,
    /// How long the proxy waits on Notion.
    pub proxy_timeouts: crate::config::ProxyTimeouts,
    /// How old `/metrics`' database-wide gauges may be (`metrics::DEFAULT_GAUGE_INTERVAL`).
    pub metrics_gauge_interval: Duration,
    /// Connections the token cache keeps at most (`TOKENKEEPER_TOKEN_CACHE_SIZE`; 0: off).
    pub token_cache_size: usize,
    /// Whether Notion's 429s and 529s hold every process's proxied calls
    /// (`TOKENKEEPER_PROXY_SHARED_THROTTLE`).
    pub shared_throttle: bool,
}

/// Builds the shared state from its parts.
pub fn state(
    store: Arc<Store>,
    notion: NotionSettings,
    settings: StateSettings,
    clock: Clock,
    simulator: Option<String>,
    journal: Arc<Journal>,
) -> SharedState {
    let server_counters = Arc::new(crate::metrics::ServerCounters::default());
    let proxy_upstream_timeouts = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let metrics = Arc::new(Metrics::new(
        server_counters.clone(),
        proxy_upstream_timeouts.clone(),
        settings.metrics_gauge_interval,
    ));
    metrics.attach_store(store.clone());
    if let Err(e) = store.start_change_feed(settings.token_cache_size) {
        // Without its feed the store reads the database every time: slower, never wrong.
        tracing::error!(
            "the change feed could not start ({e}); every token read goes to the database"
        );
    }
    let client = NotionClient::new(notion, settings.provider_timeout).with_metrics(metrics.clone());
    store.set_webhook_endpoints(
        settings
            .webhooks
            .iter()
            .flat_map(|w| w.endpoints.iter().map(|e| e.to_string()))
            .collect(),
    );
    let jobs = Jobs::new(
        store.clone(),
        client.clone(),
        clock.clone(),
        settings.webhooks.clone(),
        settings.provider_timeout,
        Some(metrics.clone()),
    );
    tokio::spawn(jobs.clone().run_worker());
    let coordinator = Coordinator::new(
        store.clone(),
        client.clone(),
        CoordinatorSettings {
            holder: LeaseHolder::for_this_process(),
            provider_timeout: settings.provider_timeout,
            budget: settings.refresh_budget,
            rate: settings.refresh_rate,
        },
        journal.clone(),
        jobs.clone(),
        metrics.clone(),
    );
    let http = reqwest::Client::builder()
        // The proxy hands Notion's answers back as they are, redirects included.
        .redirect(reqwest::redirect::Policy::none())
        .pool_max_idle_per_host(256)
        .connect_timeout(Duration::from_secs(5))
        .build()
        .expect("a reqwest client builds");
    let state = Arc::new(AppState {
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
        jobs,
        journal,
        server: settings.server,
        proxy_timeouts: settings.proxy_timeouts,
        shared_throttle: settings.shared_throttle,
        proxy_upstream_timeouts,
        server_counters,
        metrics,
        console: Default::default(),
    });
    let links: std::sync::Weak<AppState> = Arc::downgrade(&state);
    state.jobs.attach(links);
    state
}

impl App {
    /// Builds the running state on a store that `keycheck::open` opened for `serve`.
    pub async fn build(config: &Config, opened: Opened) -> anyhow::Result<App> {
        let clock = Clock::System;
        let Opened {
            store,
            schema_version,
            check,
            created_key_file,
        } = opened;
        let registered_keys = check
            .map(|c| c.newly_registered.into_iter().collect())
            .unwrap_or_default();
        let journal = Journal::start(&config.spill_dir, &store).await?;
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
                refresh_rate: config.refresh_rate,
                notion_version: config.notion_version.clone(),
                bench_baseline_route: config.bench_baseline_route,
                webhooks: config.webhooks.clone(),
                server: config.server.clone(),
                proxy_timeouts: config.proxy,
                metrics_gauge_interval: crate::metrics::DEFAULT_GAUGE_INTERVAL,
                token_cache_size: config.token_cache_size,
                shared_throttle: config.proxy_shared_throttle,
            },
            clock,
            simulator.as_ref().map(|s| s.base_url()),
            journal,
        );
        state.console.set_health_check(config.health_check);
        crate::health::spawn(state.health_checker(), config.health_check);
        Ok(App {
            state,
            simulator,
            schema_version,
            created_key_file,
            registered_keys,
        })
    }
}
