//! Scenario `throttle` (issue 14 §4): Notion-side 429s per 1,000 proxied calls, with the shared
//! throttle and without it (`TOKENKEEPER_PROXY_SHARED_THROTTLE=false`), at equal offered load.
//!
//! The simulator limits each connection to `LIMIT` calls per one-second window (Notion's own is
//! 180 a minute; a short window makes the effect show within a benchmark's seconds). Two `serve`
//! processes share the database; an open-loop generator offers `RATE` `users.me` calls a
//! second, spread over the connections and alternating between the processes, whatever the
//! answers (so both runs are offered exactly the same calls). Each call carries the default
//! retry budget. The simulator counts the 429s it answered.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use serde_json::json;

use super::{Ctx, Stack};
use crate::client::{self, request, Conn};
use crate::db::Backend;
use crate::flows;
use crate::load::round;
use crate::procs::NOTION_VERSION;
use crate::report::{BackendResult, Figure};

pub const CONNECTIONS: usize = 10;
/// Calls a connection may make per one-second window at the simulator.
pub const LIMIT: u32 = 20;
/// Offered calls per second, over all connections: twice what the simulator lets through.
pub const RATE: u64 = 400;
/// Workers sending the calls; a call held for its `Retry-After` keeps one busy.
const WORKERS: usize = 600;

/// What one run measured.
struct Run {
    offered: u64,
    ok: u64,
    throttled_answers: u64,
    other: u64,
    dropped: u64,
    sim_429: u64,
    sim_calls: u64,
    seconds: f64,
}

pub async fn run(ctx: &Ctx, backend: Backend) -> anyhow::Result<BackendResult> {
    let limit = LIMIT.to_string();
    let stack = Stack::new(
        ctx,
        backend,
        "throttle",
        &[
            "--rate-limit-per-connection",
            &limit,
            "--rate-limit-window",
            "1s",
        ],
    )
    .await?;
    let key = stack.spec.api_key.clone();
    let mut results = Vec::new();
    let mut ids: Option<Vec<String>> = None;
    for shared in [true, false] {
        let flag = ("TOKENKEEPER_PROXY_SHARED_THROTTLE", shared.to_string());
        let a = stack
            .broker_with(
                &format!("throttle-{}-{shared}-a", backend.name()),
                std::slice::from_ref(&flag),
            )
            .await?;
        let b = stack
            .broker_with(&format!("throttle-{}-{shared}-b", backend.name()), &[flag])
            .await?;
        if ids.is_none() {
            let (made, _) =
                flows::connect_many(&a.url, stack.sim.addr, &key, CONNECTIONS, 4).await?;
            ids = Some(made);
        }
        let ids = ids.clone().expect("connected");
        // A fresh start at the simulator: its counters and rate-limit windows.
        client::once(
            stack.sim.addr,
            request(Method::POST, stack.sim.addr, "/_sim/reset").json(&json!({})),
        )
        .await?
        .expect(StatusCode::OK)?;
        eprintln!(
            "  shared throttle {}: {RATE} calls/s offered for {} s over {} connections and 2 processes",
            if shared { "on" } else { "off" },
            ctx.duration.as_secs_f64(),
            ids.len()
        );
        let run = open_loop(&[a.addr, b.addr], &ids, &key, ctx.duration).await?;
        let stats = stack.sim.stats().await?;
        let sim_429 = stats["rate_limited"]
            .as_object()
            .map(|m| m.values().filter_map(|v| v.as_u64()).sum())
            .unwrap_or(0);
        let sim_calls = stats["requests"]["users.me"].as_u64().unwrap_or(0);
        let run = Run {
            sim_429,
            sim_calls,
            ..run
        };
        eprintln!(
            "    {} offered, {} answered 200 ({:.0}/s), {} answered 429, {} other, {} not sent (no free worker); Notion saw {} calls and answered {} of them 429",
            run.offered, run.ok, run.ok as f64 / run.seconds, run.throttled_answers, run.other, run.dropped, run.sim_calls, run.sim_429
        );
        a.stop().await?;
        b.stop().await?;
        results.push(run);
    }
    stack.finish().await?;
    let per_1000 = |r: &Run| round(r.sim_429 as f64 * 1000.0 / r.offered.max(1) as f64, 1);
    let (on, off) = (&results[0], &results[1]);
    let ok_rate = |r: &Run| round(r.ok as f64 / r.seconds, 0);
    Ok(BackendResult {
        backend: backend.name().to_owned(),
        figures: vec![
            Figure::new("offered proxied calls/s (both runs)", RATE as f64, "req/s"),
            Figure::new(
                "Notion-side 429s per 1,000 calls, shared throttle",
                per_1000(on),
                "",
            ),
            Figure::new(
                "Notion-side 429s per 1,000 calls, without it",
                per_1000(off),
                "",
            ),
            Figure::new(
                "calls answered 200/s, shared throttle",
                ok_rate(on),
                "req/s",
            ),
            Figure::new("calls answered 200/s, without it", ok_rate(off), "req/s"),
            Figure::new("calls Notion saw, shared throttle", on.sim_calls as f64, ""),
            Figure::new("calls Notion saw, without it", off.sim_calls as f64, ""),
            Figure::new(
                "fewer Notion-side 429s with the shared throttle",
                round(1.0 - on.sim_429 as f64 / off.sim_429.max(1) as f64, 3),
                "",
            )
            .target("> 0", on.sim_429 < off.sim_429),
            Figure::new(
                "calls not sent (no free worker)",
                (on.dropped + off.dropped) as f64,
                "",
            ),
        ],
        details: json!({
            "connections": CONNECTIONS,
            "limit_per_connection_per_second": LIMIT,
            "offered_per_second": RATE,
            "runs": results.iter().zip(["shared", "unshared"]).map(|(r, name)| json!({
                "run": name,
                "offered": r.offered,
                "answered_200": r.ok,
                "answered_429": r.throttled_answers,
                "answered_other": r.other,
                "not_sent": r.dropped,
                "notion_calls": r.sim_calls,
                "notion_429": r.sim_429,
                "seconds": round(r.seconds, 2),
            })).collect::<Vec<_>>(),
        }),
    })
}

/// Offers `RATE` calls a second for `duration`, round-robin over the connections and the
/// processes, each sent by a free worker (a call with no free worker is counted, not sent).
async fn open_loop(
    addrs: &[std::net::SocketAddr],
    ids: &[String],
    key: &str,
    duration: Duration,
) -> anyhow::Result<Run> {
    let (tx, rx) = async_channel(WORKERS);
    let counts: Arc<[AtomicU64; 4]> = Arc::new(Default::default());
    let mut workers = Vec::new();
    for w in 0..WORKERS {
        let addr = addrs[w % addrs.len()];
        let mut conn = Conn::open(addr).await?;
        let (rx, counts, key) = (rx.clone(), counts.clone(), key.to_owned());
        workers.push(tokio::spawn(async move {
            while let Ok(path) = rx.recv().await {
                let req = request(Method::GET, addr, &path)
                    .bearer(&key)
                    .header("notion-version", NOTION_VERSION)
                    .empty();
                let i = match conn.send(req).await {
                    Ok(r) if r.status == StatusCode::OK => 0,
                    Ok(r) if r.status == StatusCode::TOO_MANY_REQUESTS => 1,
                    Ok(_) => 2,
                    Err(_) => {
                        conn = match Conn::open(addr).await {
                            Ok(c) => c,
                            Err(_) => return,
                        };
                        2
                    }
                };
                counts[i].fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // Each worker talks to one process; calls alternate between the workers' processes by
    // being handed to whichever worker is free, so the split is even over the run.
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / RATE as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut offered = 0u64;
    while start.elapsed() < duration {
        tick.tick().await;
        let id = &ids[offered as usize % ids.len()];
        offered += 1;
        if tx.try_send(format!("/v1/proxy/{id}/v1/users/me")).is_err() {
            counts[3].fetch_add(1, Ordering::Relaxed);
        }
    }
    drop(tx);
    for w in workers {
        w.await?;
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok(Run {
        offered,
        ok: counts[0].load(Ordering::Relaxed),
        throttled_answers: counts[1].load(Ordering::Relaxed),
        other: counts[2].load(Ordering::Relaxed),
        dropped: counts[3].load(Ordering::Relaxed),
        sim_429: 0,
        sim_calls: 0,
        seconds,
    })
}

/// A bounded multi-consumer queue: tokio's mpsc receiver shared behind a mutex.
fn async_channel(capacity: usize) -> (tokio::sync::mpsc::Sender<String>, Arc<SharedReceiver>) {
    let (tx, rx) = tokio::sync::mpsc::channel(capacity);
    (tx, Arc::new(SharedReceiver(tokio::sync::Mutex::new(rx))))
}

struct SharedReceiver(tokio::sync::Mutex<tokio::sync::mpsc::Receiver<String>>);

impl SharedReceiver {
    async fn recv(&self) -> Result<String, ()> {
        self.0.lock().await.recv().await.ok_or(())
    }
}
