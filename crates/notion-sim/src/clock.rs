//! The simulator's time: the system clock, or a manual clock that stands still until a test
//! moves it.
//!
//! Every time-dependent decision (token and code expiry, the refresh-reuse grace window, rate-limit
//! windows, `iat`, page and request-log timestamps) reads the server's [`SimClock`], so a test
//! that owns a manual clock decides when a token dies instead of sleeping past its lifetime.
//! Latency settings and `delay` faults are not on this clock: they model a slow network, which
//! only real time can show a client (see [`crate::Hold`] for an answer that waits to be told).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use chrono::{DateTime, Utc};

/// The simulator's source of time; clones share one clock.
///
/// `Default` is the system clock, which is what `tokenkeeper notion-sim` uses.
#[derive(Clone, Debug, Default)]
pub struct SimClock {
    /// `None` is the system clock.
    manual: Option<Arc<Manual>>,
}

/// A manual clock reads as the moment it was made plus everything it was advanced by.
/// Both readings (monotonic and wall) move together, so a duration measured on one agrees with
/// the timestamps shown from the other.
#[derive(Debug)]
struct Manual {
    origin: Instant,
    wall_origin: SystemTime,
    /// Nanoseconds advanced since `origin`; 64 bits last five centuries.
    advanced_ns: AtomicU64,
}

impl SimClock {
    /// The system clock: time passes by itself.
    pub fn system() -> SimClock {
        SimClock::default()
    }

    /// A manual clock that starts at the current time and stands still until
    /// [`SimClock::advance`] moves it.
    pub fn manual() -> SimClock {
        SimClock {
            manual: Some(Arc::new(Manual {
                origin: Instant::now(),
                wall_origin: SystemTime::now(),
                advanced_ns: AtomicU64::new(0),
            })),
        }
    }

    pub fn is_manual(&self) -> bool {
        self.manual.is_some()
    }

    /// Moves a manual clock forward by `by`, for every clone of it.
    ///
    /// # Panics
    ///
    /// On the system clock: a test that advances time it does not control would otherwise pass
    /// or fail by the speed of the machine, which is what the manual clock exists to prevent.
    pub fn advance(&self, by: Duration) {
        let Some(manual) = &self.manual else {
            panic!(
                "SimClock::advance on the system clock: start the simulator with \
                 SimServer::start_with_clock(config, SimClock::manual())"
            );
        };
        let ns = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        manual.advanced_ns.fetch_add(ns, Ordering::SeqCst);
    }

    /// How far a manual clock has been advanced; zero for the system clock.
    pub fn advanced(&self) -> Duration {
        self.manual
            .as_ref()
            .map(|m| Duration::from_nanos(m.advanced_ns.load(Ordering::SeqCst)))
            .unwrap_or_default()
    }

    /// The current time as the simulator sees it.
    pub fn now(&self) -> SystemTime {
        match &self.manual {
            None => SystemTime::now(),
            Some(manual) => manual.wall_origin + self.advanced(),
        }
    }

    /// The monotonic reading that durations (lifetimes, windows) are measured on.
    pub(crate) fn instant(&self) -> Instant {
        match &self.manual {
            None => Instant::now(),
            Some(manual) => manual.origin + self.advanced(),
        }
    }

    /// [`SimClock::now`] as a UTC date, for the timestamps the simulator shows.
    pub(crate) fn utc(&self) -> DateTime<Utc> {
        DateTime::<Utc>::from(self.now())
    }

    /// One reading of both faces of the clock, taken once per request so that everything the
    /// request decides and stamps agrees on when it happened.
    pub(crate) fn moment(&self) -> Moment {
        Moment {
            instant: self.instant(),
            utc: self.utc(),
        }
    }
}

/// A point in the simulator's time: `instant` for measuring lifetimes and windows, `utc` for
/// what is shown (`iat`, `created_time`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Moment {
    pub instant: Instant,
    pub utc: DateTime<Utc>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_stands_still_until_advanced_and_clones_share_it() {
        let clock = SimClock::manual();
        let (start, wall) = (clock.instant(), clock.now());
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(clock.instant(), start, "no time passes by itself");
        let clone = clock.clone();
        clone.advance(Duration::from_millis(1500));
        assert_eq!(clock.instant() - start, Duration::from_millis(1500));
        assert_eq!(
            clock.now().duration_since(wall).unwrap(),
            Duration::from_millis(1500)
        );
        assert_eq!(clock.advanced(), Duration::from_millis(1500));
    }

    #[test]
    #[should_panic(expected = "system clock")]
    fn advancing_the_system_clock_is_a_mistake_said_out_loud() {
        SimClock::system().advance(Duration::from_secs(1));
    }
}
