//! The simulator's own ceiling: `users.me` and the token endpoint (refresh grants) straight at
//! `notion-sim`, with the same load generator, so that the simulator is known never to be what
//! limits the other scenarios.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use base64::Engine as _;
use http::{Method, StatusCode};
use rand::Rng;
use serde_json::json;

use super::Ctx;
use crate::client::{path_and_query, request, Conn};
use crate::load::{self, round, Phase, Stats};
use crate::procs::{Sim, CLIENT_ID, CLIENT_SECRET, NOTION_VERSION};
use crate::report::{BackendResult, Figure};

const REDIRECT: &str = "http://127.0.0.1:9/callback";

pub async fn run(ctx: &Ctx) -> anyhow::Result<BackendResult> {
    let sim = Sim::start(&ctx.bin, &ctx.run_dir, "sim-ceiling", &[]).await?;
    let bots = ctx.concurrency.max(1);
    let mut conn = Conn::open(sim.addr).await?;
    let mut pairs = Vec::with_capacity(bots);
    for _ in 0..bots {
        pairs.push(authorize(&mut conn, sim.addr).await?);
    }
    let addr = sim.addr;
    let tokens: Arc<Vec<String>> = Arc::new(pairs.iter().map(|(a, _)| a.clone()).collect());
    let users_me: load::MakeRequest = Arc::new(move |rng| {
        let token = &tokens[rng.gen_range(0..tokens.len())];
        request(Method::GET, addr, "/v1/users/me")
            .bearer(token)
            .header("notion-version", NOTION_VERSION)
            .empty()
    });
    let phase = Phase {
        concurrency: ctx.concurrency,
        duration: ctx.duration,
        max_requests: 20_000_000,
    };
    eprintln!(
        "  users.me straight at the simulator for {} s",
        ctx.duration.as_secs_f64()
    );
    let me = load::closed_loop(
        "sim users.me",
        addr,
        phase,
        StatusCode::OK,
        users_me,
        &[("notion-sim", sim.proc.pid)],
    )
    .await?;
    eprintln!("  users.me: {}", me.summary());
    eprintln!(
        "  token endpoint (refresh_token grants, each worker rotating its own bot's pair) for {} s",
        ctx.duration.as_secs_f64()
    );
    let refresh = refresh_chains(
        addr,
        pairs.into_iter().map(|(_, r)| r).collect(),
        ctx.duration,
    )
    .await?;
    eprintln!("  oauth.token: {}", refresh.summary());
    let memory = sim.proc.memory()?;
    sim.stop().await?;
    Ok(BackendResult {
        backend: "none".into(),
        figures: vec![
            Figure::new(
                "users.me straight at the simulator",
                round(me.rps(), 0),
                "req/s",
            ),
            Figure::new("users.me p50", me.ms(0.5), "ms"),
            Figure::new(
                "token endpoint, refresh grants",
                round(refresh.rps(), 0),
                "req/s",
            ),
            Figure::new("token endpoint p50", refresh.ms(0.5), "ms"),
            Figure::new("errors", (me.errors + refresh.errors) as f64, "")
                .target("0", me.errors + refresh.errors == 0),
        ],
        details: json!({"users_me": me.to_json(), "oauth_token_refresh": refresh.to_json(), "memory_mb": memory}),
    })
}

fn basic() -> String {
    let raw = format!("{CLIENT_ID}:{CLIENT_SECRET}");
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
}

/// One authorization straight at the simulator (auto-approved); returns the access and refresh
/// tokens.
async fn authorize(conn: &mut Conn, addr: SocketAddr) -> anyhow::Result<(String, String)> {
    let mut url = url::Url::parse(&format!("http://{addr}/v1/oauth/authorize"))?;
    url.query_pairs_mut()
        .append_pair("client_id", CLIENT_ID)
        .append_pair("redirect_uri", REDIRECT)
        .append_pair("response_type", "code")
        .append_pair("owner", "user")
        .append_pair("state", "bench");
    let reply = conn
        .send(request(Method::GET, addr, &path_and_query(url.as_str())?).empty())
        .await?;
    let back = url::Url::parse(reply.location()?)?;
    let code = back
        .query_pairs()
        .find(|(k, _)| k == "code")
        .map(|(_, v)| v.into_owned())
        .context("no code in the redirect")?;
    let tokens = conn
        .send(
            request(Method::POST, addr, "/v1/oauth/token")
                .header("authorization", &basic())
                .header("notion-version", NOTION_VERSION)
                .json(&json!({"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT})),
        )
        .await?
        .expect(StatusCode::OK)?
        .json()?;
    Ok((
        tokens["access_token"]
            .as_str()
            .context("no access_token")?
            .to_owned(),
        tokens["refresh_token"]
            .as_str()
            .context("no refresh_token")?
            .to_owned(),
    ))
}

/// A closed loop in which each worker refreshes its own bot again and again, each time with the
/// refresh token the previous answer rotated to.
async fn refresh_chains(
    addr: SocketAddr,
    refresh_tokens: Vec<String>,
    duration: Duration,
) -> anyhow::Result<Stats> {
    let mut conns = Vec::new();
    for _ in &refresh_tokens {
        conns.push(Conn::open(addr).await?);
    }
    let start = Instant::now();
    let deadline = start + duration;
    let auth = basic();
    let mut workers = Vec::new();
    for (mut conn, mut refresh) in conns.into_iter().zip(refresh_tokens) {
        let auth = auth.clone();
        workers.push(tokio::spawn(async move {
            let mut stats = Stats::empty();
            while Instant::now() < deadline {
                let req = request(Method::POST, addr, "/v1/oauth/token")
                    .header("authorization", &auth)
                    .header("notion-version", NOTION_VERSION)
                    .json(&json!({"grant_type": "refresh_token", "refresh_token": refresh}));
                let t = Instant::now();
                let reply = conn.send(req).await;
                let micros = t.elapsed().as_micros() as u64;
                let next = reply
                    .as_ref()
                    .ok()
                    .filter(|r| r.status == StatusCode::OK)
                    .and_then(|r| r.json().ok())
                    .and_then(|j| j["refresh_token"].as_str().map(str::to_owned));
                match next {
                    Some(next) => {
                        refresh = next;
                        stats.ok += 1;
                        stats.hist.saturating_record(micros.max(1));
                    }
                    None => {
                        stats.errors += 1;
                        stats.first_error.get_or_insert(match reply {
                            Ok(r) => format!("{} {}", r.status, r.text()),
                            Err(e) => format!("{e:#}"),
                        });
                        // A broken chain cannot go on.
                        return stats;
                    }
                }
            }
            stats
        }));
    }
    let mut total = Stats::empty();
    for w in workers {
        total.merge(&w.await?);
    }
    total.elapsed = start.elapsed();
    Ok(total)
}
