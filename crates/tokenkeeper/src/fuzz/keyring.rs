//! Target 3: the key ring's text (`seal::KeyRing::parse`), from `TOKENKEEPER_ENCRYPTION_KEY` or
//! a key ring file.
//!
//! Properties, beyond "never panics":
//! - A ring is accepted exactly when its text follows the documented format: lines, of which
//!   blank ones and those starting with `#` are ignored whole; the others hold entries
//!   `<key id>:<base64 of 32 bytes>` separated by commas (an entry starting with `#` is ignored
//!   too); key ids of 1 to 64 letters, digits, `-` or `_`, each once; at least one entry.
//! - An accepted ring round-trips: its active key id is the first entry's, it contains every
//!   listed key id and no other, and each id holds the key bytes written for it (a key check
//!   value sealed by a ring built from the same entries opens in it).
//! - A refusal never shows key material: no run of 16 characters of any key's base64 (padded
//!   or not, either alphabet) appears in the error's `Display` or `Debug`, even when an entry is
//!   written key first, or the key stands alone.

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine;
use proptest::prelude::*;

use super::sealed::ring_text;
use super::{config, hostile_text, mutate, mutations, replay_corpus};
use crate::seal::{KeyRing, SealError};

/// How a key is written.
#[derive(Debug, Clone)]
enum KeyForm {
    Standard,
    NoPadding,
    UrlSafe,
    /// Whitespace inside the base64.
    Broken,
    /// Base64 of a key of another length.
    Length(Vec<u8>),
    Garbage(String),
}

/// One piece of a ring's text.
#[derive(Debug, Clone)]
enum Piece {
    /// `<id>:<key>`, with spaces around its parts when `spaced`.
    Entry {
        id: String,
        key: [u8; 32],
        form: KeyForm,
        spaced: bool,
    },
    /// `<key>:<id>`: the two parts swapped.
    Swapped {
        id: String,
        key: [u8; 32],
    },
    /// A key without its id.
    KeyAlone([u8; 32]),
    /// A comment line, which may hold commas and whole entries.
    Comment(String),
    /// An earlier piece again (a duplicated key id, or a duplicated comment).
    Again(prop::sample::Index),
    Garbage(String),
}

fn key_id() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => "[a-zA-Z0-9_-]{1,64}",
        1 => "[a-zA-Z0-9_-]{65,80}",
        1 => Just(String::new()),
        1 => "[a-z]{1,8}[ .=+/|é\u{0}\t][a-z]{1,8}",
        1 => hostile_text(),
    ]
}

fn key_form() -> impl Strategy<Value = KeyForm> {
    prop_oneof![
        8 => Just(KeyForm::Standard),
        1 => Just(KeyForm::NoPadding),
        1 => Just(KeyForm::UrlSafe),
        1 => Just(KeyForm::Broken),
        1 => prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..32),
            proptest::collection::vec(any::<u8>(), 33..80),
        ]
        .prop_map(KeyForm::Length),
        1 => hostile_text().prop_map(KeyForm::Garbage),
    ]
}

fn piece() -> impl Strategy<Value = Piece> {
    prop_oneof![
        10 => (key_id(), any::<[u8; 32]>(), key_form(), any::<bool>()).prop_map(
            |(id, key, form, spaced)| Piece::Entry { id, key, form, spaced }
        ),
        1 => ("[a-zA-Z0-9_-]{1,12}", any::<[u8; 32]>())
            .prop_map(|(id, key)| Piece::Swapped { id, key }),
        1 => any::<[u8; 32]>().prop_map(Piece::KeyAlone),
        2 => (hostile_text(), any::<[u8; 32]>(), any::<bool>()).prop_map(|(text, key, entry)| {
            // A comment that mentions a retired entry, or just has commas.
            let more = if entry {
                format!(", k-retired:{}", STANDARD.encode(key))
            } else {
                ", and so on".into()
            };
            Piece::Comment(format!("# {}{more}", text.replace('\n', " ")))
        }),
        1 => any::<prop::sample::Index>().prop_map(Piece::Again),
        1 => hostile_text().prop_map(Piece::Garbage),
    ]
}

fn separator() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        "\n", "\n", ",", "\r\n", ", ", "\n\n", " ,\n", "\n  \n",
    ])
}

/// A generated ring text, and the keys it holds (to look for in errors).
#[derive(Debug, Clone)]
struct RingCase {
    text: String,
    keys: Vec<[u8; 32]>,
}

fn render_key(key: &[u8; 32], form: &KeyForm) -> String {
    match form {
        KeyForm::Standard => STANDARD.encode(key),
        KeyForm::NoPadding => STANDARD_NO_PAD.encode(key),
        KeyForm::UrlSafe => URL_SAFE.encode(key),
        KeyForm::Broken => {
            let b = STANDARD.encode(key);
            format!("{} {}", &b[..20], &b[20..])
        }
        KeyForm::Length(bytes) => STANDARD.encode(bytes),
        KeyForm::Garbage(text) => text.clone(),
    }
}

fn ring_case() -> impl Strategy<Value = RingCase> {
    (
        proptest::collection::vec((piece(), separator()), 0..7),
        any::<bool>(),
    )
        .prop_map(|(pieces, comment_first)| {
            let mut text = String::new();
            let mut rendered: Vec<String> = Vec::new();
            let mut keys = Vec::new();
            if comment_first {
                text.push_str("# tokenkeeper key ring, newest first\n");
            }
            for (piece, sep) in &pieces {
                let piece_text = match piece {
                    Piece::Entry {
                        id,
                        key,
                        form,
                        spaced,
                    } => {
                        keys.push(*key);
                        let pad = if *spaced { " " } else { "" };
                        format!("{pad}{id}{pad}:{pad}{}{pad}", render_key(key, form))
                    }
                    Piece::Swapped { id, key } => {
                        keys.push(*key);
                        format!("{}:{id}", STANDARD.encode(key))
                    }
                    Piece::KeyAlone(key) => {
                        keys.push(*key);
                        STANDARD.encode(key)
                    }
                    Piece::Comment(c) => {
                        // A comment is a line of its own.
                        if !text.is_empty() && !text.ends_with('\n') {
                            text.push('\n');
                        }
                        format!("{c}\n")
                    }
                    Piece::Again(i) if !rendered.is_empty() => {
                        rendered[i.index(rendered.len())].clone()
                    }
                    Piece::Again(_) => String::new(),
                    Piece::Garbage(g) => g.clone(),
                };
                text.push_str(&piece_text);
                text.push_str(sep);
                rendered.push(piece_text);
            }
            // Keys that only comments hold are key material too.
            for c in pieces.iter().filter_map(|(p, _)| match p {
                Piece::Comment(c) => Some(c),
                _ => None,
            }) {
                for word in c.split([',', ':', ' ']) {
                    if let Ok(bytes) = STANDARD.decode(word) {
                        if let Ok(key) = <[u8; 32]>::try_from(bytes) {
                            keys.push(key);
                        }
                    }
                }
            }
            RingCase { text, keys }
        })
}

fn valid_key_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The documented format, read independently of `KeyRing::parse`: the entries of an acceptable
/// ring in order, or `None`.
fn spec_entries(text: &str) -> Option<Vec<(String, [u8; 32])>> {
    let mut entries: Vec<(String, [u8; 32])> = Vec::new();
    for line in text.split('\n') {
        if line.trim().starts_with('#') {
            continue;
        }
        for entry in line.split(',').map(str::trim) {
            if entry.is_empty() || entry.starts_with('#') {
                continue;
            }
            let (id, b64) = entry.split_once(':')?;
            let (id, b64) = (id.trim(), b64.trim());
            if !valid_key_id(id) || entries.iter().any(|(e, _)| e == id) {
                return None;
            }
            let key = <[u8; 32]>::try_from(STANDARD.decode(b64).ok()?).ok()?;
            entries.push((id.to_owned(), key));
        }
    }
    (!entries.is_empty()).then_some(entries)
}

/// The base64 forms of a key that could be quoted.
fn forms(key: &[u8; 32]) -> [String; 4] {
    [
        STANDARD.encode(key),
        STANDARD_NO_PAD.encode(key),
        URL_SAFE.encode(key),
        URL_SAFE_NO_PAD.encode(key),
    ]
}

/// No 16-character run of any form of `keys` in what `e` shows.
fn assert_no_key_material(e: &SealError, keys: &[[u8; 32]]) -> Result<(), TestCaseError> {
    let shown = format!("{e}\n{e:?}");
    for key in keys {
        for form in forms(key) {
            for window in form.as_bytes().windows(16) {
                let window = std::str::from_utf8(window).expect("base64 is ASCII");
                prop_assert!(
                    !shown.contains(window),
                    "the error shows key material ({window}): {shown}"
                );
            }
        }
    }
    Ok(())
}

/// Key material in arbitrary text: runs of the base64 alphabet that decode to 32 bytes and have
/// a character no key id can have (`+`, `/` or `=`), so that ids are not taken for keys.
fn keys_in(text: &str) -> Vec<[u8; 32]> {
    let lenient = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    text.split(|c: char| !(c.is_ascii_alphanumeric() || "+/=".contains(c)))
        .filter(|run| run.contains(['+', '/', '=']))
        .filter_map(|run| lenient.decode(run).ok())
        .filter_map(|bytes| <[u8; 32]>::try_from(bytes).ok())
        .collect()
}

fn check_ring(text: &str, keys: &[[u8; 32]], spec: bool) -> Result<(), TestCaseError> {
    let parsed = KeyRing::parse(text);
    let expected = spec.then(|| spec_entries(text));
    match (&parsed, expected) {
        (Ok(ring), Some(Some(entries))) => {
            prop_assert_eq!(ring.active_key_id(), entries[0].0.as_str());
            // Built from the same entries the canonical way: each id holds the same key.
            let canonical = KeyRing::parse(&ring_text(&entries)).unwrap();
            for (id, _) in &entries {
                prop_assert!(ring.contains(id));
                let check = canonical.seal_check(id).unwrap();
                prop_assert_eq!(ring.open_check(id, &check), Ok(()), "key {} differs", id);
            }
            let debug = format!("{ring:?}");
            let listed = debug.matches('"').count() / 2;
            // The active id, then every key id: one quoted string each.
            prop_assert_eq!(listed, entries.len() + 1, "extra key ids: {}", debug);
        }
        (Ok(ring), Some(None)) => {
            return Err(TestCaseError::fail(format!(
                "a ring outside the documented format was accepted: {ring:?}"
            )))
        }
        (Err(e), Some(Some(_))) => {
            return Err(TestCaseError::fail(format!(
                "a ring in the documented format was refused: {e}"
            )))
        }
        (Ok(ring), None) => prop_assert!(ring.contains(ring.active_key_id())),
        (Err(_), _) => {}
    }
    if let Err(e) = &parsed {
        assert_no_key_material(e, keys)?;
        if text.trim().is_empty() {
            prop_assert_eq!(e, &SealError::EmptyKeyRing);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(2048))]

    #[test]
    fn rings_are_accepted_exactly_in_the_documented_format_and_round_trip(case in ring_case()) {
        check_ring(&case.text, &case.keys, true)?;
    }
}

proptest! {
    #![proptest_config(config(2048))]

    #[test]
    fn damaged_rings_never_panic_and_never_show_a_key(case in ring_case(), damage in mutations(3)) {
        let text = String::from_utf8_lossy(&mutate(case.text.as_bytes(), &damage)).into_owned();
        check_ring(&text, &case.keys, true)?;
    }
}

proptest! {
    #![proptest_config(config(4096))]

    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,200}") {
        check_ring(&text, &keys_in(&text), false)?;
    }
}

#[test]
fn the_key_ring_corpus_keeps_the_properties() {
    replay_corpus("key-ring", |bytes| {
        let text = String::from_utf8_lossy(bytes);
        check_ring(&text, &keys_in(&text), true)
    });
}
