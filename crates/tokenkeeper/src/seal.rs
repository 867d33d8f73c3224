//! Sealing tokens at rest with XChaCha20-Poly1305 (invariant 7).
//!
//! A sealed value is `[version=1][key id length][key id][24-byte nonce][ciphertext + tag]`.
//! The associated data binds it to its connection, grant and column, so a value copied to
//! another row, or to the other column of the same row, does not open. The key id travels in
//! the value so that keys can rotate: old values open with their own key until
//! `keys rotate` re-seals them with the active one. There is no plaintext mode.
//!
//! A key check value (invariant 11) is sealed the same way, with associated data that names
//! only its key id: it lets a start prove that its key of that id is the key the database was
//! told about, and it opens neither as a token nor as another key id's check.

use std::collections::HashMap;
use std::fmt;

use base64::Engine;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::RngCore;

const VERSION: u8 = 1;
const KEY_LEN: usize = 32;
const NONCE_LEN: usize = 24;

/// What every key check value says; only whether it opens matters.
const CHECK_PLAINTEXT: &str = "tokenkeeper key check";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    #[error("the key ring is empty")]
    EmptyKeyRing,
    #[error("key ring entry {0}: expected `<key id>:<base64 of 32 bytes>`")]
    BadEntry(usize),
    // An entry that fails is named by its number, never by its text: what stands where the key
    // id should be may be the key itself (an entry written key first).
    #[error("key ring entry {entry}: the key is {len} bytes long; keys are 32 bytes")]
    BadKeyLength { entry: usize, len: usize },
    #[error("key id {0:?} appears twice in the key ring")]
    DuplicateKeyId(String),
    #[error(
        "key ring entry {0}: the key id is not valid: use 1 to 64 letters, digits, '-' or '_'"
    )]
    BadKeyId(usize),
    #[error("sealed value was made with key {0:?}, which is not in the key ring")]
    UnknownKey(String),
    #[error("sealed value is malformed")]
    Malformed,
    #[error("sealed value does not open: it was altered, or it belongs to another row or column")]
    Forged,
}

/// Which token column a sealed value belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Column {
    AccessToken,
    RefreshToken,
    /// The `state` of a reusable reconnect session (`connect_sessions.reusable_state`); its
    /// context names the session where a token's names the grant.
    ReconnectState,
}

impl Column {
    fn as_str(self) -> &'static str {
        match self {
            Column::AccessToken => "access_token",
            Column::RefreshToken => "refresh_token",
            Column::ReconnectState => "reconnect_state",
        }
    }
}

/// Where a sealed value lives; all of it goes into the associated data.
#[derive(Debug, Clone, Copy)]
pub struct SealContext<'a> {
    pub connection_id: &'a str,
    pub grant_id: &'a str,
    pub column: Column,
}

impl SealContext<'_> {
    fn associated_data(&self, key_id: &str) -> Vec<u8> {
        format!(
            "tokenkeeper/v{VERSION}|{key_id}|{}|{}|{}",
            self.connection_id,
            self.grant_id,
            self.column.as_str()
        )
        .into_bytes()
    }
}

/// The associated data of a key check value: a shape no token's associated data can have, since
/// key ids and row ids never contain `|`.
fn check_associated_data(key_id: &str) -> Vec<u8> {
    format!("tokenkeeper/v{VERSION}|{key_id}|key-check").into_bytes()
}

/// Several keys, one of them active (the first in the ring). New values are sealed with the
/// active key; any key in the ring opens the values sealed with it.
#[derive(Clone)]
pub struct KeyRing {
    active: String,
    keys: HashMap<String, XChaCha20Poly1305>,
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut ids: Vec<_> = self.keys.keys().collect();
        ids.sort();
        f.debug_struct("KeyRing")
            .field("active", &self.active)
            .field("key_ids", &ids)
            .finish()
    }
}

fn valid_key_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl KeyRing {
    /// Parses a key ring: entries `<key id>:<base64 key>` separated by commas or newlines; the
    /// first entry is the active key. Blank lines and lines starting with `#` are ignored.
    pub fn parse(text: &str) -> Result<Self, SealError> {
        let mut active = None;
        let mut keys = HashMap::new();
        // A comment is a whole line: a comma in it starts no entry, so a key mentioned in a
        // comment (a retired one, say) is never read.
        let entries = text
            .split('\n')
            .filter(|line| !line.trim_start().starts_with('#'))
            .flat_map(|line| line.split(','))
            .map(str::trim)
            .filter(|e| !e.is_empty() && !e.starts_with('#'));
        for (index, entry) in entries.enumerate() {
            let (id, b64) = entry
                .split_once(':')
                .ok_or(SealError::BadEntry(index + 1))?;
            let (id, b64) = (id.trim(), b64.trim());
            if !valid_key_id(id) {
                return Err(SealError::BadKeyId(index + 1));
            }
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|_| SealError::BadEntry(index + 1))?;
            if bytes.len() != KEY_LEN {
                return Err(SealError::BadKeyLength {
                    entry: index + 1,
                    len: bytes.len(),
                });
            }
            let cipher = XChaCha20Poly1305::new_from_slice(&bytes)
                .map_err(|_| SealError::BadEntry(index + 1))?;
            if keys.insert(id.to_owned(), cipher).is_some() {
                return Err(SealError::DuplicateKeyId(id.to_owned()));
            }
            active.get_or_insert_with(|| id.to_owned());
        }
        Ok(KeyRing {
            active: active.ok_or(SealError::EmptyKeyRing)?,
            keys,
        })
    }

    /// A new random key entry, `<key id>:<base64>`, as `keys generate` prints it.
    pub fn generate_entry() -> String {
        let mut key = [0u8; KEY_LEN];
        rand::rngs::OsRng.fill_bytes(&mut key);
        let mut id = [0u8; 4];
        rand::rngs::OsRng.fill_bytes(&mut id);
        let id: String = id.iter().map(|b| format!("{b:02x}")).collect();
        format!(
            "k{}-{id}:{}",
            chrono::Utc::now().format("%Y%m%d"),
            base64::engine::general_purpose::STANDARD.encode(key)
        )
    }

    pub fn active_key_id(&self) -> &str {
        &self.active
    }

    /// Every key id of the ring, sorted (ids only: the console shows them).
    pub fn key_ids(&self) -> Vec<&str> {
        let mut ids: Vec<&str> = self.keys.keys().map(String::as_str).collect();
        ids.sort_unstable();
        ids
    }

    pub fn contains(&self, key_id: &str) -> bool {
        self.keys.contains_key(key_id)
    }

    /// Seals `plaintext` with the active key for the place `ctx` names.
    pub fn seal(&self, ctx: SealContext<'_>, plaintext: &str) -> Vec<u8> {
        self.seal_with(&self.active, &ctx.associated_data(&self.active), plaintext)
    }

    /// The key check value of `key_id` (invariant 11), or `None` if the ring lacks that key.
    pub fn seal_check(&self, key_id: &str) -> Option<Vec<u8>> {
        self.keys
            .contains_key(key_id)
            .then(|| self.seal_with(key_id, &check_associated_data(key_id), CHECK_PLAINTEXT))
    }

    /// Opens the key check value stored for `key_id`: it must name that key id, and this ring's
    /// key of that id must open it. `Forged` means the ring has a different key under that id.
    pub fn open_check(&self, key_id: &str, sealed: &[u8]) -> Result<(), SealError> {
        let plaintext = self.open_with(sealed, |id| {
            if id == key_id {
                Ok(check_associated_data(id))
            } else {
                // A check value moved from another key id's row proves nothing about this one.
                Err(SealError::Forged)
            }
        })?;
        if plaintext == CHECK_PLAINTEXT {
            Ok(())
        } else {
            Err(SealError::Forged)
        }
    }

    fn seal_with(&self, key_id: &str, aad: &[u8], plaintext: &str) -> Vec<u8> {
        let cipher = &self.keys[key_id];
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let ciphertext = cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plaintext.as_bytes(),
                    aad,
                },
            )
            .expect("XChaCha20-Poly1305 encryption cannot fail for in-memory buffers");
        let id = key_id.as_bytes();
        let mut out = Vec::with_capacity(2 + id.len() + NONCE_LEN + ciphertext.len());
        out.push(VERSION);
        out.push(id.len() as u8);
        out.extend_from_slice(id);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ciphertext);
        out
    }

    /// The key id a sealed value names, without opening it.
    pub fn key_id_of(sealed: &[u8]) -> Result<&str, SealError> {
        let (id, _, _) = split(sealed)?;
        Ok(id)
    }

    /// Opens a sealed value; fails, never returns garbage, if anything about it is off.
    pub fn open(&self, ctx: SealContext<'_>, sealed: &[u8]) -> Result<String, SealError> {
        self.open_with(sealed, |key_id| Ok(ctx.associated_data(key_id)))
    }

    /// Opens `sealed` with the associated data `aad` gives for the key id the value names.
    fn open_with(
        &self,
        sealed: &[u8],
        aad: impl FnOnce(&str) -> Result<Vec<u8>, SealError>,
    ) -> Result<String, SealError> {
        let (key_id, nonce, ciphertext) = split(sealed)?;
        let cipher = self
            .keys
            .get(key_id)
            .ok_or_else(|| SealError::UnknownKey(key_id.to_owned()))?;
        let aad = aad(key_id)?;
        let plaintext = cipher
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad: &aad,
                },
            )
            .map_err(|_| SealError::Forged)?;
        String::from_utf8(plaintext).map_err(|_| SealError::Malformed)
    }
}

fn split(sealed: &[u8]) -> Result<(&str, &[u8], &[u8]), SealError> {
    let (&version, rest) = sealed.split_first().ok_or(SealError::Malformed)?;
    if version != VERSION {
        return Err(SealError::Malformed);
    }
    let (&id_len, rest) = rest.split_first().ok_or(SealError::Malformed)?;
    let id_len = id_len as usize;
    if rest.len() < id_len + NONCE_LEN + 16 {
        return Err(SealError::Malformed);
    }
    let (id, rest) = rest.split_at(id_len);
    let id = std::str::from_utf8(id).map_err(|_| SealError::Malformed)?;
    let (nonce, ciphertext) = rest.split_at(NONCE_LEN);
    Ok((id, nonce, ciphertext))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ring() -> KeyRing {
        KeyRing::parse(&KeyRing::generate_entry()).unwrap()
    }

    fn ctx<'a>(c: &'a str, g: &'a str, column: Column) -> SealContext<'a> {
        SealContext {
            connection_id: c,
            grant_id: g,
            column,
        }
    }

    #[test]
    fn moved_values_do_not_open() {
        let ring = ring();
        let sealed = ring.seal(ctx("con_a", "grt_a", Column::AccessToken), "ntn_secret");
        assert_eq!(
            ring.open(ctx("con_b", "grt_a", Column::AccessToken), &sealed),
            Err(SealError::Forged)
        );
        assert_eq!(
            ring.open(ctx("con_a", "grt_b", Column::AccessToken), &sealed),
            Err(SealError::Forged)
        );
        assert_eq!(
            ring.open(ctx("con_a", "grt_a", Column::RefreshToken), &sealed),
            Err(SealError::Forged)
        );
    }

    #[test]
    fn unknown_or_swapped_key_id_fails() {
        let a = KeyRing::parse(&KeyRing::generate_entry()).unwrap();
        let b = KeyRing::parse(&KeyRing::generate_entry()).unwrap();
        let c = ctx("con_a", "grt_a", Column::AccessToken);
        let sealed = a.seal(c, "ntn_secret");
        assert!(matches!(b.open(c, &sealed), Err(SealError::UnknownKey(_))));

        // Rewrite the key id inside the value to the other ring's id: the tag no longer matches.
        let mut forged = vec![VERSION, b.active_key_id().len() as u8];
        forged.extend_from_slice(b.active_key_id().as_bytes());
        forged.extend_from_slice(&sealed[2 + a.active_key_id().len()..]);
        assert_eq!(b.open(c, &forged), Err(SealError::Forged));
    }

    #[test]
    fn rings_rotate_old_values_still_open() {
        let old = KeyRing::generate_entry();
        let new = KeyRing::generate_entry();
        let before = KeyRing::parse(&old).unwrap();
        let c = ctx("con_a", "grt_a", Column::RefreshToken);
        let sealed = before.seal(c, "nrt_x");
        let after = KeyRing::parse(&format!("{new}\n{old}")).unwrap();
        assert_eq!(after.open(c, &sealed).unwrap(), "nrt_x");
        let resealed = after.seal(c, "nrt_x");
        assert_eq!(
            KeyRing::key_id_of(&resealed).unwrap(),
            after.active_key_id()
        );
        assert_ne!(after.active_key_id(), before.active_key_id());
    }

    #[test]
    fn bad_rings_are_refused_with_reasons() {
        assert_eq!(KeyRing::parse("").unwrap_err(), SealError::EmptyKeyRing);
        assert!(matches!(
            KeyRing::parse("k1:AAAA").unwrap_err(),
            SealError::BadKeyLength { len: 3, .. }
        ));
        assert_eq!(
            KeyRing::parse("nocolon").unwrap_err(),
            SealError::BadEntry(1)
        );
        let e = KeyRing::generate_entry();
        let dup = format!("{e},{e}");
        assert!(matches!(
            KeyRing::parse(&dup).unwrap_err(),
            SealError::DuplicateKeyId(_)
        ));
    }

    #[test]
    fn a_check_value_opens_only_with_the_same_key_under_the_same_id() {
        let entry = KeyRing::generate_entry();
        let ring = KeyRing::parse(&entry).unwrap();
        let id = ring.active_key_id().to_owned();
        let check = ring.seal_check(&id).unwrap();
        assert_eq!(ring.open_check(&id, &check), Ok(()));
        assert_eq!(KeyRing::key_id_of(&check).unwrap(), id);
        assert!(ring.seal_check("k-absent").is_none());

        // The same key id with other key bytes: the ring a mistyped copy would give.
        let other_bytes = KeyRing::generate_entry();
        let (_, bytes) = other_bytes.split_once(':').unwrap();
        let impostor = KeyRing::parse(&format!("{id}:{bytes}")).unwrap();
        assert_eq!(impostor.open_check(&id, &check), Err(SealError::Forged));
        let without = KeyRing::parse(&other_bytes).unwrap();
        assert!(matches!(
            without.open_check(&id, &check),
            Err(SealError::UnknownKey(_))
        ));

        // Moved to another key id's row, it proves nothing about that key.
        let two = KeyRing::parse(&format!("{entry},{other_bytes}")).unwrap();
        let second = KeyRing::parse(&other_bytes).unwrap();
        let second_id = second.active_key_id();
        assert_eq!(two.open_check(second_id, &check), Err(SealError::Forged));

        // A check value is not a token, and a token is not a check value.
        let c = ctx("con_a", "grt_a", Column::AccessToken);
        assert_eq!(ring.open(c, &check), Err(SealError::Forged));
        let token = ring.seal(c, CHECK_PLAINTEXT);
        assert_eq!(ring.open_check(&id, &token), Err(SealError::Forged));
    }

    proptest! {
        #[test]
        fn round_trip(token in "\\PC{0,300}") {
            let ring = ring();
            let c = ctx("con_x", "grt_y", Column::AccessToken);
            let sealed = ring.seal(c, &token);
            prop_assert_eq!(ring.open(c, &sealed).unwrap(), token);
        }

        #[test]
        fn any_flipped_byte_fails(token in "[a-z_]{1,64}", pos in any::<prop::sample::Index>(), bit in 0u8..8) {
            let ring = ring();
            let c = ctx("con_x", "grt_y", Column::AccessToken);
            let mut sealed = ring.seal(c, &token);
            let i = pos.index(sealed.len());
            sealed[i] ^= 1 << bit;
            prop_assert!(ring.open(c, &sealed).is_err());
        }
    }
}
