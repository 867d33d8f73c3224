//! Asking Notion about access tokens, paced: `audit --verify`, `import --verify` and the health
//! check all introspect through `Pacer`, at a documented rate, so that no amount of tokens can
//! make tokenkeeper exceed it.
//!
//! Introspection's own failures (throttling, 5xx, timeouts, unreadable answers) are `unknown`,
//! never `inactive`: only Notion saying `{"active": false}` is a verdict about a token.
//!
//! A verification can be resumed: with a state file, each verdict (`active` or `inactive`, by
//! token fingerprint, never the token) is appended as it arrives, and a later run skips the
//! fingerprints it finds there. `unknown` is not kept, so it is asked again.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use crate::ids::AccessToken;
use crate::ledger::CheckResult;
use crate::provider::notion::NotionClient;
use crate::provider::ProviderError;

use crate::clock::Rate;

/// Hands out one start time per call, `rate.spacing()` apart, to every task that asks: the
/// calls it paces never exceed the rate, however many tasks make them.
pub struct Pacer {
    next: tokio::sync::Mutex<tokio::time::Instant>,
    spacing: Duration,
}

impl Pacer {
    pub fn new(rate: Rate) -> Pacer {
        Pacer {
            next: tokio::sync::Mutex::new(tokio::time::Instant::now()),
            spacing: rate.spacing(),
        }
    }

    /// Waits for this call's turn.
    pub async fn turn(&self) {
        let at = {
            let mut next = self.next.lock().await;
            let now = tokio::time::Instant::now();
            let at = (*next).max(now);
            *next = at + self.spacing;
            at
        };
        tokio::time::sleep_until(at).await;
    }
}

/// Tries of one token when introspection is throttled or fails.
const TRIES: u32 = 3;
/// The longest `Retry-After` waited for; beyond it the token is `unknown` for now.
const MAX_RETRY_WAIT: Duration = Duration::from_secs(60);

/// Introspects one token within the pacer's rate, retrying throttling and passing failures a
/// few times; what is still not known after that is `unknown`.
pub async fn introspect(notion: &NotionClient, pacer: &Pacer, token: &AccessToken) -> CheckResult {
    for attempt in 1..=TRIES {
        pacer.turn().await;
        match notion.introspect(token).await {
            Ok(true) => return CheckResult::Active,
            Ok(false) => return CheckResult::Inactive,
            Err(ProviderError::Throttled { retry_after, .. }) if attempt < TRIES => {
                let wait = retry_after.unwrap_or(Duration::from_secs(1));
                if wait > MAX_RETRY_WAIT {
                    return CheckResult::Unknown;
                }
                tokio::time::sleep(wait).await;
            }
            Err(e) if e.is_transient() && attempt < TRIES => {
                tracing::debug!(token = %token.fingerprint(), "introspection failed, retrying: {e}");
            }
            Err(e) => {
                tracing::info!(token = %token.fingerprint(), "introspection failed: {e}");
                return CheckResult::Unknown;
            }
        }
    }
    CheckResult::Unknown
}

/// Verdicts kept across runs, by token fingerprint.
pub struct StateFile {
    path: PathBuf,
    known: HashMap<String, CheckResult>,
    file: Mutex<std::fs::File>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct StateLine {
    fingerprint: String,
    result: CheckResult,
}

impl StateFile {
    /// Opens (creating if needed, mode 0600) the state file and reads what it holds; a torn last
    /// line (a run stopped mid-write) is ignored.
    pub fn open(path: &Path) -> std::io::Result<StateFile> {
        let mut known = HashMap::new();
        let mut torn = false;
        if let Ok(text) = std::fs::read_to_string(path) {
            for line in text.lines() {
                if let Ok(entry) = serde_json::from_str::<StateLine>(line) {
                    known.insert(entry.fingerprint, entry.result);
                }
            }
            torn = !text.is_empty() && !text.ends_with('\n');
        }
        let mut options = std::fs::OpenOptions::new();
        options.create(true).append(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(path)?;
        if torn {
            // End the torn line, so that the next verdict is a line of its own.
            file.write_all(b"\n")?;
        }
        Ok(StateFile {
            path: path.to_path_buf(),
            known,
            file: Mutex::new(file),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn get(&self, fingerprint: &str) -> Option<CheckResult> {
        self.known.get(fingerprint).copied()
    }

    /// How many verdicts the file held when it was opened.
    pub fn len(&self) -> usize {
        self.known.len()
    }

    pub fn is_empty(&self) -> bool {
        self.known.is_empty()
    }

    /// Appends a verdict; `unknown` is not kept.
    pub fn record(&self, fingerprint: &str, result: CheckResult) -> std::io::Result<()> {
        if result == CheckResult::Unknown {
            return Ok(());
        }
        let mut line = serde_json::to_string(&StateLine {
            fingerprint: fingerprint.to_owned(),
            result,
        })
        .expect("a state line serializes");
        line.push('\n');
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        file.write_all(line.as_bytes())?;
        file.flush()
    }
}

/// Introspections in flight at once during a verification: enough to keep the rate when
/// Notion is slow, few enough to stay polite. The pacer keeps the rate either way.
const IN_FLIGHT: usize = 8;

/// Asks about every token not already in `state`, at the pacer's rate; `done` is called after
/// each (for a progress bar). Answers a verdict per fingerprint.
pub async fn verify_all(
    notion: &NotionClient,
    pacer: &Pacer,
    tokens: Vec<(String, AccessToken)>,
    state: Option<&StateFile>,
    done: &(dyn Fn() + Sync),
) -> HashMap<String, CheckResult> {
    use futures::stream::{self, StreamExt};
    let mut verdicts = HashMap::with_capacity(tokens.len());
    let mut ask = Vec::new();
    for (fingerprint, token) in tokens {
        match state.and_then(|s| s.get(&fingerprint)) {
            Some(known) => {
                verdicts.insert(fingerprint, known);
                done();
            }
            None => ask.push((fingerprint, token)),
        }
    }
    let mut answers = stream::iter(ask)
        .map(|(fingerprint, token)| async move {
            let result = introspect(notion, pacer, &token).await;
            (fingerprint, result)
        })
        .buffer_unordered(IN_FLIGHT);
    while let Some((fingerprint, result)) = answers.next().await {
        if let Some(state) = state {
            if let Err(e) = state.record(&fingerprint, result) {
                tracing::warn!("could not write to {}: {e}", state.path().display());
            }
        }
        verdicts.insert(fingerprint, result);
        done();
    }
    verdicts
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::parse_rate;

    #[test]
    fn rates_parse_with_or_without_a_number_in_the_window() {
        let r = parse_rate("2/s").unwrap();
        assert_eq!(r.spacing(), Duration::from_millis(500));
        assert_eq!(
            parse_rate("120/1m").unwrap().spacing(),
            Duration::from_millis(500)
        );
        assert_eq!(
            parse_rate("5/10s").unwrap().spacing(),
            Duration::from_secs(2)
        );
        assert!(parse_rate("0/s").is_err());
        assert!(parse_rate("2").is_err());
        assert!(parse_rate("fast/s").is_err());
    }

    #[tokio::test]
    async fn the_pacer_never_lets_calls_come_faster_than_its_rate() {
        // Nine calls at 20/s, from nine tasks at once: the last cannot start before 8 × 50 ms
        // after the first (a lower bound, which a slow machine cannot break).
        let pacer = std::sync::Arc::new(Pacer::new(parse_rate("20/s").unwrap()));
        let start = tokio::time::Instant::now();
        let tasks: Vec<_> = (0..9)
            .map(|_| {
                let pacer = pacer.clone();
                tokio::spawn(async move {
                    pacer.turn().await;
                    tokio::time::Instant::now()
                })
            })
            .collect();
        let mut last = start;
        for t in tasks {
            last = last.max(t.await.unwrap());
        }
        assert!(
            last - start >= Duration::from_millis(400),
            "{:?}",
            last - start
        );
    }

    #[test]
    fn a_state_file_keeps_verdicts_by_fingerprint_and_forgets_unknowns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.jsonl");
        let state = StateFile::open(&path).unwrap();
        state.record("sha256:aa", CheckResult::Active).unwrap();
        state.record("sha256:bb", CheckResult::Inactive).unwrap();
        state.record("sha256:cc", CheckResult::Unknown).unwrap();
        drop(state);
        // A run stopped mid-write leaves a torn line.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"fingerprint\":\"sha256:dd\",\"res")
            .unwrap();
        let again = StateFile::open(&path).unwrap();
        assert_eq!(again.get("sha256:aa"), Some(CheckResult::Active));
        assert_eq!(again.get("sha256:bb"), Some(CheckResult::Inactive));
        assert_eq!(again.get("sha256:cc"), None);
        assert_eq!(again.get("sha256:dd"), None);
        assert_eq!(again.len(), 2);
        again.record("sha256:ee", CheckResult::Active).unwrap();
        drop(again);
        assert_eq!(
            StateFile::open(&path).unwrap().get("sha256:ee"),
            Some(CheckResult::Active),
            "a verdict written after a torn line is read back"
        );
    }
}
