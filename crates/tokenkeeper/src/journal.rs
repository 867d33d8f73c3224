//! The spill journal: where a minted pair waits when the database cannot take it (invariant 1).
//!
//! A refresh spends its refresh token at the provider before the new pair is committed. If the
//! database is down at that moment, the pair exists only in this process's memory, and the
//! connection's only valid refresh token with it. So after a short while of failed commits the
//! coordinator writes the pair here, fsynced, and from then on the journal is part of the
//! ledger: callers may be answered with the new token, and the pair is committed as soon as the
//! database answers again (`Replayer`), or at the next start if this process dies first.
//!
//! The journal is a directory of files, one per running process (`spill-<id>.journal`), each
//! held under an exclusive file lock while its process lives. A process replays its own file
//! and every file whose lock it can take (a process that died); replaying is idempotent, since
//! every record carries the grant id its commit uses, and recording a grant id twice changes
//! nothing (`Store::record_refresh`).
//!
//! Records are framed as `TKJ1 | length (u32 LE) | JSON | first 8 bytes of its SHA-256`. A torn
//! record (the process was killed in the middle of a write) or any damaged bytes fail the
//! check and are skipped, never misread; reading resumes at the next frame. Tokens are sealed
//! with the active key, bound to the connection and the parent grant (or the connect session),
//! exactly as the store seals them; the journal never holds a plaintext token. Once every
//! record of a file is committed, the file is emptied (its own) or removed (a dead process's).
//!
//! This is hand-written rather than taken from a crate: what it must guarantee (fsync per
//! record, torn-write detection, sealing with our key ring, one file per process with a lock)
//! is a few dozen lines here, and no maintained crate offers that combination.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::ids::{AccessToken, AttemptId, BotId, ConnectionId, GrantId, RefreshToken, SessionId};
use crate::ledger::{AuthorizationTarget, Fence, MintedPair, NewAuthorization, Provider, Rescue};
use crate::seal::{Column, KeyRing, SealContext};
use crate::store::{Store, StoreError};

const MAGIC: &[u8; 4] = b"TKJ1";
const CHECK_LEN: usize = 8;
/// No record is anywhere near this long; a length beyond it is damage.
const MAX_RECORD: usize = 1 << 20;

/// A refreshed pair that waits for its commit.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SpilledRefresh {
    pub connection_id: ConnectionId,
    pub parent: GrantId,
    pub fence: Fence,
    pub attempt_id: AttemptId,
    /// The grant id the commit uses, chosen before the first try.
    pub grant_id: GrantId,
    pub pair: SealedPair,
    /// Set when the refresh stood in for a refused current grant.
    #[serde(default)]
    pub rescue: Option<Rescue>,
}

/// A pair with its tokens sealed, and what came with it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SealedPair {
    access_token: String,
    refresh_token: Option<String>,
    bot_id: BotId,
    workspace_id: String,
    workspace_name: Option<String>,
    workspace_icon: Option<String>,
    #[serde(with = "metadata_text")]
    metadata: serde_json::Value,
    provider_request_id: Option<String>,
    obtained_at: DateTime<Utc>,
    expires_at: Option<DateTime<Utc>>,
}

/// A pair's metadata is written as JSON text inside the record. As a value it would sit three
/// levels down in the record, and serde_json refuses to read anything nested deeper than 128
/// levels, which the provider's answer (parsed with the same limit) may already reach: such a
/// record would be written, then skipped as damage, and its pair lost. Text read on its own
/// starts a fresh count.
mod metadata_text {
    use serde::{Deserialize, Deserializer, Serializer};
    use serde_json::Value;

    pub fn serialize<S: Serializer>(metadata: &Value, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&metadata.to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Value, D::Error> {
        match Value::deserialize(d)? {
            // A provider's metadata is an object, so text that is not JSON was never written by
            // `serialize`; keep it as it is.
            Value::String(text) => Ok(serde_json::from_str(&text).unwrap_or(Value::String(text))),
            // Written before metadata was text.
            other => Ok(other),
        }
    }
}

/// What a sealed journal value is bound to: `spill|<owner>|<parent>` and the grant id.
fn context<'a>(owner: &'a str, grant: &'a str, column: Column) -> SealContext<'a> {
    SealContext {
        connection_id: owner,
        grant_id: grant,
        column,
    }
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD_NO_PAD
}

impl SealedPair {
    pub(crate) fn seal(keys: &KeyRing, owner: &str, grant: &GrantId, pair: &MintedPair) -> Self {
        let seal = |column, plain: &str| {
            b64().encode(keys.seal(context(owner, grant.as_str(), column), plain))
        };
        SealedPair {
            access_token: seal(Column::AccessToken, pair.access_token.expose_secret()),
            refresh_token: pair
                .refresh_token
                .as_ref()
                .map(|r| seal(Column::RefreshToken, r.expose_secret())),
            bot_id: pair.bot_id.clone(),
            workspace_id: pair.workspace_id.clone(),
            workspace_name: pair.workspace_name.clone(),
            workspace_icon: pair.workspace_icon.clone(),
            metadata: pair.metadata.clone(),
            provider_request_id: pair.provider_request_id.clone(),
            obtained_at: pair.obtained_at,
            expires_at: pair.expires_at,
        }
    }

    fn open(
        &self,
        keys: &KeyRing,
        owner: &str,
        grant: &GrantId,
    ) -> Result<MintedPair, JournalError> {
        let open = |column, sealed: &str| -> Result<String, JournalError> {
            let bytes = b64().decode(sealed).map_err(|_| JournalError::Damaged)?;
            Ok(keys.open(context(owner, grant.as_str(), column), &bytes)?)
        };
        Ok(MintedPair {
            access_token: AccessToken::new(open(Column::AccessToken, &self.access_token)?),
            refresh_token: self
                .refresh_token
                .as_deref()
                .map(|r| open(Column::RefreshToken, r).map(RefreshToken::new))
                .transpose()?,
            bot_id: self.bot_id.clone(),
            workspace_id: self.workspace_id.clone(),
            workspace_name: self.workspace_name.clone(),
            workspace_icon: self.workspace_icon.clone(),
            metadata: self.metadata.clone(),
            provider_request_id: self.provider_request_id.clone(),
            obtained_at: self.obtained_at,
            expires_at: self.expires_at,
        })
    }
}

impl SpilledRefresh {
    pub(crate) fn owner(connection: &ConnectionId, parent: &GrantId) -> String {
        format!("spill|{connection}|{parent}")
    }

    /// The pair, opened.
    pub fn pair(&self, keys: &KeyRing) -> Result<MintedPair, JournalError> {
        self.pair.open(
            keys,
            &Self::owner(&self.connection_id, &self.parent),
            &self.grant_id,
        )
    }
}

/// An authorization whose pair came back from a code exchange in the callback, and waits for
/// its commit. The browser was told the authorization is kept; `GET /connect/pending/…` sends
/// it on to the app once the grant is in the ledger.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SpilledAuthorization {
    pub session_id: SessionId,
    pub provider: Provider,
    pub target: AuthorizationTarget,
    /// The grant id the commit uses, chosen before the first try.
    pub grant_id: GrantId,
    pub pair: SealedPair,
}

impl SpilledAuthorization {
    fn owner(session: &SessionId) -> String {
        format!("spill|session|{session}")
    }

    /// The pair, opened.
    pub fn pair(&self, keys: &KeyRing) -> Result<MintedPair, JournalError> {
        self.pair
            .open(keys, &Self::owner(&self.session_id), &self.grant_id)
    }
}

/// One line of a journal file.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(crate) enum Entry {
    Refresh(Box<SpilledRefresh>),
    Authorization(Box<SpilledAuthorization>),
    /// The record with this grant id is committed.
    Done {
        grant_id: GrantId,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("the spill journal could not be written or read: {0}")]
    Io(#[from] std::io::Error),
    #[error("a journal record does not open with this key ring: {0}")]
    Seal(#[from] crate::seal::SealError),
    #[error("a journal record is damaged")]
    Damaged,
    #[error("the record would be larger than a journal frame may be, so it was not written")]
    Unreadable,
}

/// What reading a journal file found.
#[derive(Debug, Default)]
pub struct FileContents {
    /// Refreshes not yet marked done, in the order they were written.
    pub pending: Vec<SpilledRefresh>,
    /// Authorizations not yet marked done, in the order they were written.
    pub authorizations: Vec<SpilledAuthorization>,
    /// Frames that failed their check and were skipped.
    pub damaged: usize,
}

pub(crate) fn frame(entry: &Entry) -> Vec<u8> {
    let json = serde_json::to_vec(entry).expect("a journal entry serializes");
    let mut out = Vec::with_capacity(json.len() + 16);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(&Sha256::digest(&json)[..CHECK_LEN]);
    out
}

/// Reads every intact frame of `bytes`; damaged ones are counted and skipped.
pub(crate) fn parse(bytes: &[u8]) -> FileContents {
    let mut records: Vec<SpilledRefresh> = Vec::new();
    let mut authorizations: Vec<SpilledAuthorization> = Vec::new();
    let mut done = HashSet::new();
    let mut damaged = 0;
    let mut at = 0;
    while at < bytes.len() {
        match read_frame(&bytes[at..]) {
            Some((entry, len)) => {
                match entry {
                    Entry::Refresh(r) => records.push(*r),
                    Entry::Authorization(a) => authorizations.push(*a),
                    Entry::Done { grant_id } => {
                        done.insert(grant_id);
                    }
                }
                at += len;
            }
            None => {
                damaged += 1;
                // Resynchronise at the next frame start, if any.
                match bytes[at + 1..]
                    .windows(MAGIC.len())
                    .position(|w| w == MAGIC)
                {
                    Some(next) => at += 1 + next,
                    None => break,
                }
            }
        }
    }
    FileContents {
        pending: records
            .into_iter()
            .filter(|r| !done.contains(&r.grant_id))
            .collect(),
        authorizations: authorizations
            .into_iter()
            .filter(|a| !done.contains(&a.grant_id))
            .collect(),
        damaged,
    }
}

fn read_frame(bytes: &[u8]) -> Option<(Entry, usize)> {
    if bytes.len() < 8 || &bytes[..4] != MAGIC {
        return None;
    }
    let len = u32::from_le_bytes(bytes[4..8].try_into().ok()?) as usize;
    if len > MAX_RECORD || bytes.len() < 8 + len + CHECK_LEN {
        return None;
    }
    let json = &bytes[8..8 + len];
    if Sha256::digest(json)[..CHECK_LEN] != bytes[8 + len..8 + len + CHECK_LEN] {
        return None;
    }
    let entry = serde_json::from_slice(json).ok()?;
    Some((entry, 8 + len + CHECK_LEN))
}

fn read_file(file: &mut File) -> std::io::Result<FileContents> {
    let mut bytes = Vec::new();
    file.seek(SeekFrom::Start(0))?;
    file.read_to_end(&mut bytes)?;
    Ok(parse(&bytes))
}

/// This process's journal file, and the directory it shares with other processes.
pub struct Journal {
    dir: PathBuf,
    keys: Arc<KeyRing>,
    /// This process's file, locked for as long as the process lives.
    own: Mutex<File>,
    own_path: PathBuf,
    /// Wakes the replayer when a record is written.
    spilled: tokio::sync::Notify,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal").field("dir", &self.dir).finish()
    }
}

fn open_private(path: &Path) -> std::io::Result<File> {
    let mut options = OpenOptions::new();
    options.read(true).append(true).create(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)
}

impl Journal {
    /// Opens this process's spill journal in `dir`, commits what earlier processes left there
    /// (when the database answers; otherwise the replayer does it when it is back), and starts the
    /// replayer that commits whatever is spilled from now on.
    pub async fn start(dir: &std::path::Path, store: &Store) -> anyhow::Result<Arc<Journal>> {
        let journal = Arc::new(
            Journal::open(dir, Arc::new(store.keys().clone()))
                .map_err(|e| anyhow::anyhow!("the spill journal in {}: {e}", dir.display()))?,
        );
        match journal.replay(store).await {
            Ok(report) if report.committed > 0 || report.damaged > 0 => tracing::warn!(
                committed = report.committed,
                damaged = report.damaged,
                "committed pairs that an earlier process left in the spill journal"
            ),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!("the spill journal will be replayed when the database answers: {e}")
            }
        }
        tokio::spawn(journal.clone().run_replayer(store.clone()));
        Ok(journal)
    }

    /// Opens (creating it, mode 0700) the journal directory and a new file of this process in
    /// it, locked until the process ends.
    pub fn open(dir: &Path, keys: Arc<KeyRing>) -> Result<Journal, JournalError> {
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder.create(dir)?;
        let own_path = dir.join(format!(
            "spill-{}.journal",
            crate::ids::random_token(9).to_ascii_lowercase()
        ));
        let own = open_private(&own_path)?;
        own.try_lock()
            .map_err(|e| std::io::Error::other(format!("{} is locked: {e}", own_path.display())))?;
        // The new file's name must survive a crash too.
        File::open(dir)?.sync_all()?;
        Ok(Journal {
            dir: dir.to_path_buf(),
            keys,
            own: Mutex::new(own),
            own_path,
            spilled: tokio::sync::Notify::new(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes a refreshed pair and waits until it is on disk. From then on it is part of the
    /// ledger. Blocking: call it from a blocking context or accept a short wait (one fsync).
    #[allow(clippy::too_many_arguments)]
    pub fn spill_refresh(
        &self,
        connection_id: &ConnectionId,
        parent: &GrantId,
        fence: Fence,
        attempt_id: &AttemptId,
        grant_id: &GrantId,
        pair: &MintedPair,
        rescue: Option<&Rescue>,
    ) -> Result<(), JournalError> {
        let owner = SpilledRefresh::owner(connection_id, parent);
        let record = SpilledRefresh {
            connection_id: connection_id.clone(),
            parent: parent.clone(),
            fence,
            attempt_id: attempt_id.clone(),
            grant_id: grant_id.clone(),
            pair: SealedPair::seal(&self.keys, &owner, grant_id, pair),
            rescue: rescue.cloned(),
        };
        self.spill(&Entry::Refresh(Box::new(record)))
    }

    /// Writes an authorization from the callback and waits until it is on disk; see
    /// `spill_refresh`.
    pub fn spill_authorization(
        &self,
        session_id: &SessionId,
        auth: &NewAuthorization,
    ) -> Result<(), JournalError> {
        let owner = SpilledAuthorization::owner(session_id);
        let record = SpilledAuthorization {
            session_id: session_id.clone(),
            provider: auth.provider,
            target: auth.target.clone(),
            grant_id: auth.grant_id.clone(),
            pair: SealedPair::seal(&self.keys, &owner, &auth.grant_id, &auth.pair),
        };
        self.spill(&Entry::Authorization(Box::new(record)))
    }

    fn spill(&self, entry: &Entry) -> Result<(), JournalError> {
        let framed = frame(entry);
        // The reader skips a frame it cannot read as damage, so a pair written in one would be
        // lost; refused here, the pair stays with its caller, which retries its commit.
        if read_frame(&framed).is_none() {
            return Err(JournalError::Unreadable);
        }
        self.write_frame(&framed)?;
        self.spilled.notify_one();
        Ok(())
    }

    fn append(&self, entry: &Entry) -> std::io::Result<()> {
        self.write_frame(&frame(entry))
    }

    fn write_frame(&self, framed: &[u8]) -> std::io::Result<()> {
        let mut file = self.own.lock().unwrap_or_else(|e| e.into_inner());
        file.write_all(framed)?;
        file.sync_data()
    }

    /// Records of this process's file not yet committed.
    pub fn pending(&self) -> Result<FileContents, JournalError> {
        let mut file = self.own.lock().unwrap_or_else(|e| e.into_inner());
        Ok(read_file(&mut file)?)
    }

    /// Commits every pending record of this process's file and of the files of processes that
    /// died; returns how many were committed. Stops at the first database failure (the rest
    /// wait for the next try); a record that the key ring cannot open is logged and kept.
    pub async fn replay(&self, store: &Store) -> Result<ReplayReport, StoreError> {
        let mut report = ReplayReport::default();
        // This process's own file.
        let contents = self
            .pending()
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        report.damaged += contents.damaged;
        for (grant, committed) in self.commit_all(store, &contents, &mut report).await? {
            if committed {
                self.append(&Entry::Done { grant_id: grant })
                    .map_err(|e| StoreError::Unavailable(e.to_string()))?;
            }
        }
        if self.pending().map(|c| c.is_empty()).unwrap_or(false) {
            let file = self.own.lock().unwrap_or_else(|e| e.into_inner());
            if file.metadata().map(|m| m.len() > 0).unwrap_or(false) {
                file.set_len(0)
                    .and_then(|()| file.sync_all())
                    .map_err(|e| {
                        StoreError::Unavailable(format!("emptying the spill journal: {e}"))
                    })?;
            }
        }
        // Files of processes that died: their lock is free.
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) => return Err(StoreError::Unavailable(e.to_string())),
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path == self.own_path || path.extension().and_then(|e| e.to_str()) != Some("journal")
            {
                continue;
            }
            let Ok(mut file) = OpenOptions::new().read(true).append(true).open(&path) else {
                continue;
            };
            if file.try_lock().is_err() {
                continue; // A live process owns it.
            }
            let contents =
                read_file(&mut file).map_err(|e| StoreError::Unavailable(e.to_string()))?;
            report.damaged += contents.damaged;
            let mut all = true;
            for (grant, committed) in self.commit_all(store, &contents, &mut report).await? {
                if committed {
                    file.write_all(&frame(&Entry::Done { grant_id: grant }))
                        .and_then(|()| file.sync_data())
                        .map_err(|e| StoreError::Unavailable(e.to_string()))?;
                } else {
                    all = false;
                }
            }
            if all {
                std::fs::remove_file(&path).map_err(|e| StoreError::Unavailable(e.to_string()))?;
            }
        }
        Ok(report)
    }

    /// Commits every record of a file, in order; says which were committed (`false`: it could
    /// not be opened, and stays in the journal).
    async fn commit_all(
        &self,
        store: &Store,
        contents: &FileContents,
        report: &mut ReplayReport,
    ) -> Result<Vec<(GrantId, bool)>, StoreError> {
        let mut out = Vec::new();
        for record in &contents.pending {
            let committed = self.commit(store, record, report).await?;
            out.push((record.grant_id.clone(), committed));
        }
        for record in &contents.authorizations {
            let committed = self.commit_authorization(store, record, report).await?;
            out.push((record.grant_id.clone(), committed));
        }
        Ok(out)
    }

    async fn commit_authorization(
        &self,
        store: &Store,
        record: &SpilledAuthorization,
        report: &mut ReplayReport,
    ) -> Result<bool, StoreError> {
        let pair = match record.pair(&self.keys) {
            Ok(pair) => pair,
            Err(e) => {
                tracing::error!(
                    session = %record.session_id,
                    grant = %record.grant_id,
                    "a spilled authorization cannot be opened and stays in the journal: {e}"
                );
                report.unopenable += 1;
                return Ok(false);
            }
        };
        let auth = NewAuthorization {
            provider: record.provider,
            target: record.target.clone(),
            pair,
            grant_id: record.grant_id.clone(),
        };
        match store.record_authorization(auth).await {
            Ok(outcome) => {
                tracing::info!(
                    connection = %outcome.connection.id,
                    grant = %record.grant_id,
                    "committed a spilled authorization"
                );
            }
            // Refused for good (its bot now belongs to another live connection): what the
            // store would have refused at the callback. Kept in the log, not retried forever.
            Err(StoreError::Conflict(reason)) => {
                tracing::error!(
                    grant = %record.grant_id,
                    "a spilled authorization was refused: {reason}"
                );
            }
            Err(e) => return Err(e),
        }
        report.committed += 1;
        Ok(true)
    }

    /// Commits one record; `false` when it cannot be opened and stays in the journal.
    async fn commit(
        &self,
        store: &Store,
        record: &SpilledRefresh,
        report: &mut ReplayReport,
    ) -> Result<bool, StoreError> {
        let pair = match record.pair(&self.keys) {
            Ok(pair) => pair,
            Err(e) => {
                tracing::error!(
                    connection = %record.connection_id,
                    grant = %record.grant_id,
                    "a spilled pair cannot be opened and stays in the journal: {e}"
                );
                report.unopenable += 1;
                return Ok(false);
            }
        };
        let recorded = match &record.rescue {
            None => {
                store
                    .record_refresh(
                        &record.connection_id,
                        &record.parent,
                        record.fence,
                        &record.attempt_id,
                        &record.grant_id,
                        pair,
                    )
                    .await?
            }
            Some(rescue) => {
                store
                    .record_rescue(
                        &record.connection_id,
                        &record.parent,
                        record.fence,
                        &record.attempt_id,
                        &record.grant_id,
                        pair,
                        rescue,
                    )
                    .await?
            }
        };
        tracing::info!(
            connection = %record.connection_id,
            grant = %record.grant_id,
            commit = ?recorded.commit,
            recovered = recorded.recovered,
            "committed a spilled pair"
        );
        report.committed += 1;
        Ok(true)
    }

    /// Replays whenever a record is spilled or the database comes back, until the process
    /// ends. A failed replay (the database is still down) waits for the database's return.
    pub async fn run_replayer(self: Arc<Self>, store: Store) {
        let mut backoff = Duration::from_millis(200);
        loop {
            store.wait_until_up().await;
            match self.replay(&store).await {
                Ok(report) => {
                    if report.committed > 0 {
                        tracing::info!(
                            committed = report.committed,
                            "the spill journal is replayed"
                        );
                    }
                    backoff = Duration::from_millis(200);
                    if self.pending().map(|c| c.is_empty()).unwrap_or(false) {
                        self.spilled.notified().await;
                    } else {
                        tokio::time::sleep(backoff).await;
                    }
                }
                Err(e) => {
                    tracing::debug!("spill journal replay postponed: {e}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

impl FileContents {
    /// Whether nothing waits for a commit.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty() && self.authorizations.is_empty()
    }
}

/// What one replay did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReplayReport {
    pub committed: usize,
    pub damaged: usize,
    pub unopenable: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::MintedPair;

    fn keys() -> Arc<KeyRing> {
        Arc::new(KeyRing::parse(&KeyRing::generate_entry()).unwrap())
    }

    fn pair(tag: &str) -> MintedPair {
        MintedPair {
            access_token: AccessToken::new(format!("ntn_journal_access_{tag}")),
            refresh_token: Some(RefreshToken::new(format!("nrt_journal_refresh_{tag}"))),
            bot_id: BotId("bot".into()),
            workspace_id: "ws".into(),
            workspace_name: None,
            workspace_icon: None,
            metadata: serde_json::json!({}),
            provider_request_id: None,
            obtained_at: Utc::now(),
            expires_at: None,
        }
    }

    fn spill(journal: &Journal, tag: &str) -> GrantId {
        let grant = GrantId::generate();
        journal
            .spill_refresh(
                &ConnectionId::generate(),
                &GrantId::generate(),
                Fence(3),
                &AttemptId::generate(),
                &grant,
                &pair(tag),
                None,
            )
            .unwrap();
        grant
    }

    #[test]
    fn records_round_trip_sealed_and_no_token_is_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let keys = keys();
        let journal = Journal::open(dir.path(), keys.clone()).unwrap();
        let a = spill(&journal, "a");
        let b = spill(&journal, "b");
        let pending = journal.pending().unwrap();
        assert_eq!(pending.damaged, 0);
        let ids: Vec<_> = pending.pending.iter().map(|r| r.grant_id.clone()).collect();
        assert_eq!(ids, [a, b]);
        let opened = pending.pending[1].pair(&keys).unwrap();
        assert_eq!(opened.access_token.expose_secret(), "ntn_journal_access_b");
        let bytes = std::fs::read(&journal.own_path).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        assert!(!text.contains("ntn_journal") && !text.contains("nrt_journal"));
    }

    #[test]
    fn a_record_opens_only_with_its_own_binding() {
        let dir = tempfile::tempdir().unwrap();
        let keys = keys();
        let journal = Journal::open(dir.path(), keys.clone()).unwrap();
        spill(&journal, "a");
        let mut record = journal.pending().unwrap().pending.remove(0);
        record.parent = GrantId::generate();
        assert!(matches!(record.pair(&keys), Err(JournalError::Seal(_))));
        assert!(matches!(
            journal.pending().unwrap().pending[0].pair(&self::keys()),
            Err(JournalError::Seal(_))
        ));
    }

    #[test]
    fn a_torn_tail_is_skipped_and_never_misread() {
        let dir = tempfile::tempdir().unwrap();
        let keys = keys();
        let journal = Journal::open(dir.path(), keys.clone()).unwrap();
        let first = spill(&journal, "first");
        spill(&journal, "second");
        let whole = std::fs::read(&journal.own_path).unwrap();
        let first_len = frame(&Entry::Done {
            grant_id: first.clone(),
        })
        .len();
        assert!(whole.len() > first_len);
        // Every cut inside the second record leaves exactly the first one readable.
        let second_start = whole[4..].windows(4).position(|w| w == MAGIC).unwrap() + 4;
        for cut in second_start + 1..whole.len() {
            let contents = parse(&whole[..cut]);
            assert_eq!(contents.pending.len(), 1, "cut at {cut}");
            assert_eq!(contents.pending[0].grant_id, first);
            assert_eq!(contents.damaged, 1, "cut at {cut}");
        }
    }

    #[test]
    fn damaged_bytes_in_the_middle_lose_only_that_record() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path(), keys()).unwrap();
        let a = spill(&journal, "a");
        spill(&journal, "b");
        let c = spill(&journal, "c");
        let mut bytes = std::fs::read(&journal.own_path).unwrap();
        let starts: Vec<usize> = bytes
            .windows(4)
            .enumerate()
            .filter(|(_, w)| *w == MAGIC)
            .map(|(i, _)| i)
            .collect();
        assert_eq!(starts.len(), 3);
        // Flip one byte inside the second record's JSON.
        bytes[starts[1] + 20] ^= 0x20;
        let contents = parse(&bytes);
        let ids: Vec<_> = contents
            .pending
            .iter()
            .map(|r| r.grant_id.clone())
            .collect();
        assert_eq!(ids, [a, c]);
        assert_eq!(contents.damaged, 1);
    }

    #[test]
    fn done_marks_hide_committed_records() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path(), keys()).unwrap();
        let a = spill(&journal, "a");
        let b = spill(&journal, "b");
        journal.append(&Entry::Done { grant_id: a }).unwrap();
        let ids: Vec<_> = journal
            .pending()
            .unwrap()
            .pending
            .iter()
            .map(|r| r.grant_id.clone())
            .collect();
        assert_eq!(ids, [b]);
    }

    #[test]
    fn a_live_process_file_is_locked_against_others() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path(), keys()).unwrap();
        let other = OpenOptions::new()
            .read(true)
            .open(&journal.own_path)
            .unwrap();
        assert!(other.try_lock().is_err());
        drop(journal);
        assert!(other.try_lock().is_ok());
    }
}
