//! Target 4: the spill journal's reader (`journal::parse`), which reads files that a process
//! may have been killed in the middle of writing, on disks that may damage them.
//!
//! Properties, beyond "never panics" on any bytes:
//! - A file of frames as the journal writes them (`journal::frame`), damaged anywhere (cut at
//!   any byte, bits flipped, garbage and hostile frame heads inserted, bytes removed), yields
//!   only records that were really written, each exactly as written: never a misread one.
//! - Every frame that the damage left intact is read, wherever it sits after the damage: the
//!   pending records are exactly those of intact frames, in order, minus those an intact
//!   `done` frame marks committed.
//! - The damage is counted: at least one damaged frame per stretch of damage, at most one more
//!   per frame start (`TKJ1`) inside it.
//! - Every pair that `parse_token_response` accepts can be spilled and read back.

use chrono::{DateTime, TimeZone, Utc};
use proptest::prelude::*;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::{config, hostile_fragment, hostile_text, json_value, nested};
use crate::ids::{AccessToken, AttemptId, BotId, ConnectionId, GrantId, RefreshToken};
use crate::journal::{frame, parse, Entry, SealedPair, SpilledRefresh};
use crate::ledger::{Fence, MintedPair, Rescue};
use crate::provider::notion::parse_token_response;
use crate::seal::KeyRing;

/// The frame start, as the module's documentation gives the format.
const MAGIC: &[u8] = b"TKJ1";

fn keys() -> KeyRing {
    KeyRing::parse("k-fuzz:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=").unwrap()
}

fn hex_id(prefix: &str, n: u128) -> String {
    format!("{prefix}_{n:032x}")
}

fn time() -> impl Strategy<Value = DateTime<Utc>> {
    (0i64..4_102_444_800, 0u32..1_000_000_000)
        .prop_map(|(s, ns)| Utc.timestamp_opt(s, ns).single().expect("a valid time"))
}

/// A pair as a refresh might have returned it: hostile strings, any metadata.
fn pair() -> impl Strategy<Value = MintedPair> {
    (
        (
            "(ntn_)?[A-Za-z0-9]{0,40}",
            proptest::option::of("(nrt_)?[A-Za-z0-9]{0,40}"),
            hostile_text(),
            hostile_text(),
        ),
        (
            proptest::option::of(hostile_text()),
            proptest::option::of(hostile_text()),
            json_value(4),
            proptest::option::of(hostile_text()),
        ),
        (time(), proptest::option::of(time())),
    )
        .prop_map(
            |(
                (access, refresh, bot, workspace),
                (name, icon, metadata, request),
                (at, expires),
            )| {
                MintedPair {
                    access_token: AccessToken::new(access),
                    refresh_token: refresh.map(RefreshToken::new),
                    bot_id: BotId(bot),
                    workspace_id: workspace,
                    workspace_name: name,
                    workspace_icon: icon,
                    metadata,
                    provider_request_id: request,
                    obtained_at: at,
                    expires_at: expires,
                }
            },
        )
}

fn record(index: usize) -> impl Strategy<Value = SpilledRefresh> {
    (
        any::<u128>(),
        any::<u128>(),
        any::<i64>(),
        any::<u128>(),
        pair(),
        proptest::option::of((any::<u128>(), any::<u128>())),
    )
        .prop_map(move |(connection, parent, fence, attempt, pair, rescue)| {
            let connection_id = ConnectionId::from_trusted(hex_id("con", connection));
            let parent = GrantId::from_trusted(hex_id("grt", parent));
            // Distinct per record, so that a `done` frame names exactly one.
            let grant_id = GrantId::from_trusted(hex_id("grt", index as u128));
            let owner = SpilledRefresh::owner(&connection_id, &parent);
            SpilledRefresh {
                pair: SealedPair::seal(&keys(), &owner, &grant_id, &pair),
                connection_id,
                parent,
                fence: Fence(fence),
                attempt_id: AttemptId::from_trusted(hex_id("att", attempt)),
                grant_id,
                rescue: rescue.map(|(failed, attempt)| Rescue {
                    failed: GrantId::from_trusted(hex_id("grt", failed)),
                    failed_attempt: AttemptId::from_trusted(hex_id("att", attempt)),
                }),
            }
        })
}

/// What a written frame says.
#[derive(Debug, Clone)]
enum Written {
    Refresh(Box<SpilledRefresh>),
    /// Marks the record with this index done (or none, past the last record).
    Done(usize),
}

fn written() -> impl Strategy<Value = Vec<Written>> {
    proptest::collection::vec(any::<(bool, prop::sample::Index)>(), 1..7).prop_flat_map(|plan| {
        plan.into_iter()
            .enumerate()
            .map(|(i, (done, pick))| {
                if done && i > 0 {
                    Just(Written::Done(pick.index(i + 1))).boxed()
                } else {
                    record(i)
                        .prop_map(|r| Written::Refresh(Box::new(r)))
                        .boxed()
                }
            })
            .collect::<Vec<_>>()
    })
}

fn grant_of(index: usize) -> GrantId {
    GrantId::from_trusted(hex_id("grt", index as u128))
}

fn framed(w: &Written) -> Vec<u8> {
    match w {
        Written::Refresh(r) => frame(&Entry::Refresh(r.clone())),
        Written::Done(i) => frame(&Entry::Done {
            grant_id: grant_of(*i),
        }),
    }
}

/// A frame head or a whole frame that is not a journal entry: what a torn or foreign write can
/// leave, and what resynchronisation must step over.
fn hostile_frame() -> impl Strategy<Value = Vec<u8>> {
    let with_check = |json: &[u8]| {
        let mut f = MAGIC.to_vec();
        f.extend_from_slice(&(json.len() as u32).to_le_bytes());
        f.extend_from_slice(json);
        f.extend_from_slice(&Sha256::digest(json)[..8]);
        f
    };
    let head = |len: u32| {
        let mut f = MAGIC.to_vec();
        f.extend_from_slice(&len.to_le_bytes());
        f
    };
    prop_oneof![
        Just(MAGIC.to_vec()),
        Just(MAGIC.repeat(3)),
        Just(head(0)),
        Just(head(u32::MAX)),
        Just(head((1 << 20) + 1)),
        (0u32..64).prop_map(head),
        Just(with_check(b"{}")),
        Just(with_check(b"{\"op\":\"refresh\"}")),
        Just(with_check(b"{\"op\":\"done\",\"grant_id\":7}")),
        Just(with_check(b"[[[[[[[[[[[[[[[[[[[[")),
        Just(with_check(b"")),
        // A correct frame of something else, its check off by one bit.
        (0usize..8).prop_map(move |bit| {
            let mut f = with_check(b"{\"op\":\"done\",\"grant_id\":\"grt_x\"}");
            let last = f.len() - 1;
            f[last] ^= 1 << bit;
            f
        }),
        hostile_fragment(),
    ]
}

/// One way the file is damaged after it was written.
#[derive(Debug, Clone)]
enum Damage {
    Cut(usize),
    Flip(usize, u8),
    Insert(usize, Vec<u8>),
    Remove(usize, usize),
}

fn damage() -> impl Strategy<Value = Vec<Damage>> {
    let one = prop_oneof![
        1 => any::<usize>().prop_map(Damage::Cut),
        3 => (any::<usize>(), 0u8..8).prop_map(|(p, b)| Damage::Flip(p, b)),
        3 => (any::<usize>(), hostile_frame()).prop_map(|(p, f)| Damage::Insert(p, f)),
        1 => (any::<usize>(), 1usize..40).prop_map(|(p, n)| Damage::Remove(p, n)),
    ];
    proptest::collection::vec(one, 0..5)
}

/// The file as stretches of bytes: an intact frame (its index among the written ones), or
/// damage.
#[derive(Debug, Clone)]
struct Stretch {
    frame: Option<usize>,
    bytes: Vec<u8>,
}

struct File {
    stretches: Vec<Stretch>,
}

impl File {
    fn new(frames: Vec<Vec<u8>>) -> File {
        File {
            stretches: frames
                .into_iter()
                .enumerate()
                .map(|(i, bytes)| Stretch {
                    frame: Some(i),
                    bytes,
                })
                .collect(),
        }
    }

    fn len(&self) -> usize {
        self.stretches.iter().map(|s| s.bytes.len()).sum()
    }

    /// The stretch holding byte `at`, and the offset in it.
    fn locate(&self, mut at: usize) -> (usize, usize) {
        for (i, s) in self.stretches.iter().enumerate() {
            if at < s.bytes.len() {
                return (i, at);
            }
            at -= s.bytes.len();
        }
        (self.stretches.len(), 0)
    }

    fn apply(&mut self, d: &Damage) {
        let len = self.len();
        match d {
            Damage::Cut(p) => {
                let (i, off) = self.locate(p % (len + 1));
                self.stretches.truncate(i + 1);
                if off == 0 {
                    self.stretches.truncate(i);
                } else if let Some(s) = self.stretches.get_mut(i) {
                    s.bytes.truncate(off);
                    s.frame = None;
                }
            }
            Damage::Flip(p, bit) if len > 0 => {
                let (i, off) = self.locate(p % len);
                let s = &mut self.stretches[i];
                s.bytes[off] ^= 1 << bit;
                s.frame = None;
            }
            Damage::Insert(p, bytes) => {
                let (i, off) = self.locate(p % (len + 1));
                if off == 0 {
                    // Between frames: the frames around it stay intact.
                    self.stretches.insert(
                        i,
                        Stretch {
                            frame: None,
                            bytes: bytes.clone(),
                        },
                    );
                } else {
                    let s = &mut self.stretches[i];
                    s.bytes.splice(off..off, bytes.iter().copied());
                    s.frame = None;
                }
            }
            Damage::Remove(p, n) if len > 0 => {
                let start = p % len;
                for _ in 0..*n {
                    if start >= self.len() {
                        break;
                    }
                    let (i, off) = self.locate(start);
                    let s = &mut self.stretches[i];
                    s.bytes.remove(off);
                    s.frame = None;
                    if s.bytes.is_empty() {
                        self.stretches.remove(i);
                    }
                }
            }
            Damage::Flip(..) | Damage::Remove(..) => {}
        }
        self.stretches.retain(|s| !s.bytes.is_empty());
    }

    /// Finds the frames that damage left whole although it touched their stretch: bytes
    /// inserted right after a frame start that repeat it (`TKJ1` after `TKJ1`), or removed
    /// across a boundary so that what remains is the frame again. Such a frame is intact by
    /// content, and the reader rightly reads it.
    fn recognise(&mut self, frames: &[Vec<u8>]) {
        let mut out: Vec<Stretch> = Vec::new();
        for s in std::mem::take(&mut self.stretches) {
            match (s.frame, out.last_mut()) {
                (None, Some(last)) if last.frame.is_none() => last.bytes.extend(s.bytes),
                _ => out.push(s),
            }
        }
        let mut done: Vec<Stretch> = Vec::new();
        for s in out {
            if s.frame.is_some() {
                done.push(s);
                continue;
            }
            let mut rest = s.bytes.as_slice();
            loop {
                let found = frames
                    .iter()
                    .enumerate()
                    .filter_map(|(i, f)| {
                        rest.windows(f.len())
                            .position(|w| w == f.as_slice())
                            .map(|at| (at, i))
                    })
                    .min();
                let Some((at, i)) = found else {
                    break;
                };
                if at > 0 {
                    done.push(Stretch {
                        frame: None,
                        bytes: rest[..at].to_vec(),
                    });
                }
                done.push(Stretch {
                    frame: Some(i),
                    bytes: frames[i].clone(),
                });
                rest = &rest[at + frames[i].len()..];
            }
            if !rest.is_empty() {
                done.push(Stretch {
                    frame: None,
                    bytes: rest.to_vec(),
                });
            }
        }
        self.stretches = done;
    }

    fn bytes(&self) -> Vec<u8> {
        self.stretches
            .iter()
            .flat_map(|s| s.bytes.clone())
            .collect()
    }

    /// Maximal runs of damaged bytes.
    fn damaged_runs(&self) -> Vec<Vec<u8>> {
        let mut runs: Vec<Vec<u8>> = Vec::new();
        let mut in_run = false;
        for s in &self.stretches {
            match (s.frame, in_run) {
                (Some(_), _) => in_run = false,
                (None, true) => runs.last_mut().unwrap().extend_from_slice(&s.bytes),
                (None, false) => {
                    runs.push(s.bytes.clone());
                    in_run = true;
                }
            }
        }
        runs
    }
}

/// A record that was read, as JSON.
fn as_read(r: &SpilledRefresh) -> Value {
    serde_json::to_value(r).expect("a record serializes")
}

/// A written record as JSON, after one trip through JSON text: serde_json reads a float back to
/// the nearest value its fast algorithm finds, which may differ from the written one in the last
/// bit, and that is the record the frame really holds.
fn as_written(r: &SpilledRefresh) -> Result<Value, TestCaseError> {
    let text = serde_json::to_vec(r).expect("a record serializes");
    let back: SpilledRefresh = serde_json::from_slice(&text)
        .map_err(|e| TestCaseError::fail(format!("a written record does not read back: {e}")))?;
    Ok(as_read(&back))
}

fn check_damaged(written: &[Written], damage: &[Damage]) -> Result<(), TestCaseError> {
    let frames: Vec<Vec<u8>> = written.iter().map(framed).collect();
    let mut file = File::new(frames.clone());
    for d in damage {
        file.apply(d);
    }
    file.recognise(&frames);
    let bytes = file.bytes();
    let contents = parse(&bytes);

    let intact: Vec<usize> = file.stretches.iter().filter_map(|s| s.frame).collect();
    let done: Vec<GrantId> = intact
        .iter()
        .filter_map(|&i| match &written[i] {
            Written::Done(r) => Some(grant_of(*r)),
            Written::Refresh(_) => None,
        })
        .collect();
    let expected: Vec<Value> = intact
        .iter()
        .filter_map(|&i| match &written[i] {
            Written::Refresh(r) if !done.contains(&r.grant_id) => Some(as_written(r)),
            _ => None,
        })
        .collect::<Result<_, _>>()?;
    let got: Vec<Value> = contents.pending.iter().map(as_read).collect();
    let all_written: Vec<Value> = written
        .iter()
        .filter_map(|w| match w {
            Written::Refresh(r) => Some(as_written(r)),
            Written::Done(_) => None,
        })
        .collect::<Result<_, _>>()?;
    for record in &got {
        prop_assert!(
            all_written.contains(record),
            "a record that was never written was read: {record}"
        );
    }
    prop_assert_eq!(got, expected, "the intact frames' records, in order");

    let runs = file.damaged_runs();
    let starts: usize = runs
        .iter()
        .map(|r| r.windows(MAGIC.len()).filter(|w| *w == MAGIC).count())
        .sum();
    prop_assert!(
        contents.damaged >= runs.len() && contents.damaged <= runs.len() + starts,
        "{} damaged frames counted for {} stretches of damage with {} frame starts",
        contents.damaged,
        runs.len(),
        starts
    );
    Ok(())
}

proptest! {
    #![proptest_config(config(768))]

    #[test]
    fn damaged_journals_yield_exactly_the_intact_records(written in written(), damage in damage()) {
        check_damaged(&written, &damage)?;
    }
}

proptest! {
    #![proptest_config(config(2048))]

    #[test]
    fn arbitrary_bytes_never_panic_and_yield_no_record(
        bytes in proptest::collection::vec(
            prop_oneof![4 => any::<u8>().prop_map(|b| vec![b]), 1 => hostile_frame()],
            0..64,
        ),
    ) {
        let bytes: Vec<u8> = bytes.concat();
        let contents = parse(&bytes);
        prop_assert!(contents.pending.is_empty());
        prop_assert_eq!(contents.damaged == 0, bytes.is_empty());
    }
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn every_pair_the_provider_parser_accepts_is_spilled_and_read_back(
        depth in 0usize..=127,
        extra in json_value(3),
    ) {
        // Up to the deepest answer the provider parser takes, nested inside a journal record.
        let body = json!({
            "access_token": "ntn_deep", "refresh_token": "nrt_deep", "bot_id": "b",
            "workspace_id": "w", "extra": extra, "deep": nested(depth, json!(1)),
        });
        let Ok(pair) = parse_token_response(200, &serde_json::to_vec(&body).unwrap()) else {
            // Deeper than JSON parsing takes: nothing to spill.
            return Ok(());
        };
        spill_and_read_back(pair)?;
    }
}

/// Spills `pair` with a real journal, and reads it back from the file: the spill either
/// succeeds and the record reads back as it was, or fails (the coordinator then keeps the pair
/// in memory and retries its commit); it fails only for a record too large for a frame.
fn spill_and_read_back(pair: MintedPair) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let keys = std::sync::Arc::new(keys());
    let journal = crate::journal::Journal::open(dir.path(), keys.clone()).unwrap();
    let record = spilled(pair.clone());
    let outcome = journal.spill_refresh(
        &record.connection_id,
        &record.parent,
        record.fence,
        &record.attempt_id,
        &record.grant_id,
        &pair,
        None,
    );
    let size = serde_json::to_vec(&record).unwrap().len();
    match outcome {
        Ok(()) => {
            let pending = journal.pending().unwrap();
            prop_assert_eq!(
                pending.damaged,
                0,
                "the journal wrote a record it cannot read"
            );
            prop_assert_eq!(pending.pending.len(), 1);
            let back = pending.pending[0].pair(&keys).unwrap();
            // After one trip through JSON text, as in `as_written`.
            let sent: Value = serde_json::from_str(&pair.metadata.to_string()).unwrap();
            prop_assert_eq!(&back.metadata, &sent);
            prop_assert_eq!(
                back.access_token.expose_secret(),
                pair.access_token.expose_secret()
            );
        }
        Err(e) => prop_assert!(size > 1 << 20, "a {size}-byte record was refused: {e}"),
    }
    Ok(())
}

#[test]
fn a_pair_too_large_for_a_frame_is_refused_not_written_unreadable() {
    for len in [(1 << 20) - 2000, (1 << 20) + 1, 3 << 20] {
        let body = json!({
            "access_token": "ntn_big", "bot_id": "b", "workspace_id": "w",
            "padding": "x".repeat(len),
        });
        let pair = parse_token_response(200, &serde_json::to_vec(&body).unwrap()).unwrap();
        if let Err(e) = spill_and_read_back(pair) {
            panic!("{len}: {e}");
        }
    }
}

/// A record of `pair`, with fixed ids.
fn spilled(pair: MintedPair) -> SpilledRefresh {
    let connection_id = ConnectionId::from_trusted(hex_id("con", 1));
    let parent = GrantId::from_trusted(hex_id("grt", 2));
    let grant_id = grant_of(0);
    let owner = SpilledRefresh::owner(&connection_id, &parent);
    SpilledRefresh {
        pair: SealedPair::seal(&keys(), &owner, &grant_id, &pair),
        connection_id,
        parent,
        fence: Fence(1),
        attempt_id: AttemptId::from_trusted(hex_id("att", 3)),
        grant_id,
        rescue: None,
    }
}

#[test]
fn the_journal_corpus_yields_the_records_its_names_promise() {
    // An entry's name starts with how many pending records it holds. A record that one yields
    // must open with the key it was sealed with (`keys()`), which proves it was written, not
    // misread. Entries written before the journal stored metadata as text are kept, so that
    // files left by an older process stay readable.
    let keys = keys();
    for (name, bytes) in super::corpus("journal") {
        let expected: usize = name
            .split('-')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{name}: the name must start with a count"));
        let contents = parse(&bytes);
        assert_eq!(contents.pending.len(), expected, "{name}");
        for record in &contents.pending {
            let pair = record.pair(&keys).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(pair.access_token.expose_secret().starts_with("ntn_corpus_"));
            assert!(
                pair.metadata.is_object(),
                "{name}: metadata {}",
                pair.metadata
            );
        }
    }
}
