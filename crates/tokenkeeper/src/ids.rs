//! Identifiers and secrets as distinct types, so that a grant id cannot be passed where a
//! connection id is expected and a token cannot be printed by accident.

use std::fmt;

use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

/// Generates a prefixed, sortable, unguessable id: `<prefix>_<uuid v7 as 32 hex digits>`.
fn new_prefixed(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::now_v7().simple())
}

/// Checks the shape of a prefixed id, so malformed ids are rejected at the edge rather than
/// reaching the database.
fn valid_prefixed(prefix: &str, s: &str) -> bool {
    s.len() == prefix.len() + 33
        && s.starts_with(prefix)
        && s.as_bytes()[prefix.len()] == b'_'
        && s[prefix.len() + 1..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

macro_rules! prefixed_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            pub const PREFIX: &'static str = $prefix;

            pub fn generate() -> Self {
                Self(new_prefixed($prefix))
            }

            /// Parses an id received from outside; `None` when it does not have the id's shape.
            pub fn parse(s: &str) -> Option<Self> {
                valid_prefixed($prefix, s).then(|| Self(s.to_owned()))
            }

            /// Wraps an id read back from our own database, which only ever holds ids we made.
            pub fn from_trusted(s: String) -> Self {
                Self(s)
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        /// In the OpenAPI document: a string of exactly the shape `parse` accepts.
        impl utoipa::PartialSchema for $name {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                utoipa::openapi::ObjectBuilder::new()
                    .schema_type(utoipa::openapi::schema::Type::String)
                    .pattern(Some(concat!("^", $prefix, "_[0-9a-f]{32}$")))
                    .examples([concat!($prefix, "_0192f6b4c1a87d3e9b5f0a2c4e6d8b1f")])
                    .into()
            }
        }

        impl utoipa::ToSchema for $name {}

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

prefixed_id!(
    /// A connection's stable id (`con_…`); it survives re-authorizations and `bot_id` changes.
    ConnectionId,
    "con"
);
prefixed_id!(
    /// One token pair in the ledger (`grt_…`).
    GrantId,
    "grt"
);
prefixed_id!(
    /// One audit record (`evt_…`).
    EventId,
    "evt"
);
prefixed_id!(
    /// A connect or reconnect session (`cs_…`).
    SessionId,
    "cs"
);
prefixed_id!(
    /// One recorded refresh attempt (`rfa_…`).
    AttemptId,
    "rfa"
);

/// Notion's identifier of one authorization (the bot in a workspace). Opaque to us.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(transparent)]
pub struct BotId(pub String);

impl fmt::Display for BotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for BotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

macro_rules! secret_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone)]
        pub struct $name(SecretString);

        impl $name {
            pub fn new(s: impl Into<String>) -> Self {
                Self(SecretString::from(s.into()))
            }

            /// The plaintext. Call it only at the sealing boundary and in the HTTP client.
            pub fn expose_secret(&self) -> &str {
                self.0.expose_secret()
            }

            /// A short, non-reversible fingerprint that is safe to log and show.
            pub fn fingerprint(&self) -> String {
                fingerprint(self.expose_secret())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(concat!(stringify!($name), "([redacted])"))
            }
        }

        impl PartialEq for $name {
            /// Constant-time, so that comparing tokens leaks nothing through timing.
            fn eq(&self, other: &Self) -> bool {
                use subtle::ConstantTimeEq;
                self.expose_secret()
                    .as_bytes()
                    .ct_eq(other.expose_secret().as_bytes())
                    .into()
            }
        }
    };
}

secret_type!(
    /// An OAuth access token.
    AccessToken
);
secret_type!(
    /// An OAuth refresh token.
    RefreshToken
);
secret_type!(
    /// An OAuth client secret.
    ClientSecret
);

/// The fingerprint of a token: the first 16 hex digits of its SHA-256, the same function the
/// simulator uses, so that a test can correlate our ledger with the provider's view.
pub fn fingerprint(token: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(token.as_bytes());
    let mut hex = String::with_capacity(16);
    for b in &digest[..8] {
        hex.push_str(&format!("{b:02x}"));
    }
    format!("sha256:{hex}")
}

/// A random value of 128 bits or more, URL-safe, for `state` and session links.
pub fn random_token(bytes: usize) -> String {
    use base64::Engine;
    let mut buf = vec![0u8; bytes];
    rand::rngs::OsRng.fill_bytes(&mut buf);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_reject_foreign_shapes() {
        let id = ConnectionId::generate();
        assert_eq!(ConnectionId::parse(id.as_str()), Some(id.clone()));
        assert!(GrantId::parse(id.as_str()).is_none());
        assert!(ConnectionId::parse("con_123").is_none());
        assert!(ConnectionId::parse("con_ZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZ").is_none());
    }

    #[test]
    fn secrets_never_print() {
        let t = AccessToken::new("ntn_very_secret");
        assert_eq!(format!("{t:?}"), "AccessToken([redacted])");
    }
}
