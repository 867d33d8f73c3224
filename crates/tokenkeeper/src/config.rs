//! Configuration: flags and `TOKENKEEPER_*` variables, parsed and validated once at start.
//!
//! `clap` reads the raw values (`--help` is the reference); `Config::resolve` turns them into
//! checked values or one `ConfigError` that names the setting. `main` prints that line and exits
//! with status 2 before anything listens.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::api::auth::{ApiKey, ApiKeys};
use crate::api::return_to::AllowedReturnUrls;
use crate::ids::ClientSecret;
use crate::provider::notion::NotionSettings;
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
    fn new(var: &str, message: impl Into<String>) -> Self {
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
    /// configured, `serve` creates `<database file>.key` (mode 0600) on first start.
    #[arg(
        long,
        env = "TOKENKEEPER_ENCRYPTION_KEY_FILE",
        conflicts_with = "encryption_key"
    )]
    pub encryption_key_file: Option<PathBuf>,
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

    /// The Notion public connection's OAuth client id. Without it (and the secret), tokenkeeper
    /// starts a built-in Notion simulator and uses it instead of Notion.
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

    /// How long a connect link and its `state` stay valid.
    #[arg(long, env = "TOKENKEEPER_SESSION_TTL", default_value = "10m", value_parser = parse_duration)]
    pub session_ttl: Duration,

    /// Timeout of one call to the provider's token endpoint. The refresh lease is always longer.
    #[arg(long, env = "TOKENKEEPER_PROVIDER_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub provider_timeout: Duration,

    /// Total time a caller may wait for a refresh (its own, or another process's), including
    /// retries of transient provider failures.
    #[arg(long, env = "TOKENKEEPER_REFRESH_BUDGET", default_value = "30s", value_parser = parse_duration)]
    pub refresh_budget: Duration,

    /// Mounts `GET /v1/_baseline`, a constant answer behind the API-key check, which the
    /// benchmarks compare token reads with. Not for production.
    #[arg(long, env = "TOKENKEEPER_BENCH_BASELINE_ROUTE", hide = true)]
    pub bench_baseline_route: bool,
}

/// Parses `500ms`, `2s`, `10m`, `1h` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (use 500ms, 30s, 10m or 1h)"))?;
    Ok(match unit.trim() {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => {
            return Err(format!(
                "{s:?} is not a duration (use 500ms, 30s, 10m or 1h)"
            ))
        }
    })
}

/// The validated configuration of `serve`.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub public_url: url::Url,
    pub database_url: DatabaseUrl,
    pub keys: Arc<KeyRing>,
    /// Set when the key ring file was created by this start (the embedded default).
    pub created_key_file: Option<PathBuf>,
    pub api_keys: ApiKeys,
    pub created_api_key_file: Option<PathBuf>,
    pub allowed_return_urls: AllowedReturnUrls,
    /// `None` means: no Notion credentials; `serve` starts the built-in simulator and fills this in.
    pub notion: Option<NotionSettings>,
    pub notion_version: String,
    pub session_ttl: Duration,
    pub provider_timeout: Duration,
    pub refresh_budget: Duration,
    pub bench_baseline_route: bool,
}

impl StoreArgs {
    pub fn database_url(&self) -> Result<DatabaseUrl, ConfigError> {
        DatabaseUrl::parse(&self.database_url)
            .map_err(|m| ConfigError::new("TOKENKEEPER_DATABASE_URL", m))
    }

    /// Loads the key ring. With SQLite and no key configured, uses `<database>.key`, creating it
    /// (mode 0600) when `create` is set; returns the path when it was created.
    pub fn key_ring(&self, create: bool) -> Result<(Arc<KeyRing>, Option<PathBuf>), ConfigError> {
        if let Some(text) = &self.encryption_key {
            let ring = KeyRing::parse(text)
                .map_err(|e| ConfigError::new("TOKENKEEPER_ENCRYPTION_KEY", e.to_string()))?;
            return Ok((Arc::new(ring), None));
        }
        if let Some(path) = &self.encryption_key_file {
            return Ok((
                Arc::new(read_key_file(path, "TOKENKEEPER_ENCRYPTION_KEY_FILE")?),
                None,
            ));
        }
        match self.database_url()? {
            DatabaseUrl::Sqlite(db) => {
                let path = sibling(&db, "key");
                if path.exists() {
                    return Ok((Arc::new(read_key_file(&path, "TOKENKEEPER_ENCRYPTION_KEY_FILE")?), None));
                }
                if !create {
                    return Err(ConfigError::new(
                        "TOKENKEEPER_ENCRYPTION_KEY",
                        format!("no key configured and {} does not exist", path.display()),
                    ));
                }
                let entry = KeyRing::generate_entry();
                write_private(&path, &format!("{entry}\n")).map_err(|e| {
                    ConfigError::new(
                        "TOKENKEEPER_ENCRYPTION_KEY_FILE",
                        format!("could not create {}: {e}", path.display()),
                    )
                })?;
                let ring = KeyRing::parse(&entry).expect("a generated entry parses");
                Ok((Arc::new(ring), Some(path)))
            }
            DatabaseUrl::Postgres(_) => Err(ConfigError::new(
                "TOKENKEEPER_ENCRYPTION_KEY",
                "required with PostgreSQL (make one with `tokenkeeper keys generate`); tokens are never stored in plaintext",
            )),
        }
    }
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
    /// Validates everything `serve` needs. May create the embedded default's key files.
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
        let notion_base_url = parse_http_url(&args.notion_base_url, "TOKENKEEPER_NOTION_BASE_URL")?;
        let notion = match (&args.notion_client_id, &args.notion_client_secret) {
            (Some(id), Some(secret)) if !id.is_empty() && !secret.is_empty() => Some(NotionSettings {
                client_id: id.clone(),
                client_secret: ClientSecret::new(secret.clone()),
                base_url: notion_base_url,
                version: args.notion_version.clone(),
            }),
            (None, None) => None,
            (Some(_), _) => {
                return Err(ConfigError::new(
                    "TOKENKEEPER_NOTION_CLIENT_SECRET",
                    "missing: set both the client id and the client secret, or neither to use the built-in simulator",
                ))
            }
            (None, Some(_)) => {
                return Err(ConfigError::new(
                    "TOKENKEEPER_NOTION_CLIENT_ID",
                    "missing: set both the client id and the client secret, or neither to use the built-in simulator",
                ))
            }
        };
        if args.provider_timeout.is_zero() {
            return Err(ConfigError::new(
                "TOKENKEEPER_PROVIDER_TIMEOUT",
                "must be above zero",
            ));
        }
        let (keys, created_key_file) = args.store.key_ring(true)?;
        let (api_keys, created_api_key_file) = Self::api_keys(args, &database_url)?;
        Ok(Config {
            listen,
            public_url,
            database_url,
            keys,
            created_key_file,
            api_keys,
            created_api_key_file,
            allowed_return_urls,
            notion,
            notion_version: args.notion_version.clone(),
            session_ttl: args.session_ttl,
            provider_timeout: args.provider_timeout,
            refresh_budget: args.refresh_budget,
            bench_baseline_route: args.bench_baseline_route,
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_in_every_unit_and_refuse_garbage() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5 fortnights").is_err());
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
