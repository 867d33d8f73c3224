//! Opaque identifiers and secrets.

use rand::RngCore;
use sha2::{Digest, Sha256};

/// Bytes of randomness in every token: 192 bits from the thread-local CSPRNG (ChaCha, seeded
/// from the operating system), well past the 128 bits that make guessing hopeless.
const TOKEN_BYTES: usize = 24;

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 0x0f) as usize] as char);
    }
    out
}

fn secret(prefix: &str) -> String {
    let mut bytes = [0u8; TOKEN_BYTES];
    rand::thread_rng().fill_bytes(&mut bytes);
    let mut out = String::with_capacity(prefix.len() + TOKEN_BYTES * 2);
    out.push_str(prefix);
    out.push_str(&hex(&bytes));
    out
}

/// A new access token, shaped like Notion's (`ntn_…`).
pub(crate) fn access_token() -> String {
    secret("ntn_")
}

/// A new refresh token, shaped like Notion's (`nrt_…`).
pub(crate) fn refresh_token() -> String {
    secret("nrt_")
}

/// A random (version 4) UUID in its hyphenated form, as Notion writes ids.
pub(crate) fn uuid() -> String {
    uuid::Uuid::new_v4().hyphenated().to_string()
}

/// A token's public fingerprint: `sha256:` and the first 16 hex digits of its SHA-256.
///
/// The broker computes the same function, so the simulator's logs and tokenkeeper's ledger can
/// be correlated without either ever showing a token.
pub fn fingerprint(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    format!("sha256:{}", &hex(&digest)[..16])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_is_the_prefix_of_the_sha256() {
        // sha256("abc") = ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad
        assert_eq!(fingerprint("abc"), "sha256:ba7816bf8f01cfea");
    }

    #[test]
    fn tokens_carry_notion_prefixes_and_enough_entropy() {
        let a = access_token();
        let r = refresh_token();
        assert!(a.starts_with("ntn_") && a.len() == 4 + 2 * TOKEN_BYTES);
        assert!(r.starts_with("nrt_"));
        assert_ne!(a, access_token());
    }
}
