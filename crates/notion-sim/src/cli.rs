//! `tokenkeeper notion-sim`: every setting of [`SimConfig`] as a flag (and a `NOTION_SIM_*`
//! environment variable).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;

use crate::clock::SimClock;
use crate::config::{
    parse_duration, OwnerKind, PreviousPairPolicy, ReauthMode, RefreshReusePolicy, SimConfig,
};

/// Run a faithful, stateful Notion simulator (OAuth endpoints, consent page, a REST slice, rate
/// limits, faults on demand and a control API under /_sim).
#[derive(Debug, Clone, clap::Args)]
pub struct SimArgs {
    /// Address to listen on; port 0 picks a free port (the first line printed tells which).
    #[arg(long, env = "NOTION_SIM_LISTEN", default_value = "127.0.0.1:8090")]
    pub listen: SocketAddr,

    /// The registered OAuth client's id.
    #[arg(long, env = "NOTION_SIM_CLIENT_ID", default_value = "tokenkeeper-dev")]
    pub client_id: String,

    /// The registered OAuth client's secret (HTTP Basic auth on token, introspect, revoke).
    #[arg(
        long,
        env = "NOTION_SIM_CLIENT_SECRET",
        default_value = "dev-secret-not-for-production"
    )]
    pub client_secret: String,

    /// A registered redirect URI (repeat or comma-separate for several).
    /// None registered: any http(s) URI is accepted.
    #[arg(
        long = "redirect-uri",
        env = "NOTION_SIM_REDIRECT_URIS",
        value_delimiter = ','
    )]
    pub redirect_uris: Vec<String>,

    /// Approve authorizations at once (redirect with a code) instead of showing the consent page.
    #[arg(long, env = "NOTION_SIM_AUTO_APPROVE")]
    pub auto_approve: bool,

    /// Re-authorization: `fresh` mints a new pair every time (Notion since 2026-06-08);
    /// `legacy` returns the bot's active pair.
    #[arg(long, env = "NOTION_SIM_REAUTH", value_enum, default_value = "fresh")]
    pub reauth: ReauthMode,

    /// What a re-authorization does to the earlier pairs: keep them alive, kill their refresh
    /// tokens, or kill both tokens.
    #[arg(
        long,
        env = "NOTION_SIM_PREVIOUS_PAIR",
        value_enum,
        default_value = "keep"
    )]
    pub previous_pair: PreviousPairPolicy,

    /// Reusing a rotated refresh token: `reject` (invalid_grant), `grace` (accepted within
    /// --refresh-grace of its first use), or `revoke-grant` (invalid_grant and the whole grant dies).
    #[arg(
        long,
        env = "NOTION_SIM_REFRESH_REUSE",
        value_enum,
        default_value = "reject"
    )]
    pub refresh_reuse: RefreshReusePolicy,

    /// The grace window of `--refresh-reuse grace`.
    #[arg(long, env = "NOTION_SIM_REFRESH_GRACE", value_parser = parse_duration, default_value = "10s")]
    pub refresh_grace: Duration,

    /// Access tokens answer 401 after this long (e.g. 1h). Unset: they never expire.
    #[arg(long, env = "NOTION_SIM_ACCESS_TOKEN_TTL", value_parser = parse_duration)]
    pub access_token_ttl: Option<Duration>,

    /// How long an authorization code can be exchanged (codes are single-use regardless).
    #[arg(long, env = "NOTION_SIM_CODE_TTL", value_parser = parse_duration, default_value = "10m")]
    pub code_ttl: Duration,

    /// Artificial latency, ENDPOINT=DURATION (repeatable), e.g. `oauth.token:refresh_token=2s`.
    /// Spent after processing and before answering.
    #[arg(long = "latency", env = "NOTION_SIM_LATENCY", value_delimiter = ',', value_parser = parse_latency)]
    pub latency: Vec<(String, Duration)>,

    /// Requests per window one connection (bot) may make to the REST API; 0 = unlimited.
    #[arg(
        long,
        env = "NOTION_SIM_RATE_LIMIT_PER_CONNECTION",
        default_value_t = 180
    )]
    pub rate_limit_per_connection: u32,

    /// Requests per window all connections of a workspace may make together; 0 = unlimited.
    #[arg(long, env = "NOTION_SIM_RATE_LIMIT_PER_WORKSPACE", default_value_t = 0)]
    pub rate_limit_per_workspace: u32,

    /// Length of the fixed rate-limit window.
    #[arg(long, env = "NOTION_SIM_RATE_LIMIT_WINDOW", value_parser = parse_duration, default_value = "60s")]
    pub rate_limit_window: Duration,

    /// Give every authorization (with an empty /_sim/next-authorization queue) a brand-new
    /// workspace and user, for benchmarks.
    #[arg(long, env = "NOTION_SIM_FRESH_IDENTITY")]
    pub fresh_identity: bool,

    /// Mint a new bot_id when the same user re-authorizes in the same workspace.
    #[arg(long, env = "NOTION_SIM_NEW_BOT_ID_ON_REAUTH")]
    pub new_bot_id_on_reauth: bool,

    /// Capabilities of every bot (comma-separated).
    #[arg(
        long,
        env = "NOTION_SIM_CAPABILITIES",
        value_delimiter = ',',
        default_value = "read_content,insert_content,update_content,read_user_with_email"
    )]
    pub capabilities: Vec<String>,

    /// Bot owner in token responses and users.me: `user` (public connections) or `workspace`.
    #[arg(long, env = "NOTION_SIM_OWNER", value_enum, default_value = "user")]
    pub owner: OwnerKind,

    /// How many recent requests GET /_sim/requests keeps.
    #[arg(
        long,
        env = "NOTION_SIM_REQUEST_LOG_CAPACITY",
        default_value_t = 10_000
    )]
    pub request_log_capacity: usize,

    /// Start with a clock that stands still until `POST /_sim/clock/advance` moves it, so that
    /// tests in other processes decide when tokens, codes and rate-limit windows expire.
    #[arg(long, env = "NOTION_SIM_MANUAL_CLOCK")]
    pub manual_clock: bool,
}

fn parse_latency(text: &str) -> Result<(String, Duration), String> {
    let (endpoint, duration) = text
        .split_once('=')
        .ok_or_else(|| format!("expected ENDPOINT=DURATION, got {text:?}"))?;
    Ok((endpoint.trim().to_owned(), parse_duration(duration)?))
}

impl SimArgs {
    /// The configuration these flags describe.
    pub fn into_config(self) -> anyhow::Result<SimConfig> {
        for uri in &self.redirect_uris {
            url::Url::parse(uri).with_context(|| format!("--redirect-uri {uri:?} is not a URL"))?;
        }
        let latency: BTreeMap<String, Duration> = self.latency.into_iter().collect();
        Ok(SimConfig {
            client_id: self.client_id,
            client_secret: self.client_secret,
            redirect_uris: self.redirect_uris,
            auto_approve: self.auto_approve,
            reauth: self.reauth,
            previous_pair: self.previous_pair,
            refresh_reuse: self.refresh_reuse,
            refresh_grace: self.refresh_grace,
            access_token_ttl: self.access_token_ttl,
            code_ttl: self.code_ttl,
            latency,
            rate_limit_per_connection: self.rate_limit_per_connection,
            rate_limit_per_workspace: self.rate_limit_per_workspace,
            rate_limit_window: self.rate_limit_window,
            fresh_identity: self.fresh_identity,
            new_bot_id_on_reauth: self.new_bot_id_on_reauth,
            capabilities: self.capabilities,
            owner: self.owner,
            request_log_capacity: self.request_log_capacity,
        })
    }
}

/// Runs the simulator until Ctrl-C or SIGTERM.
/// The first line on stdout is exactly `notion-sim listening on http://ADDR`.
pub async fn run_cli(args: SimArgs) -> anyhow::Result<()> {
    let listen = args.listen;
    let clock = if args.manual_clock {
        SimClock::manual()
    } else {
        SimClock::system()
    };
    let config = args.into_config()?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    {
        use std::io::Write;
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "notion-sim listening on http://{addr}")?;
        stdout.flush()?;
    }
    crate::serve_with_clock(listener, config, clock, shutdown_signal()).await
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        sim: SimArgs,
    }

    #[test]
    fn defaults_are_post_june_2026_notion() {
        let args = Cli::parse_from(["sim"]).sim;
        assert!(!args.manual_clock, "users get the system clock");
        let config = args.into_config().unwrap();
        assert_eq!(config, SimConfig::default());
        assert!(Cli::parse_from(["sim", "--manual-clock"]).sim.manual_clock);
    }

    #[test]
    fn flags_reach_the_config() {
        let config = Cli::parse_from([
            "sim",
            "--auto-approve",
            "--reauth",
            "legacy",
            "--previous-pair",
            "kill-both",
            "--refresh-reuse",
            "revoke-grant",
            "--access-token-ttl",
            "500ms",
            "--latency",
            "oauth.token:refresh_token=2s",
            "--latency",
            "users.me=10ms",
            "--rate-limit-per-connection",
            "0",
            "--capabilities",
            "read_content",
        ])
        .sim
        .into_config()
        .unwrap();
        assert!(config.auto_approve);
        assert_eq!(config.reauth, ReauthMode::Legacy);
        assert_eq!(config.previous_pair, PreviousPairPolicy::KillBoth);
        assert_eq!(config.refresh_reuse, RefreshReusePolicy::RevokeGrant);
        assert_eq!(config.access_token_ttl, Some(Duration::from_millis(500)));
        assert_eq!(config.latency.len(), 2);
        assert_eq!(
            config.latency_for("oauth.token", Some("refresh_token")),
            Some(Duration::from_secs(2))
        );
        assert_eq!(config.rate_limit_per_connection, 0);
        assert_eq!(config.capabilities, vec!["read_content".to_owned()]);
    }
}
