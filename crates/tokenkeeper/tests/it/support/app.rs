//! `TestApp`: tokenkeeper on `127.0.0.1:0` against a real store (temp-file SQLite or a fresh
//! PostgreSQL schema) and a real notion-sim on another port; `Api`: the calls a client makes;
//! and `spawn_peer`: another tokenkeeper *process* (the built binary, `support::process`) on the
//! same database, for cross-process claims.

use std::sync::Arc;
use std::time::Duration;

use notion_sim::{SimClock, SimConfig, SimServer};
use serde_json::{json, Value};

use tokenkeeper::api::SharedState;
use tokenkeeper::api_keys::ApiKeys;
use tokenkeeper::app::StateSettings;
use tokenkeeper::clock::Clock;
use tokenkeeper::config::ProxyTimeouts;
use tokenkeeper::config::ServerLimits;
use tokenkeeper::ids::ClientSecret;
use tokenkeeper::provider::notion::NotionSettings;
use tokenkeeper::return_to::AllowedReturnUrls;
use tokenkeeper::seal::KeyRing;

use super::db::{Backend, TestDb};
use super::process::{Broker, BrokerSpec};

pub const ADMIN_KEY: &str = "admin-key-for-tests-0123456789";
pub const TOKENS_KEY: &str = "tokens-key-for-tests-0123456789";

pub struct Options {
    pub sim: SimConfig,
    /// The simulator's clock; `SimClock::manual()` lets a test expire tokens with
    /// `app.sim.clock().advance(…)` instead of sleeping.
    pub sim_clock: SimClock,
    pub provider_timeout: Duration,
    pub refresh_budget: Duration,
    pub refresh_rate: tokenkeeper::refresh::RefreshRate,
    /// Notion's base URL, when a test plays Notion with a server of its own instead of the
    /// simulator (which still runs, unused). `None`: the simulator.
    pub notion_base_url: Option<String>,
    /// `TOKENKEEPER_ALLOWED_RETURN_URLS`, given the app's URL; `None`: `<app url>/`.
    pub allowed_return_urls: Option<fn(&str) -> String>,
    pub session_ttl: Duration,
    /// Where to deliver webhooks and how to sign them.
    pub webhooks: Option<tokenkeeper::webhooks::WebhookSettings>,
    /// The server's deadlines and connection cap.
    pub server: ServerLimits,
    /// How long the proxy waits on Notion.
    pub proxy_timeouts: ProxyTimeouts,
    /// The health check of this app's process; `None`: off.
    pub health_check: Option<tokenkeeper::config::HealthSettings>,
    /// `TOKENKEEPER_TOKEN_CACHE_SIZE` of this app's process (0: no token cache).
    pub token_cache_size: usize,
    /// `TOKENKEEPER_PROXY_SHARED_THROTTLE` of this app's process.
    pub shared_throttle: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            sim: SimConfig {
                auto_approve: true,
                rate_limit_per_connection: 0,
                ..SimConfig::default()
            },
            sim_clock: SimClock::system(),
            provider_timeout: Duration::from_secs(5),
            refresh_budget: Duration::from_secs(20),
            refresh_rate: Default::default(),
            notion_base_url: None,
            allowed_return_urls: None,
            webhooks: None,
            session_ttl: Duration::from_secs(600),
            server: ServerLimits::default(),
            proxy_timeouts: ProxyTimeouts::default(),
            health_check: None,
            token_cache_size: tokenkeeper::store::cache::DEFAULT_CAPACITY,
            shared_throttle: true,
        }
    }
}

/// Our HTTP API and the simulator's, as a client sees them: the calls tests make, for a
/// tokenkeeper in this process (`TestApp`) or in another (`support::process::Broker`).
pub struct Api {
    pub url: String,
    pub sim_url: String,
    /// A client that does not follow redirects, so tests see each hop.
    pub http: reqwest::Client,
}

pub struct TestApp {
    api: Api,
    pub sim: SimServer,
    pub db: TestDb,
    pub key_ring: String,
    pub state: SharedState,
    /// The spill journal's directory (removed with the app).
    pub spill: tempfile::TempDir,
    options: Options,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    health: Option<tokio::task::JoinHandle<()>>,
}

impl Api {
    pub fn new(url: String, sim_url: String) -> Api {
        Api {
            url,
            sim_url,
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .pool_max_idle_per_host(600)
                .build()
                .unwrap(),
        }
    }

    /// A request to our API with the admin key.
    pub fn api(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(ADMIN_KEY)
    }

    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let r = self.api(reqwest::Method::GET, path).send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn post_json(&self, path: &str, body: Value) -> (u16, Value) {
        let r = self
            .api(reqwest::Method::POST, path)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// A connect session for `end_user`, returning to our own `/done`.
    pub async fn connect_link(&self, end_user: &str) -> String {
        let (status, body) = self
            .post_json(
                "/v1/connect-sessions",
                json!({"provider": "notion", "end_user_id": end_user, "return_to": format!("{}/done", self.url)}),
            )
            .await;
        assert_eq!(status, 201, "connect session: {body}");
        body["url"].as_str().unwrap().to_owned()
    }

    /// Follows a connect link through the (auto-approving) simulator and the callback, in a
    /// fresh browser.
    pub async fn follow(&self, link: &str) -> Landing {
        self.follow_in(&Browser::new(), link).await
    }

    /// Follows a connect link in `browser`, which keeps the connect attempt's cookie.
    pub async fn follow_in(&self, browser: &Browser, link: &str) -> Landing {
        let to_sim = browser.redirect(link).await;
        assert!(
            to_sim.starts_with(&self.sim_url),
            "link goes to Notion: {to_sim}"
        );
        let to_callback = browser.redirect(&to_sim).await;
        assert!(
            to_callback.starts_with(&format!("{}/oauth/callback", self.url)),
            "{to_callback}"
        );
        Landing::of(&browser.redirect(&to_callback).await)
    }

    /// Connects (or re-authorizes) `end_user` end to end; returns the connection id and status.
    pub async fn connect(&self, end_user: &str) -> (String, String) {
        let link = self.connect_link(end_user).await;
        let landing = self.follow(&link).await;
        (
            landing.connection_id.expect("a connection id"),
            landing.status,
        )
    }

    pub async fn reconnect(&self, id: &str) -> Landing {
        let (status, body) = self
            .post_json(
                &format!("/v1/connections/{id}/reconnect-sessions"),
                json!({}),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        self.follow(body["url"].as_str().unwrap()).await
    }

    pub async fn connection(&self, id: &str) -> Value {
        let (status, body) = self.get_json(&format!("/v1/connections/{id}")).await;
        assert_eq!(status, 200, "{body}");
        body
    }

    /// The id of the connection's current grant.
    pub async fn current_grant(&self, id: &str) -> String {
        self.connection(id).await["grant_id"]
            .as_str()
            .expect("the connection has a current grant")
            .to_owned()
    }

    pub async fn grants(&self, id: &str) -> Vec<Value> {
        let (status, body) = self.get_json(&format!("/v1/connections/{id}/grants")).await;
        assert_eq!(status, 200, "{body}");
        body["data"].as_array().unwrap().clone()
    }

    pub async fn event_kinds(&self, id: &str) -> Vec<String> {
        let (status, body) = self.get_json(&format!("/v1/connections/{id}/events")).await;
        assert_eq!(status, 200, "{body}");
        body["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["kind"].as_str().unwrap().to_owned())
            .collect()
    }

    pub async fn refresh(&self, id: &str, if_grant: &str) -> (u16, Value) {
        self.post_json(
            &format!("/v1/connections/{id}/refresh"),
            json!({"if_grant": if_grant}),
        )
        .await
    }

    pub async fn sim_json(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Value {
        let mut r = self.http.request(method, format!("{}{path}", self.sim_url));
        if let Some(b) = body {
            r = r.json(&b);
        }
        let r = r.send().await.unwrap();
        assert!(r.status().is_success(), "sim {path}: {}", r.status());
        r.json().await.unwrap_or(Value::Null)
    }

    /// How many refresh-grant token requests reached the simulator.
    pub async fn sim_refreshes(&self) -> u64 {
        let stats = self
            .sim_json(reqwest::Method::GET, "/_sim/stats", None)
            .await;
        stats["token_requests"]["total"]["refresh_token"]
            .as_u64()
            .unwrap_or(0)
    }

    pub async fn sim_fault(&self, fault: Value) {
        self.sim_json(reqwest::Method::POST, "/_sim/faults", Some(fault))
            .await;
    }
}

impl std::ops::Deref for TestApp {
    type Target = Api;

    fn deref(&self) -> &Api {
        &self.api
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(health) = self.health.take() {
            health.abort();
        }
    }
}

/// Where a connect flow ended: the `return_to` redirect's query.
#[derive(Debug, Clone)]
pub struct Landing {
    pub connection_id: Option<String>,
    pub status: String,
    /// The whole URL the browser was sent to.
    pub url: url::Url,
}

impl Landing {
    pub fn of(location: &str) -> Landing {
        let url = url::Url::parse(location).expect("the landing is an absolute URL");
        let get = |k: &str| {
            url.query_pairs()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.into_owned())
        };
        Landing {
            connection_id: get("connection_id"),
            status: get("status").unwrap_or_default(),
            url: url.clone(),
        }
    }

    /// A query parameter of the landing URL.
    pub fn param(&self, name: &str) -> Option<String> {
        self.url
            .query_pairs()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    }
}

/// A user's browser: keeps cookies (the connect attempt's) and does not follow redirects, so
/// tests see each hop.
#[derive(Clone)]
pub struct Browser {
    pub client: reqwest::Client,
}

impl Default for Browser {
    fn default() -> Self {
        Browser::new()
    }
}

impl Browser {
    pub fn new() -> Browser {
        Browser {
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .cookie_store(true)
                .build()
                .unwrap(),
        }
    }

    pub async fn get(&self, url: &str) -> reqwest::Response {
        self.client.get(url).send().await.unwrap()
    }

    /// GETs `url` and returns the redirect's target, failing on anything else.
    pub async fn redirect(&self, url: &str) -> String {
        let r = self.get(url).await;
        assert!(
            r.status().is_redirection(),
            "expected a redirect from {url}, got {}: {}",
            r.status(),
            r.text().await.unwrap_or_default()
        );
        r.headers()["location"].to_str().unwrap().to_owned()
    }
}

impl TestApp {
    pub async fn start(backend: Backend) -> TestApp {
        TestApp::with(backend, Options::default()).await
    }

    pub async fn with(backend: Backend, options: Options) -> TestApp {
        let key_ring = KeyRing::generate_entry();
        let keys = Arc::new(KeyRing::parse(&key_ring).unwrap());
        let db = TestDb::new(backend, keys, Clock::System).await;
        db.store.migrate().await.expect("migrations apply");
        let sim = SimServer::start_with_clock(options.sim.clone(), options.sim_clock.clone())
            .await
            .expect("the simulator starts");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let sim_config = options.sim.clone();
        let spill = tempfile::tempdir().expect("a temp dir for the spill journal");
        let journal = tokenkeeper::journal::Journal::start(spill.path(), &db.store)
            .await
            .expect("the spill journal opens");
        let state = tokenkeeper::app::state(
            db.store.clone(),
            NotionSettings {
                client_id: sim_config.client_id.clone(),
                client_secret: ClientSecret::new(sim_config.client_secret.clone()),
                base_url: url::Url::parse(
                    options
                        .notion_base_url
                        .as_deref()
                        .unwrap_or(&sim.base_url()),
                )
                .unwrap(),
                version: "2026-03-11".into(),
            },
            StateSettings {
                public_url: url::Url::parse(&url).unwrap(),
                allowed_return_urls: AllowedReturnUrls::parse(
                    &options
                        .allowed_return_urls
                        .map_or_else(|| format!("{url}/"), |list| list(&url)),
                )
                .unwrap(),
                api_keys: ApiKeys::parse(&format!("admin:{ADMIN_KEY},tokens:{TOKENS_KEY}"))
                    .unwrap(),
                session_ttl: options.session_ttl,
                provider_timeout: options.provider_timeout,
                refresh_budget: options.refresh_budget,
                refresh_rate: options.refresh_rate,
                notion_version: "2026-03-11".into(),
                bench_baseline_route: false,
                webhooks: options.webhooks.clone(),
                server: options.server.clone(),
                proxy_timeouts: options.proxy_timeouts,
                // Tests read the gauges right after the flow that moved them.
                metrics_gauge_interval: Duration::ZERO,
                token_cache_size: options.token_cache_size,
                shared_throttle: options.shared_throttle,
            },
            Clock::System,
            None,
            journal,
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = state.clone();
        tokio::spawn(async move {
            let _ = tokenkeeper::api::serve(listener, served, async move {
                let _ = stopped.await;
            })
            .await;
        });
        let health = options
            .health_check
            .and_then(|settings| tokenkeeper::health::spawn(state.health_checker(), settings));
        TestApp {
            health,
            api: Api::new(url, sim.base_url()),
            sim,
            db,
            key_ring,
            state,
            spill,
            options,
            stop: Some(stop),
        }
    }

    /// Starts another tokenkeeper process on the same database and simulator.
    pub async fn spawn_peer(&self, extra_env: &[(&str, &str)]) -> Broker {
        let mut spec = self.broker_spec();
        spec.env.extend(
            extra_env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        spec.start().await
    }

    /// Revokes `token` at Notion (the simulator), as the app's client would.
    pub async fn revoke_at_notion(&self, token: &Value) {
        let config = self.sim.config();
        let r = self
            .http
            .post(format!("{}/v1/oauth/revoke", self.sim.base_url()))
            .basic_auth(&config.client_id, Some(&config.client_secret))
            .json(&json!({ "token": token }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "Notion revoked the token");
    }

    /// What a tokenkeeper process on this app's database and simulator is started with.
    pub fn broker_spec(&self) -> BrokerSpec {
        BrokerSpec {
            database_url: self.db.url.clone(),
            key_ring: self.key_ring.clone(),
            sim_url: self.sim.base_url(),
            client_id: self.options.sim.client_id.clone(),
            client_secret: self.options.sim.client_secret.clone(),
            public_url: Some(self.url.clone()),
            spill_dir: self.spill.path().to_path_buf(),
            provider_timeout: self.options.provider_timeout,
            refresh_budget: self.options.refresh_budget,
            env: Vec::new(),
            capture_output: false,
        }
    }

    /// Starts another tokenkeeper process, keeping everything it writes (`Broker::output`).
    pub async fn spawn_logged_peer(&self, extra_env: &[(&str, &str)]) -> Broker {
        let mut spec = self.broker_spec();
        spec.capture_output = true;
        spec.env.extend(
            extra_env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        spec.start().await
    }
}

/// For each `async fn name(Backend)` in scope, defines `name::sqlite` and `name::postgres`
/// tests: one case, both backends.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),+ $(,)?) => { $(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn sqlite() {
                super::$name($crate::support::db::Backend::Sqlite).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn postgres() {
                super::$name($crate::support::db::Backend::Postgres).await
            }
        }
    )+ };
}

/// `tokenkeeper_<name>{labels}` of a process's `/metrics` (0 when absent).
pub async fn metric(api: &Api, series: &str) -> f64 {
    let text = api
        .api(reqwest::Method::GET, "/metrics")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|line| {
            line.strip_prefix(&format!("tokenkeeper_{series} "))
                .map(|v| v.trim().parse::<f64>().unwrap())
        })
        .unwrap_or(0.0)
}
