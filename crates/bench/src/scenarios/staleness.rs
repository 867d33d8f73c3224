//! Scenario `staleness` (issue 14): how long another process's token cache may still serve a
//! grant after a refresh superseded it, under a refresh storm.
//!
//! Two `serve` processes share one database. Refreshers call process B, each taking the next
//! connection (each connection is refreshed once: a second refresh of a fresh grant would be
//! judged, not made); before each refresh the refresher reads the token on process A, so A's
//! cache holds the grant about to be superseded, and after B answers it reads A again and again
//! until A answers the new grant. The time from B's answer (the commit is before it) to A's
//! first answer with the new grant is the staleness window, an upper bound of it by one read.
//! Background readers keep A busy with random token reads meanwhile.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use http::{Method, StatusCode};
use rand::{Rng, SeedableRng};
use serde_json::json;

use super::{Ctx, Stack};
use crate::client::{request, Conn};
use crate::db::Backend;
use crate::flows;
use crate::load::{new_histogram, round};
use crate::report::{BackendResult, Figure};

pub const CONNECTIONS: usize = 3_000;
const REFRESHERS: usize = 16;
const READERS: usize = 16;
/// A change that has not reached A after this long counts as never reaching it.
const GIVE_UP: Duration = Duration::from_secs(10);

pub async fn run(ctx: &Ctx, backend: Backend) -> anyhow::Result<BackendResult> {
    let n = ctx.connections.unwrap_or(CONNECTIONS);
    let stack = Stack::new(ctx, backend, "staleness", &[]).await?;
    // Every connection is refreshed once; the cap on refreshes per connection is not in play.
    let a = stack
        .broker(&format!("staleness-{}-a", backend.name()))
        .await?;
    let b = stack
        .broker(&format!("staleness-{}-b", backend.name()))
        .await?;
    let key = stack.spec.api_key.clone();
    eprintln!("  connecting {n} users through the connect flow");
    flows::connect_many(&a.url, stack.sim.addr, &key, n, ctx.concurrency).await?;
    let connections = Arc::new(flows::list_connections(a.addr, &key).await?);
    let next = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (a_addr, b_addr) = (a.addr, b.addr);

    let mut readers = Vec::new();
    for i in 0..READERS {
        let (connections, stop, key) = (connections.clone(), stop.clone(), key.clone());
        let mut conn = Conn::open(a_addr).await?;
        readers.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(i as u64);
            let mut reads = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let (id, _) = &connections[rng.gen_range(0..connections.len())];
                let path = format!("/v1/connections/{id}/access-token");
                conn.send(request(Method::GET, a_addr, &path).bearer(&key).empty())
                    .await?;
                reads += 1;
            }
            anyhow::Ok(reads)
        }));
    }

    eprintln!(
        "  refreshing through B, {REFRESHERS} at a time, for {} s, while A serves token reads",
        ctx.duration.as_secs_f64()
    );
    let deadline = Instant::now() + ctx.duration;
    let mut refreshers = Vec::new();
    for _ in 0..REFRESHERS {
        let (connections, next, key) = (connections.clone(), next.clone(), key.clone());
        let mut on_a = Conn::open(a_addr).await?;
        let mut on_b = Conn::open(b_addr).await?;
        refreshers.push(tokio::spawn(async move {
            let mut windows = new_histogram();
            let mut errors = 0u64;
            let mut never = 0u64;
            let mut first_error = None;
            while Instant::now() < deadline {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((id, grant)) = connections.get(i) else {
                    break;
                };
                let token_path = format!("/v1/connections/{id}/access-token");
                // A caches the grant about to be superseded.
                let before = get(&mut on_a, a_addr, &token_path, &key)
                    .await?
                    .expect(StatusCode::OK)?
                    .json()?;
                if before["grant_id"].as_str() != Some(grant.as_str()) {
                    errors += 1;
                    continue;
                }
                let reply = on_b
                    .send(
                        request(
                            Method::POST,
                            b_addr,
                            &format!("/v1/connections/{id}/refresh"),
                        )
                        .bearer(&key)
                        .json(&json!({ "if_grant": grant })),
                    )
                    .await?;
                let answered = Instant::now();
                if reply.status != StatusCode::OK {
                    errors += 1;
                    first_error.get_or_insert(format!("{} {}", reply.status, reply.text()));
                    continue;
                }
                let new_grant = reply.json()?["grant_id"]
                    .as_str()
                    .context("a refresh without grant_id")?
                    .to_owned();
                loop {
                    let now = get(&mut on_a, a_addr, &token_path, &key).await?.json()?;
                    if now["grant_id"].as_str() == Some(new_grant.as_str()) {
                        windows.saturating_record(answered.elapsed().as_micros() as u64);
                        break;
                    }
                    if answered.elapsed() > GIVE_UP {
                        never += 1;
                        break;
                    }
                }
            }
            anyhow::Ok((windows, errors, never, first_error))
        }));
    }
    let mut windows = new_histogram();
    let (mut errors, mut never, mut first_error) = (0u64, 0u64, None);
    for r in refreshers {
        let (w, e, n, f) = r.await??;
        windows.add(&w).expect("same bounds");
        errors += e;
        never += n;
        if first_error.is_none() {
            first_error = f;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut reads = 0u64;
    for r in readers {
        reads += r.await??;
    }
    let elapsed = ctx.duration.as_secs_f64();
    let refreshes = windows.len();
    let ms = |q: f64| windows.value_at_quantile(q) as f64 / 1000.0;
    eprintln!(
        "  {refreshes} refreshes through B ({:.0}/s), {reads} token reads on A; staleness p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; {errors} errors, {never} never seen",
        refreshes as f64 / elapsed,
        ms(0.5),
        ms(0.99),
        windows.max() as f64 / 1000.0
    );
    if let Some(e) = &first_error {
        eprintln!("    first error: {e}");
    }
    a.stop().await?;
    b.stop().await?;
    stack.finish().await?;
    Ok(BackendResult {
        backend: backend.name().to_owned(),
        figures: vec![
            Figure::new("refreshes through process B", refreshes as f64, ""),
            Figure::new(
                "refreshes/s",
                round(refreshes as f64 / elapsed, 0),
                "refreshes/s",
            ),
            Figure::new(
                "token reads/s on process A meanwhile",
                round(reads as f64 / elapsed, 0),
                "req/s",
            ),
            Figure::new("staleness p50 (B's answer to A's new grant)", ms(0.5), "ms"),
            Figure::new("staleness p99", ms(0.99), "ms"),
            Figure::new("staleness max", windows.max() as f64 / 1000.0, "ms"),
            Figure::new("changes A never saw (within 10 s)", never as f64, "")
                .target("0", never == 0),
            Figure::new("errors", errors as f64, "").target("0", errors == 0),
        ],
        details: json!({
            "connections": n,
            "refreshers": REFRESHERS,
            "readers": READERS,
            "staleness_ms": {
                "p50": ms(0.5), "p90": ms(0.9), "p99": ms(0.99), "max": windows.max() as f64 / 1000.0,
                "mean": round(windows.mean() / 1000.0, 3),
            },
            "first_error": first_error,
        }),
    })
}

async fn get(
    conn: &mut Conn,
    addr: std::net::SocketAddr,
    path: &str,
    key: &str,
) -> anyhow::Result<crate::client::Reply> {
    conn.send(request(Method::GET, addr, path).bearer(key).empty())
        .await
}
