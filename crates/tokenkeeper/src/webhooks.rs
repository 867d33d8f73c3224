//! Webhooks: the app is told, once per change, durably (invariant 9).
//!
//! Every ledger change that matters to the app (a new connection, a re-authorization,
//! `needs_reauth`, a recovery, a revocation) writes one delivery job per configured endpoint in
//! the same transaction as the change (`store/rules.rs`, `emit`). The job worker (`jobs.rs`)
//! delivers them: a `POST` signed the Standard Webhooks way (https://www.standardwebhooks.com),
//! with the same `webhook-id` on every attempt, a per-attempt timeout, and retries with
//! exponential backoff and jitter for three days; a 2xx answer is a delivery.
//!
//! The body is built at each attempt from what the job holds: the event as it happened (its
//! type, time and the connection as it was), and, for `connection.needs_reauth`, a reconnect
//! link that works at the time of the attempt (a link from the first attempt would have expired
//! by a retry days later). Receivers deduplicate by `webhook-id`.

use std::time::Duration;

use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

use crate::ledger::Job;

/// `whsec_` and the base64 of the signing key, as Standard Webhooks writes it.
#[derive(Clone)]
pub struct WebhookSecret {
    key: Vec<u8>,
}

impl std::fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WebhookSecret([redacted])")
    }
}

impl WebhookSecret {
    pub fn parse(text: &str) -> Result<WebhookSecret, String> {
        let text = text.trim();
        let encoded = text
            .strip_prefix("whsec_")
            .ok_or("a webhook secret is `whsec_` followed by base64")?;
        let key = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map_err(|_| "the part after `whsec_` is not base64".to_owned())?;
        if key.len() < 24 {
            return Err("a webhook secret holds at least 24 bytes".into());
        }
        Ok(WebhookSecret { key })
    }

    /// A new random secret (32 bytes), in its `whsec_` form.
    pub fn generate() -> String {
        let mut key = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut key);
        format!(
            "whsec_{}",
            base64::engine::general_purpose::STANDARD.encode(key)
        )
    }

    /// `v1,<base64 of HMAC-SHA256(key, "{id}.{timestamp}.{body}")>`.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes a key of any length");
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!(
            "v1,{}",
            base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
        )
    }
}

/// Where events go and how they are signed.
#[derive(Debug, Clone)]
pub struct WebhookSettings {
    pub endpoints: Vec<url::Url>,
    pub secret: WebhookSecret,
    /// How long one delivery attempt may take before it counts as failed.
    pub timeout: Duration,
}

/// Whether an endpoint may receive events: an http(s) URL, https unless it is on loopback.
pub fn check_endpoint(s: &str) -> Result<url::Url, String> {
    let url = url::Url::parse(s).map_err(|e| format!("{s:?} is not a URL: {e}"))?;
    let loopback = match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    };
    match url.scheme() {
        "https" => {}
        "http" if loopback => {}
        "http" => {
            return Err(format!(
                "{s:?}: events carry connection details, so they go over https (http only to \
                 loopback)"
            ))
        }
        _ => return Err(format!("{s:?} must be an https URL")),
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!("{s:?}: put credentials in the secret, not the URL"));
    }
    Ok(url)
}

/// One attempt at a delivery: the body, signed, to the job's endpoint. `body` is the event as
/// the job holds it with anything added for this attempt (the reconnect link).
pub async fn deliver(
    http: &reqwest::Client,
    settings: &WebhookSettings,
    job: &Job,
    body: &Value,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<(), String> {
    let id = job
        .payload
        .get("webhook_id")
        .and_then(Value::as_str)
        .ok_or("the delivery names no webhook id")?;
    let body = serde_json::to_vec(body).expect("an event serializes");
    let timestamp = now.timestamp();
    let response = http
        .post(&job.subject)
        .timeout(settings.timeout)
        .header("content-type", "application/json")
        .header("webhook-id", id)
        .header("webhook-timestamp", timestamp.to_string())
        .header(
            "webhook-signature",
            settings.secret.sign(id, timestamp, &body),
        )
        .body(body)
        .send()
        .await
        .map_err(|e| {
            if e.is_timeout() {
                format!("no answer within {:?}", settings.timeout)
            } else if e.is_connect() {
                "the endpoint could not be reached".to_owned()
            } else {
                "the connection broke before an answer".to_owned()
            }
        })?;
    let status = response.status();
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("the endpoint answered {}", status.as_u16()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The signature of the Standard Webhooks specification's example, whose inputs and output
    /// it publishes, so this does not only check our code against itself.
    #[test]
    fn signs_the_specification_example() {
        let secret = WebhookSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let signature = secret.sign(
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn endpoints_are_https_unless_on_loopback() {
        assert!(check_endpoint("https://app.example/hooks").is_ok());
        assert!(check_endpoint("http://127.0.0.1:9000/hooks").is_ok());
        assert!(check_endpoint("http://localhost:9000/hooks").is_ok());
        assert!(check_endpoint("http://[::1]:9000/hooks").is_ok());
        assert!(check_endpoint("http://app.example/hooks").is_err());
        assert!(check_endpoint("ftp://app.example/hooks").is_err());
        assert!(check_endpoint("https://user:pw@app.example/hooks").is_err());
        assert!(check_endpoint("not a url").is_err());
    }

    #[test]
    fn secrets_parse_and_never_print() {
        let text = WebhookSecret::generate();
        let secret = WebhookSecret::parse(&text).unwrap();
        assert!(!format!("{secret:?}").contains(&text[6..]));
        assert!(WebhookSecret::parse("nope").is_err());
        assert!(WebhookSecret::parse("whsec_!!!").is_err());
        assert!(WebhookSecret::parse("whsec_c2hvcnQ=").is_err());
    }
}
