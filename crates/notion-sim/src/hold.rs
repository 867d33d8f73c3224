//! Holds: answers that leave only when the test says so.
//!
//! A hold names an endpoint (`users.me`) or a grant of the token endpoint
//! (`oauth.token:refresh_token`). A matching request is processed as usual (a refresh has
//! rotated the token, a page was created), logged, and then waits before its answer is sent, at
//! the point where `latency` is spent and just before it: a slow Notion whose answer is in flight.
//! The test learns that requests have arrived by counting them ([`Hold::arrived`]) instead of
//! sleeping and hoping, and decides when they answer ([`Hold::release`], [`Hold::release_all`]).
//!
//! Nothing can hang forever: a held request answers anyway after [`HOLD_DEADLINE`], and lifting a
//! hold (dropping its [`Hold`], `DELETE /_sim/holds/{id}`, `/_sim/reset`, or shutting the server
//! down) releases everything it holds.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::{oneshot, watch};

use crate::endpoint::Endpoint;

/// How long a held request waits for its release before answering anyway, and how long
/// [`Hold::arrived`] waits for requests before failing the test.
/// Generous, because it only matters when a test forgot to release or waits for a request that
/// never comes; a test that relies on it is wrong.
/// It is a tokio timer, so under `tokio::time::pause` it passes as soon as the runtime idles.
pub const HOLD_DEADLINE: Duration = Duration::from_secs(60);

/// The parsed target of a hold.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    endpoint: Endpoint,
    /// Only token requests of this grant type; `None`: every request to the endpoint.
    grant: Option<&'static str>,
}

impl Target {
    fn parse(key: &str) -> Result<Target, String> {
        let (name, grant) = match key.split_once(':') {
            Some((name, grant)) => (name, Some(grant)),
            None => (key, None),
        };
        let endpoint =
            Endpoint::from_name(name).ok_or_else(|| format!("unknown endpoint {name:?}"))?;
        let grant = match grant {
            None => None,
            Some(grant) if endpoint != Endpoint::OauthToken => {
                return Err(format!(
                    "only oauth.token takes a grant type, not {name:?} (:{grant})"
                ));
            }
            Some("authorization_code") => Some("authorization_code"),
            Some("refresh_token") => Some("refresh_token"),
            Some(other) => {
                return Err(format!(
                    "unknown grant type {other:?}: authorization_code or refresh_token"
                ));
            }
        };
        Ok(Target { endpoint, grant })
    }

    fn matches(&self, endpoint: Endpoint, grant: Option<&str>) -> bool {
        self.endpoint == endpoint && self.grant.is_none_or(|g| grant == Some(g))
    }
}

/// One hold's state, shared by the registry and the test's [`Hold`] handle.
pub(crate) struct HoldState {
    pub id: u64,
    key: String,
    target: Target,
    inner: Mutex<Waiting>,
    /// How many requests have reached this hold; a watch so that waiting for a number is one
    /// `wait_for`, with no wake-up missed between a check and a wait.
    arrived: watch::Sender<u64>,
}

struct Waiting {
    /// Once lifted, a hold catches nothing more; the registry drops it at its next look.
    lifted: bool,
    /// Held requests, oldest first. A sender whose request gave up (deadline, or the client went
    /// away) is closed and no longer counts.
    held: VecDeque<oneshot::Sender<()>>,
}

impl HoldState {
    fn waiting(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.inner.lock().expect("hold lock")
    }

    pub fn held(&self) -> usize {
        self.waiting()
            .held
            .iter()
            .filter(|s| !s.is_closed())
            .count()
    }

    pub fn arrivals(&self) -> u64 {
        *self.arrived.borrow()
    }

    /// Lets the `n` oldest held requests answer; returns how many did.
    pub fn release(&self, n: usize) -> usize {
        let mut waiting = self.waiting();
        let mut released = 0;
        while released < n {
            let Some(sender) = waiting.held.pop_front() else {
                break;
            };
            if sender.send(()).is_ok() {
                released += 1;
            }
        }
        released
    }

    /// Releases everything held and catches nothing more.
    pub fn lift(&self) {
        let mut waiting = self.waiting();
        waiting.lifted = true;
        for sender in waiting.held.drain(..) {
            let _ = sender.send(());
        }
    }

    fn is_lifted(&self) -> bool {
        self.waiting().lifted
    }

    /// Waits until `n` requests have arrived, or fails after `limit`.
    pub async fn wait_for_arrivals(&self, n: u64, limit: Duration) -> Result<(), u64> {
        let mut arrived = self.arrived.subscribe();
        let reached = tokio::time::timeout(limit, async {
            // The sender lives as long as `self`, so the watch cannot close under us.
            arrived.wait_for(|count| *count >= n).await.is_ok()
        })
        .await;
        match reached {
            Ok(true) => Ok(()),
            Ok(false) | Err(_) => Err(self.arrivals()),
        }
    }

    pub fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "endpoint": self.key,
            "held": self.held(),
            "arrived": self.arrivals(),
        })
    }
}

/// Every hold in force, in the order they were made.
#[derive(Default)]
pub(crate) struct Holds {
    /// Lets the common case (no holds) skip the lock.
    any: AtomicBool,
    next_id: AtomicU64,
    list: Mutex<Vec<Arc<HoldState>>>,
}

impl Holds {
    /// Starts holding requests that match `key` (`users.me`, `oauth.token:refresh_token`).
    pub fn add(&self, key: &str) -> Result<Arc<HoldState>, String> {
        let target = Target::parse(key)?;
        let state = Arc::new(HoldState {
            id: self.next_id.fetch_add(1, Ordering::Relaxed) + 1,
            key: key.to_owned(),
            target,
            inner: Mutex::new(Waiting {
                lifted: false,
                held: VecDeque::new(),
            }),
            arrived: watch::Sender::new(0),
        });
        let mut list = self.list.lock().expect("holds lock");
        list.push(state.clone());
        self.any.store(true, Ordering::Release);
        Ok(state)
    }

    /// The holds in force (lifted ones are forgotten here).
    pub fn list(&self) -> Vec<Arc<HoldState>> {
        let mut list = self.list.lock().expect("holds lock");
        list.retain(|h| !h.is_lifted());
        self.any.store(!list.is_empty(), Ordering::Release);
        list.clone()
    }

    pub fn get(&self, id: u64) -> Option<Arc<HoldState>> {
        self.list().into_iter().find(|h| h.id == id)
    }

    /// Lifts every hold, releasing what they hold.
    pub fn lift_all(&self) {
        let mut list = self.list.lock().expect("holds lock");
        for hold in list.drain(..) {
            hold.lift();
        }
        self.any.store(false, Ordering::Release);
    }

    /// If the first hold in force that matches catches this request, the receiver to wait on:
    /// it completes on release, or fails when the hold's handle is gone.
    pub fn catch(&self, endpoint: Endpoint, grant: Option<&str>) -> Option<oneshot::Receiver<()>> {
        if !self.any.load(Ordering::Acquire) {
            return None;
        }
        let list = self.list.lock().expect("holds lock");
        for hold in list.iter().filter(|h| h.target.matches(endpoint, grant)) {
            // The state's lock orders this against `lift`: a request is either caught before
            // the lift (and released by it) or sees the hold lifted and looks further.
            let mut waiting = hold.waiting();
            if waiting.lifted {
                continue;
            }
            waiting.held.retain(|s| !s.is_closed());
            let (release, released) = oneshot::channel();
            waiting.held.push_back(release);
            hold.arrived.send_modify(|count| *count += 1);
            return Some(released);
        }
        None
    }
}

/// A hold made from Rust with [`crate::SimServer::hold`]: matching requests are processed and
/// then wait for [`Hold::release`] before answering.
///
/// Dropping it (or [`Hold::release_all`]) lifts the hold: everything held answers and later
/// requests pass. A request still held after [`HOLD_DEADLINE`] answers anyway.
#[must_use = "dropping a Hold lifts it at once"]
pub struct Hold {
    state: Arc<HoldState>,
}

impl Hold {
    pub(crate) fn new(state: Arc<HoldState>) -> Hold {
        Hold { state }
    }

    /// The hold's id in `GET /_sim/holds`.
    pub fn id(&self) -> u64 {
        self.state.id
    }

    /// How many requests are waiting now.
    pub fn held(&self) -> usize {
        self.state.held()
    }

    /// How many requests have reached the hold since it was made, released or not.
    pub fn arrivals(&self) -> u64 {
        self.state.arrivals()
    }

    /// Waits until `n` requests in all have reached the hold since it was made (those still
    /// held and those already released), so a test knows a request was processed at the
    /// simulator without guessing how long that takes.
    ///
    /// # Panics
    ///
    /// When fewer than `n` arrive within [`HOLD_DEADLINE`]: the test is waiting for a request
    /// that its code under test never made.
    pub async fn arrived(&self, n: u64) {
        if let Err(count) = self.state.wait_for_arrivals(n, HOLD_DEADLINE).await {
            panic!(
                "only {count} of {n} requests reached the hold on {} within {HOLD_DEADLINE:?}",
                self.state.key
            );
        }
    }

    /// Lets the `n` oldest held requests answer; the hold stays, so later requests are held
    /// too. Returns how many were released.
    pub fn release(&self, n: usize) -> usize {
        self.state.release(n)
    }

    /// Lets every held request answer and lifts the hold: later requests pass.
    pub fn release_all(self) {
        // Dropping `self` lifts the hold; this method exists so that a test says what it means.
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.state.lift();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_name_an_endpoint_or_a_grant_of_the_token_endpoint() {
        let refresh = Target::parse("oauth.token:refresh_token").unwrap();
        assert!(refresh.matches(Endpoint::OauthToken, Some("refresh_token")));
        assert!(!refresh.matches(Endpoint::OauthToken, Some("authorization_code")));
        assert!(!refresh.matches(Endpoint::OauthToken, None));
        let token = Target::parse("oauth.token").unwrap();
        assert!(token.matches(Endpoint::OauthToken, Some("authorization_code")));
        assert!(token.matches(Endpoint::OauthToken, None));
        assert!(!token.matches(Endpoint::UsersMe, None));
        assert!(Target::parse("users.you").is_err());
        assert!(Target::parse("users.me:refresh_token").is_err());
        assert!(Target::parse("oauth.token:password").is_err());
    }

    #[tokio::test]
    async fn a_lift_releases_what_is_held_and_catches_nothing_more() {
        let holds = Holds::default();
        let hold = Hold::new(holds.add("users.me").unwrap());
        let first = holds.catch(Endpoint::UsersMe, None).expect("caught");
        let second = holds.catch(Endpoint::UsersMe, None).expect("caught");
        assert!(holds.catch(Endpoint::Search, None).is_none());
        hold.arrived(2).await;
        assert_eq!(hold.held(), 2);
        assert_eq!(hold.release(1), 1);
        first.await.expect("the oldest is released first");
        assert_eq!((hold.held(), hold.arrivals()), (1, 2));
        hold.release_all();
        second.await.expect("released by the lift");
        assert!(holds.catch(Endpoint::UsersMe, None).is_none());
        assert!(holds.list().is_empty());
    }
}
