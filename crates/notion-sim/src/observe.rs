//! What the simulator saw: per-endpoint counters, token requests per grant type, and a bounded
//! log of recent requests. All of it is served by the control API and cleared by `/_sim/reset`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde::Serialize;
use serde_json::{json, Value};

use crate::endpoint::Endpoint;
use crate::world::Id;

#[derive(Default)]
pub(crate) struct Stats {
    requests: [AtomicU64; Endpoint::ALL.len()],
    tokens: Mutex<TokenStats>,
    /// REST calls answered 429 by the rate limits, by `rate_limit_reason`.
    rate_limited: Mutex<BTreeMap<&'static str, u64>>,
}

#[derive(Default)]
struct TokenStats {
    total: BTreeMap<&'static str, u64>,
    by_bot: HashMap<Id, BTreeMap<&'static str, u64>>,
}

/// The grant-type names stats are kept under; anything else is counted as `other`.
fn grant_key(grant_type: Option<&str>) -> &'static str {
    match grant_type {
        Some("authorization_code") => "authorization_code",
        Some("refresh_token") => "refresh_token",
        _ => "other",
    }
}

impl Stats {
    pub fn count(&self, endpoint: Endpoint) {
        self.requests[endpoint as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a token request; `bot` is `None` when the code or refresh token is unknown.
    pub fn count_grant(&self, grant_type: Option<&str>, bot: Option<Id>) {
        let key = grant_key(grant_type);
        let mut tokens = self.tokens.lock().expect("stats lock");
        *tokens.total.entry(key).or_default() += 1;
        if let Some(bot) = bot {
            *tokens
                .by_bot
                .entry(bot)
                .or_default()
                .entry(key)
                .or_default() += 1;
        }
    }

    /// Counts a REST call the rate limits answered 429.
    pub fn count_rate_limited(&self, reason: &'static str) {
        *self
            .rate_limited
            .lock()
            .expect("stats lock")
            .entry(reason)
            .or_default() += 1;
    }

    pub fn clear(&self) {
        self.rate_limited.lock().expect("stats lock").clear();
        for counter in &self.requests {
            counter.store(0, Ordering::Relaxed);
        }
        *self.tokens.lock().expect("stats lock") = TokenStats::default();
    }

    /// The `GET /_sim/stats` document.
    pub fn to_json(&self) -> Value {
        let requests: serde_json::Map<String, Value> = Endpoint::ALL
            .iter()
            .map(|e| {
                (
                    e.name().to_owned(),
                    json!(self.requests[*e as usize].load(Ordering::Relaxed)),
                )
            })
            .collect();
        let tokens = self.tokens.lock().expect("stats lock");
        let by_bot: serde_json::Map<String, Value> = tokens
            .by_bot
            .iter()
            .map(|(bot, counts)| (bot.to_string(), json!(counts)))
            .collect();
        json!({
            "requests": requests,
            "token_requests": {"total": tokens.total, "by_bot": by_bot},
            "rate_limited": self.rate_limited.lock().expect("stats lock").clone(),
        })
    }
}

/// One request as `GET /_sim/requests` shows it.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct LoggedRequest {
    pub seq: u64,
    /// RFC 3339 with milliseconds, UTC.
    pub time: String,
    pub endpoint: Option<&'static str>,
    pub method: String,
    pub path: String,
    pub status: u16,
    pub bot_id: Option<Id>,
    /// `sha256:…` of the bearer token (REST) or of the token in the body (OAuth).
    pub token_fingerprint: Option<String>,
    /// Whether that token was the newest live token of its kind for the bot.
    pub token_is_newest_live: Option<bool>,
    /// For `oauth.token`, the grant type.
    pub grant_type: Option<&'static str>,
}

/// A ring buffer of the most recent requests.
#[derive(Default)]
pub(crate) struct RequestLog {
    inner: Mutex<LogInner>,
}

#[derive(Default)]
struct LogInner {
    seq: u64,
    entries: VecDeque<LoggedRequest>,
}

impl RequestLog {
    pub fn push(&self, capacity: usize, mut entry: LoggedRequest) {
        if capacity == 0 {
            return;
        }
        let mut inner = self.inner.lock().expect("log lock");
        inner.seq += 1;
        entry.seq = inner.seq;
        while inner.entries.len() >= capacity {
            inner.entries.pop_front();
        }
        inner.entries.push_back(entry);
    }

    /// The last `limit` entries, oldest first.
    pub fn recent(&self, limit: usize) -> Vec<LoggedRequest> {
        let inner = self.inner.lock().expect("log lock");
        let skip = inner.entries.len().saturating_sub(limit);
        inner.entries.iter().skip(skip).cloned().collect()
    }

    pub fn clear(&self) {
        self.inner.lock().expect("log lock").entries.clear();
    }
}
