//! Notion's OAuth endpoints, as `notion-wire.md` describes them.
//!
//! JSON bodies, HTTP Basic client authentication, `Notion-Version` on every call. Responses are
//! read leniently (unknown fields ignored; only `access_token`, `bot_id` and `workspace_id` are
//! required) and errors are parsed in both shapes Notion uses: OAuth style (`error`,
//! `error_description`) and its own envelope (`code`, `message`).

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use chrono::Utc;
use serde::Deserialize;
use serde_json::{json, Value};

use super::text::{ProviderCode, ProviderRequestId, ProviderText, Sent};
use super::ProviderError;
use crate::ids::{AccessToken, BotId, ClientSecret, RefreshToken};
use crate::ledger::MintedPair;
use crate::metrics::{Metrics, ProviderEndpoint};

/// How tokenkeeper reaches Notion: its OAuth client registration, where, and which API version.
#[derive(Debug, Clone)]
pub struct NotionSettings {
    pub client_id: String,
    pub client_secret: ClientSecret,
    pub base_url: url::Url,
    pub version: String,
}

/// A client for one Notion OAuth client registration.
#[derive(Clone)]
pub struct NotionClient {
    http: reqwest::Client,
    settings: NotionSettings,
    /// `Basic <base64 of client_id:client_secret>`.
    basic_auth: String,
    /// Where each call's endpoint, status class and latency are counted, when set.
    metrics: Option<Arc<Metrics>>,
}

impl std::fmt::Debug for NotionClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NotionClient")
            .field("base_url", &self.settings.base_url.as_str())
            .field("client_id", &self.settings.client_id)
            .finish_non_exhaustive()
    }
}

/// The fields of a token response we rely on; everything else is kept as metadata.
///
/// Only `access_token`, `bot_id` and `workspace_id` are required (notion-wire.md §2). The others
/// are read when they are strings and otherwise taken as absent: a refresh has already spent the
/// old refresh token when this answer arrives, so refusing it over, say, an icon that became an
/// object would lose the only pair that still works (invariant 1).
#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default, deserialize_with = "string_or_none")]
    refresh_token: Option<String>,
    bot_id: String,
    workspace_id: String,
    #[serde(default, deserialize_with = "string_or_none")]
    workspace_name: Option<String>,
    #[serde(default, deserialize_with = "string_or_none")]
    workspace_icon: Option<String>,
    #[serde(default, deserialize_with = "string_or_none")]
    request_id: Option<String>,
}

/// An optional field: its text when it is a string, `None` for anything else.
fn string_or_none<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::String(s) => Some(s),
        _ => None,
    })
}

/// The fields a token response cannot do without.
const REQUIRED: [&str; 3] = ["access_token", "bot_id", "workspace_id"];

/// An OAuth endpoint's answer as received: status, headers and the whole body.
type Answer = (
    reqwest::StatusCode,
    reqwest::header::HeaderMap,
    bytes::Bytes,
);

impl NotionClient {
    pub fn new(settings: NotionSettings, timeout: Duration) -> Self {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .pool_max_idle_per_host(64)
            .build()
            .expect("a reqwest client with rustls builds");
        let basic_auth = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!(
                "{}:{}",
                settings.client_id,
                settings.client_secret.expose_secret()
            ))
        );
        NotionClient {
            http,
            settings,
            basic_auth,
            metrics: None,
        }
    }

    /// The same client, counting its calls in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    pub fn settings(&self) -> &NotionSettings {
        &self.settings
    }

    /// The URL to send a user's browser to.
    pub fn authorize_url(&self, state: &str, redirect_uri: &str) -> url::Url {
        let mut url = self.endpoint("/v1/oauth/authorize");
        url.query_pairs_mut()
            .append_pair("client_id", &self.settings.client_id)
            .append_pair("redirect_uri", redirect_uri)
            .append_pair("response_type", "code")
            .append_pair("owner", "user")
            .append_pair("state", state);
        url
    }

    fn endpoint(&self, path: &str) -> url::Url {
        let mut url = self.settings.base_url.clone();
        let base = url.path().trim_end_matches('/').to_owned();
        url.set_path(&format!("{base}{path}"));
        url
    }

    /// Exchanges an authorization code. `redirect_uri` is always sent (notion-wire.md §2).
    pub async fn exchange_code(
        &self,
        code: &str,
        redirect_uri: &str,
    ) -> Result<MintedPair, ProviderError> {
        let body =
            json!({"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri});
        self.token_call(ProviderEndpoint::TokenExchange, body, self.sent(code))
            .await
    }

    /// Uses a refresh token. Notion rotates it: the answer carries a new pair.
    pub async fn refresh(&self, refresh_token: &RefreshToken) -> Result<MintedPair, ProviderError> {
        let body =
            json!({"grant_type": "refresh_token", "refresh_token": refresh_token.expose_secret()});
        self.token_call(
            ProviderEndpoint::TokenRefresh,
            body,
            self.sent(refresh_token.expose_secret()),
        )
        .await
    }

    /// Asks the provider whether an access token is active (RFC 7662 introspection).
    pub async fn introspect(&self, token: &AccessToken) -> Result<bool, ProviderError> {
        let body = json!({"token": token.expose_secret()});
        let (status, headers, bytes) = self
            .post(ProviderEndpoint::Introspect, "/v1/oauth/introspect", &body)
            .await?;
        if !status.is_success() {
            return Err(error_from(
                status.as_u16(),
                &headers,
                &bytes,
                &self.sent(token.expose_secret()),
            ));
        }
        serde_json::from_slice::<Value>(&bytes)
            .ok()
            .and_then(|v| v.get("active").and_then(Value::as_bool))
            .ok_or(ProviderError::Unparseable {
                status: status.as_u16(),
                reason: "the introspection answer has no boolean `active`".into(),
            })
    }

    /// Revokes an access token upstream.
    pub async fn revoke(&self, token: &AccessToken) -> Result<(), ProviderError> {
        self.revoke_secret(token.expose_secret()).await
    }

    /// Revokes a refresh token upstream (Notion revokes the token given, not its partner).
    pub async fn revoke_refresh(&self, token: &RefreshToken) -> Result<(), ProviderError> {
        self.revoke_secret(token.expose_secret()).await
    }

    async fn revoke_secret(&self, token: &str) -> Result<(), ProviderError> {
        let body = json!({"token": token});
        let (status, headers, bytes) = self
            .post(ProviderEndpoint::Revoke, "/v1/oauth/revoke", &body)
            .await?;
        if status.is_success() {
            return Ok(());
        }
        Err(error_from(
            status.as_u16(),
            &headers,
            &bytes,
            &self.sent(token),
        ))
    }

    /// The secrets a call sends: `secret` (the code or token in its body) and the client's
    /// credentials, so that an answer echoing any of them is scrubbed (`text.rs`).
    fn sent<'a>(&'a self, secret: &'a str) -> Sent<'a> {
        let encoded = self
            .basic_auth
            .strip_prefix("Basic ")
            .unwrap_or(&self.basic_auth);
        Sent::new([secret, self.settings.client_secret.expose_secret(), encoded])
    }

    /// One call to an OAuth endpoint, counted in the metrics whatever its end.
    async fn post(
        &self,
        endpoint: ProviderEndpoint,
        path: &str,
        body: &Value,
    ) -> Result<Answer, ProviderError> {
        let started = std::time::Instant::now();
        let result = self.post_uncounted(path, body).await;
        if let Some(metrics) = &self.metrics {
            let status = match &result {
                Ok((status, _, _)) => Some(status.as_u16()),
                Err(ProviderError::Unavailable { status, .. }) => *status,
                Err(_) => None,
            };
            metrics.provider_call(endpoint, status, started.elapsed());
        }
        result
    }

    async fn post_uncounted(&self, path: &str, body: &Value) -> Result<Answer, ProviderError> {
        let response = self
            .http
            .post(self.endpoint(path))
            .header("Authorization", &self.basic_auth)
            .header("Notion-Version", &self.settings.version)
            .json(body)
            .send()
            .await
            .map_err(|e| ProviderError::Unavailable {
                status: None,
                reason: transport_reason(&e),
                maybe_processed: !e.is_connect(),
            })?;
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| ProviderError::Unavailable {
                status: Some(status.as_u16()),
                reason: transport_reason(&e),
                maybe_processed: true,
            })?;
        Ok((status, headers, bytes))
    }

    async fn token_call(
        &self,
        endpoint: ProviderEndpoint,
        body: Value,
        sent: Sent<'_>,
    ) -> Result<MintedPair, ProviderError> {
        let (status, headers, bytes) = self.post(endpoint, "/v1/oauth/token", &body).await?;
        if !status.is_success() {
            return Err(error_from(status.as_u16(), &headers, &bytes, &sent));
        }
        parse_token_response(status.as_u16(), &bytes)
    }
}

/// Describes a transport failure without the URL's query or any body.
fn transport_reason(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".into()
    } else if e.is_connect() {
        "could not connect".into()
    } else if e.is_body() || e.is_decode() {
        "the connection broke while reading the answer".into()
    } else {
        "the request failed before an answer arrived".into()
    }
}

/// Parses a successful token response into a pair, keeping the rest as metadata.
pub fn parse_token_response(status: u16, bytes: &[u8]) -> Result<MintedPair, ProviderError> {
    let mut value: Value =
        serde_json::from_slice(bytes).map_err(|_| ProviderError::Unparseable {
            status,
            reason: "the token response is not JSON".into(),
        })?;
    // Checked here rather than left to serde, whose message for a mistyped field quotes the
    // value and not the field; the reason names the field and never quotes the body.
    let unparseable = |reason: String| ProviderError::Unparseable { status, reason };
    if !value.is_object() {
        return Err(unparseable(
            "the token response is not a JSON object".into(),
        ));
    }
    if let Some(field) = REQUIRED
        .into_iter()
        .find(|f| !value.get(f).is_some_and(Value::is_string))
    {
        let problem = if value.get(field).is_some() {
            "is not a string"
        } else {
            "is missing"
        };
        return Err(unparseable(format!(
            "the token response's required field `{field}` {problem}"
        )));
    }
    let parsed: TokenResponse = serde_json::from_value(value.clone())
        .map_err(|_| unparseable("the token response could not be read".into()))?;
    if let Some(map) = value.as_object_mut() {
        map.remove("access_token");
        map.remove("refresh_token");
    }
    // The tokens go to their sealed columns only. An answer that repeats one elsewhere (in a
    // name, a nested object, a key) would otherwise have it stored in plain text with the
    // metadata and the workspace's fields (invariant 7).
    let mut tokens: Vec<String> = [Some(&parsed.access_token), parsed.refresh_token.as_ref()]
        .into_iter()
        .flatten()
        .filter(|t| !t.is_empty())
        .cloned()
        .collect();
    tokens.sort_by_key(|t| std::cmp::Reverse(t.len()));
    redact_value(&mut value, &tokens);
    let redact = |field: Option<String>| field.map(|f| redact_text(f, &tokens));
    Ok(MintedPair {
        workspace_name: redact(parsed.workspace_name),
        workspace_icon: redact(parsed.workspace_icon),
        provider_request_id: redact(parsed.request_id),
        access_token: AccessToken::new(parsed.access_token),
        refresh_token: parsed.refresh_token.map(RefreshToken::new),
        bot_id: BotId(parsed.bot_id),
        workspace_id: parsed.workspace_id,
        metadata: value,
        obtained_at: Utc::now(),
        expires_at: None,
    })
}

/// What stands where a token was.
const REDACTED: &str = "[redacted]";

/// `text` with every occurrence of `tokens` (longest first) replaced.
fn redact_text(mut text: String, tokens: &[String]) -> String {
    for token in tokens {
        if text.contains(token.as_str()) {
            text = text.replace(token.as_str(), REDACTED);
        }
    }
    text
}

/// `redact_text` on every string and key of `value`.
fn redact_value(value: &mut Value, tokens: &[String]) {
    match value {
        Value::String(s) => *s = redact_text(std::mem::take(s), tokens),
        Value::Array(items) => items.iter_mut().for_each(|v| redact_value(v, tokens)),
        Value::Object(map) => {
            if map
                .keys()
                .any(|k| tokens.iter().any(|t| k.contains(t.as_str())))
            {
                *map = std::mem::take(map)
                    .into_iter()
                    .map(|(k, v)| (redact_text(k, tokens), v))
                    .collect();
            }
            map.values_mut().for_each(|v| redact_value(v, tokens));
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

/// Reads an error answer in either of Notion's shapes. Everything taken from the answer is
/// untrusted and goes through `text.rs`, with `sent`, the secrets the request carried.
pub fn error_from(
    status: u16,
    headers: &reqwest::header::HeaderMap,
    bytes: &[u8],
    sent: &Sent<'_>,
) -> ProviderError {
    let retry_after = headers
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let body: Option<Value> = serde_json::from_slice(bytes).ok();
    let field = |name: &str| {
        body.as_ref()
            .and_then(|b| b.get(name))
            .and_then(Value::as_str)
    };
    // Each piece is scrubbed by its type (`text.rs`), the one place provider text is made safe.
    let code = field("error")
        .or_else(|| field("code"))
        .map(|c| ProviderCode::from_untrusted(c, sent));
    let message = field("error_description")
        .or_else(|| field("message"))
        .and_then(|m| ProviderText::from_untrusted(m, sent));
    let request_id = field("request_id").and_then(|r| ProviderRequestId::from_untrusted(r, sent));
    match (status, code) {
        (429 | 529, _) => ProviderError::Throttled {
            status,
            retry_after,
            request_id,
        },
        (500..=599, _) => ProviderError::Unavailable {
            status: Some(status),
            reason: format!("HTTP {status}"),
            // A gateway timeout says nothing about whether Notion acted behind it.
            maybe_processed: status == 504,
        },
        (400..=499, Some(code)) => ProviderError::Rejected {
            status,
            code,
            message,
            request_id,
        },
        _ => ProviderError::Unparseable {
            status,
            reason: format!("HTTP {status} without an error code"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_error_shapes_parse() {
        let h = reqwest::header::HeaderMap::new();
        let none = Sent::nothing();
        let oauth = error_from(
            401,
            &h,
            br#"{"error":"invalid_client","request_id":"r1"}"#,
            &none,
        );
        assert!(
            matches!(&oauth, ProviderError::Rejected { code, request_id: Some(r), .. } if code == "invalid_client" && r.as_str() == "r1")
        );
        let envelope = error_from(
            400,
            &h,
            br#"{"object":"error","status":400,"code":"invalid_grant","message":"Invalid refresh token."}"#,
            &none,
        );
        assert!(envelope.is_invalid_grant());
        assert!(!envelope.is_transient());
    }

    #[test]
    fn an_echoing_error_answer_keeps_its_code_and_loses_what_we_sent() {
        let refresh = "Zk2Pq8Xw4Lm9Tn3Vb7Rc1Yd6Hs5Jf0Ga";
        let basic = "dG9rZW5rZWVwZXI6c2VjcmV0LXZhbHVlLTAxMjM0NQ==";
        let sent = Sent::new([refresh, "secret-value-012345", basic]);
        let body = json!({
            "error": "invalid_grant",
            "error_description": format!("you sent Authorization: Basic {basic} and refresh_token={refresh}"),
            "request_id": refresh,
        });
        let e = error_from(
            400,
            &reqwest::header::HeaderMap::new(),
            body.to_string().as_bytes(),
            &sent,
        );
        assert!(e.is_invalid_grant());
        assert_eq!(e.request_id(), None, "an echoed request id is dropped");
        let shown = e.to_string();
        assert!(
            !shown.contains(refresh) && !shown.contains(basic),
            "{shown}"
        );
        assert!(
            shown.contains("you sent Authorization: Basic [redacted]"),
            "{shown}"
        );
    }

    #[test]
    fn throttling_and_5xx_are_transient_even_without_json() {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert("retry-after", "7".parse().unwrap());
        let none = Sent::nothing();
        let e = error_from(429, &h, b"slow down", &none);
        assert!(
            matches!(e, ProviderError::Throttled { retry_after: Some(d), .. } if d == Duration::from_secs(7))
        );
        assert!(error_from(503, &h, b"<html>", &none).is_transient());
        assert!(error_from(529, &h, b"", &none).is_transient());
        assert!(!error_from(403, &h, b"<html>forbidden</html>", &none).is_transient());
    }

    #[test]
    fn token_responses_parse_leniently_and_never_keep_tokens_in_metadata() {
        let body = br#"{"access_token":"ntn_a","token_type":"bearer","refresh_token":"nrt_b","bot_id":"b1",
            "workspace_id":"w1","workspace_name":null,"owner":{"type":"workspace","workspace":true},
            "duplicated_template_id":null,"request_id":"r","something_new":[1,2]}"#;
        let pair = parse_token_response(200, body).unwrap();
        assert_eq!(pair.access_token.expose_secret(), "ntn_a");
        assert_eq!(pair.refresh_token.unwrap().expose_secret(), "nrt_b");
        assert_eq!(pair.bot_id.0, "b1");
        let meta = pair.metadata.to_string();
        assert!(!meta.contains("ntn_a") && !meta.contains("nrt_b"));
        assert!(meta.contains("something_new"));
    }

    #[test]
    fn missing_required_fields_are_unparseable_and_quote_no_value() {
        let e = parse_token_response(
            200,
            br#"{"access_token":"ntn_secret_value","workspace_id":"w"}"#,
        )
        .unwrap_err();
        assert!(matches!(&e, ProviderError::Unparseable { .. }));
        assert!(!e.to_string().contains("ntn_secret_value"));
        assert!(e.to_string().contains("bot_id"));
    }
}
