//! The process's metrics, served at `GET /metrics` in Prometheus's text format (version 0.0.4)
//! with the `prometheus-client` crate; docs/OBSERVABILITY.md lists every name and label.
//!
//! The hot paths pay an atomic increment or a histogram observation each, nothing more: label
//! sets are small `Copy` structs of `&'static str` and integers (the HTTP route is the matched
//! route template, an `Arc` clone), and the counters of a token read are looked up once, here,
//! rather than per request.
//!
//! Two kinds of number are not counted by this process but read when scraped:
//! - what `api::server` and the proxy already count in atomics (connections open, displaced,
//!   timed out; the proxy's upstream timeouts), through `StateCollector`;
//! - connections by status and jobs by kind and status, which are database-wide. Counting them
//!   is a scan, so the scrape reuses the last count unless it is older than
//!   `gauge_interval` (30 s by default). Two alternatives were weighed: counters kept by the
//!   ledger in a table of its own, updated in every transaction that changes a status, would
//!   make one row the hottest in the database and put a write in rules that other work is
//!   changing; counters kept in this process's memory would be wrong as soon as a second
//!   process, or a restart, shares the database. A count every 30 s per process is a few
//!   tens of milliseconds of one core at a million connections (an index-only scan), on the
//!   blocking pool. Every process reports the same database-wide numbers: aggregate them with
//!   `max`, not `sum`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::MatchedPath;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::store::{StatusCounts, Store};

/// The `Content-Type` of `GET /metrics`.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// How old the database-wide gauges may be before a scrape counts again.
pub const DEFAULT_GAUGE_INTERVAL: Duration = Duration::from_secs(30);

/// Latencies of our own answers: from half a millisecond (a token read) to a minute (a proxied
/// call that waited out its retries).
const HTTP_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];
/// Latencies of calls to Notion and of waits for another process's refresh.
const UPSTREAM_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

fn http_histogram() -> Histogram {
    Histogram::new(HTTP_BUCKETS)
}

fn upstream_histogram() -> Histogram {
    Histogram::new(UPSTREAM_BUCKETS)
}

/// The route template an answer came from (`/v1/connections/{id}`), never the path itself:
/// paths carry ids and, for `/connect/{session}/{state}`, a secret, and would make one series
/// per connection. `None`: no route matched (a 404, or an answer written before routing).
#[derive(Debug, Clone)]
pub struct Route(pub Option<MatchedPath>);

impl Route {
    pub fn as_str(&self) -> &str {
        self.0.as_ref().map_or("unmatched", MatchedPath::as_str)
    }
}

impl PartialEq for Route {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Route {}

impl std::hash::Hash for Route {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl EncodeLabelValue for Route {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct HttpLabels {
    route: Route,
    method: &'static str,
    status: u16,
}

/// A method as a label: the ones HTTP defines for APIs, and `other` for the rest, so that a
/// client cannot create series by inventing methods.
fn method_label(method: &http::Method) -> &'static str {
    match *method {
        http::Method::GET => "GET",
        http::Method::POST => "POST",
        http::Method::PUT => "PUT",
        http::Method::DELETE => "DELETE",
        http::Method::PATCH => "PATCH",
        http::Method::HEAD => "HEAD",
        http::Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ProviderLabels {
    endpoint: &'static str,
    status_class: &'static str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StatusLabels {
    status: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ConnectionStatusLabels {
    status: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct JobLabels {
    kind: String,
    status: String,
}

/// What one call to the coordinator for a refresh came to (docs/OBSERVABILITY.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefreshOutcome {
    /// This process called Notion and a new pair is the connection's current grant.
    Refreshed,
    /// The current refresh token was refused and another unused one saved the connection.
    Rescued,
    /// The caller joined a refresh already in flight in this process.
    Joined,
    /// The grant had already been replaced (by a caller before, or another process): no new
    /// pair was minted for this caller.
    AlreadyRotated,
    /// Notion throttled for longer than the budget; the connection is unchanged.
    Throttled,
    /// Anything else that left the caller without a token; the log line says why.
    Failed,
    /// Notion refused the grant and nothing rescued it: the user must reconnect.
    NeedsReauth,
    /// Refused before any refresh: the token Notion refused was minted moments ago by a
    /// refresh and Notion calls it active (409 `token_rejected_after_refresh`).
    TokenRejectedAfterRefresh,
    /// Refused before any refresh: the connection's cap on refreshes was reached (429
    /// `refresh_rate_limited`).
    RateLimited,
}

impl RefreshOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            RefreshOutcome::Refreshed => "refreshed",
            RefreshOutcome::Rescued => "rescued",
            RefreshOutcome::Joined => "joined",
            RefreshOutcome::AlreadyRotated => "already_rotated",
            RefreshOutcome::Throttled => "throttled",
            RefreshOutcome::Failed => "failed",
            RefreshOutcome::NeedsReauth => "needs_reauth",
            RefreshOutcome::TokenRejectedAfterRefresh => "token_rejected_after_refresh",
            RefreshOutcome::RateLimited => "rate_limited",
        }
    }
}

/// The calls tokenkeeper makes to Notion's OAuth endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderEndpoint {
    /// `POST /v1/oauth/token` with an authorization code.
    TokenExchange,
    /// `POST /v1/oauth/token` with a refresh token.
    TokenRefresh,
    Introspect,
    Revoke,
}

impl ProviderEndpoint {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderEndpoint::TokenExchange => "token_exchange",
            ProviderEndpoint::TokenRefresh => "token_refresh",
            ProviderEndpoint::Introspect => "introspect",
            ProviderEndpoint::Revoke => "revoke",
        }
    }
}

/// Why the proxy sent a request to Notion again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyRetry {
    /// A 401: retried once with the refreshed token.
    Unauthorized,
    /// A 429 or 529, after its `Retry-After`.
    Throttled,
    /// A 5xx on a read.
    ServerError,
    /// No answer head within the first-byte timeout.
    Timeout,
    /// The connection was refused or broke.
    Unreachable,
}

impl ProxyRetry {
    fn as_str(self) -> &'static str {
        match self {
            ProxyRetry::Unauthorized => "unauthorized",
            ProxyRetry::Throttled => "throttled",
            ProxyRetry::ServerError => "server_error",
            ProxyRetry::Timeout => "timeout",
            ProxyRetry::Unreachable => "unreachable",
        }
    }
}

/// What became of a token read (`GET /v1/connections/{id}/access-token`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenRead {
    Served,
    NeedsReauth,
    Revoked,
}

/// The counters of the token read, looked up once: a read pays one atomic increment.
#[derive(Debug)]
struct TokenReads {
    served: Counter,
    needs_reauth: Counter,
    revoked: Counter,
}

/// Every metric of the process. Built once by `app::state`, shared by the API, the refresh
/// coordinator and the provider client.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    http: Family<HttpLabels, Histogram, fn() -> Histogram>,
    token_reads: TokenReads,
    refreshes: Family<OutcomeLabels, Counter>,
    lease_waits: Histogram,
    provider: Family<ProviderLabels, Histogram, fn() -> Histogram>,
    proxy_answers: Family<StatusLabels, Counter>,
    proxy_retries: Family<ReasonLabels, Counter>,
    proxy_holds: Family<OutcomeLabels, Counter>,
    authorizations: Family<OutcomeLabels, Counter>,
    revocations: Counter,
    webhook_deliveries: Family<OutcomeLabels, Counter>,
    api_key_rejections: Family<ReasonLabels, Counter>,
    database_up: Gauge,
    connections: Family<ConnectionStatusLabels, Gauge>,
    jobs: Family<JobLabels, Gauge>,
    gauge_interval: Duration,
    /// The store whose token cache `CacheCollector` reports.
    cache_store: Arc<std::sync::OnceLock<Arc<Store>>>,
    /// When the database-wide gauges were last counted; held while counting, so that
    /// concurrent scrapes count once.
    counted: tokio::sync::Mutex<Counted>,
}

/// The numbers `api::server` and the proxy keep in atomics of their own, read at each scrape.
#[derive(Debug)]
struct StateCollector {
    server: Arc<ServerCounters>,
    proxy_upstream_timeouts: Arc<AtomicU64>,
}

impl Collector for StateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.server;
        let counters: [(&str, &str, u64); 6] = [
            (
                "http_connections_displaced",
                "Idle connections closed to make room for a new one",
                s.displaced.load(Ordering::Relaxed),
            ),
            (
                "http_connections_idle_closed",
                "Connections closed after the idle timeout with nothing moving",
                s.idle_closed.load(Ordering::Relaxed),
            ),
            (
                "http_connections_refused",
                "Connections answered 503 too_many_connections because every slot was busy",
                s.refused.load(Ordering::Relaxed),
            ),
            (
                "http_header_read_timeouts",
                "Connections closed because a request head did not arrive in time",
                s.header_timeouts.load(Ordering::Relaxed),
            ),
            (
                "http_body_read_timeouts",
                "Requests answered 408 because their body did not arrive in time",
                s.body_timeouts.load(Ordering::Relaxed),
            ),
            (
                "proxy_upstream_timeouts",
                "Proxied calls Notion left silent past the first-byte or the idle timeout",
                self.proxy_upstream_timeouts.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, value) in counters {
            let counter = ConstCounter::new(value);
            let metric = encoder.encode_descriptor(name, help, None, counter.metric_type())?;
            counter.encode(metric)?;
        }
        let open = ConstGauge::new(i64::try_from(s.open.load(Ordering::Relaxed)).unwrap_or(0));
        let metric = encoder.encode_descriptor(
            "http_connections_open",
            "Client connections open now",
            None,
            open.metric_type(),
        )?;
        open.encode(metric)
    }
}

/// The token cache's and the change feed's counts, read from the store at each scrape.
#[derive(Debug, Default)]
struct CacheCollector {
    store: Arc<std::sync::OnceLock<Arc<Store>>>,
}

impl Collector for CacheCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(store) = self.store.get() else {
            return Ok(());
        };
        let c = store.cache_counters();
        let lookups = [
            ("hit", c.hits.load(Ordering::Relaxed)),
            ("miss", c.misses.load(Ordering::Relaxed)),
            ("outage", c.outage_hits.load(Ordering::Relaxed)),
        ];
        let mut family = encoder.encode_descriptor(
            "token_cache_lookups",
            "Token reads (and proxied calls) by what the token cache did: hit (answered from a verified entry, no database statement), miss (read from the database), outage (answered from an unverified entry because the database could not be reached)",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (result, n) in lookups {
            let labels = [("result", result)];
            let metric = family.encode_family(&labels)?;
            ConstCounter::new(n).encode(metric)?;
        }
        let counters: [(&str, &str, u64); 2] = [
            (
                "change_feed_resyncs",
                "Times the change feed (re)connected, after which every cached entry is read again before it is served",
                c.feed_resyncs.load(Ordering::Relaxed),
            ),
            (
                "database_statements",
                "Statements this process sent to the database",
                c.statements.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, value) in counters {
            let counter = ConstCounter::new(value);
            let metric = encoder.encode_descriptor(name, help, None, counter.metric_type())?;
            counter.encode(metric)?;
        }
        let gauges: [(&str, &str, i64); 2] = [
            (
                "token_cache_entries",
                "Connections in this process's token cache",
                i64::try_from(store.cached_connections()).unwrap_or(i64::MAX),
            ),
            (
                "change_feed_up",
                "1 while the change feed is connected (the token cache is served), 0 otherwise",
                i64::from(store.feed_is_live()),
            ),
        ];
        for (name, help, value) in gauges {
            let gauge = ConstGauge::new(value);
            let metric = encoder.encode_descriptor(name, help, None, gauge.metric_type())?;
            gauge.encode(metric)?;
        }
        Ok(())
    }
}

impl Metrics {
    /// Reports the store's token cache and change feed from now on.
    pub fn attach_store(&self, store: Arc<Store>) {
        let _ = self.cache_store.set(store);
    }

    /// The metrics, reading `server` and `proxy_upstream_timeouts` at every scrape, and
    /// counting database-wide gauges at most every `gauge_interval`.
    /// Metrics nobody scrapes: for a command (`import`) that runs the coordinator without
    /// serving `/metrics`.
    pub fn detached() -> Metrics {
        Metrics::new(Default::default(), Default::default(), Duration::ZERO)
    }

    pub fn new(
        server: Arc<ServerCounters>,
        proxy_upstream_timeouts: Arc<AtomicU64>,
        gauge_interval: Duration,
    ) -> Metrics {
        let mut registry = Registry::with_prefix("tokenkeeper");
        let http = Family::new_with_constructor(http_histogram as fn() -> Histogram);
        registry.register(
            "http_request_duration_seconds",
            "Answers by route template, method and status, from the request's head to the answer's head (the _count counts requests)",
            http.clone(),
        );
        let token_read_family = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "token_reads",
            "Access-token reads by outcome (served, needs_reauth, revoked)",
            token_read_family.clone(),
        );
        let token_reads = TokenReads {
            served: token_read_family.get_or_create_owned(&OutcomeLabels { outcome: "served" }),
            needs_reauth: token_read_family.get_or_create_owned(&OutcomeLabels {
                outcome: "needs_reauth",
            }),
            revoked: token_read_family.get_or_create_owned(&OutcomeLabels { outcome: "revoked" }),
        };
        let refreshes = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "refreshes",
            "Calls for a refresh by outcome (refreshed, rescued, joined, already_rotated, throttled, failed, needs_reauth)",
            refreshes.clone(),
        );
        let lease_waits = upstream_histogram();
        registry.register(
            "refresh_lease_wait_seconds",
            "Refreshes that found another process holding the connection's refresh lease, by how long they waited for its result (the _count counts waits)",
            lease_waits.clone(),
        );
        let provider = Family::new_with_constructor(upstream_histogram as fn() -> Histogram);
        registry.register(
            "provider_request_duration_seconds",
            "Calls to Notion's OAuth endpoints by endpoint and status class (error: no answer), with their latency",
            provider.clone(),
        );
        let proxy_answers = Family::<StatusLabels, Counter>::default();
        registry.register(
            "proxy_upstream_answers",
            "Answers Notion gave proxied calls, by status, retried attempts included",
            proxy_answers.clone(),
        );
        let proxy_retries = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "proxy_retries",
            "Proxied calls sent to Notion again, by reason",
            proxy_retries.clone(),
        );
        let proxy_holds = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "proxy_throttle_holds",
            "Proxied calls that met a 429 or 529 another call had met (shared by every process), by outcome (waited: held until it passed; refused: answered 429 notion_throttled, the wait not fitting the budget)",
            proxy_holds.clone(),
        );
        let authorizations = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "authorizations",
            "Ends of connect attempts at the callback by outcome (connected, reauthorized, confirmed, denied, error, failed)",
            authorizations.clone(),
        );
        let revocations = Counter::default();
        registry.register(
            "revocations",
            "Connections revoked through the API",
            revocations.clone(),
        );
        let webhook_deliveries = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "webhook_deliveries",
            "Webhook delivery attempts by outcome (delivered; retry: failed and tried again later; failed: given up)",
            webhook_deliveries.clone(),
        );
        let api_key_rejections = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "api_key_rejections",
            "Requests refused for their API key, by reason (missing, unknown)",
            api_key_rejections.clone(),
        );
        let database_up = Gauge::default();
        registry.register(
            "database_up",
            "1 while the database answers, 0 during an outage",
            database_up.clone(),
        );
        let connections = Family::<ConnectionStatusLabels, Gauge>::default();
        registry.register(
            "connections",
            "Connections in the database by status, counted at most every 30 s (database-wide: aggregate with max)",
            connections.clone(),
        );
        let jobs = Family::<JobLabels, Gauge>::default();
        registry.register(
            "jobs",
            "Jobs in the database by kind and status (pending is the outbox's depth), counted at most every 30 s (database-wide: aggregate with max)",
            jobs.clone(),
        );
        let info = prometheus_client::metrics::info::Info::new(vec![(
            "version".to_owned(),
            env!("CARGO_PKG_VERSION").to_owned(),
        )]);
        registry.register("build", "The running version", info);
        registry.register_collector(Box::new(StateCollector {
            server,
            proxy_upstream_timeouts,
        }));
        let cache_store = Arc::new(std::sync::OnceLock::new());
        registry.register_collector(Box::new(CacheCollector {
            store: cache_store.clone(),
        }));
        Metrics {
            registry,
            http,
            token_reads,
            refreshes,
            lease_waits,
            provider,
            proxy_answers,
            proxy_retries,
            proxy_holds,
            authorizations,
            revocations,
            webhook_deliveries,
            api_key_rejections,
            database_up,
            connections,
            jobs,
            gauge_interval,
            cache_store,
            counted: tokio::sync::Mutex::new(Counted::default()),
        }
    }

    /// One answer of the HTTP API, as `api::server` finished it.
    pub fn http_request(
        &self,
        route: Route,
        method: &http::Method,
        status: u16,
        elapsed: Duration,
    ) {
        let labels = HttpLabels {
            route,
            method: method_label(method),
            status,
        };
        self.http
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
    }

    pub fn token_read(&self, outcome: TokenRead) {
        match outcome {
            TokenRead::Served => &self.token_reads.served,
            TokenRead::NeedsReauth => &self.token_reads.needs_reauth,
            TokenRead::Revoked => &self.token_reads.revoked,
        }
        .inc();
    }

    pub fn refresh(&self, outcome: RefreshOutcome) {
        self.refreshes
            .get_or_create(&OutcomeLabels {
                outcome: outcome.as_str(),
            })
            .inc();
    }

    /// A refresh waited `waited` for another process's lease.
    pub fn lease_wait(&self, waited: Duration) {
        self.lease_waits.observe(waited.as_secs_f64());
    }

    /// A call to Notion's OAuth endpoints: `status` is `None` when no answer came.
    pub fn provider_call(
        &self,
        endpoint: ProviderEndpoint,
        status: Option<u16>,
        elapsed: Duration,
    ) {
        let status_class = match status {
            Some(200..=299) => "2xx",
            Some(300..=399) => "3xx",
            Some(400..=499) => "4xx",
            Some(500..=599) => "5xx",
            Some(_) => "other",
            None => "error",
        };
        self.provider
            .get_or_create(&ProviderLabels {
                endpoint: endpoint.as_str(),
                status_class,
            })
            .observe(elapsed.as_secs_f64());
    }

    /// An answer from Notion to a proxied call (each attempt's).
    pub fn proxy_answer(&self, status: u16) {
        self.proxy_answers
            .get_or_create(&StatusLabels { status })
            .inc();
    }

    /// A proxied call met a throttle another call (of any process) learned of: `waited` when
    /// it waited it out, else it was answered 429 `notion_throttled` without calling Notion.
    pub fn proxy_held(&self, waited: bool) {
        self.proxy_holds
            .get_or_create(&OutcomeLabels {
                outcome: if waited { "waited" } else { "refused" },
            })
            .inc();
    }

    pub fn proxy_retry(&self, reason: ProxyRetry) {
        self.proxy_retries
            .get_or_create(&ReasonLabels {
                reason: reason.as_str(),
            })
            .inc();
    }

    /// A connect attempt ended at the callback (`outcome` from docs/OBSERVABILITY.md).
    pub fn authorization(&self, outcome: &'static str) {
        self.authorizations
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    pub fn revocation(&self) {
        self.revocations.inc();
    }

    /// One webhook delivery attempt: `delivered`, `retry` or `failed`.
    pub fn webhook_delivery(&self, outcome: &'static str) {
        self.webhook_deliveries
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    /// A request refused for its API key: `missing` or `unknown`.
    pub fn api_key_rejected(&self, reason: &'static str) {
        self.api_key_rejections
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// The whole text of `GET /metrics`: the database-wide gauges counted again first if they
    /// are older than the interval (a failed count keeps the last one: the scrape still
    /// answers during an outage, and `database_up` says why the gauges stand still).
    pub async fn render(&self, store: &Store) -> String {
        self.database_up.set(i64::from(store.is_up()));
        self.count(store).await;
        let mut text = String::with_capacity(16 * 1024);
        prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }

    async fn count(&self, store: &Store) {
        let mut counted = self.counted.lock().await;
        if counted
            .at
            .is_some_and(|at| at.elapsed() < self.gauge_interval)
        {
            return;
        }
        match store.status_counts().await {
            Ok(counts) => {
                self.set_gauges(&mut counted, &counts);
                counted.at = Some(Instant::now());
            }
            Err(e) => tracing::debug!("the metrics could not count connections and jobs: {e}"),
        }
    }

    fn set_gauges(&self, counted: &mut Counted, counts: &StatusCounts) {
        // Every status is reported, zero included, so that a status that empties goes to zero
        // instead of keeping its last count.
        for status in ["active", "needs_reauth", "revoked"] {
            let n = counts
                .connections
                .iter()
                .find(|(s, _)| s == status)
                .map_or(0, |(_, n)| *n);
            self.connections
                .get_or_create(&ConnectionStatusLabels {
                    status: status.to_owned(),
                })
                .set(n);
        }
        // The same for jobs: every kind and status reported once stays reported, at zero when
        // it empties. Kinds are added by other work (webhooks) without a change here.
        for (kind, status, _) in &counts.jobs {
            counted.jobs_seen.insert((kind.clone(), status.clone()));
        }
        for (kind, status) in &counted.jobs_seen {
            let n = counts
                .jobs
                .iter()
                .find(|(k, s, _)| k == kind && s == status)
                .map_or(0, |(_, _, n)| *n);
            self.jobs
                .get_or_create(&JobLabels {
                    kind: kind.clone(),
                    status: status.clone(),
                })
                .set(n);
        }
    }
}

/// What the last count of the database-wide gauges left behind.
#[derive(Debug)]
struct Counted {
    at: Option<Instant>,
    /// Every `(kind, status)` of jobs reported so far; those of revocations from the start.
    jobs_seen: std::collections::BTreeSet<(String, String)>,
}

impl Default for Counted {
    fn default() -> Self {
        let kind = crate::ledger::JobKind::RevokeToken.as_str();
        Counted {
            at: None,
            jobs_seen: ["pending", "done", "failed"]
                .into_iter()
                .map(|status| (kind.to_owned(), status.to_owned()))
                .collect(),
        }
    }
}

/// What the HTTP server (`api::server`) did about slow, stalled and surplus clients: counted
/// there, exported here.
#[derive(Debug, Default)]
pub struct ServerCounters {
    /// Connections open now.
    pub open: AtomicU64,
    /// Idle connections closed to make room for a new one.
    pub displaced: AtomicU64,
    /// Connections closed because nothing moved on them for the idle timeout.
    pub idle_closed: AtomicU64,
    /// Connections closed by hyper because a request head took too long.
    pub header_timeouts: AtomicU64,
    /// Requests answered 408 because their body took too long.
    pub body_timeouts: AtomicU64,
    /// Connections beyond the cap that found no idle connection to displace, or whose displaced
    /// connection did not make room in time: answered 503 `too_many_connections`.
    pub refused: AtomicU64,
}
