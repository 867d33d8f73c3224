//! Target 2: sealed values (`seal::KeyRing::open`), the bytes the store reads back from its
//! token columns and the spill journal.
//!
//! Properties, beyond "never panics":
//! - A sealed value opens, to its plaintext, in its own context with its own ring (a ring that
//!   holds its key among others, active or not).
//! - It never opens in another context: another connection, grant or column. Row ids never
//!   contain `|` (they are prefixed uuids, and the journal's owner names are built from them),
//!   so the generated ones do not either: that is what keeps two contexts' associated data apart.
//! - It never opens under another key: a ring with the same key id but other key bytes
//!   (`Forged`), or a ring without that key id (`UnknownKey`).
//! - Damaged in any way (truncated, flipped, extended, its key id rewritten), it never opens.
//! - Arbitrary bytes, and bytes with a well-formed header around random contents, never open.
//! - A token never opens as a key check value, nor a key check value as a token.

use base64::Engine;
use proptest::prelude::*;

use super::{config, hostile_text, mutate, mutations, replay_corpus};
use crate::seal::{Column, KeyRing, SealContext, SealError};

/// A key ring's entries: distinct key ids, each with its 32 key bytes.
pub(crate) fn ring_entries(max: usize) -> impl Strategy<Value = Vec<(String, [u8; 32])>> {
    proptest::collection::btree_map("[a-zA-Z0-9_-]{1,64}", any::<[u8; 32]>(), 1..=max)
        .prop_map(|m| m.into_iter().collect::<Vec<_>>())
        .prop_shuffle()
}

/// The text of a ring, one entry per line, the first active.
pub(crate) fn ring_text(entries: &[(String, [u8; 32])]) -> String {
    entries
        .iter()
        .map(|(id, key)| {
            format!(
                "{id}:{}",
                base64::engine::general_purpose::STANDARD.encode(key)
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A row id as the store makes them, or hostile text; never with `|`.
fn row_id(prefix: &'static str) -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[0-9a-f]{32}".prop_map(move |hex| format!("{prefix}_{hex}")),
        1 => hostile_text().prop_map(|s| s.replace('|', "")),
    ]
}

fn column() -> impl Strategy<Value = Column> {
    prop_oneof![Just(Column::AccessToken), Just(Column::RefreshToken)]
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Place {
    connection: String,
    grant: String,
    column: Column,
}

impl Place {
    fn ctx(&self) -> SealContext<'_> {
        SealContext {
            connection_id: &self.connection,
            grant_id: &self.grant,
            column: self.column,
        }
    }
}

fn place() -> impl Strategy<Value = Place> {
    (row_id("con"), row_id("grt"), column()).prop_map(|(connection, grant, column)| Place {
        connection,
        grant,
        column,
    })
}

/// A place that differs from `p` in at least one of its three parts.
fn other_place(p: Place) -> impl Strategy<Value = Place> {
    (
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        place(),
        Just(p),
    )
        .prop_map(|(c, g, col, fresh, p)| Place {
            connection: if c {
                fresh.connection
            } else {
                p.connection.clone()
            },
            grant: if g { fresh.grant } else { p.grant.clone() },
            column: if col { fresh.column } else { p.column },
        })
}

fn plaintext() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "(ntn|nrt)_[A-Za-z0-9]{0,60}",
        1 => hostile_text(),
        1 => "\\PC{0,300}",
    ]
}

/// A ring and one value sealed by it, with where it was sealed.
#[derive(Debug, Clone)]
struct Sealed {
    entries: Vec<(String, [u8; 32])>,
    place: Place,
    plaintext: String,
}

fn sealed() -> impl Strategy<Value = Sealed> {
    (ring_entries(3), place(), plaintext()).prop_map(|(entries, place, plaintext)| Sealed {
        entries,
        place,
        plaintext,
    })
}

impl Sealed {
    fn ring(&self) -> KeyRing {
        KeyRing::parse(&ring_text(&self.entries)).expect("a generated ring parses")
    }
}

/// What `open` must say about bytes that are not the value sealed for this place.
fn refused(result: Result<String, SealError>) -> Result<(), TestCaseError> {
    match result {
        Err(SealError::Malformed | SealError::Forged | SealError::UnknownKey(_)) => Ok(()),
        other => Err(TestCaseError::fail(format!(
            "opened or failed oddly: {other:?}"
        ))),
    }
}

proptest! {
    #![proptest_config(config(1024))]

    #[test]
    fn a_sealed_value_opens_only_in_its_own_place_with_its_own_key(
        (case, other) in sealed().prop_flat_map(|c| {
            let p = c.place.clone();
            (Just(c), other_place(p))
        }),
        other_key in any::<[u8; 32]>(),
        reader_extra in ring_entries(2),
    ) {
        let ring = case.ring();
        let sealed = ring.seal(case.place.ctx(), &case.plaintext);
        prop_assert_eq!(KeyRing::key_id_of(&sealed).unwrap(), ring.active_key_id());
        prop_assert_eq!(ring.open(case.place.ctx(), &sealed).unwrap(), case.plaintext.clone());

        // A ring that holds the key among others, not first, still opens it (rotation).
        let mut rotated: Vec<_> = reader_extra
            .into_iter()
            .filter(|(id, _)| !case.entries.iter().any(|(e, _)| e == id))
            .collect();
        rotated.extend(case.entries.iter().cloned());
        let rotated = KeyRing::parse(&ring_text(&rotated)).unwrap();
        prop_assert_eq!(rotated.open(case.place.ctx(), &sealed).unwrap(), case.plaintext.clone());

        if other != case.place {
            prop_assert_eq!(ring.open(other.ctx(), &sealed), Err(SealError::Forged));
        }

        let id = ring.active_key_id().to_owned();
        if other_key != case.entries[0].1 {
            let impostor = KeyRing::parse(&ring_text(&[(id.clone(), other_key)])).unwrap();
            prop_assert_eq!(impostor.open(case.place.ctx(), &sealed), Err(SealError::Forged));
        }
        if !case.entries.iter().any(|(e, _)| e == "k-stranger") {
            let stranger = KeyRing::parse(&ring_text(&[("k-stranger".into(), other_key)])).unwrap();
            prop_assert!(matches!(
                stranger.open(case.place.ctx(), &sealed),
                Err(SealError::UnknownKey(k)) if k == id
            ));
        }

        // Tokens and key check values do not stand in for each other.
        prop_assert!(ring.open_check(&id, &sealed).is_err());
        let check = ring.seal_check(&id).unwrap();
        prop_assert_eq!(ring.open(case.place.ctx(), &check), Err(SealError::Forged));
    }
}

proptest! {
    #![proptest_config(config(2048))]

    #[test]
    fn a_damaged_sealed_value_never_opens(case in sealed(), damage in mutations(4)) {
        let ring = case.ring();
        let sealed = ring.seal(case.place.ctx(), &case.plaintext);
        let damaged = mutate(&sealed, &damage);
        let _ = KeyRing::key_id_of(&damaged);
        if damaged == sealed {
            prop_assert_eq!(ring.open(case.place.ctx(), &damaged).unwrap(), case.plaintext);
        } else {
            refused(ring.open(case.place.ctx(), &damaged))?;
            let id = ring.active_key_id().to_owned();
            prop_assert!(ring.open_check(&id, &damaged).is_err());
        }
    }
}

proptest! {
    #![proptest_config(config(1024))]

    #[test]
    fn a_key_id_rewritten_to_another_of_the_ring_never_opens(case in sealed(), pick in any::<prop::sample::Index>()) {
        let ring = case.ring();
        let sealed = ring.seal(case.place.ctx(), &case.plaintext);
        let (id, _) = &case.entries[pick.index(case.entries.len())];
        let old = ring.active_key_id();
        let mut forged = vec![sealed[0], id.len() as u8];
        forged.extend_from_slice(id.as_bytes());
        forged.extend_from_slice(&sealed[2 + old.len()..]);
        if forged != sealed {
            prop_assert_eq!(ring.open(case.place.ctx(), &forged), Err(SealError::Forged));
        }
    }
}

proptest! {
    #![proptest_config(config(2048))]

    #[test]
    fn arbitrary_bytes_never_open(
        entries in ring_entries(2),
        place in place(),
        header in any::<bool>(),
        tail in proptest::collection::vec(any::<u8>(), 0..200),
    ) {
        let ring = KeyRing::parse(&ring_text(&entries)).unwrap();
        // With `header`, a well-formed head naming a key of the ring around random contents.
        let bytes = if header {
            let id = ring.active_key_id();
            let mut b = vec![1, id.len() as u8];
            b.extend_from_slice(id.as_bytes());
            b.extend_from_slice(&tail);
            b
        } else {
            tail
        };
        let _ = KeyRing::key_id_of(&bytes);
        refused(ring.open(place.ctx(), &bytes))?;
        prop_assert!(ring.open_check(ring.active_key_id(), &bytes).is_err());
    }
}

#[test]
fn the_sealed_corpus_never_opens() {
    // The corpus holds hostile byte strings; none may open under a ring holding the key ids
    // they name (`k1`) or any other.
    let ring = KeyRing::parse(&ring_text(&[
        ("k1".into(), [7; 32]),
        ("k2".into(), [9; 32]),
    ]))
    .unwrap();
    let place = Place {
        connection: "con_00000000000000000000000000000001".into(),
        grant: "grt_00000000000000000000000000000001".into(),
        column: Column::AccessToken,
    };
    replay_corpus("sealed", |bytes| {
        let _ = KeyRing::key_id_of(bytes);
        refused(ring.open(place.ctx(), bytes))?;
        prop_assert!(ring.open_check("k1", bytes).is_err());
        Ok(())
    });
}
