//! Configuration: flags and `TOKENKEEPER_*` variables, parsed and validated once at start.
//!
//! `clap` reads the raw values (`--help` is the reference); `Config::resolve` turns them into
//! checked values or one `ConfigError` that names the setting. `main` prints that line and exits
//! with status 2 before anything listens.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::api_keys::{ApiKey, ApiKeys};
pub use crate::clock::parse_duration;
use crate::ids::ClientSecret;
use crate::provider::notion::NotionSettings;
use crate::return_to::AllowedReturnUrls;
use crate::seal::KeyRing;
use crate::store::DatabaseUrl;

/// A setting that could not be used, and why.
#[derive(Debug, thiserror::Error)]
#[error("{setting}: {message}")]
pub struct ConfigError {
    /// The environment variable and flag, e.g. `TOKENKEEPER_DATABASE_URL (--database-url)`.
    pub setting: String,
    pub message: String,
}

impl ConfigError {
    pub(crate) fn new(var: &str, message: impl Into<String>) -> Self {
        let flag = var
            .trim_start_matches("TOKENKEEPER_")
            .to_ascii_lowercase()
            .replace('_', "-");
        ConfigError {
            setting: format!("{var} (--{flag})"),
            message: message.into(),
        }
    }
}

/// Where the data lives and how it is sealed: shared by `serve`, `migrate` and `keys rotate`.
#[derive(Debug, Clone, clap::Args)]
pub struct StoreArgs {
    /// Database: `sqlite://<file>` (embedded default) or `postgres://user@host/db` for several
    /// tokenkeeper processes sharing one database.
    #[arg(
        long,
        env = "TOKENKEEPER_DATABASE_URL",
        default_value = "sqlite://tokenkeeper.db"
    )]
    pub database_url: String,

    /// The key ring that seals tokens at rest: `<key id>:<base64 of 32 bytes>` entries separated
    /// by commas, the first one active. Make one with `tokenkeeper keys generate`.
    #[arg(long, env = "TOKENKEEPER_ENCRYPTION_KEY", hide_env_values = true)]
    pub encryption_key: Option<String>,

    /// A file holding the key ring, one entry per line, the first active. With SQLite and no key
    /// configured, `serve` creates `<database file>.key` (mode 0600) on the first start of a
    /// database that holds nothing sealed, and refuses to start if it is lost afterwards.
    #[arg(
        long,
        env = "TOKENKEEPER_ENCRYPTION_KEY_FILE",
        conflicts_with = "encryption_key"
    )]
    pub encryption_key_file: Option<PathBuf>,
}

/// How every command logs (a global flag, so `tokenkeeper serve --log-format json` and
/// `tokenkeeper --log-format json migrate` both work). `TOKENKEEPER_LOG`, the filter, is read by
/// `logging` from the environment only.
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// The log's format on standard error: `text` (colours only on a terminal) or `json` (one
    /// object per line, with the stable field names of docs/OBSERVABILITY.md).
    #[arg(
        long,
        env = "TOKENKEEPER_LOG_FORMAT",
        default_value = "text",
        global = true
    )]
    pub log_format: String,
}

impl LogArgs {
    /// The format, or the one-line error `main` stops with (exit status 2).
    pub fn format(&self) -> Result<crate::logging::LogFormat, ConfigError> {
        crate::logging::LogFormat::parse(&self.log_format)
            .map_err(|e| ConfigError::new("TOKENKEEPER_LOG_FORMAT", e))
    }
}

/// Which Notion tokenkeeper talks to: `serve`'s, and `audit`/`import --verify`'s.
#[derive(Debug, Clone, clap::Args)]
pub struct NotionArgs {
    /// The Notion public connection's OAuth client id. Without it (and the secret), `serve`
    /// starts a built-in Notion simulator and uses it instead of Notion; `--verify` needs both.
    #[arg(long, env = "TOKENKEEPER_NOTION_CLIENT_ID")]
    pub notion_client_id: Option<String>,

    /// The Notion public connection's OAuth client secret.
    #[arg(long, env = "TOKENKEEPER_NOTION_CLIENT_SECRET", hide_env_values = true)]
    pub notion_client_secret: Option<String>,

    /// Notion's API base URL (point it at a notion-sim in tests).
    #[arg(
        long,
        env = "TOKENKEEPER_NOTION_BASE_URL",
        default_value = "https://api.notion.com"
    )]
    pub notion_base_url: String,

    /// The `Notion-Version` sent on token calls, and on proxied calls whose caller sent none.
    #[arg(long, env = "TOKENKEEPER_NOTION_VERSION", default_value = "2026-03-11")]
    pub notion_version: String,
}

impl NotionArgs {
    /// The Notion registration these name; `None` when neither the client id nor the secret
    /// is set (the built-in simulator). Only one of them, or a base URL that is not http(s),
    /// is a `ConfigError`.
    pub fn settings(&self) -> Result<Option<NotionSettings>, ConfigError> {
        let base_url = parse_http_url(&self.notion_base_url, "TOKENKEEPER_NOTION_BASE_URL")?;
        match (&self.notion_client_id, &self.notion_client_secret) {
            (Some(id), Some(secret)) if !id.is_empty() && !secret.is_empty() => {
                Ok(Some(NotionSettings {
                    client_id: id.clone(),
                    client_secret: ClientSecret::new(secret.clone()),
                    base_url,
                    version: self.notion_version.clone(),
                }))
            }
            (None, None) => Ok(None),
            (Some(_), _) => Err(ConfigError::new(
                "TOKENKEEPER_NOTION_CLIENT_SECRET",
                "missing: set both the client id and the client secret, or neither to use the built-in simulator",
            )),
            (None, Some(_)) => Err(ConfigError::new(
                "TOKENKEEPER_NOTION_CLIENT_ID",
                "missing: set both the client id and the client secret, or neither to use the built-in simulator",
            )),
        }
    }
}

/// The settings of `tokenkeeper serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub store: StoreArgs,

    /// Address to listen on.
    #[arg(long, env = "TOKENKEEPER_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: String,

    /// Base URL under which users' browsers reach tokenkeeper; Notion redirects back to
    /// `<public url>/oauth/callback`. Default: `http://<listen address>`.
    #[arg(long, env = "TOKENKEEPER_PUBLIC_URL")]
    pub public_url: Option<String>,

    /// API keys, comma-separated, each optionally prefixed by its scope: `tokens:<key>` may read
    /// access tokens, `admin:<key>` (or no prefix) may do everything. Keys are at least 16
    /// characters. With SQLite and no key configured, `serve` creates `<database file>.api-key`.
    #[arg(long, env = "TOKENKEEPER_API_KEYS", hide_env_values = true)]
    pub api_keys: Option<String>,

    /// A file holding API keys, one per line, in the same form as --api-keys.
    #[arg(long, env = "TOKENKEEPER_API_KEYS_FILE", conflicts_with = "api_keys")]
    pub api_keys_file: Option<PathBuf>,

    /// Comma-separated URL prefixes that a connect session's `return_to` must lie under: the
    /// same scheme, host and port, and a path under the prefix's path at a segment boundary.
    /// Each is an http(s) URL without user name, query, fragment or dot segments.
    /// Default: tokenkeeper's own public URL.
    #[arg(long, env = "TOKENKEEPER_ALLOWED_RETURN_URLS")]
    pub allowed_return_urls: Option<String>,

    #[command(flatten)]
    pub notion: NotionArgs,

    /// How long a connect link and its `state` stay valid.
    #[arg(long, env = "TOKENKEEPER_SESSION_TTL", default_value = "10m")]
    pub session_ttl: String,

    /// Timeout of one call to the provider's token endpoint. The refresh lease is always longer.
    #[arg(long, env = "TOKENKEEPER_PROVIDER_TIMEOUT", default_value = "10s")]
    pub provider_timeout: String,

    /// Total time a caller may wait for a refresh (its own, or another process's), including
    /// retries of transient provider failures.
    #[arg(long, env = "TOKENKEEPER_REFRESH_BUDGET", default_value = "30s")]
    pub refresh_budget: String,

    /// How long a client may take to send a request's head (request line and headers), counted
    /// from when tokenkeeper starts waiting for it: when the connection opens, or when the
    /// previous answer on it ends. A connection without a whole head by then is closed.
    #[arg(long, env = "TOKENKEEPER_HEADER_READ_TIMEOUT", default_value = "10s")]
    pub header_read_timeout: String,

    /// How long a request's body may take to arrive in full, counted from the end of its head.
    /// A body still incomplete then is answered 408 `request_timeout` and the connection closed.
    #[arg(long, env = "TOKENKEEPER_BODY_READ_TIMEOUT", default_value = "30s")]
    pub body_read_timeout: String,

    /// How long a connection may stay open with no request in progress and nothing arriving;
    /// then it is closed. At most the header read timeout, which also ends such a connection.
    #[arg(long, env = "TOKENKEEPER_IDLE_TIMEOUT", default_value = "5s")]
    pub idle_timeout: String,

    /// The most connections served at once. A new connection beyond it first displaces the
    /// connection that has been idle longest; when every one is busy with a request, it is
    /// answered 503 `too_many_connections` with `Retry-After` and closed.
    #[arg(long, env = "TOKENKEEPER_MAX_CONNECTIONS", default_value = "4096")]
    pub max_connections: String,

    /// How long the proxy waits for the head of Notion's answer, counted from sending the
    /// request; then it answers 504 `upstream_timeout` (retried first for GET, HEAD and DELETE).
    #[arg(
        long,
        env = "TOKENKEEPER_PROXY_FIRST_BYTE_TIMEOUT",
        default_value = "30s"
    )]
    pub proxy_first_byte_timeout: String,

    /// How long the proxy waits for more of the body of Notion's answer while passing it on;
    /// then the answer is cut off (the caller sees a truncated body).
    #[arg(long, env = "TOKENKEEPER_PROXY_IDLE_TIMEOUT", default_value = "30s")]
    pub proxy_idle_timeout: String,

    /// Endpoints that receive events (webhooks: `connection.created`, `.reauthorized`,
    /// `.needs_reauth`, `.recovered`, `.revoked`), comma-separated; https URLs (http only to
    /// loopback). Every process sharing a database should name the same endpoints.
    #[arg(long, env = "TOKENKEEPER_WEBHOOK_URLS")]
    pub webhook_urls: Option<String>,

    /// The Standard Webhooks signing secret, `whsec_<base64>`. Required with webhook URLs,
    /// except with SQLite, where `serve` creates `<database file>.webhook-secret` (mode 0600).
    #[arg(long, env = "TOKENKEEPER_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<String>,

    /// A file holding the webhook signing secret.
    #[arg(
        long,
        env = "TOKENKEEPER_WEBHOOK_SECRET_FILE",
        conflicts_with = "webhook_secret"
    )]
    pub webhook_secret_file: Option<PathBuf>,

    /// How long one webhook delivery attempt may take; no answer by then is a failed attempt,
    /// retried later with backoff (for three days).
    #[arg(long, env = "TOKENKEEPER_WEBHOOK_TIMEOUT", default_value = "15s")]
    pub webhook_timeout: String,

    /// The most refreshes of one connection in a window, whatever callers ask (`<count>/<window>`,
    /// e.g. `10/10m`): a provider that refuses even fresh tokens cannot make tokenkeeper mint
    /// pairs without end. Counted across processes; beyond it refreshes answer 429.
    #[arg(long, env = "TOKENKEEPER_REFRESH_RATE", default_value = "10/10m")]
    pub refresh_rate: String,

    /// Where a refreshed pair waits, fsynced and sealed, when the database cannot take it (an
    /// outage); it is committed as soon as the database answers again, or at the next start.
    /// Must be on durable local disk. Default: `<database file>.spill` with SQLite,
    /// `tokenkeeper-spill` in the working directory with PostgreSQL.
    #[arg(long, env = "TOKENKEEPER_SPILL_DIR")]
    pub spill_dir: Option<PathBuf>,

    /// How often each active connection's current access token is introspected at Notion, so
    /// that a dead connection is found (and refreshed, or marked needs_reauth) before the app
    /// meets it. The checks are spread evenly over the interval, one process at a time.
    /// `0` turns them off.
    #[arg(long, env = "TOKENKEEPER_HEALTH_CHECK_INTERVAL", default_value = "24h")]
    pub health_check_interval: String,

    /// The most health checks, across every process, as `<count>/<window>` (`2/s`, `60/1m`).
    /// Notion's documented average is about 3 requests a second per integration; with more
    /// active connections than the interval allows at this rate, each is checked less often.
    #[arg(long, env = "TOKENKEEPER_HEALTH_CHECK_RATE", default_value = "2/s")]
    pub health_check_rate: String,

    /// The most connections whose current grant this process keeps in memory (sealed as at
    /// rest), so that a token read touches no database; other processes' changes reach it
    /// through the change feed. About 400 bytes each. `0` turns the cache off.
    #[arg(long, env = "TOKENKEEPER_TOKEN_CACHE_SIZE", default_value = "100000")]
    pub token_cache_size: String,

    /// Whether a 429 or 529 from Notion holds every process's proxied calls of that connection
    /// (or workspace) until its `Retry-After` passes, instead of letting each call meet its own
    /// 429. `false` only to measure what it saves.
    #[arg(
        long,
        env = "TOKENKEEPER_PROXY_SHARED_THROTTLE",
        default_value = "true",
        action = clap::ArgAction::Set
    )]
    pub proxy_shared_throttle: bool,

    /// Mounts `GET /v1/_baseline`, a constant answer behind the API-key check, which the
    /// benchmarks compare token reads with. Not for production.
    #[arg(long, env = "TOKENKEEPER_BENCH_BASELINE_ROUTE", hide = true)]
    pub bench_baseline_route: bool,
}

/// Parses `<count>/<window>`, e.g. `10/10m`.
pub fn parse_refresh_rate(s: &str) -> Result<crate::refresh::RefreshRate, String> {
    let bad = || format!("{s:?} is not a rate like 10/10m (refreshes per window)");
    let (count, window) = s.split_once('/').ok_or_else(bad)?;
    let limit: u32 = count.trim().parse().map_err(|_| bad())?;
    let window = parse_duration(window).map_err(|_| bad())?;
    if limit == 0 || window.is_zero() {
        return Err(format!(
            "{s:?}: both the count and the window must be above zero"
        ));
    }
    Ok(crate::refresh::RefreshRate { limit, window })
}

/// A duration setting, or a `ConfigError` naming it.
fn any_duration(var: &str, raw: &str) -> Result<Duration, ConfigError> {
    parse_duration(raw).map_err(|m| ConfigError::new(var, m))
}

/// A duration setting that must be above zero: a zero deadline would end every wait at once.
fn duration_setting(var: &str, raw: &str) -> Result<Duration, ConfigError> {
    let d = any_duration(var, raw)?;
    if d.is_zero() {
        return Err(ConfigError::new(var, "must be above zero"));
    }
    Ok(d)
}

/// The validated configuration of `serve`.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub public_url: url::Url,
    pub database_url: DatabaseUrl,
    /// A key ring, or the embedded default's file to create on a first start; never
    /// `Unconfigured`.
    pub keys: KeySource,
    pub api_keys: ApiKeys,
    pub created_api_key_file: Option<PathBuf>,
    /// Where to deliver webhooks and how to sign them; `None` without webhook URLs.
    pub webhooks: Option<crate::webhooks::WebhookSettings>,
    /// Set when this start created the embedded default's webhook secret file.
    pub created_webhook_secret_file: Option<PathBuf>,
    pub allowed_return_urls: AllowedReturnUrls,
    /// `None` means: no Notion credentials; `serve` starts the built-in simulator and fills this in.
    pub notion: Option<NotionSettings>,
    pub notion_version: String,
    pub session_ttl: Duration,
    pub provider_timeout: Duration,
    pub refresh_budget: Duration,
    pub refresh_rate: crate::refresh::RefreshRate,
    pub spill_dir: PathBuf,
    /// Deadlines and the connection cap of the HTTP server.
    pub server: ServerLimits,
    /// Deadlines of the proxy's calls to Notion.
    pub proxy: ProxyTimeouts,
    pub bench_baseline_route: bool,
    /// Connections the token cache keeps at most (0: off).
    pub token_cache_size: usize,
    /// Whether Notion's 429s and 529s hold every process's proxied calls.
    pub proxy_shared_throttle: bool,
    /// The health check (`interval` zero: off).
    pub health_check: HealthSettings,
}

/// Where the key ring comes from. Whether a start may use it is decided with the database in
/// view (`keycheck`), not here.
#[derive(Debug, Clone)]
pub enum KeySource {
    /// A key ring from a setting, or the embedded default's existing `<database file>.key`.
    Ring {
        keys: Arc<KeyRing>,
        /// The variable that errors about this ring name.
        setting: &'static str,
        /// The file the ring was read from, if any.
        file: Option<PathBuf>,
    },
    /// SQLite with no key configured and no `<database file>.key`: the embedded default. A
    /// first start creates the file, but only on a database that holds nothing sealed; a lost
    /// file is never silently replaced by a new key ring.
    EmbeddedDefault { file: PathBuf },
    /// PostgreSQL with no key configured.
    Unconfigured,
}

impl StoreArgs {
    pub fn database_url(&self) -> Result<DatabaseUrl, ConfigError> {
        DatabaseUrl::parse(&self.database_url)
            .map_err(|m| ConfigError::new("TOKENKEEPER_DATABASE_URL", m))
    }

    /// Loads the key ring from the settings, or from `<database>.key` with SQLite when none is
    /// configured. Creates nothing.
    pub fn key_source(&self) -> Result<KeySource, ConfigError> {
        if let Some(text) = &self.encryption_key {
            let ring = KeyRing::parse(text)
                .map_err(|e| ConfigError::new("TOKENKEEPER_ENCRYPTION_KEY", e.to_string()))?;
            return Ok(KeySource::Ring {
                keys: Arc::new(ring),
                setting: "TOKENKEEPER_ENCRYPTION_KEY",
                file: None,
            });
        }
        const FILE_VAR: &str = "TOKENKEEPER_ENCRYPTION_KEY_FILE";
        if let Some(path) = &self.encryption_key_file {
            return Ok(KeySource::Ring {
                keys: Arc::new(read_key_file(path, FILE_VAR)?),
                setting: FILE_VAR,
                file: Some(path.clone()),
            });
        }
        match self.database_url()? {
            DatabaseUrl::Sqlite(db) => {
                let path = sibling(&db, "key");
                if path.exists() {
                    return Ok(KeySource::Ring {
                        keys: Arc::new(read_key_file(&path, FILE_VAR)?),
                        setting: FILE_VAR,
                        file: Some(path),
                    });
                }
                Ok(KeySource::EmbeddedDefault { file: path })
            }
            DatabaseUrl::Postgres(_) => Ok(KeySource::Unconfigured),
        }
    }
}

/// Creates the embedded default's key ring file holding `entry` (mode 0600); fails if it exists.
pub(crate) fn create_key_ring_file(path: &Path, entry: &str) -> Result<(), ConfigError> {
    write_private(path, &format!("{entry}\n")).map_err(|e| {
        ConfigError::new(
            "TOKENKEEPER_ENCRYPTION_KEY_FILE",
            format!("could not create {}: {e}", path.display()),
        )
    })
}

/// The error of a command that needs a key ring and has none.
pub(crate) fn no_key_ring(source: &KeySource) -> ConfigError {
    let message = match source {
        KeySource::EmbeddedDefault { file } => {
            format!("no key configured and {} does not exist", file.display())
        }
        _ => "required with PostgreSQL (make one with `tokenkeeper keys generate`); tokens are \
              never stored in plaintext"
            .to_owned(),
    };
    ConfigError::new("TOKENKEEPER_ENCRYPTION_KEY", message)
}

fn read_key_file(path: &Path, var: &str) -> Result<KeyRing, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new(var, format!("cannot read {}: {e}", path.display())))?;
    KeyRing::parse(&text).map_err(|e| ConfigError::new(var, format!("{}: {e}", path.display())))
}

/// `<file>.<suffix>` beside a database file.
fn sibling(db: &Path, suffix: &str) -> PathBuf {
    let mut name = db.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(format!(".{suffix}"));
    db.with_file_name(name)
}

/// Creates a file readable by its owner only; fails if it exists.
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    file.write_all(contents.as_bytes())?;
    file.sync_all()
}

impl Config {
    /// Validates everything `serve` needs. May create the embedded default's API key file; the
    /// key ring file is created later, if at all, once the database has been seen (`keycheck`).
    pub fn resolve(args: &ServeArgs) -> Result<Config, ConfigError> {
        let database_url = args.store.database_url()?;
        let listen: SocketAddr = args.listen.parse().map_err(|_| {
            ConfigError::new(
                "TOKENKEEPER_LISTEN",
                format!("{:?} is not an address like 127.0.0.1:8080", args.listen),
            )
        })?;
        let public_url = match &args.public_url {
            Some(u) => parse_http_url(u, "TOKENKEEPER_PUBLIC_URL")?,
            None => {
                url::Url::parse(&format!("http://{listen}")).expect("a socket address makes a URL")
            }
        };
        let allowed_return_urls = match &args.allowed_return_urls {
            Some(list) => AllowedReturnUrls::parse(list)
                .map_err(|m| ConfigError::new("TOKENKEEPER_ALLOWED_RETURN_URLS", m))?,
            None => AllowedReturnUrls::only(&public_url),
        };
        let notion = args.notion.settings()?;
        let session_ttl = any_duration("TOKENKEEPER_SESSION_TTL", &args.session_ttl)?;
        let provider_timeout =
            duration_setting("TOKENKEEPER_PROVIDER_TIMEOUT", &args.provider_timeout)?;
        let refresh_budget = any_duration("TOKENKEEPER_REFRESH_BUDGET", &args.refresh_budget)?;
        let server = Self::server_limits(args)?;
        let proxy = ProxyTimeouts {
            first_byte: duration_setting(
                "TOKENKEEPER_PROXY_FIRST_BYTE_TIMEOUT",
                &args.proxy_first_byte_timeout,
            )?,
            idle: duration_setting("TOKENKEEPER_PROXY_IDLE_TIMEOUT", &args.proxy_idle_timeout)?,
        };
        let keys = args.store.key_source()?;
        if let KeySource::Unconfigured = keys {
            return Err(no_key_ring(&keys));
        }
        let (api_keys, created_api_key_file) = Self::api_keys(args, &database_url)?;
        let (webhooks, created_webhook_secret_file) = Self::webhooks(args, &database_url)?;
        let spill_dir = match (&args.spill_dir, &database_url) {
            (Some(dir), _) => dir.clone(),
            (None, DatabaseUrl::Sqlite(db)) => sibling(db, "spill"),
            (None, DatabaseUrl::Postgres(_)) => PathBuf::from("tokenkeeper-spill"),
        };
        Ok(Config {
            listen,
            public_url,
            database_url,
            keys,
            api_keys,
            created_api_key_file,
            webhooks,
            created_webhook_secret_file,
            allowed_return_urls,
            notion,
            notion_version: args.notion.notion_version.clone(),
            session_ttl,
            provider_timeout,
            refresh_budget,
            server,
            proxy,
            refresh_rate: parse_refresh_rate(&args.refresh_rate)
                .map_err(|m| ConfigError::new("TOKENKEEPER_REFRESH_RATE", m))?,
            spill_dir,
            bench_baseline_route: args.bench_baseline_route,
            token_cache_size: args
                .token_cache_size
                .trim()
                .parse::<usize>()
                .ok()
                .filter(|n| *n <= 100_000_000)
                .ok_or_else(|| {
                    ConfigError::new(
                        "TOKENKEEPER_TOKEN_CACHE_SIZE",
                        format!(
                            "{:?} is not a whole number from 0 to 100000000",
                            args.token_cache_size
                        ),
                    )
                })?,
            proxy_shared_throttle: args.proxy_shared_throttle,
            health_check: HealthSettings {
                interval: any_duration(
                    "TOKENKEEPER_HEALTH_CHECK_INTERVAL",
                    &args.health_check_interval,
                )?,
                rate: crate::clock::parse_rate(&args.health_check_rate)
                    .map_err(|m| ConfigError::new("TOKENKEEPER_HEALTH_CHECK_RATE", m))?,
            },
        })
    }

    fn server_limits(args: &ServeArgs) -> Result<ServerLimits, ConfigError> {
        let header_read =
            duration_setting("TOKENKEEPER_HEADER_READ_TIMEOUT", &args.header_read_timeout)?;
        let idle = duration_setting("TOKENKEEPER_IDLE_TIMEOUT", &args.idle_timeout)?;
        if idle > header_read {
            // hyper's header read timeout runs from the moment a connection waits for a request,
            // so it would close an idle HTTP/1.1 connection first: a longer idle timeout would be
            // a setting that silently does nothing.
            return Err(ConfigError::new(
                "TOKENKEEPER_IDLE_TIMEOUT",
                format!(
                    "{} is longer than TOKENKEEPER_HEADER_READ_TIMEOUT ({}), which also ends an idle connection; raise that one too",
                    humantime::format_duration(idle),
                    humantime::format_duration(header_read)
                ),
            ));
        }
        let max_connections = args
            .max_connections
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=1_000_000).contains(n))
            .ok_or_else(|| {
                ConfigError::new(
                    "TOKENKEEPER_MAX_CONNECTIONS",
                    format!(
                        "{:?} is not a whole number from 1 to 1000000",
                        args.max_connections
                    ),
                )
            })?;
        Ok(ServerLimits {
            header_read_timeout: header_read,
            body_read_timeout: duration_setting(
                "TOKENKEEPER_BODY_READ_TIMEOUT",
                &args.body_read_timeout,
            )?,
            idle_timeout: idle,
            max_connections,
        })
    }

    fn webhooks(
        args: &ServeArgs,
        db: &DatabaseUrl,
    ) -> Result<(Option<crate::webhooks::WebhookSettings>, Option<PathBuf>), ConfigError> {
        use crate::webhooks::{WebhookSecret, WebhookSettings};
        let endpoints = webhook_endpoints(args.webhook_urls.as_deref())?;
        if endpoints.is_empty() {
            return Ok((None, None));
        }
        let timeout = duration_setting("TOKENKEEPER_WEBHOOK_TIMEOUT", &args.webhook_timeout)?;
        let parse = |text: &str, var: &str| {
            WebhookSecret::parse(text).map_err(|m| ConfigError::new(var, m))
        };
        let (secret, created) = if let Some(text) = &args.webhook_secret {
            (parse(text, "TOKENKEEPER_WEBHOOK_SECRET")?, None)
        } else if let Some(path) = &args.webhook_secret_file {
            let var = "TOKENKEEPER_WEBHOOK_SECRET_FILE";
            let text = std::fs::read_to_string(path).map_err(|e| {
                ConfigError::new(var, format!("cannot read {}: {e}", path.display()))
            })?;
            (parse(&text, var)?, None)
        } else {
            let DatabaseUrl::Sqlite(file) = db else {
                return Err(ConfigError::new(
                    "TOKENKEEPER_WEBHOOK_SECRET",
                    "required with TOKENKEEPER_WEBHOOK_URLS (a `whsec_` secret the endpoints \
                     verify signatures with)",
                ));
            };
            let var = "TOKENKEEPER_WEBHOOK_SECRET_FILE";
            let path = sibling(file, "webhook-secret");
            if path.exists() {
                let text = std::fs::read_to_string(&path).map_err(|e| {
                    ConfigError::new(var, format!("cannot read {}: {e}", path.display()))
                })?;
                (parse(&text, var)?, None)
            } else {
                let text = WebhookSecret::generate();
                write_private(&path, &format!("{text}\n")).map_err(|e| {
                    ConfigError::new(var, format!("could not create {}: {e}", path.display()))
                })?;
                (parse(&text, var)?, Some(path))
            }
        };
        Ok((
            Some(WebhookSettings {
                endpoints,
                secret,
                timeout,
            }),
            created,
        ))
    }

    fn api_keys(
        args: &ServeArgs,
        db: &DatabaseUrl,
    ) -> Result<(ApiKeys, Option<PathBuf>), ConfigError> {
        const VAR: &str = "TOKENKEEPER_API_KEYS";
        if let Some(text) = &args.api_keys {
            return Ok((
                ApiKeys::parse(text).map_err(|m| ConfigError::new(VAR, m))?,
                None,
            ));
        }
        if let Some(path) = &args.api_keys_file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                ConfigError::new(
                    "TOKENKEEPER_API_KEYS_FILE",
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            return Ok((
                ApiKeys::parse(&text)
                    .map_err(|m| ConfigError::new("TOKENKEEPER_API_KEYS_FILE", m))?,
                None,
            ));
        }
        match db {
            DatabaseUrl::Sqlite(file) => {
                let path = sibling(file, "api-key");
                if path.exists() {
                    let text = std::fs::read_to_string(&path).map_err(|e| {
                        ConfigError::new(
                            "TOKENKEEPER_API_KEYS_FILE",
                            format!("cannot read {}: {e}", path.display()),
                        )
                    })?;
                    let keys = ApiKeys::parse(&text).map_err(|m| {
                        ConfigError::new(
                            "TOKENKEEPER_API_KEYS_FILE",
                            format!("{}: {m}", path.display()),
                        )
                    })?;
                    return Ok((keys, None));
                }
                let key = ApiKey::generate_admin();
                write_private(&path, &format!("admin:{}\n", key.expose())).map_err(|e| {
                    ConfigError::new(
                        "TOKENKEEPER_API_KEYS_FILE",
                        format!("could not create {}: {e}", path.display()),
                    )
                })?;
                Ok((ApiKeys::new(vec![key]), Some(path)))
            }
            DatabaseUrl::Postgres(_) => Err(ConfigError::new(VAR, "required with PostgreSQL")),
        }
    }
}

fn parse_http_url(s: &str, var: &str) -> Result<url::Url, ConfigError> {
    let url = url::Url::parse(s)
        .map_err(|e| ConfigError::new(var, format!("{s:?} is not a URL: {e}")))?;
    if url.scheme() != "http" && url.scheme() != "https" {
        return Err(ConfigError::new(
            var,
            format!("{s:?} must be an http or https URL"),
        ));
    }
    Ok(url)
}

/// `TOKENKEEPER_WEBHOOK_URLS`: comma-separated endpoints, each checked (`webhooks::check_endpoint`).
pub fn webhook_endpoints(urls: Option<&str>) -> Result<Vec<url::Url>, ConfigError> {
    urls.unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|u| {
            crate::webhooks::check_endpoint(u)
                .map_err(|m| ConfigError::new("TOKENKEEPER_WEBHOOK_URLS", m))
        })
        .collect()
}

/// The health check's settings (`health`).
#[derive(Debug, Clone, Copy)]
pub struct HealthSettings {
    /// How often each active connection is checked; zero turns the checks off.
    pub interval: Duration,
    /// The most checks per second, across every process.
    pub rate: crate::clock::Rate,
}

/// The server's deadlines and its connection cap (`TOKENKEEPER_HEADER_READ_TIMEOUT`,
/// `_BODY_READ_TIMEOUT`, `_IDLE_TIMEOUT`, `_MAX_CONNECTIONS`).
#[derive(Debug, Clone)]
pub struct ServerLimits {
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
}

impl Default for ServerLimits {
    /// - Header read, 10 s: a head is a few hundred bytes, which any working link delivers in
    ///   far less, and a client that trickles one gets little.
    /// - Body read, 30 s: the API's own bodies are at most 64 KiB; a proxied upload must arrive
    ///   at about 35 KB/s per MiB, which any link an app server uses does.
    /// - Idle, 5 s: the keep-alive of Node's own HTTP server, which undici-based clients (among
    ///   them `@notionhq/client`) are tuned to: they drop an idle socket after 4 s, so they do not
    ///   race our close.
    /// - 4,096 connections: far more than the keep-alive pools of a fleet of app servers need,
    ///   and within the descriptors of a common limit (1,024 soft, much more hard) once `main`
    ///   has raised the soft limit; each idle connection costs a descriptor, a task and a few
    ///   KiB of buffers.
    fn default() -> Self {
        ServerLimits {
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(5),
            max_connections: 4096,
        }
    }
}

/// How long the proxy waits on Notion (`TOKENKEEPER_PROXY_FIRST_BYTE_TIMEOUT`,
/// `TOKENKEEPER_PROXY_IDLE_TIMEOUT`).
#[derive(Debug, Clone, Copy)]
pub struct ProxyTimeouts {
    /// From sending a request until the head of Notion's answer has arrived.
    pub first_byte: Duration,
    /// Between two pieces of the body of Notion's answer.
    pub idle: Duration,
}

impl Default for ProxyTimeouts {
    /// Under the 60 s after which `@notionhq/client` gives up by default, so that its callers get
    /// the proxy's 504 rather than their own abort; far above Notion's usual answer times.
    fn default() -> Self {
        ProxyTimeouts {
            first_byte: Duration::from_secs(30),
            idle: Duration::from_secs(30),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_in_every_unit_and_refuse_garbage() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration(" 2s ").unwrap(), Duration::from_secs(2));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("5 fortnights").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn errors_name_the_variable_and_the_flag() {
        let e = ConfigError::new("TOKENKEEPER_DATABASE_URL", "nope");
        assert_eq!(
            e.to_string(),
            "TOKENKEEPER_DATABASE_URL (--database-url): nope"
        );
    }
}
