//! Time as a value the tests control: leases, session expiry and timestamps all read it here.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use chrono::{DateTime, Duration, TimeZone, Utc};

#[derive(Clone, Debug)]
pub enum Clock {
    System,
    /// A manual clock, in milliseconds since the epoch, shared by everything that clones it.
    Manual(Arc<AtomicI64>),
}

impl Clock {
    pub fn manual(start: DateTime<Utc>) -> Self {
        Clock::Manual(Arc::new(AtomicI64::new(start.timestamp_millis())))
    }

    pub fn now(&self) -> DateTime<Utc> {
        match self {
            Clock::System => Utc::now(),
            Clock::Manual(ms) => Utc
                .timestamp_millis_opt(ms.load(Ordering::SeqCst))
                .single()
                .expect("manual clock holds a valid timestamp"),
        }
    }

    /// Moves a manual clock forward; a no-op on the system clock.
    pub fn advance(&self, by: Duration) {
        if let Clock::Manual(ms) = self {
            ms.fetch_add(by.num_milliseconds(), Ordering::SeqCst);
        }
    }
}

/// Parses a duration in humantime's forms (`500ms`, `30s`, `10m`, `1h`, `1h 30m`, …) or as a bare
/// number of seconds.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    // humantime insists on a unit; a bare number of seconds was accepted before humantime parsed
    // these settings, and configurations written then keep working.
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s
            .parse()
            .map(std::time::Duration::from_secs)
            .map_err(|_| format!("{s:?} is too large"));
    }
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration ({e}); use e.g. 500ms, 30s, 10m or 1h"))
}

/// A rate of calls: `count` per `per`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub count: u32,
    pub per: std::time::Duration,
}

impl Rate {
    /// The time between two calls.
    pub fn spacing(self) -> std::time::Duration {
        self.per / self.count.max(1)
    }

    pub fn per_second(self) -> f64 {
        f64::from(self.count) / self.per.as_secs_f64()
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.count, humantime::format_duration(self.per))
    }
}

/// Parses `<count>/<window>`: `2/s`, `120/1m`, `5/10s`.
pub fn parse_rate(s: &str) -> Result<Rate, String> {
    let bad = || format!("{s:?} is not a rate like 2/s or 120/1m (calls per window)");
    let (count, per) = s.split_once('/').ok_or_else(bad)?;
    let count: u32 = count.trim().parse().map_err(|_| bad())?;
    let per = per.trim();
    // `2/s` reads as 2 per 1 s; humantime wants the number.
    let per = if per.starts_with(|c: char| c.is_ascii_digit()) {
        parse_duration(per).map_err(|_| bad())?
    } else {
        parse_duration(&format!("1{per}")).map_err(|_| bad())?
    };
    if count == 0 || per.is_zero() {
        return Err(format!(
            "{s:?}: both the count and the window must be above zero"
        ));
    }
    Ok(Rate { count, per })
}
