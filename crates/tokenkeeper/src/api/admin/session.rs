//! The console's sign-in state, in this process's memory: sessions, their CSRF tokens, and
//! the count of failed sign-ins per client address.
//!
//! Sessions live in memory on purpose: a restart signs everyone out (the issue asks for
//! sessions "revocable at restart"), and there is nothing to leak from the database. Their
//! number and lifetime are bounded (invariant 10): at most `MAX_SESSIONS`, each for at most
//! `LIFETIME`, and ended after `IDLE` without a request. With several processes behind a load
//! balancer, a session is valid only on the process that made it; the console is meant for
//! one operator's browser, so a sticky session or a single process serves it.
//!
//! Only a SHA-256 of each cookie value is kept, so that what this map holds cannot be used as
//! a cookie, and a cookie is found by its hash, never compared byte by byte.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

use chrono::{DateTime, Duration, Utc};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The most sessions held at once; a new one beyond ends the least recently used.
pub const MAX_SESSIONS: usize = 1000;
/// How long a session lasts at most, however busy.
pub const LIFETIME: Duration = Duration::hours(8);
/// How long a session lasts without a request.
pub const IDLE: Duration = Duration::hours(1);

/// Failed sign-ins allowed from one client address within `FAILURE_WINDOW`; past them, sign-in
/// is refused from that address, without looking at the key, until the window has passed.
pub const MAX_FAILURES: u32 = 5;
pub const FAILURE_WINDOW: Duration = Duration::minutes(5);
/// The most client addresses whose failures are remembered; beyond, the oldest are forgotten.
const MAX_FAILING_ADDRESSES: usize = 4096;

/// A signed-in browser.
#[derive(Debug, Clone)]
pub struct Session {
    /// The token every form of this session carries (`csrf`), checked on every POST.
    pub csrf: String,
    /// The fingerprint of the admin key that signed in (`sha256:…`), for the log.
    pub key: String,
    pub started_at: DateTime<Utc>,
    last_seen: DateTime<Utc>,
}

impl Session {
    /// Whether `presented` is this session's CSRF token (compared in constant time).
    pub fn csrf_matches(&self, presented: &str) -> bool {
        bool::from(self.csrf.as_bytes().ct_eq(presented.as_bytes()))
    }

    fn alive(&self, now: DateTime<Utc>) -> bool {
        now < self.started_at + LIFETIME && now < self.last_seen + IDLE
    }
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    since: DateTime<Utc>,
}

/// Sign-in state of one process.
#[derive(Debug, Default)]
pub struct Sessions {
    sessions: Mutex<HashMap<[u8; 32], Session>>,
    failures: Mutex<HashMap<IpAddr, Failures>>,
}

fn digest(cookie: &str) -> [u8; 32] {
    Sha256::digest(cookie.as_bytes()).into()
}

impl Sessions {
    /// Starts a session for the admin key with fingerprint `key`; answers the cookie value
    /// (192 random bits) and the session.
    pub fn start(&self, key: String, now: DateTime<Utc>) -> (String, Session) {
        let cookie = crate::ids::random_token(24);
        let session = Session {
            csrf: crate::ids::random_token(24),
            key,
            started_at: now,
            last_seen: now,
        };
        let mut sessions = self.lock();
        if sessions.len() >= MAX_SESSIONS {
            sessions.retain(|_, s| s.alive(now));
        }
        if sessions.len() >= MAX_SESSIONS {
            let oldest = sessions
                .iter()
                .min_by_key(|(_, s)| s.last_seen)
                .map(|(k, _)| *k);
            if let Some(oldest) = oldest {
                sessions.remove(&oldest);
            }
        }
        sessions.insert(digest(&cookie), session.clone());
        (cookie, session)
    }

    /// The live session of this cookie, touched; an expired one is ended.
    pub fn get(&self, cookie: &str, now: DateTime<Utc>) -> Option<Session> {
        let key = digest(cookie);
        let mut sessions = self.lock();
        let session = sessions.get_mut(&key)?;
        if !session.alive(now) {
            sessions.remove(&key);
            return None;
        }
        session.last_seen = now;
        Some(session.clone())
    }

    /// Ends the session of this cookie (signing out).
    pub fn end(&self, cookie: &str) {
        self.lock().remove(&digest(cookie));
    }

    /// How many sessions are held (live or not yet swept).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `client` may try to sign in now: `Err(wait)` once it failed `MAX_FAILURES` times
    /// within the window, with how long until it may try again.
    pub fn may_try(&self, client: IpAddr, now: DateTime<Utc>) -> Result<(), Duration> {
        let failures = self.failures_lock();
        match failures.get(&client) {
            Some(f) if f.count >= MAX_FAILURES && now < f.since + FAILURE_WINDOW => {
                Err(f.since + FAILURE_WINDOW - now)
            }
            _ => Ok(()),
        }
    }

    /// Counts a failed sign-in from `client`; answers how many it made in the current window.
    pub fn failed(&self, client: IpAddr, now: DateTime<Utc>) -> u32 {
        let mut failures = self.failures_lock();
        if failures.len() >= MAX_FAILING_ADDRESSES && !failures.contains_key(&client) {
            failures.retain(|_, f| now < f.since + FAILURE_WINDOW);
            if failures.len() >= MAX_FAILING_ADDRESSES {
                let oldest = failures
                    .iter()
                    .min_by_key(|(_, f)| f.since)
                    .map(|(a, _)| *a);
                if let Some(oldest) = oldest {
                    failures.remove(&oldest);
                }
            }
        }
        let entry = failures.entry(client).or_insert(Failures {
            count: 0,
            since: now,
        });
        if now >= entry.since + FAILURE_WINDOW {
            *entry = Failures {
                count: 0,
                since: now,
            };
        }
        entry.count += 1;
        entry.count
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Session>> {
        self.sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn failures_lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Failures>> {
        self.failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t0() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-06-08T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn a_session_ends_when_idle_or_too_old_and_on_sign_out() {
        let sessions = Sessions::default();
        let (cookie, _) = sessions.start("sha256:k".into(), t0());
        assert!(sessions
            .get(&cookie, t0() + Duration::minutes(59))
            .is_some());
        // Touched at 59 minutes: alive until an hour after that.
        assert!(sessions
            .get(&cookie, t0() + Duration::minutes(118))
            .is_some());
        assert!(sessions
            .get(&cookie, t0() + Duration::minutes(179))
            .is_none());

        let (cookie, _) = sessions.start("sha256:k".into(), t0());
        let mut at = t0();
        while at < t0() + LIFETIME - Duration::minutes(30) {
            at += Duration::minutes(30);
            assert!(sessions.get(&cookie, at).is_some(), "alive at {at}");
        }
        assert!(sessions.get(&cookie, t0() + LIFETIME).is_none());

        let (cookie, _) = sessions.start("sha256:k".into(), t0());
        sessions.end(&cookie);
        assert!(sessions.get(&cookie, t0()).is_none());
        assert!(sessions.get("not-a-cookie", t0()).is_none());
    }

    #[test]
    fn sessions_are_bounded_and_the_least_recently_used_goes_first() {
        let sessions = Sessions::default();
        let (first, _) = sessions.start("sha256:k".into(), t0());
        let (second, _) = sessions.start("sha256:k".into(), t0() + Duration::seconds(1));
        // The first is used again, so the second is now the least recently used.
        assert!(sessions.get(&first, t0() + Duration::seconds(2)).is_some());
        for i in 0..MAX_SESSIONS - 1 {
            sessions.start("sha256:k".into(), t0() + Duration::seconds(3 + i as i64));
        }
        assert_eq!(sessions.len(), MAX_SESSIONS);
        let later = t0() + Duration::seconds(3 + MAX_SESSIONS as i64);
        assert!(sessions.get(&second, later).is_none());
        assert!(sessions.get(&first, later).is_some());
    }

    #[test]
    fn failed_sign_ins_are_limited_per_address_within_a_window() {
        let sessions = Sessions::default();
        let (a, b): (IpAddr, IpAddr) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        for n in 1..=MAX_FAILURES {
            assert!(sessions.may_try(a, t0()).is_ok());
            assert_eq!(sessions.failed(a, t0()), n);
        }
        let wait = sessions
            .may_try(a, t0() + Duration::minutes(1))
            .unwrap_err();
        assert_eq!(wait, FAILURE_WINDOW - Duration::minutes(1));
        assert!(
            sessions.may_try(b, t0()).is_ok(),
            "another address is not limited"
        );
        assert!(sessions.may_try(a, t0() + FAILURE_WINDOW).is_ok());
        assert_eq!(sessions.failed(a, t0() + FAILURE_WINDOW), 1, "a new window");
    }

    #[test]
    fn csrf_tokens_differ_per_session_and_match_exactly() {
        let sessions = Sessions::default();
        let (_, one) = sessions.start("sha256:k".into(), t0());
        let (_, two) = sessions.start("sha256:k".into(), t0());
        assert_ne!(one.csrf, two.csrf);
        assert!(one.csrf_matches(&one.csrf.clone()));
        assert!(!one.csrf_matches(&two.csrf));
        assert!(!one.csrf_matches(""));
        assert!(!one.csrf_matches(&one.csrf[..one.csrf.len() - 1]));
    }
}
