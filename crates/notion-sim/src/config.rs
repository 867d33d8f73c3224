//! The simulator's behaviour settings.
//!
//! One struct, [`SimConfig`], holds every setting.
//! Rust callers build it directly, the CLI builds it from flags ([`crate::SimArgs`]), and tests in
//! other languages patch it at run time through `POST /_sim/config`, whose JSON is this struct's
//! serde form (durations in milliseconds, or strings such as `"500ms"`, `"2s"`, `"10m"`).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Every capability a Notion connection can be given; the default set of a bot.
pub const ALL_CAPABILITIES: [&str; 4] = [
    "read_content",
    "insert_content",
    "update_content",
    "read_user_with_email",
];

/// Behaviour settings of the simulator.
///
/// `Default` is Notion as it behaves for connections created after 2026-06-08, with the consent
/// page shown (no auto-approval).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimConfig {
    /// The one registered OAuth client's id.
    pub client_id: String,
    /// The one registered OAuth client's secret, checked with HTTP Basic auth on the token,
    /// introspect and revoke endpoints.
    pub client_secret: String,
    /// Registered redirect URIs.
    /// Empty means any `http` or `https` URI is accepted; the conditional `redirect_uri` rule of
    /// the token endpoint (notion-wire.md §2) depends on how many are registered.
    pub redirect_uris: Vec<String>,
    /// Approve (or deny, per `POST /_sim/next-authorization`) at once instead of showing the
    /// consent page.
    pub auto_approve: bool,
    /// Whether a re-authorization mints a fresh pair or returns the active one.
    pub reauth: ReauthMode,
    /// What a re-authorization that mints a fresh pair does to the bot's earlier pairs.
    pub previous_pair: PreviousPairPolicy,
    /// What presenting an already rotated refresh token does.
    pub refresh_reuse: RefreshReusePolicy,
    /// How long a rotated refresh token stays usable under [`RefreshReusePolicy::Grace`],
    /// counted from its first use.
    #[serde(with = "duration_serde")]
    pub refresh_grace: Duration,
    /// After this long an access token answers 401 `unauthorized` (and introspects inactive).
    /// `None`: access tokens never expire.
    #[serde(with = "opt_duration_serde")]
    pub access_token_ttl: Option<Duration>,
    /// How long an authorization code can be exchanged. Codes are single-use whatever this is.
    #[serde(with = "duration_serde")]
    pub code_ttl: Duration,
    /// Artificial latency per endpoint name (`users.me`, `oauth.token`, …) or per grant
    /// (`oauth.token:refresh_token`); the most specific key wins.
    /// It is spent after the request was processed (state already changed) and before the
    /// response is sent: it models a slow answer on the way back.
    #[serde(with = "duration_map_serde")]
    pub latency: BTreeMap<String, Duration>,
    /// Requests per window a single connection (bot) may make to the REST slice; 0 = unlimited.
    pub rate_limit_per_connection: u32,
    /// Requests per window all connections of one workspace may make together; 0 = unlimited.
    pub rate_limit_per_workspace: u32,
    /// Length of the fixed rate-limit window (Notion: 60 seconds).
    #[serde(with = "duration_serde")]
    pub rate_limit_window: Duration,
    /// With an empty next-authorization queue, give every authorization a brand-new workspace
    /// and user (benchmarks) instead of the default ones (re-authorizations of one bot).
    pub fresh_identity: bool,
    /// A re-authorization by the same user in the same workspace mints a new `bot_id` instead of
    /// keeping the existing one.
    pub new_bot_id_on_reauth: bool,
    /// Capabilities of every bot; `introspect` reports them as `scope`.
    pub capabilities: Vec<String>,
    /// Whether bots are user-owned (public connections) or workspace-owned (internal
    /// integrations and the legacy `{"type":"workspace","workspace":true}` owner).
    pub owner: OwnerKind,
    /// How many requests `GET /_sim/requests` remembers (a ring buffer).
    pub request_log_capacity: usize,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            client_id: "tokenkeeper-dev".to_owned(),
            client_secret: "dev-secret-not-for-production".to_owned(),
            redirect_uris: Vec::new(),
            auto_approve: false,
            reauth: ReauthMode::Fresh,
            previous_pair: PreviousPairPolicy::Keep,
            refresh_reuse: RefreshReusePolicy::Reject,
            refresh_grace: Duration::from_secs(10),
            access_token_ttl: None,
            code_ttl: Duration::from_secs(600),
            latency: BTreeMap::new(),
            rate_limit_per_connection: 180,
            rate_limit_per_workspace: 0,
            rate_limit_window: Duration::from_secs(60),
            fresh_identity: false,
            new_bot_id_on_reauth: false,
            capabilities: ALL_CAPABILITIES.iter().map(|c| (*c).to_owned()).collect(),
            owner: OwnerKind::User,
            request_log_capacity: 10_000,
        }
    }
}

impl SimConfig {
    /// Applies a partial JSON object on top of this configuration.
    /// Unknown keys and ill-typed values are rejected and leave the configuration unchanged.
    pub fn patched(&self, patch: &serde_json::Value) -> Result<SimConfig, String> {
        let serde_json::Value::Object(patch) = patch else {
            return Err("the config patch must be a JSON object".to_owned());
        };
        let mut merged = serde_json::to_value(self).map_err(|e| e.to_string())?;
        if let serde_json::Value::Object(current) = &mut merged {
            for (key, value) in patch {
                current.insert(key.clone(), value.clone());
            }
        }
        serde_json::from_value(merged).map_err(|e| e.to_string())
    }

    /// The artificial latency for an endpoint, preferring the grant-specific key.
    pub(crate) fn latency_for(&self, endpoint: &str, grant: Option<&str>) -> Option<Duration> {
        if self.latency.is_empty() {
            return None;
        }
        if let Some(grant) = grant {
            if let Some(d) = self.latency.get(&format!("{endpoint}:{grant}")) {
                return Some(*d);
            }
        }
        self.latency.get(endpoint).copied()
    }

    pub(crate) fn has_capability(&self, capability: &str) -> bool {
        self.capabilities.iter().any(|c| c == capability)
    }
}

/// What a successful re-authorization of an existing bot returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum ReauthMode {
    /// A fresh access and refresh token on every authorization (Notion since 2026-06-08).
    Fresh,
    /// The bot's active pair again, if it has one (connections created before 2026-06-08).
    Legacy,
}

/// What a re-authorization that mints a fresh pair does to the pairs minted before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum PreviousPairPolicy {
    /// Earlier pairs keep working.
    Keep,
    /// Earlier refresh tokens die; earlier access tokens keep working.
    #[serde(alias = "kill-refresh")]
    KillRefresh,
    /// Earlier access and refresh tokens die.
    #[serde(alias = "kill-both")]
    KillBoth,
}

/// What presenting a refresh token that was already used (rotated) does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum RefreshReusePolicy {
    /// `400 invalid_grant`; nothing else changes.
    Reject,
    /// Accepted like a first use (a new pair) within `refresh_grace` of its first use, then
    /// `invalid_grant`.
    Grace,
    /// `400 invalid_grant`, and every token descending from the same authorization dies
    /// (reuse detection, as Notion's MCP server does).
    #[serde(alias = "revoke-grant")]
    RevokeGrant,
}

/// Who owns the bots, as reported in token responses and `users.me`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum OwnerKind {
    /// `{"type":"user","user":{…}}`: public OAuth connections.
    User,
    /// `{"type":"workspace","workspace":true}`: internal integrations and legacy responses.
    Workspace,
}

/// Parses `500ms`, `2s`, `10m`, `1h` or a bare number of milliseconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("invalid duration {text:?}: expected e.g. 500ms, 2s, 10m"))?;
    let millis = match unit.trim() {
        "" | "ms" => number,
        "s" => number * 1_000.0,
        "m" => number * 60_000.0,
        "h" => number * 3_600_000.0,
        other => return Err(format!("invalid duration unit {other:?} in {text:?}")),
    };
    if !millis.is_finite() || millis < 0.0 {
        return Err(format!("invalid duration {text:?}"));
    }
    Ok(Duration::from_micros((millis * 1_000.0).round() as u64))
}

/// A duration on the wire: a number of milliseconds or a string accepted by [`parse_duration`].
#[derive(Deserialize)]
#[serde(untagged)]
enum WireDuration {
    Millis(f64),
    Text(String),
}

impl WireDuration {
    fn into_duration(self) -> Result<Duration, String> {
        match self {
            WireDuration::Millis(ms) if ms.is_finite() && ms >= 0.0 => {
                Ok(Duration::from_micros((ms * 1_000.0).round() as u64))
            }
            WireDuration::Millis(ms) => Err(format!("invalid duration {ms}")),
            WireDuration::Text(text) => parse_duration(&text),
        }
    }
}

fn millis(d: &Duration) -> u64 {
    d.as_millis().try_into().unwrap_or(u64::MAX)
}

mod duration_serde {
    use super::*;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(millis(d))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        WireDuration::deserialize(d)?
            .into_duration()
            .map_err(serde::de::Error::custom)
    }
}

mod opt_duration_serde {
    use super::*;

    pub fn serialize<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&millis(d)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        Option::<WireDuration>::deserialize(d)?
            .map(WireDuration::into_duration)
            .transpose()
            .map_err(serde::de::Error::custom)
    }
}

mod duration_map_serde {
    use super::*;

    pub fn serialize<S: serde::Serializer>(
        map: &BTreeMap<String, Duration>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_map(map.iter().map(|(k, v)| (k, millis(v))))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<String, Duration>, D::Error> {
        BTreeMap::<String, WireDuration>::deserialize(d)?
            .into_iter()
            .map(|(k, v)| v.into_duration().map(|v| (k, v)))
            .collect::<Result<_, _>>()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_in_every_unit() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("250"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("2 fortnights").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn a_patch_changes_only_the_keys_it_names() {
        let config = SimConfig::default();
        let patched = config
            .patched(&serde_json::json!({
                "reauth": "legacy",
                "access_token_ttl": "2s",
                "latency": {"oauth.token:refresh_token": 150}
            }))
            .unwrap();
        assert_eq!(patched.reauth, ReauthMode::Legacy);
        assert_eq!(patched.access_token_ttl, Some(Duration::from_secs(2)));
        assert_eq!(
            patched.latency_for("oauth.token", Some("refresh_token")),
            Some(Duration::from_millis(150))
        );
        assert_eq!(
            patched.latency_for("oauth.token", Some("authorization_code")),
            None
        );
        assert_eq!(patched.client_id, config.client_id);
        assert!(config
            .patched(&serde_json::json!({"no_such_setting": 1}))
            .is_err());
    }
}
