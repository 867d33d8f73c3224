//! API keys: who may call `/v1`, and with which scope.
//!
//! Keys are compared in constant time, against every configured key, so that neither the
//! position nor the length of a match leaks through timing. Keys are never logged: their
//! `Debug` prints only the scope and a fingerprint.

use std::fmt;

use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    /// Read connections, read access tokens, ask for refreshes, use the proxy.
    Tokens,
    /// Everything: connect and reconnect sessions, revocation, grants and events, and
    /// `include_refresh_token=true`.
    Admin,
}

#[derive(Clone)]
pub struct ApiKey {
    scope: Scope,
    /// SHA-256 of the key: equal-length digests make the constant-time comparison meaningful.
    digest: [u8; 32],
    secret: SecretString,
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKey({:?}, [redacted])", self.scope)
    }
}

const MIN_KEY_LEN: usize = 16;

impl ApiKey {
    pub fn new(scope: Scope, key: &str) -> Result<Self, String> {
        if key.len() < MIN_KEY_LEN {
            return Err(format!(
                "an API key is at least {MIN_KEY_LEN} characters long"
            ));
        }
        if key.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err("an API key cannot contain spaces or control characters".into());
        }
        Ok(ApiKey {
            scope,
            digest: Sha256::digest(key.as_bytes()).into(),
            secret: SecretString::from(key.to_owned()),
        })
    }

    /// A new random admin key (`tk_…`, 192 bits).
    pub fn generate_admin() -> Self {
        let key = format!("tk_{}", crate::ids::random_token(24));
        ApiKey::new(Scope::Admin, &key).expect("a generated key is valid")
    }

    /// The key itself, for writing it to the file it was generated into.
    pub fn expose(&self) -> &str {
        self.secret.expose_secret()
    }
}

#[derive(Debug, Clone, Default)]
pub struct ApiKeys(Vec<ApiKey>);

impl ApiKeys {
    pub fn new(keys: Vec<ApiKey>) -> Self {
        ApiKeys(keys)
    }

    /// Parses `[scope:]key` entries separated by commas or newlines.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut keys = Vec::new();
        for (i, entry) in text
            .split([',', '\n'])
            .map(str::trim)
            .filter(|e| !e.is_empty() && !e.starts_with('#'))
            .enumerate()
        {
            let (scope, key) = match entry.split_once(':') {
                Some(("tokens", key)) => (Scope::Tokens, key),
                Some(("admin", key)) => (Scope::Admin, key),
                Some((other, _))
                    if !other.is_empty() && other.chars().all(|c| c.is_ascii_alphabetic()) =>
                {
                    return Err(format!(
                        "entry {}: unknown scope {other:?} (use tokens: or admin:)",
                        i + 1
                    ))
                }
                _ => (Scope::Admin, entry),
            };
            keys.push(ApiKey::new(scope, key).map_err(|e| format!("entry {}: {e}", i + 1))?);
        }
        if keys.is_empty() {
            return Err("no API key given".into());
        }
        Ok(ApiKeys(keys))
    }

    /// The scope of the presented key, if it is one of ours. Looks at every key whatever
    /// happens, so the time taken does not depend on which key matched.
    pub fn check(&self, presented: &str) -> Option<Scope> {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let mut found = None;
        for key in &self.0 {
            if bool::from(key.digest.ct_eq(&digest)) {
                found = Some(key.scope);
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_parse_and_keys_match_exactly() {
        let keys = ApiKeys::parse(
            "tokens:tok-0123456789abcdef, admin:adm-0123456789abcdef,plain-0123456789abcdef",
        )
        .unwrap();
        assert_eq!(keys.check("tok-0123456789abcdef"), Some(Scope::Tokens));
        assert_eq!(keys.check("adm-0123456789abcdef"), Some(Scope::Admin));
        assert_eq!(keys.check("plain-0123456789abcdef"), Some(Scope::Admin));
        assert_eq!(keys.check("tok-0123456789abcde"), None);
        assert_eq!(keys.check(""), None);
    }

    #[test]
    fn bad_keys_are_refused() {
        assert!(ApiKeys::parse("short").is_err());
        assert!(ApiKeys::parse("reader:0123456789abcdef0").is_err());
        assert!(ApiKeys::parse(" , ").is_err());
    }

    #[test]
    fn keys_never_print() {
        let k = ApiKey::new(Scope::Admin, "super-secret-key-123").unwrap();
        assert!(!format!("{k:?}").contains("super-secret"));
    }
}
