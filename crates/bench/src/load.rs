//! The load generator: a closed loop of N workers, each with its own keep-alive connection,
//! each sending its next request as soon as the previous answer is read. Every latency goes
//! into an HDR histogram (microseconds, 3 significant digits); the workers' histograms are
//! merged at the end.
//!
//! A phase is bounded twice: by its duration and by a request cap, so a run never outlives
//! its budget whatever the server does.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use http::{Request, StatusCode};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde_json::json;

use crate::client::{Body, Conn};

/// Builds the next request; gets the worker's random generator (random connection per request).
pub type MakeRequest = Arc<dyn Fn(&mut StdRng) -> Request<Body> + Send + Sync>;

#[derive(Debug, Clone, Copy)]
pub struct Phase {
    pub concurrency: usize,
    pub duration: Duration,
    pub max_requests: u64,
}

/// What one or several phases against one target measured.
#[derive(Clone)]
pub struct Stats {
    pub hist: Histogram<u64>,
    /// Answers with the expected status.
    pub ok: u64,
    /// Other statuses and transport errors.
    pub errors: u64,
    /// Wall time of the measured phases, summed.
    pub elapsed: Duration,
    /// The first unexpected answer, to say what went wrong.
    pub first_error: Option<String>,
    /// CPU time (user + system) each watched process spent during the phases, ms.
    pub cpu_ms: BTreeMap<String, f64>,
}

pub fn new_histogram() -> Histogram<u64> {
    // 1 µs to 10 min, 3 significant digits.
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

impl Stats {
    pub fn empty() -> Stats {
        Stats {
            hist: new_histogram(),
            ok: 0,
            errors: 0,
            elapsed: Duration::ZERO,
            first_error: None,
            cpu_ms: BTreeMap::new(),
        }
    }

    pub fn merge(&mut self, other: &Stats) {
        self.hist
            .add(&other.hist)
            .expect("histograms with the same bounds");
        self.ok += other.ok;
        self.errors += other.errors;
        self.elapsed += other.elapsed;
        if self.first_error.is_none() {
            self.first_error.clone_from(&other.first_error);
        }
        for (name, ms) in &other.cpu_ms {
            *self.cpu_ms.entry(name.clone()).or_default() += ms;
        }
    }

    /// Successful requests per second.
    pub fn rps(&self) -> f64 {
        if self.elapsed.is_zero() {
            return 0.0;
        }
        self.ok as f64 / self.elapsed.as_secs_f64()
    }

    /// A quantile in milliseconds.
    pub fn ms(&self, quantile: f64) -> f64 {
        self.hist.value_at_quantile(quantile) as f64 / 1000.0
    }

    /// CPU time the named process(es) spent per successful request, µs.
    pub fn cpu_us(&self, name: &str) -> f64 {
        round(
            self.cpu_ms.get(name).copied().unwrap_or(0.0) * 1000.0 / self.ok.max(1) as f64,
            1,
        )
    }

    pub fn max_ms(&self) -> f64 {
        self.hist.max() as f64 / 1000.0
    }

    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "requests_ok": self.ok,
            "errors": self.errors,
            "first_error": self.first_error,
            "seconds": round(self.elapsed.as_secs_f64(), 3),
            "requests_per_second": round(self.rps(), 1),
            "cpu_ms": self.cpu_ms,
            "cpu_us_per_request": self
                .cpu_ms
                .iter()
                .map(|(name, ms)| (name.clone(), round(ms * 1000.0 / self.ok.max(1) as f64, 1)))
                .collect::<BTreeMap<_, _>>(),
            "latency_ms": {
                "mean": round(self.hist.mean() / 1000.0, 3),
                "p50": self.ms(0.50),
                "p90": self.ms(0.90),
                "p99": self.ms(0.99),
                "p99_9": self.ms(0.999),
                "max": self.max_ms(),
            },
        })
    }

    /// One line for the progress log.
    pub fn summary(&self) -> String {
        format!(
            "{:.0} req/s, p50 {:.3} ms, p99 {:.3} ms, max {:.1} ms, {} ok, {} errors",
            self.rps(),
            self.ms(0.5),
            self.ms(0.99),
            self.max_ms(),
            self.ok,
            self.errors
        )
    }
}

pub fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

/// Runs one closed-loop phase against `addr`; answers other than `expect` count as errors.
pub async fn closed_loop(
    label: &str,
    addr: SocketAddr,
    phase: Phase,
    expect: StatusCode,
    make: MakeRequest,
    watch: &[(&str, u32)],
) -> anyhow::Result<Stats> {
    // Connect every worker first, so the measured phase has no handshakes in it.
    let mut conns = Vec::with_capacity(phase.concurrency);
    for _ in 0..phase.concurrency {
        conns.push(Conn::open(addr).await?);
    }
    let sent = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let cpu_before = cpu_times(watch);
    let start = Instant::now();
    let deadline = start + phase.duration;
    let ticker = {
        let done = done.clone();
        let label = label.to_owned();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(2));
            tick.tick().await;
            loop {
                tick.tick().await;
                let n = done.load(Ordering::Relaxed);
                eprintln!(
                    "    {label}: {n} requests after {:.0} s",
                    start.elapsed().as_secs_f64()
                );
            }
        })
    };
    let mut workers = Vec::with_capacity(phase.concurrency);
    for (i, mut conn) in conns.into_iter().enumerate() {
        let make = make.clone();
        let sent = sent.clone();
        let done = done.clone();
        workers.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(0x5eed ^ i as u64);
            let mut stats = Stats::empty();
            while Instant::now() < deadline
                && sent.fetch_add(1, Ordering::Relaxed) < phase.max_requests
            {
                let req = make(&mut rng);
                let t = Instant::now();
                let result = conn.send(req).await;
                let micros = t.elapsed().as_micros() as u64;
                done.fetch_add(1, Ordering::Relaxed);
                match result {
                    Ok(reply) if reply.status == expect => {
                        stats.ok += 1;
                        stats.hist.saturating_record(micros.max(1));
                    }
                    Ok(reply) => {
                        stats.errors += 1;
                        if stats.first_error.is_none() {
                            stats.first_error = Some(format!("{} {}", reply.status, reply.text()));
                        }
                    }
                    Err(e) => {
                        stats.errors += 1;
                        if stats.first_error.is_none() {
                            stats.first_error = Some(format!("{e:#}"));
                        }
                        // Do not spin on a dead server.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            stats
        }));
    }
    let mut total = Stats::empty();
    for worker in workers {
        total.merge(&worker.await?);
    }
    total.elapsed = start.elapsed();
    for ((name, before), (_, after)) in cpu_before.iter().zip(cpu_times(watch)) {
        *total.cpu_ms.entry(name.clone()).or_default() += after - before;
    }
    ticker.abort();
    Ok(total)
}

/// Runs `a` and `b` alternately, `slices` times each, `duration / slices` per slice, so that
/// both see the same machine noise; returns their merged stats.
pub async fn side_by_side(
    (label_a, addr_a, make_a, expect_a): (&str, SocketAddr, MakeRequest, StatusCode),
    (label_b, addr_b, make_b, expect_b): (&str, SocketAddr, MakeRequest, StatusCode),
    phase: Phase,
    slices: u32,
    watch: &[(&str, u32)],
) -> anyhow::Result<(Stats, Stats)> {
    let slice = Phase {
        duration: phase.duration / slices,
        max_requests: phase.max_requests / u64::from(slices),
        ..phase
    };
    let mut a = Stats::empty();
    let mut b = Stats::empty();
    for i in 1..=slices {
        let s = closed_loop(label_a, addr_a, slice, expect_a, make_a.clone(), watch).await?;
        eprintln!("  {label_a} [{i}/{slices}]: {}", s.summary());
        a.merge(&s);
        let s = closed_loop(label_b, addr_b, slice, expect_b, make_b.clone(), watch).await?;
        eprintln!("  {label_b} [{i}/{slices}]: {}", s.summary());
        b.merge(&s);
    }
    Ok((a, b))
}

/// CPU time (user + system, all threads) of each process so far, ms; the bench itself is
/// always included as `bench`. A process that is gone reads as 0.
fn cpu_times(watch: &[(&str, u32)]) -> Vec<(String, f64)> {
    let own = ("bench", std::process::id());
    std::iter::once(&own)
        .chain(watch.iter())
        .map(|(name, pid)| {
            (
                (*name).to_owned(),
                crate::procs::cpu_ms(*pid).unwrap_or(0.0),
            )
        })
        .collect()
}
