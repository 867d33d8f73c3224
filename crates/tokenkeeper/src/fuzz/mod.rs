//! Fuzzing every parser of outside input, as property tests (issue 11 §9; docs/FUZZING.md).
//!
//! `cargo fuzz` needs a nightly toolchain, which CI does not have, so each target is a proptest
//! property with generators that reach deep: they build valid-looking inputs (a token response,
//! a sealed value, a key ring, a journal file, a proxied request) and then damage them
//! (truncations, byte flips, hostile fragments, wrong types, huge values, unicode, control
//! characters). Every target also replays a committed corpus, `tests/fuzz-corpus/<target>/`,
//! one file per interesting input, and failures that proptest finds are persisted under
//! `proptest-regressions/fuzz/` and replayed first on every run.
//!
//! Each property runs a bounded number of cases: its own default, chosen so that the whole fuzz
//! suite takes under fifteen seconds on two cores in a debug build, or `TOKENKEEPER_FUZZ_CASES`
//! for every property (a long local run sets it high). The default nextest profile stops a fuzz
//! test that runs past two minutes, taking it for a hang (`.config/nextest.toml`).

mod callback;
mod journal;
mod keyring;
mod provider;
mod proxy;
mod return_to;
mod sealed;
pub(crate) mod urls;

use std::path::PathBuf;

use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence};
use serde_json::{json, Value};

/// The proptest settings of a target whose default case count is `default_cases`.
pub(crate) fn config(default_cases: u32) -> Config {
    let cases = std::env::var("TOKENKEEPER_FUZZ_CASES")
        .ok()
        .map(|v| {
            v.trim()
                .parse()
                .unwrap_or_else(|_| panic!("TOKENKEEPER_FUZZ_CASES must be a whole number: {v:?}"))
        })
        .unwrap_or(default_cases);
    Config {
        cases,
        // Shrinking a failure of a deep generator can take long; a bounded shrink still gives a
        // small enough input, and the persisted seed reproduces it exactly.
        max_shrink_iters: 4096,
        failure_persistence: Some(Box::new(FileFailurePersistence::SourceParallel(
            "proptest-regressions",
        ))),
        ..Config::default()
    }
}

/// The corpus of one target: every file of `tests/fuzz-corpus/<target>/`, sorted by name.
pub(crate) fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz-corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("the fuzz corpus {} cannot be read: {e}", dir.display()))
        .map(|e| e.expect("a corpus entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "the fuzz corpus {} is empty",
        dir.display()
    );
    files
        .into_iter()
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect()
}

/// Runs `check` on every entry of a target's corpus and fails with the list of every entry
/// that broke a property.
pub(crate) fn replay_corpus(
    target: &str,
    check: impl Fn(&[u8]) -> Result<(), proptest::test_runner::TestCaseError>,
) {
    let failures: Vec<String> = corpus(target)
        .into_iter()
        .filter_map(|(name, bytes)| check(&bytes).err().map(|e| format!("{name}: {e}")))
        .collect();
    assert!(
        failures.is_empty(),
        "{} corpus entries of {target} break a property:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// One way of damaging a byte string. A position is taken modulo the length the string has when
/// the mutation applies (one past the end included, for insertions), so it shrinks towards the
/// start.
#[derive(Debug, Clone)]
pub(crate) enum Mutation {
    /// Cut everything from this position on.
    Truncate(usize),
    /// Flip one bit.
    Flip(usize, u8),
    /// Overwrite one byte.
    Set(usize, u8),
    /// Insert bytes (random, or a hostile fragment).
    Insert(usize, Vec<u8>),
    /// Remove up to this many bytes.
    Delete(usize, usize),
    /// Repeat a stretch of the input right after itself.
    Duplicate(usize, usize),
}

/// Bytes that tend to break parsers: structure characters, escapes, encodings, huge numbers,
/// control characters, invalid UTF-8, and text that only looks like structure.
pub(crate) fn hostile_fragment() -> impl Strategy<Value = Vec<u8>> {
    let fixed: Vec<&'static [u8]> = vec![
        b"\"",
        b"\\",
        b"{",
        b"}",
        b"[",
        b"]",
        b":",
        b",",
        b"\0",
        b"\r\n",
        b"\t",
        b"\x7f",
        b"\xff",
        b"\xc3",
        b"\xed\xa0\x80",
        b"\xef\xbb\xbf",
        "\u{202e}".as_bytes(),
        "\u{2028}".as_bytes(),
        "é".as_bytes(),
        "😀".as_bytes(),
        b"\\u0000",
        b"\\ud800",
        b"\\udc00\\ud800",
        b"\\\"",
        b"null",
        b"true",
        b"-0",
        b"1e999999",
        b"-1e-999999",
        b"18446744073709551616",
        b"-9223372036854775809",
        b"0.0000000000000000000000000000001",
        b"NaN",
        b"Infinity",
        b"{\"a\":",
        b"[[[[[[[[[[[[[[[[",
        b"]]]]]]]]]]]]]]]]",
        b"%00",
        b"%2e%2e/",
        b"../",
        b"TKJ1",
        b"ntn_",
        b"nrt_",
        b"\x01\x00\x00\x00",
        b"\xff\xff\xff\xff",
    ];
    prop_oneof![
        3 => proptest::sample::select(fixed).prop_map(<[u8]>::to_vec),
        1 => proptest::collection::vec(any::<u8>(), 1..24),
        1 => "\\PC{1,8}".prop_map(String::into_bytes),
        1 => (proptest::sample::select(vec![b'a', b'[', b'{', b'0', b' ', b'\\']), 100usize..5000)
            .prop_map(|(b, n)| vec![b; n]),
    ]
}

pub(crate) fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        1 => any::<usize>().prop_map(Mutation::Truncate),
        3 => (any::<usize>(), 0u8..8).prop_map(|(i, b)| Mutation::Flip(i, b)),
        1 => (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        3 => (any::<usize>(), hostile_fragment()).prop_map(|(i, f)| Mutation::Insert(i, f)),
        1 => (any::<usize>(), 1usize..32).prop_map(|(i, n)| Mutation::Delete(i, n)),
        1 => (any::<usize>(), 1usize..64).prop_map(|(i, n)| Mutation::Duplicate(i, n)),
    ]
}

/// Up to `max` mutations (possibly none: the unmodified input is a case too).
pub(crate) fn mutations(max: usize) -> impl Strategy<Value = Vec<Mutation>> {
    proptest::collection::vec(mutation(), 0..=max)
}

/// `bytes` with `mutations` applied in order.
pub(crate) fn mutate(bytes: &[u8], mutations: &[Mutation]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    for m in mutations {
        let at = |i: &usize, len: usize| i % (len + 1);
        match m {
            Mutation::Truncate(i) => {
                let n = at(i, out.len());
                out.truncate(n);
            }
            Mutation::Flip(i, bit) if !out.is_empty() => {
                let n = i % out.len();
                out[n] ^= 1 << bit;
            }
            Mutation::Set(i, b) if !out.is_empty() => {
                let n = i % out.len();
                out[n] = *b;
            }
            Mutation::Insert(i, fragment) => {
                let n = at(i, out.len());
                out.splice(n..n, fragment.iter().copied());
            }
            Mutation::Delete(i, len) => {
                let n = at(i, out.len());
                let end = (n + len).min(out.len());
                out.drain(n..end);
            }
            Mutation::Duplicate(i, len) => {
                let n = at(i, out.len());
                let end = (n + len).min(out.len());
                let copy = out[n..end].to_vec();
                out.splice(end..end, copy);
            }
            Mutation::Flip(..) | Mutation::Set(..) => {}
        }
    }
    out
}

/// Text that a careless parser mishandles: unicode of every plane, control characters, markup,
/// escapes, long runs; sometimes empty.
pub(crate) fn hostile_text() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[a-zA-Z0-9 _.-]{0,24}",
        2 => "\\PC{0,24}",
        1 => "[\\x00-\\x1f\\x7f\"\\\\/<>&'%]{0,12}",
        1 => proptest::sample::select(vec![
            "",
            " ",
            "\u{feff}",
            "\u{202e}evil",
            "e\u{301}",
            "\u{10ffff}",
            "\0",
            "\r\n",
            "../../",
            "%2e%2e%2f",
            "<script>alert(1)</script>",
            "null",
            "{}",
            "[]",
        ])
        .prop_map(str::to_owned),
        1 => ("\\PC{1,4}", 256usize..4096).prop_map(|(s, n)| s.repeat(n)),
    ]
}

/// Any JSON value, nested up to about `depth` levels, with hostile strings and keys.
pub(crate) fn json_value(depth: u32) -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("JSON has no NaN or infinity", |f| f.is_finite())
            .prop_map(Value::from),
        hostile_text().prop_map(Value::String),
    ];
    leaf.prop_recursive(depth, 64, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::btree_map(hostile_text(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A value nested `depth` levels deep (arrays and objects alternating) around `inner`.
pub(crate) fn nested(depth: usize, inner: Value) -> Value {
    (0..depth).fold(inner, |v, level| {
        if level % 2 == 0 {
            json!([v])
        } else {
            json!({ "d": v })
        }
    })
}

/// A token-shaped secret with `prefix` (`ntn_`, `nrt_`, …): the prefix and 24 to 48 letters and
/// digits, long enough that it never appears by chance.
pub(crate) fn secret(prefix: &'static str) -> impl Strategy<Value = String> {
    "[A-Za-z0-9]{24,48}".prop_map(move |s| format!("{prefix}{s}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutations_apply_at_their_positions() {
        let i = |n: usize| n;
        assert_eq!(mutate(b"abcd", &[Mutation::Truncate(i(0))]), b"");
        assert_eq!(
            mutate(b"abcd", &[Mutation::Insert(i(0), b"xy".to_vec())]),
            b"xyabcd"
        );
        assert_eq!(mutate(b"abcd", &[Mutation::Flip(i(0), 0)]), b"`bcd");
        assert_eq!(mutate(b"abcd", &[Mutation::Delete(i(0), 2)]), b"cd");
        assert_eq!(mutate(b"abcd", &[Mutation::Duplicate(i(0), 2)]), b"ababcd");
        assert_eq!(mutate(b"", &[Mutation::Flip(i(0), 3)]), b"");
    }
}
