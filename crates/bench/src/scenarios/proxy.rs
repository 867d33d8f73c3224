//! Scenario 5 (`proxy`): `users.me` through tokenkeeper's proxy versus straight at the
//! simulator with the same token, the same load, alternately in one run; the simulator's rate
//! limit is off.

use std::sync::Arc;

use http::{Method, StatusCode};
use rand::Rng;
use serde_json::json;

use super::{Ctx, Stack};
use crate::client::{request, Conn};
use crate::db::Backend;
use crate::flows;
use crate::load::{self, round, Phase};
use crate::procs::NOTION_VERSION;
use crate::report::{BackendResult, Figure};

/// Connections made through the connect flow; each request picks one at random.
pub const CONNECTIONS: usize = 100;

pub async fn run(ctx: &Ctx, backend: Backend) -> anyhow::Result<BackendResult> {
    let n = ctx.connections.unwrap_or(CONNECTIONS);
    let stack = Stack::new(ctx, backend, "proxy", &[]).await?;
    let broker = stack.broker(&format!("proxy-{}", backend.name())).await?;
    let key = stack.spec.api_key.clone();
    let (ids, _) =
        flows::connect_many(&broker.url, stack.sim.addr, &key, n, ctx.concurrency).await?;
    let mut conn = Conn::open(broker.addr).await?;
    let mut pairs = Vec::with_capacity(ids.len());
    for id in ids {
        let token = flows::access_token(&mut conn, broker.addr, &key, &id).await?;
        pairs.push((format!("/v1/proxy/{id}/v1/users/me"), token));
    }
    let pairs = Arc::new(pairs);
    let tk = broker.addr;
    let sim = stack.sim.addr;
    let via_proxy: load::MakeRequest = {
        let pairs = pairs.clone();
        let key = key.clone();
        Arc::new(move |rng| {
            let (path, _) = &pairs[rng.gen_range(0..pairs.len())];
            request(Method::GET, tk, path)
                .bearer(&key)
                .header("notion-version", NOTION_VERSION)
                .empty()
        })
    };
    let direct: load::MakeRequest = {
        let pairs = pairs.clone();
        Arc::new(move |rng| {
            let (_, token) = &pairs[rng.gen_range(0..pairs.len())];
            request(Method::GET, sim, "/v1/users/me")
                .bearer(token)
                .header("notion-version", NOTION_VERSION)
                .empty()
        })
    };
    let phase = Phase {
        concurrency: ctx.concurrency,
        duration: ctx.duration,
        max_requests: 20_000_000,
    };
    let warm = Phase {
        duration: std::time::Duration::from_secs(2),
        ..phase
    };
    load::closed_loop("warm-up", tk, warm, StatusCode::OK, via_proxy.clone(), &[]).await?;
    let probe = stack.db.probe().await?;
    let backends = probe.backend_pids().await?;
    drop(probe);
    let mut watch = vec![
        ("tokenkeeper", broker.proc.pid),
        ("notion-sim", stack.sim.proc.pid),
    ];
    watch.extend(backends.iter().map(|pid| ("postgres", *pid)));
    eprintln!(
        "  measuring: users.me through the proxy and straight at the simulator, alternately, {} s each",
        ctx.duration.as_secs_f64()
    );
    let (proxied, straight) = load::side_by_side(
        ("proxy users.me", tk, via_proxy.clone(), StatusCode::OK),
        ("direct users.me", sim, direct.clone(), StatusCode::OK),
        phase,
        2,
        &watch,
    )
    .await?;
    // The same with one client: latency without queueing, i.e. what the proxy adds to a call.
    eprintln!(
        "  and with one client, {} s each",
        ctx.duration.as_secs_f64() / 2.0
    );
    let single = Phase {
        concurrency: 1,
        duration: ctx.duration / 2,
        ..phase
    };
    let (proxied1, straight1) = load::side_by_side(
        ("proxy users.me, 1 client", tk, via_proxy, StatusCode::OK),
        ("direct users.me, 1 client", sim, direct, StatusCode::OK),
        single,
        2,
        &watch,
    )
    .await?;
    let memory = broker.proc.memory()?;
    broker.stop().await?;
    stack.finish().await?;

    let added_p50 = proxied.ms(0.5) - straight.ms(0.5);
    let added_p50_1 = proxied1.ms(0.5) - straight1.ms(0.5);
    let ratio = proxied.rps() / straight.rps();
    let errors = proxied.errors + straight.errors + proxied1.errors + straight1.errors;
    let c = ctx.concurrency;
    Ok(BackendResult {
        backend: backend.name().to_owned(),
        figures: vec![
            Figure::new(
                &format!("through the proxy, {c} clients"),
                round(proxied.rps(), 0),
                "req/s",
            ),
            Figure::new(
                &format!("straight at the simulator, {c} clients"),
                round(straight.rps(), 0),
                "req/s",
            ),
            Figure::new("proxy / direct throughput", round(ratio, 3), "")
                .target(">= 0.6", ratio >= 0.6),
            Figure::new(&format!("proxy p50, {c} clients"), proxied.ms(0.5), "ms"),
            Figure::new(&format!("direct p50, {c} clients"), straight.ms(0.5), "ms"),
            Figure::new(
                &format!("added p50, {c} clients"),
                round(added_p50, 3),
                "ms",
            )
            .target("< 0.3 ms", added_p50 < 0.3),
            Figure::new(&format!("proxy p99, {c} clients"), proxied.ms(0.99), "ms"),
            Figure::new(&format!("direct p99, {c} clients"), straight.ms(0.99), "ms"),
            Figure::new(
                "tokenkeeper CPU per proxied call",
                proxied.cpu_us("tokenkeeper"),
                "µs",
            ),
            Figure::new(
                "notion-sim CPU per call, proxied",
                proxied.cpu_us("notion-sim"),
                "µs",
            ),
            Figure::new(
                "notion-sim CPU per call, direct",
                straight.cpu_us("notion-sim"),
                "µs",
            ),
            Figure::new(
                "load generator CPU per call, direct",
                straight.cpu_us("bench"),
                "µs",
            ),
            Figure::new("proxy p50, 1 client", proxied1.ms(0.5), "ms"),
            Figure::new("direct p50, 1 client", straight1.ms(0.5), "ms"),
            Figure::new("added p50, 1 client", round(added_p50_1, 3), "ms")
                .target("< 0.3 ms", added_p50_1 < 0.3),
            Figure::new("request errors", errors as f64, "").target("0", errors == 0),
        ],
        details: json!({
            "connections": n,
            "proxy": proxied.to_json(),
            "direct": straight.to_json(),
            "proxy_one_client": proxied1.to_json(),
            "direct_one_client": straight1.to_json(),
            "memory_mb": memory,
        }),
    })
}
