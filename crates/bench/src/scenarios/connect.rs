//! Scenario 6 (`connect`): complete authorizations per second. Each worker runs the whole flow
//! in a closed loop (POST connect-session → GET link → the simulator's authorize, auto-approved
//! with a fresh identity so each is a new bot → GET callback, where tokenkeeper exchanges the
//! code and records the grant).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde_json::json;

use super::{Ctx, Stack};
use crate::db::Backend;
use crate::flows::{self, Flow};
use crate::load::{round, Stats};
use crate::report::{BackendResult, Figure};

pub async fn run(ctx: &Ctx, backend: Backend) -> anyhow::Result<BackendResult> {
    let stack = Stack::new(ctx, backend, "connect", &[]).await?;
    let broker = stack.broker(&format!("connect-{}", backend.name())).await?;
    let key = stack.spec.api_key.clone();
    let cap = ctx.connections.unwrap_or(1_000_000) as u64;
    let sim_before = stack.sim.token_requests("authorization_code").await?;
    // Warm up on a few flows, so the first measured ones do not pay for cold caches.
    flows::connect_many(&broker.url, stack.sim.addr, &key, 64, ctx.concurrency).await?;
    let sim_warm = stack.sim.token_requests("authorization_code").await? - sim_before;

    eprintln!(
        "  measuring: {} concurrent connect flows for {} s",
        ctx.concurrency,
        ctx.duration.as_secs_f64()
    );
    let started = Arc::new(AtomicU64::new(0));
    let mut flows_open = Vec::new();
    for _ in 0..ctx.concurrency {
        flows_open.push(Flow::open(&broker.url, stack.sim.addr, &key).await?);
    }
    let start = Instant::now();
    let deadline = start + ctx.duration;
    let mut workers = Vec::new();
    for (w, mut flow) in flows_open.into_iter().enumerate() {
        let started = started.clone();
        workers.push(tokio::spawn(async move {
            let mut stats = Stats::empty();
            let mut i = 0;
            while Instant::now() < deadline && started.fetch_add(1, Ordering::Relaxed) < cap {
                i += 1;
                let t = Instant::now();
                match flow.connect(&format!("connect-{w}-{i}")).await {
                    Ok(_) => {
                        stats.ok += 1;
                        stats.hist.saturating_record(t.elapsed().as_micros() as u64);
                    }
                    Err(e) => {
                        stats.errors += 1;
                        stats.first_error.get_or_insert(format!("{e:#}"));
                    }
                }
            }
            stats
        }));
    }
    let mut stats = Stats::empty();
    for w in workers {
        stats.merge(&w.await?);
    }
    stats.elapsed = start.elapsed();
    eprintln!("  {}", stats.summary());
    let exchanged = stack.sim.token_requests("authorization_code").await? - sim_before - sim_warm;
    let listed = flows::list_connections(broker.addr, &key).await?.len() as u64;
    let memory = broker.proc.memory()?;
    broker.stop().await?;
    stack.finish().await?;
    Ok(BackendResult {
        backend: backend.name().to_owned(),
        figures: vec![
            Figure::new(
                "complete authorizations/s",
                round(stats.rps(), 0),
                "flows/s",
            ),
            Figure::new("flow p50 (4 requests)", stats.ms(0.5), "ms"),
            Figure::new("flow p99", stats.ms(0.99), "ms"),
            Figure::new("code exchanges seen by the simulator", exchanged as f64, "")
                .target("one per flow", exchanged == stats.ok),
            Figure::new("flow errors", stats.errors as f64, "").target("0", stats.errors == 0),
        ],
        details: json!({
            "flows": stats.to_json(),
            "connections_listed_after": listed,
            "memory_mb": memory,
        }),
    })
}
