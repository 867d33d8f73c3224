//! What each process keeps of the database in memory, and how it stays true.
//!
//! - `TokenCache`: the current grant of the connections this process serves, sealed as at rest
//!   (opened on each use), bounded in size. A token read that finds a verified entry touches no
//!   database.
//! - `Throttles`: Notion's 429s and 529s, held per connection and per workspace by every
//!   process (`Store::record_throttle` writes them; the change feed spreads them).
//! - `Waiters`: refreshes waiting for another process's refresh of a connection, woken by the
//!   change feed instead of polling.
//!
//! The promise (docs/DESIGN.md, "The token cache"):
//! 1. In this process, a grant is never served from the cache once a write that superseded it
//!    (or changed the connection's status) has committed: the write marks the entry `Writing`
//!    before its transaction commits, and removes it once the transaction is over, committed or
//!    not (`begin_write`, `end_write`, called by the store's rules through `Db::touched`).
//! 2. Another process's commit reaches this cache through the change feed (PostgreSQL's
//!    `LISTEN`, SQLite's change log polled every `sqlite::FEED_POLL`), which drops the entry; the
//!    staleness window across processes is the feed's delay, and it is measured by the
//!    `staleness` benchmark.
//! 3. A read that missed fills the entry only if nothing touched its shard since the read
//!    began (`Ticket`): a value read before a change can never land after the change's
//!    invalidation.
//! 4. Entries are trusted only while the feed is live, and only those filled since the feed last
//!    (re)connected (`epoch`): when the feed drops, every entry must be read again before it is
//!    served, except during a database outage, when an entry that no change was seen for is
//!    served and marked as such. An entry the feed invalidated is gone, so a grant known to be
//!    superseded or revoked is never served, not even then.
//!
//! Written by hand rather than with a caching crate: the compare-and-fill of rule 3 and the
//! `Writing` marks of rule 1 need the map under our own lock, and a random victim on eviction
//! keeps no bookkeeping per entry (the bound is what matters: 1,000,000 connections must fit in
//! a fixed amount of memory). The map is split in shards so that concurrent reads rarely meet on
//! one lock.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};

use crate::ids::{ConnectionId, GrantId};
use crate::ledger::ConnectionStatus;

/// Shards of the token cache: enough that 64 concurrent readers on two cores rarely wait on
/// each other's lock, few enough that a shard's share of the bound is not tiny.
const SHARDS: usize = 64;

/// The default bound of the token cache, in connections (`TOKENKEEPER_TOKEN_CACHE_SIZE`).
pub const DEFAULT_CAPACITY: usize = 100_000;

/// A connection's current grant as the cache keeps it: what a token read answers, with the
/// access token sealed exactly as the database holds it.
#[derive(Debug)]
pub(crate) struct Entry {
    pub status: ConnectionStatus,
    pub workspace_id: Box<str>,
    /// `None` for a revoked connection (a read of it is answered 410 without the database).
    pub grant: Option<EntryGrant>,
    /// The feed epoch the entry was filled in; older entries are not trusted (rule 4).
    epoch: u64,
}

#[derive(Debug)]
pub(crate) struct EntryGrant {
    pub id: GrantId,
    pub obtained_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    /// Sealed, bound to `(connection, grant, access_token)`; opened on every use.
    pub sealed_access: Box<[u8]>,
}

impl Entry {
    pub fn new(status: ConnectionStatus, workspace_id: &str, grant: Option<EntryGrant>) -> Entry {
        Entry {
            status,
            workspace_id: workspace_id.into(),
            grant,
            epoch: 0,
        }
    }
}

enum Slot {
    Ready(Arc<Entry>),
    /// That many transactions of this process that change the connection are in flight.
    Writing(u32),
}

struct Shard {
    map: HashMap<ConnectionId, Slot>,
    /// Moves whenever an entry of this shard is invalidated or written: what `Ticket` checks.
    version: u64,
}

/// What a read found in the cache.
pub(crate) enum Lookup {
    /// Trusted: the feed is live and nothing changed the connection since it was filled.
    Fresh(Arc<Entry>),
    /// Filled before the feed last (re)connected, or the feed is down: not served unless the
    /// database cannot be reached.
    Unverified(Arc<Entry>),
    Miss,
}

/// Taken before a read of the database; the read's result may fill the cache only if the
/// ticket is still good (rule 3).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ticket {
    shard: usize,
    version: u64,
    epoch: u64,
}

pub(crate) struct TokenCache {
    shards: Box<[Mutex<Shard>]>,
    /// The bound divided among the shards; 0 until the change feed starts (and with
    /// `TOKENKEEPER_TOKEN_CACHE_SIZE=0`): the cache is off.
    per_shard: AtomicUsize,
    hasher: std::collections::hash_map::RandomState,
    epoch: AtomicU64,
    live: AtomicBool,
}

impl TokenCache {
    /// A cache of at most `capacity` connections; 0 turns it off.
    pub fn new(capacity: usize) -> TokenCache {
        TokenCache {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        map: HashMap::new(),
                        version: 0,
                    })
                })
                .collect(),
            per_shard: AtomicUsize::new(capacity.div_ceil(SHARDS)),
            hasher: Default::default(),
            epoch: AtomicU64::new(0),
            live: AtomicBool::new(false),
        }
    }

    pub fn enabled(&self) -> bool {
        self.per_shard.load(Ordering::Relaxed) > 0
    }

    /// Sets the bound (at start, before anything is filled).
    pub fn set_capacity(&self, capacity: usize) {
        self.per_shard
            .store(capacity.div_ceil(SHARDS), Ordering::Relaxed);
    }

    fn shard_of(&self, id: &ConnectionId) -> usize {
        (self.hasher.hash_one(id) as usize) % SHARDS
    }

    fn lock(&self, shard: usize) -> std::sync::MutexGuard<'_, Shard> {
        self.shards[shard].lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, id: &ConnectionId) -> Lookup {
        if !self.enabled() {
            return Lookup::Miss;
        }
        let shard = self.lock(self.shard_of(id));
        match shard.map.get(id) {
            Some(Slot::Ready(entry)) => {
                if self.live.load(Ordering::Acquire)
                    && entry.epoch == self.epoch.load(Ordering::Acquire)
                {
                    Lookup::Fresh(entry.clone())
                } else {
                    Lookup::Unverified(entry.clone())
                }
            }
            Some(Slot::Writing(_)) | None => Lookup::Miss,
        }
    }

    pub fn ticket(&self, id: &ConnectionId) -> Ticket {
        let shard = self.shard_of(id);
        let version = self.lock(shard).version;
        Ticket {
            shard,
            version,
            epoch: self.epoch.load(Ordering::Acquire),
        }
    }

    /// Fills the entry read from the database under `ticket`, unless anything touched the
    /// shard since (rule 3), the feed is not live, or a write of this process is in flight.
    /// Returns whether it did.
    pub fn fill(&self, ticket: Ticket, id: &ConnectionId, mut entry: Entry) -> bool {
        if !self.enabled() || !self.live.load(Ordering::Acquire) {
            return false;
        }
        let epoch = self.epoch.load(Ordering::Acquire);
        if epoch != ticket.epoch {
            return false;
        }
        entry.epoch = epoch;
        let mut shard = self.lock(ticket.shard);
        if shard.version != ticket.version || matches!(shard.map.get(id), Some(Slot::Writing(_))) {
            return false;
        }
        if shard.map.len() >= self.per_shard.load(Ordering::Relaxed) && !shard.map.contains_key(id)
        {
            // A random victim: the first entry the map yields sits in a bucket chosen by the
            // hash of its id, not by its age or use. `Writing` marks are never evicted.
            let victim = shard
                .map
                .iter()
                .find(|(_, slot)| matches!(slot, Slot::Ready(_)))
                .map(|(k, _)| k.clone());
            match victim {
                Some(victim) => {
                    shard.map.remove(&victim);
                }
                None => return false,
            }
        }
        shard.map.insert(id.clone(), Slot::Ready(Arc::new(entry)));
        true
    }

    /// A transaction of this process is about to change the connection: nothing may be served
    /// from the cache for it, or filled, until `end_write` (rule 1).
    pub fn begin_write(&self, id: &ConnectionId) {
        if !self.enabled() {
            return;
        }
        let mut shard = self.lock(self.shard_of(id));
        shard.version += 1;
        let writers = match shard.map.get(id) {
            Some(Slot::Writing(n)) => n + 1,
            _ => 1,
        };
        shard.map.insert(id.clone(), Slot::Writing(writers));
    }

    /// The transaction of a `begin_write` is over (committed, rolled back or abandoned): the
    /// next read goes to the database.
    pub fn end_write(&self, id: &ConnectionId) {
        if !self.enabled() {
            return;
        }
        let mut shard = self.lock(self.shard_of(id));
        shard.version += 1;
        match shard.map.get_mut(id) {
            Some(Slot::Writing(n)) if *n > 1 => *n -= 1,
            _ => {
                shard.map.remove(id);
            }
        }
    }

    /// Another process (or this one) committed a change of the connection: it now has `grant`
    /// and `status`. An entry that says otherwise is dropped; one that says the same is kept.
    pub fn changed(&self, id: &ConnectionId, grant: Option<&GrantId>, status: ConnectionStatus) {
        if !self.enabled() {
            return;
        }
        let mut shard = self.lock(self.shard_of(id));
        shard.version += 1;
        if let Some(Slot::Ready(entry)) = shard.map.get(id) {
            let same = entry.status == status && entry.grant.as_ref().map(|g| &g.id) == grant;
            if !same {
                shard.map.remove(id);
            }
        }
    }

    /// Changes may have been missed (the feed dropped, or fell behind its log): every entry is
    /// read again before it is served, and reads in flight may not fill (rule 4).
    pub fn distrust_all(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }

    pub fn set_live(&self, live: bool) {
        self.live.store(live, Ordering::Release);
    }

    pub fn is_live(&self) -> bool {
        self.live.load(Ordering::Acquire)
    }

    pub fn len(&self) -> usize {
        (0..SHARDS)
            .map(|s| {
                self.lock(s)
                    .map
                    .values()
                    .filter(|slot| matches!(slot, Slot::Ready(_)))
                    .count()
            })
            .sum()
    }
}

/// What a throttle holds: a connection's own budget, or its workspace's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ThrottleScope {
    Connection,
    Workspace,
}

impl ThrottleScope {
    pub fn as_str(self) -> &'static str {
        match self {
            ThrottleScope::Connection => "connection",
            ThrottleScope::Workspace => "workspace",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "connection" => Some(ThrottleScope::Connection),
            "workspace" => Some(ThrottleScope::Workspace),
            _ => None,
        }
    }
}

/// A hold on proxied calls, as every process learns of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Throttle {
    pub scope: ThrottleScope,
    /// The connection id or the workspace id.
    pub subject: String,
    pub until: DateTime<Utc>,
    /// Notion's `rate_limit_reason`, or `service_overload` for a 529.
    pub reason: String,
}

/// The throttles this process knows of, by scope and subject; expired ones are dropped as they
/// are met. Bounded: beyond `MAX_THROTTLES` the expired ones go first, then the soonest to end.
#[derive(Default)]
pub(crate) struct Throttles {
    held: Mutex<HashMap<(ThrottleScope, String), Throttle>>,
    /// After a throttle ends, its subject stays careful for as long again: calls pass one at a
    /// time in this process, through this lock (`api::proxy`), so that a budget Notion has not
    /// refilled yet meets one call per process, not every call held until then.
    careful: Mutex<HashMap<(ThrottleScope, String), Careful>>,
}

struct Careful {
    until: DateTime<Utc>,
    gate: Arc<tokio::sync::Mutex<()>>,
}

const MAX_THROTTLES: usize = 100_000;

impl Throttles {
    /// Keeps the later of what is known and `t`.
    pub fn learn(&self, t: Throttle) {
        self.be_careful(&t);
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if held.len() >= MAX_THROTTLES {
            let now = Utc::now();
            held.retain(|_, t| t.until > now);
            if held.len() >= MAX_THROTTLES {
                if let Some(k) = held
                    .iter()
                    .min_by_key(|(_, t)| t.until)
                    .map(|(k, _)| k.clone())
                {
                    held.remove(&k);
                }
            }
        }
        let key = (t.scope, t.subject.clone());
        match held.get(&key) {
            Some(known) if known.until >= t.until => {}
            _ => {
                held.insert(key, t);
            }
        }
    }

    fn be_careful(&self, t: &Throttle) {
        let now = Utc::now();
        let until = t.until + (t.until - now).max(chrono::Duration::seconds(1));
        let mut careful = self.careful.lock().unwrap_or_else(|e| e.into_inner());
        if careful.len() >= MAX_THROTTLES {
            careful.retain(|_, c| c.until > now);
        }
        if careful.len() >= MAX_THROTTLES {
            return;
        }
        let entry = careful
            .entry((t.scope, t.subject.clone()))
            .or_insert_with(|| Careful {
                until,
                gate: Arc::default(),
            });
        entry.until = entry.until.max(until);
    }

    /// The gate calls of `(scope, subject)` pass one at a time through while it is careful.
    pub fn gate(
        &self,
        scope: ThrottleScope,
        subject: &str,
        now: DateTime<Utc>,
    ) -> Option<Arc<tokio::sync::Mutex<()>>> {
        let careful = self.careful.lock().unwrap_or_else(|e| e.into_inner());
        if careful.is_empty() {
            return None;
        }
        careful
            .get(&(scope, subject.to_owned()))
            .filter(|c| c.until > now)
            .map(|c| c.gate.clone())
    }

    /// The throttle that holds `(scope, subject)` at `now`, if any.
    pub fn holding(
        &self,
        scope: ThrottleScope,
        subject: &str,
        now: DateTime<Utc>,
    ) -> Option<Throttle> {
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if held.is_empty() {
            return None;
        }
        held.get(&(scope, subject.to_owned()))
            .filter(|t| t.until > now)
            .cloned()
    }
}

/// Refreshes of this process waiting for another process's refresh of a connection.
#[derive(Default)]
pub(crate) struct Waiters {
    by_connection: Mutex<HashMap<ConnectionId, Arc<tokio::sync::Notify>>>,
}

/// One waiter's registration; deregisters when dropped.
pub struct Waiter<'a> {
    waiters: &'a Waiters,
    id: ConnectionId,
    pub notify: Arc<tokio::sync::Notify>,
}

impl Waiters {
    pub fn register(&self, id: &ConnectionId) -> Waiter<'_> {
        let notify = self
            .by_connection
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(id.clone())
            .or_default()
            .clone();
        Waiter {
            waiters: self,
            id: id.clone(),
            notify,
        }
    }

    pub fn wake(&self, id: &ConnectionId) {
        let notify = self
            .by_connection
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned();
        if let Some(notify) = notify {
            notify.notify_waiters();
        }
    }

    pub fn wake_all(&self) {
        let all: Vec<_> = self
            .by_connection
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        for notify in all {
            notify.notify_waiters();
        }
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        let mut map = self
            .waiters
            .by_connection
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        // The map's own reference and ours: nobody else waits on this connection.
        if Arc::strong_count(&self.notify) <= 2 {
            map.remove(&self.id);
        }
    }
}

/// Counts of what the cache and the feed did, read by `/metrics`.
#[derive(Debug, Default)]
pub struct CacheCounters {
    /// Token reads answered from a verified entry.
    pub hits: AtomicU64,
    /// Token reads that went to the database (no entry, or an unverified one).
    pub misses: AtomicU64,
    /// Token reads answered from an unverified entry because the database could not be reached.
    pub outage_hits: AtomicU64,
    /// Times the change feed (re)connected and every entry had to be verified again.
    pub feed_resyncs: AtomicU64,
    /// Statements this process sent to the database (every `Db::execute` and `Db::query`).
    pub statements: AtomicU64,
}

/// What the store shares between its backend, its change feed and its readers.
pub(crate) struct Local {
    pub tokens: TokenCache,
    pub throttles: Throttles,
    pub waiters: Waiters,
    pub counters: CacheCounters,
}

impl Local {
    pub fn new(capacity: usize) -> Arc<Local> {
        Arc::new(Local {
            tokens: TokenCache::new(capacity),
            throttles: Throttles::default(),
            waiters: Waiters::default(),
            counters: CacheCounters::default(),
        })
    }

    /// What the feed delivers: a committed change of a connection.
    pub fn connection_changed(
        &self,
        id: &ConnectionId,
        grant: Option<&GrantId>,
        status: ConnectionStatus,
    ) {
        self.tokens.changed(id, grant, status);
        self.waiters.wake(id);
    }

    /// The feed (re)connected after `distrust_all`, with the throttles in force now.
    pub fn resynced(&self, throttles: Vec<Throttle>) {
        for t in throttles {
            self.throttles.learn(t);
        }
        self.tokens.set_live(true);
        self.counters.feed_resyncs.fetch_add(1, Ordering::Relaxed);
        self.waiters.wake_all();
    }

    /// The feed stopped: nothing in the cache is served again until it is back and entries are
    /// read again.
    pub fn feed_lost(&self) {
        self.tokens.set_live(false);
        self.tokens.distrust_all();
        self.waiters.wake_all();
    }

    /// Applies one change the feed read (a JSON document: see the 0007 migrations).
    pub fn apply(&self, kind: &str, subject: &str, detail: &serde_json::Value) {
        match kind {
            "connection" => {
                let id = ConnectionId::from_trusted(subject.to_owned());
                let grant = detail
                    .get("grant")
                    .and_then(|g| g.as_str())
                    .map(|g| GrantId::from_trusted(g.to_owned()));
                match detail
                    .get("status")
                    .and_then(|s| s.as_str())
                    .and_then(ConnectionStatus::parse)
                {
                    Some(status) => self.connection_changed(&id, grant.as_ref(), status),
                    // Cannot happen with our own triggers; dropping the entry is always safe.
                    None => {
                        self.tokens.begin_write(&id);
                        self.tokens.end_write(&id);
                        self.waiters.wake(&id);
                    }
                }
            }
            "throttle" => {
                if let Some(t) = throttle_of(subject, detail) {
                    self.throttles.learn(t);
                }
            }
            _ => {}
        }
    }
}

/// A throttle as the change feed carries it: `<scope>:<subject>` and `{until, reason}`.
fn throttle_of(subject: &str, detail: &serde_json::Value) -> Option<Throttle> {
    let (scope, subject) = subject.split_once(':')?;
    let until = DateTime::parse_from_rfc3339(detail.get("until")?.as_str()?)
        .ok()?
        .with_timezone(&Utc);
    Some(Throttle {
        scope: ThrottleScope::parse(scope)?,
        subject: subject.to_owned(),
        until,
        reason: detail.get("reason")?.as_str()?.to_owned(),
    })
}

/// The ids of connections a transaction changes, marked `Writing` in the cache as the rules
/// name them (`Db::touched`) and released when the guard drops: after the transaction's commit
/// or rollback, whichever way it ends (rule 1).
pub(crate) struct Touched {
    local: Arc<Local>,
    ids: Mutex<Vec<ConnectionId>>,
}

impl Touched {
    pub fn new(local: &Arc<Local>) -> Touched {
        Touched {
            local: local.clone(),
            ids: Mutex::new(Vec::new()),
        }
    }

    pub fn touch(&self, id: &ConnectionId) {
        let mut ids = self.ids.lock().unwrap_or_else(|e| e.into_inner());
        if !ids.contains(id) {
            self.local.tokens.begin_write(id);
            ids.push(id.clone());
        }
    }
}

impl Drop for Touched {
    fn drop(&mut self) {
        let ids = std::mem::take(self.ids.get_mut().unwrap_or_else(|e| e.into_inner()));
        for id in ids {
            self.local.tokens.end_write(&id);
            self.local.waiters.wake(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u32) -> ConnectionId {
        ConnectionId::from_trusted(format!("con_{n:032x}"))
    }

    fn grant(n: u32) -> GrantId {
        GrantId::from_trusted(format!("grt_{n:032x}"))
    }

    fn entry(g: u32) -> Entry {
        Entry::new(
            ConnectionStatus::Active,
            "ws",
            Some(EntryGrant {
                id: grant(g),
                obtained_at: Utc::now(),
                expires_at: None,
                sealed_access: Box::new([1, 2, 3]),
            }),
        )
    }

    fn live(capacity: usize) -> TokenCache {
        let cache = TokenCache::new(capacity);
        cache.set_live(true);
        cache
    }

    fn fresh_grant(cache: &TokenCache, n: u32) -> Option<GrantId> {
        match cache.get(&id(n)) {
            Lookup::Fresh(e) => e.grant.as_ref().map(|g| g.id.clone()),
            _ => None,
        }
    }

    #[test]
    fn a_read_that_began_before_a_change_cannot_fill_after_it() {
        let cache = live(100);
        let ticket = cache.ticket(&id(1));
        cache.changed(&id(1), Some(&grant(2)), ConnectionStatus::Active);
        assert!(!cache.fill(ticket, &id(1), entry(1)));
        assert_eq!(fresh_grant(&cache, 1), None);
        let ticket = cache.ticket(&id(1));
        assert!(cache.fill(ticket, &id(1), entry(2)));
        assert_eq!(fresh_grant(&cache, 1), Some(grant(2)));
    }

    #[test]
    fn nothing_is_served_or_filled_while_a_write_is_in_flight_and_after_it() {
        let cache = live(100);
        assert!(cache.fill(cache.ticket(&id(1)), &id(1), entry(1)));
        let before = cache.ticket(&id(1));
        cache.begin_write(&id(1));
        assert!(matches!(cache.get(&id(1)), Lookup::Miss));
        assert!(!cache.fill(cache.ticket(&id(1)), &id(1), entry(1)));
        cache.end_write(&id(1));
        assert!(matches!(cache.get(&id(1)), Lookup::Miss));
        assert!(
            !cache.fill(before, &id(1), entry(1)),
            "a read from before the write"
        );
    }

    #[test]
    fn a_change_that_agrees_keeps_the_entry_and_one_that_does_not_drops_it() {
        let cache = live(100);
        cache.fill(cache.ticket(&id(1)), &id(1), entry(1));
        cache.changed(&id(1), Some(&grant(1)), ConnectionStatus::Active);
        assert_eq!(fresh_grant(&cache, 1), Some(grant(1)));
        cache.changed(&id(1), Some(&grant(1)), ConnectionStatus::Revoked);
        assert!(matches!(cache.get(&id(1)), Lookup::Miss));
    }

    #[test]
    fn entries_from_before_a_lost_feed_are_unverified_and_reads_in_flight_cannot_fill() {
        let cache = live(100);
        cache.fill(cache.ticket(&id(1)), &id(1), entry(1));
        let in_flight = cache.ticket(&id(2));
        cache.set_live(false);
        cache.distrust_all();
        assert!(matches!(cache.get(&id(1)), Lookup::Unverified(_)));
        cache.set_live(true);
        assert!(matches!(cache.get(&id(1)), Lookup::Unverified(_)));
        assert!(!cache.fill(in_flight, &id(2), entry(2)));
    }

    #[test]
    fn the_cache_never_holds_more_than_its_bound() {
        let cache = live(SHARDS * 4);
        for n in 0..10_000 {
            cache.fill(cache.ticket(&id(n)), &id(n), entry(n));
        }
        assert!(cache.len() <= SHARDS * 4, "{}", cache.len());
        assert!(cache.len() >= SHARDS * 3, "{}", cache.len());
    }

    #[test]
    fn a_disabled_cache_keeps_nothing() {
        let cache = live(0);
        assert!(!cache.fill(cache.ticket(&id(1)), &id(1), entry(1)));
        assert!(matches!(cache.get(&id(1)), Lookup::Miss));
    }
}
