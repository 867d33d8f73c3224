//! Scenario 4 (`refresh`): N connections made through the real connect flow (the simulator must
//! know their refresh tokens), then each refreshed once, `concurrency` at a time, with the
//! simulator answering at once. Refreshes per second, and what each refresh costs the database:
//! PostgreSQL's transaction ids (one per write transaction) and commits; on SQLite, the WAL
//! syncs of a sample of refreshes counted with strace (with `synchronous = FULL` in WAL mode
//! every write transaction's commit syncs the WAL once).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use serde_json::json;

use super::{Ctx, Stack};
use crate::client::{request, Conn};
use crate::db::{self, Backend};
use crate::flows;
use crate::load::{round, Stats};
use crate::report::{BackendResult, Figure};

pub const CONNECTIONS: usize = 10_000;
/// Refreshes in the strace sample (SQLite).
const SYNC_SAMPLE: usize = 300;

pub async fn run(ctx: &Ctx, backend: Backend) -> anyhow::Result<BackendResult> {
    let n = ctx.connections.unwrap_or(CONNECTIONS);
    let stack = Stack::new(ctx, backend, "refresh", &[]).await?;
    let broker = stack.broker(&format!("refresh-{}", backend.name())).await?;
    let key = stack.spec.api_key.clone();
    eprintln!("  connecting {n} users through the connect flow");
    let (_, connect_time) =
        flows::connect_many(&broker.url, stack.sim.addr, &key, n, ctx.concurrency).await?;
    eprintln!(
        "  connected {n} in {:.1} s ({:.0}/s)",
        connect_time.as_secs_f64(),
        n as f64 / connect_time.as_secs_f64()
    );
    let targets = Arc::new(flows::list_connections(broker.addr, &key).await?);

    let probe = stack.db.probe().await?;
    let sim_before = stack.sim.token_requests("refresh_token").await?;
    let before = probe.sample().await?;
    eprintln!(
        "  refreshing each connection once, {} at a time",
        ctx.concurrency
    );
    let cap = Duration::from_secs(300);
    let stats = refresh_all(
        broker.addr,
        &key,
        targets.clone(),
        0..targets.len(),
        ctx.concurrency,
        cap,
    )
    .await?;
    let after_load = probe.sample().await?;
    let sim_refreshes = stack.sim.token_requests("refresh_token").await? - sim_before;
    eprintln!("  {}", stats.summary());

    // SQLite: count the WAL syncs of a sample of second refreshes, under strace.
    let syncs = match backend {
        Backend::Sqlite => {
            let m = SYNC_SAMPLE.min(targets.len());
            match count_syncs(
                broker.proc.pid,
                broker.addr,
                &key,
                &targets[..m],
                ctx.concurrency,
            )
            .await
            {
                Ok(s) => Some(s),
                Err(e) => {
                    eprintln!("  could not count syncs with strace: {e:#}");
                    None
                }
            }
        }
        Backend::Postgres => None,
    };
    let memory = broker.proc.memory()?;
    broker.stop().await?;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let after = probe.sample().await?;
    drop(probe);
    stack.finish().await?;

    let refreshed = stats.ok.max(1) as f64;
    let mut figures = vec![
        Figure::new("connections refreshed once", stats.ok as f64, ""),
        Figure::new("refreshes/s", round(stats.rps(), 0), "refreshes/s"),
        Figure::new("refresh p50", stats.ms(0.5), "ms"),
        Figure::new("refresh p99", stats.ms(0.99), "ms"),
        Figure::new(
            "refreshes that reached the simulator",
            sim_refreshes as f64,
            "",
        )
        .target("one per refresh", sim_refreshes == stats.ok),
        Figure::new(
            "connect flow while seeding",
            round(n as f64 / connect_time.as_secs_f64(), 0),
            "authorizations/s",
        ),
        Figure::new("request errors", stats.errors as f64, "").target("0", stats.errors == 0),
    ];
    let mut details = json!({
        "connections": n,
        "refresh": stats.to_json(),
        "sim_refreshes": sim_refreshes,
        "connect_seconds": round(connect_time.as_secs_f64(), 2),
        "memory_mb": memory,
        "database_counters": {
            "until_end_of_load": db::writes_between(&before, &after_load),
            "until_serve_stopped": db::writes_between(&before, &after),
        },
    });
    match backend {
        Backend::Postgres => {
            let xids = after_load.pg_next_xid.unwrap_or(0) - before.pg_next_xid.unwrap_or(0);
            let commits = after.pg_xact_commit.unwrap_or(0) - before.pg_xact_commit.unwrap_or(0);
            let per = xids as f64 / refreshed;
            figures.push(
                Figure::new(
                    "write transactions per refresh (xid delta / refreshes)",
                    round(per, 2),
                    "",
                )
                .target("<= 2 (lease + one write)", per <= 2.05),
            );
            figures.push(Figure::new(
                "all commits per refresh, reads included (xact_commit delta / refreshes)",
                round(commits as f64 / refreshed, 2),
                "",
            ));
        }
        Backend::Sqlite => {
            if let Some(s) = &syncs {
                let per = s.commits as f64 / s.refreshes.max(1) as f64;
                figures.push(
                    Figure::new(
                        "write transactions per refresh (WAL commit syncs / refreshes, strace sample)",
                        round(per, 2),
                        "",
                    )
                    .target("<= 2 (lease + one write)", per <= 2.05),
                );
                details["sync_sample"] = json!(s);
            }
        }
    }
    Ok(BackendResult {
        backend: backend.name().to_owned(),
        figures,
        details,
    })
}

/// Refreshes `targets[range]` once each (`if_grant` = the grant listed, none when it is empty),
/// `concurrency` at a time.
async fn refresh_all(
    addr: std::net::SocketAddr,
    key: &str,
    targets: Arc<Vec<(String, String)>>,
    range: std::ops::Range<usize>,
    concurrency: usize,
    cap: Duration,
) -> anyhow::Result<Stats> {
    let next = Arc::new(AtomicUsize::new(range.start));
    let end = range.end;
    let start = Instant::now();
    let deadline = start + cap;
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let mut conn = Conn::open(addr).await?;
        let next = next.clone();
        let targets = targets.clone();
        let key = key.to_owned();
        workers.push(tokio::spawn(async move {
            let mut stats = Stats::empty();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= end || Instant::now() > deadline {
                    return stats;
                }
                let (id, grant) = &targets[i];
                let req = request(Method::POST, addr, &format!("/v1/connections/{id}/refresh"))
                    .bearer(&key)
                    .json(&if grant.is_empty() {
                        json!({})
                    } else {
                        json!({ "if_grant": grant })
                    });
                let t = Instant::now();
                let reply = conn.send(req).await;
                let micros = t.elapsed().as_micros() as u64;
                let refreshed = reply
                    .as_ref()
                    .ok()
                    .filter(|r| r.status == StatusCode::OK)
                    .and_then(|r| r.json().ok())
                    .is_some_and(|j| j["refreshed"] == json!(true));
                if refreshed {
                    stats.ok += 1;
                    stats.hist.saturating_record(micros.max(1));
                } else {
                    stats.errors += 1;
                    if stats.first_error.is_none() {
                        stats.first_error = Some(match reply {
                            Ok(r) => format!("{} {}", r.status, r.text()),
                            Err(e) => format!("{e:#}"),
                        });
                    }
                }
                if i > 0 && i.is_multiple_of(2000) {
                    eprintln!(
                        "    {i} refreshes after {:.1} s",
                        start.elapsed().as_secs_f64()
                    );
                }
            }
        }));
    }
    let mut total = Stats::empty();
    for w in workers {
        total.merge(&w.await?);
    }
    total.elapsed = start.elapsed();
    Ok(total)
}

#[derive(Debug, serde::Serialize)]
pub struct SyncSample {
    pub refreshes: u64,
    /// fsync/fdatasync calls on the WAL file: one per committed write transaction, plus one
    /// per checkpoint.
    pub wal_syncs: u64,
    /// fsync/fdatasync calls on the database file: one per checkpoint.
    pub db_syncs: u64,
    /// `wal_syncs - db_syncs`: the committed write transactions.
    pub commits: u64,
}

/// Attaches `strace -f -y` (fsync, fdatasync) to serve, refreshes `targets` a second time (their
/// current grants, looked up first), detaches, and counts the syncs per file.
async fn count_syncs(
    pid: u32,
    addr: std::net::SocketAddr,
    key: &str,
    targets: &[(String, String)],
    concurrency: usize,
) -> anyhow::Result<SyncSample> {
    // Their grants changed in the measured phase: look up the current ones.
    let current = flows::list_connections(addr, key).await?;
    let wanted: std::collections::HashSet<&str> = targets.iter().map(|(c, _)| c.as_str()).collect();
    // Refreshed without `if_grant`: reported as refused, a grant a refresh minted moments ago
    // would be judged (issue 11) instead of refreshed again.
    let sample: Vec<(String, String)> = current
        .into_iter()
        .filter(|(c, _)| wanted.contains(c.as_str()))
        .map(|(c, _)| (c, String::new()))
        .collect();
    let out = tempfile::NamedTempFile::new()?;
    let mut strace = tokio::process::Command::new("strace")
        .args(["-f", "-y", "-e", "trace=fsync,fdatasync", "-o"])
        .arg(out.path())
        .args(["-p", &pid.to_string()])
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    // strace needs a moment to attach to every thread.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let n = sample.len();
    let stats = refresh_all(
        addr,
        key,
        Arc::new(sample),
        0..n,
        concurrency,
        Duration::from_secs(120),
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let strace_pid = strace.id().map(|p| p.to_string()).unwrap_or_default();
    std::process::Command::new("kill")
        .args(["-INT", &strace_pid])
        .status()?;
    tokio::time::timeout(Duration::from_secs(10), strace.wait()).await??;
    let text = std::fs::read_to_string(out.path())?;
    // Lines look like `1234  fdatasync(7</tmp/…/refresh_1.db-wal>) = 0`.
    let (mut wal_syncs, mut db_syncs) = (0, 0);
    for line in text
        .lines()
        .filter(|l| l.contains("sync(") && l.trim_end().ends_with("= 0"))
    {
        if line.contains("-wal>") {
            wal_syncs += 1;
        } else if line.contains(".db>") {
            db_syncs += 1;
        }
    }
    if wal_syncs == 0 {
        anyhow::bail!("strace saw no WAL sync; is strace allowed to attach here?");
    }
    Ok(SyncSample {
        refreshes: stats.ok,
        wal_syncs,
        db_syncs,
        commits: wal_syncs.saturating_sub(db_syncs),
    })
}
