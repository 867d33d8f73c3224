//! What a provider says is data, not trusted text.
//!
//! A provider (or whatever answers at a misconfigured base URL) may echo what it received:
//! refresh tokens, authorization codes, the client's Basic credentials. Whatever it says goes
//! through this module before it may reach a log, an event, a diagnosis, an API answer or a
//! page, and comes out as one of three types that can only be made here:
//! - `ProviderCode`: an OAuth error code, kept only if it has the shape of one;
//! - `ProviderRequestId`: a request id, kept only if it has the shape of one;
//! - `ProviderText`: free text, capped and scrubbed of anything shaped like a secret.
//!
//! Code that holds one of these cannot print unscrubbed provider text by accident: the raw
//! string never leaves this module.

use serde::Serialize;

/// The code kept in place of one that does not have the shape of an OAuth error code.
pub const UNRECOGNIZED_CODE: &str = "unrecognized_error";

/// An OAuth error code from a provider (`invalid_grant`, `access_denied`, …): at most 64
/// characters of `a-z`, `0-9`, `_`, `.` and `-`, and nothing that looks like a secret;
/// anything else becomes `unrecognized_error`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct ProviderCode(String);

impl ProviderCode {
    /// Keeps `raw` if it is shaped like an OAuth error code and holds none of `sent`.
    pub fn from_untrusted(raw: &str, sent: &Sent<'_>) -> Self {
        let shaped = !raw.is_empty()
            && raw.len() <= 64
            && raw.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-')
            });
        if shaped && scrub(raw, sent) == raw {
            ProviderCode(raw.to_owned())
        } else {
            ProviderCode(UNRECOGNIZED_CODE.to_owned())
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for ProviderCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl PartialEq<str> for ProviderCode {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for ProviderCode {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl From<ProviderCode> for String {
    fn from(code: ProviderCode) -> String {
        code.0
    }
}

impl From<ProviderCode> for serde_json::Value {
    fn from(code: ProviderCode) -> serde_json::Value {
        serde_json::Value::String(code.0)
    }
}

/// The secrets one request sent to the provider, so that an answer echoing one is caught even
/// when it does not look like a token.
#[derive(Default)]
pub struct Sent<'a> {
    secrets: Vec<&'a str>,
}

impl<'a> Sent<'a> {
    pub fn new(secrets: impl IntoIterator<Item = &'a str>) -> Self {
        Sent {
            secrets: secrets.into_iter().filter(|s| !s.is_empty()).collect(),
        }
    }

    /// Nothing sent: for text that arrived without a request of ours (a browser's redirect).
    pub fn nothing() -> Self {
        Sent::default()
    }
}

/// Free text from a provider (`error_description`, `message`), scrubbed and at most
/// `MAX_TEXT_CHARS` characters of printable ASCII. Safe to log, store and show.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct ProviderText(String);

/// The longest provider text kept, in characters, after scrubbing.
pub const MAX_TEXT_CHARS: usize = 200;

impl ProviderText {
    /// Scrubs `raw` (see `scrub`); `None` when nothing is left.
    pub fn from_untrusted(raw: &str, sent: &Sent<'_>) -> Option<Self> {
        let text = scrub(raw, sent);
        (!text.is_empty()).then_some(ProviderText(text))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for ProviderText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A provider's request id (Notion's are UUIDs): at most 64 characters of letters, digits,
/// `.`, `_`, `:` and `-`, holding nothing we sent and no token prefix; otherwise dropped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct ProviderRequestId(String);

impl ProviderRequestId {
    pub fn from_untrusted(raw: &str, sent: &Sent<'_>) -> Option<Self> {
        let shaped = !raw.is_empty()
            && raw.len() <= 64
            && raw
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
        // A UUID is a long run, so the long-run rule would drop every real request id; the
        // rules that remain still catch an echo of what we sent and anything token-prefixed.
        (shaped && scrub_with(raw, sent, false) == raw).then(|| ProviderRequestId(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<ProviderRequestId> for String {
    fn from(id: ProviderRequestId) -> String {
        id.0
    }
}

/// Only this much of a provider's text is looked at; the output is far shorter anyway, so a
/// secret cut at this boundary never reaches it.
const MAX_INPUT_BYTES: usize = 4096;
const REDACTED: &str = "[redacted]";
/// An echo of this many consecutive characters of a secret we sent is redacted, so that a
/// partial or re-wrapped echo is caught too.
const SECRET_WINDOW: usize = 12;
/// Prefixes of Notion's access tokens, refresh tokens and (internal integration or client)
/// secrets.
const TOKEN_PREFIXES: [&str; 3] = ["ntn_", "nrt_", "secret_"];

/// Characters of a token-like run: base64, base64url, hex, percent-encoding, and the
/// separators of JWTs and URL-safe tokens.
fn is_run_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=' | b'_' | b'-' | b'.' | b'~' | b'%')
}

/// Scrubs provider text: keeps printable ASCII (whitespace becomes one space; everything else,
/// including invisible and non-ASCII characters that could split a token, is dropped, which
/// joins the pieces again), then replaces with `[redacted]`:
/// - any run of 12 characters of a secret we sent in the request (case-insensitive);
/// - the credential after `Basic` or `Bearer`;
/// - any run of token characters that holds `ntn_`, `nrt_` or `secret_`;
/// - any run of token characters of 32 or more, or of 20 or more with a digit in it (tokens,
///   codes, base64 and hex blobs; ordinary words and snake_case error names are shorter or
///   have no digits);
///
/// and finally cuts the result to `MAX_TEXT_CHARS`.
///
/// Hand-written: no maintained crate redacts secrets from free text by shape (secret scanners
/// such as gitleaks's rules are whole programs over files), and the rules here are few.
pub fn scrub(raw: &str, sent: &Sent<'_>) -> String {
    scrub_with(raw, sent, true)
}

fn scrub_with(raw: &str, sent: &Sent<'_>, long_runs: bool) -> String {
    let mut end = raw.len().min(MAX_INPUT_BYTES);
    while !raw.is_char_boundary(end) {
        end -= 1;
    }
    let mut text = String::with_capacity(end);
    for c in raw[..end].chars() {
        if c.is_whitespace() {
            if !text.ends_with(' ') {
                text.push(' ');
            }
        } else if c.is_ascii_graphic() {
            text.push(c);
        }
    }
    let bytes = text.as_bytes();
    let lower = text.to_ascii_lowercase();
    let lower = lower.as_bytes();
    let mut redact = vec![false; bytes.len()];

    // What we sent, in windows, so that any long enough piece of it is found in one pass.
    let mut windows = std::collections::HashSet::new();
    let mut short = Vec::new();
    for secret in &sent.secrets {
        let secret = secret.to_ascii_lowercase().into_bytes();
        if secret.len() <= SECRET_WINDOW {
            short.push(secret);
        } else {
            windows.extend(secret.windows(SECRET_WINDOW).map(<[u8]>::to_vec));
        }
    }
    if lower.len() >= SECRET_WINDOW {
        for (i, w) in lower.windows(SECRET_WINDOW).enumerate() {
            if windows.contains(w) {
                redact[i..i + SECRET_WINDOW].fill(true);
            }
        }
    }
    for secret in &short {
        for (i, w) in lower.windows(secret.len()).enumerate() {
            if w == secret.as_slice() {
                redact[i..i + secret.len()].fill(true);
            }
        }
    }

    // Runs of token characters.
    let mut i = 0;
    while i < bytes.len() {
        if !is_run_byte(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && is_run_byte(bytes[i]) {
            i += 1;
        }
        let run = &lower[start..i];
        let run_text = std::str::from_utf8(run).expect("ASCII");
        let after_scheme = {
            let before = lower[..start].trim_ascii_end();
            let spaced = before.len() < start;
            let word_start = before
                .iter()
                .rposition(|b| !b.is_ascii_alphabetic())
                .map_or(0, |p| p + 1);
            spaced && matches!(&before[word_start..], b"basic" | b"bearer")
        };
        let token_prefixed = TOKEN_PREFIXES.iter().any(|p| run_text.contains(p));
        let long = run.len() >= 32 || (run.len() >= 20 && run.iter().any(u8::is_ascii_digit));
        if after_scheme || token_prefixed || (long_runs && long) {
            redact[start..i].fill(true);
        }
    }

    let mut out = String::with_capacity(text.len());
    let mut in_redaction = false;
    for (i, &b) in bytes.iter().enumerate() {
        if redact[i] {
            if !in_redaction {
                out.push_str(REDACTED);
            }
            in_redaction = true;
        } else {
            in_redaction = false;
            out.push(b as char);
        }
    }
    let out = out.trim();
    if out.len() <= MAX_TEXT_CHARS {
        return out.to_owned();
    }
    format!("{}...", out[..MAX_TEXT_CHARS - 3].trim_end())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const REFRESH: &str = "nrt_4Vq8TzL2mWcX9pRk7YbN3hJd6GfS1aEu";
    const CODE: &str = "0f9a6c2e-5b1d-4e7a-9c3f-8d2b1a7e6c50";
    const BASIC: &str = "dG9rZW5rZWVwZXItZGV2OmRldi1zZWNyZXQtbm90LWZvci1wcm9kdWN0aW9u";
    const CLIENT_SECRET: &str = "dev-secret-not-for-production";

    fn sent() -> Sent<'static> {
        Sent::new([REFRESH, CODE, BASIC, CLIENT_SECRET])
    }

    #[test]
    fn ordinary_error_text_survives() {
        for text in [
            "Invalid refresh token.",
            "The authorization code has expired or was already used.",
            "unsupported_grant_type: only authorization_code and refresh_token are supported",
            "API token is invalid.",
        ] {
            assert_eq!(scrub(text, &sent()), text);
        }
    }

    #[test]
    fn echoes_of_what_we_sent_and_anything_token_shaped_are_redacted() {
        let echo = format!(
            "got POST /v1/oauth/token headers {{authorization: Basic {BASIC}, notion-version: 2026-03-11}}              body {{\"grant_type\":\"refresh_token\",\"refresh_token\":\"{REFRESH}\",\"code\":\"{CODE}\"}}              secret={CLIENT_SECRET} bearer ntn_abc Bearer xyz"
        );
        let out = scrub(&echo, &sent());
        for secret in [
            REFRESH,
            CODE,
            BASIC,
            CLIENT_SECRET,
            "ntn_abc",
            "xyz",
            "dev-secret",
        ] {
            assert!(!out.contains(secret), "{secret} in {out}");
        }
        assert!(
            out.contains("[redacted]") && out.len() <= MAX_TEXT_CHARS,
            "{out}"
        );
        // Pieces and disguises.
        let half = &REFRESH[4..20];
        assert!(!scrub(&format!("token {half}"), &sent()).contains(half));
        let upper = REFRESH.to_ascii_uppercase();
        assert!(!scrub(&upper, &sent()).contains(&upper[..16]));
        let split = format!("{}\u{200b}{}", &REFRESH[..10], &REFRESH[10..]);
        let out = scrub(&split, &Sent::nothing());
        assert!(!out.contains(&REFRESH[10..]), "{out}");
        let unknown = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        assert_eq!(scrub(unknown, &Sent::nothing()), "[redacted]");
    }

    #[test]
    fn codes_and_request_ids_keep_their_shape_or_are_dropped() {
        let nothing = Sent::nothing();
        assert_eq!(
            ProviderCode::from_untrusted("invalid_grant", &nothing),
            "invalid_grant"
        );
        assert_eq!(
            ProviderCode::from_untrusted("<script>", &nothing),
            UNRECOGNIZED_CODE
        );
        assert_eq!(
            ProviderCode::from_untrusted(REFRESH, &sent()),
            UNRECOGNIZED_CODE
        );
        assert_eq!(
            ProviderCode::from_untrusted(&REFRESH.to_ascii_lowercase(), &nothing),
            UNRECOGNIZED_CODE
        );
        let id = "9a1f4c1e-33b0-4a41-bd8b-6f2a3c9d0e11";
        assert_eq!(
            ProviderRequestId::from_untrusted(id, &sent())
                .unwrap()
                .as_str(),
            id
        );
        assert!(ProviderRequestId::from_untrusted(CODE, &sent()).is_none());
        assert!(ProviderRequestId::from_untrusted("nrt_x", &nothing).is_none());
        assert!(ProviderRequestId::from_untrusted("a b", &nothing).is_none());
    }

    proptest! {
        /// Whatever surrounds a secret we sent, none of it comes out, and the output is
        /// bounded printable ASCII.
        #[test]
        fn a_sent_secret_never_survives(
            before in "\\PC{0,300}",
            after in "\\PC{0,300}",
            secret in "[A-Za-z0-9_-]{13,60}",
        ) {
            let out = scrub(&format!("{before}{secret}{after}"), &Sent::new([secret.as_str()]));
            prop_assert!(!out.to_ascii_lowercase().contains(&secret.to_ascii_lowercase()[..SECRET_WINDOW]));
            prop_assert!(out.len() <= MAX_TEXT_CHARS);
            prop_assert!(out.bytes().all(|b| b.is_ascii_graphic() || b == b' '));
        }
    }
}
