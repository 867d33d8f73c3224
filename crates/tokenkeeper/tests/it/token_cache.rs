//! The token cache (issue 14): a token read that finds a verified entry touches no database,
//! and the cache keeps the promise of docs/DESIGN.md ("The token cache"):
//! - in one process, no read that starts after a commit returned serves the grant that commit
//!   superseded (or a revoked connection's grant);
//! - another process's commit reaches the cache through the change feed, within its delay;
//! - a caller that got a stale token and reports it with `if_grant` gets the current grant;
//! - during a database outage, reads are answered from the cache (marked), never with a grant
//!   known to be superseded or revoked.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use notion_sim::{SimConfig, SimServer};
use serde_json::Value;

use crate::both_backends;
use crate::support::app::{metric, Api, Options, TestApp, TOKENS_KEY};
use crate::support::db::Backend;
use crate::support::outage_db::Database;
use crate::support::process::BrokerSpec;

/// How long a change may take to reach another process's cache before a test gives up: far
/// above the feed's delay (milliseconds), so that only a cache that never learns fails.
const CONVERGE_WITHIN: Duration = Duration::from_secs(10);

/// A token read as an app makes it: status, body and the `Tokenkeeper-Cached` header.
async fn read(api: &Api, id: &str) -> (u16, Value, Option<String>) {
    let r = api
        .http
        .get(format!("{}/v1/connections/{id}/access-token", api.url))
        .bearer_auth(TOKENS_KEY)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let cached = r
        .headers()
        .get("tokenkeeper-cached")
        .map(|v| v.to_str().unwrap().to_owned());
    (status, r.json().await.unwrap_or(Value::Null), cached)
}

async fn grant_read(api: &Api, id: &str) -> String {
    let (status, body, _) = read(api, id).await;
    assert_eq!(status, 200, "{body}");
    body["grant_id"].as_str().unwrap().to_owned()
}

async fn cache_hits(api: &Api) -> f64 {
    metric(api, "token_cache_lookups_total{result=\"hit\"}").await
}

/// Reads the connection until a read is answered from the cache (a read that began before the
/// change feed delivered the connection's creation may not fill it), within a bound.
async fn until_cached(api: &Api, id: &str) -> String {
    for _ in 0..100 {
        let hits = cache_hits(api).await;
        let grant = grant_read(api, id).await;
        if cache_hits(api).await > hits {
            return grant;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("{id} is never answered from the cache");
}

/// Reads the connection through `api` until `done` holds for an answer, within
/// `CONVERGE_WITHIN`; returns how long it took.
async fn until_read(
    api: &Api,
    id: &str,
    what: &str,
    done: impl Fn(u16, &Value) -> bool,
) -> Duration {
    let start = Instant::now();
    loop {
        let (status, body, _) = read(api, id).await;
        if done(status, &body) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < CONVERGE_WITHIN,
            "{what}: still {status} {body} after {CONVERGE_WITHIN:?}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

both_backends!(
    in_one_process_no_read_that_starts_after_a_commit_serves_what_it_superseded,
    another_process_commits_reach_the_cache_and_if_grant_always_gets_the_current_grant,
);

/// One read of the reader tasks: when it started, and what it got.
struct Seen {
    started: Instant,
    status: u16,
    grant: Option<String>,
}

async fn in_one_process_no_read_that_starts_after_a_commit_serves_what_it_superseded(
    backend: Backend,
) {
    let app = TestApp::start(backend).await;
    let (id, _) = app.connect("reader").await;
    let first = until_cached(&app, &id).await;

    // Readers hammer the token while the connection is refreshed, re-authorized and revoked.
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Vec::<Seen>::new()));
    let mut readers = Vec::new();
    for _ in 0..16 {
        let (http, url, id, stop, seen) = (
            app.http.clone(),
            app.url.clone(),
            id.clone(),
            stop.clone(),
            seen.clone(),
        );
        readers.push(tokio::spawn(async move {
            let api = Api {
                url,
                sim_url: String::new(),
                http,
            };
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let (status, body, _) = read(&api, &id).await;
                seen.lock().unwrap().push(Seen {
                    started,
                    status,
                    grant: body["grant_id"].as_str().map(str::to_owned),
                });
            }
        }));
    }
    // (when the call that changed it returned, the grant it superseded)
    let mut superseded: Vec<(Instant, String)> = Vec::new();
    let mut current = first.clone();
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        // Without `if_grant`: a grant this fresh reported as refused would be judged instead.
        let (status, body) = app
            .post_json(
                &format!("/v1/connections/{id}/refresh"),
                serde_json::json!({}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        superseded.push((Instant::now(), current));
        current = body["grant_id"].as_str().unwrap().to_owned();
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    let landing = app.reconnect(&id).await;
    assert_eq!(landing.status, "reconnected");
    superseded.push((Instant::now(), current.clone()));
    current = app.current_grant(&id).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let r = app
        .api(reqwest::Method::DELETE, &format!("/v1/connections/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let revoked_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(20)).await;
    stop.store(true, Ordering::Relaxed);
    for reader in readers {
        reader.await.unwrap();
    }

    let seen = seen.lock().unwrap();
    assert!(seen.len() > 100, "the readers read: {}", seen.len());
    let mut served_current_before_revocation = false;
    for read in seen.iter() {
        if read.started > revoked_at {
            assert_eq!(
                read.status, 410,
                "a read that started after the revocation returned was answered {} {:?}",
                read.status, read.grant
            );
            continue;
        }
        if read.status == 410 {
            // Began before the revocation returned, answered after its commit.
            continue;
        }
        assert_eq!(read.status, 200);
        let grant = read.grant.as_deref().unwrap();
        for (at, old) in &superseded {
            assert!(
                !(read.started > *at && grant == old),
                "a read that started {:?} after the commit that superseded {old} served it",
                read.started - *at
            );
        }
        served_current_before_revocation |= grant == current;
    }
    assert!(served_current_before_revocation);
}

async fn another_process_commits_reach_the_cache_and_if_grant_always_gets_the_current_grant(
    backend: Backend,
) {
    let app = TestApp::with(
        backend,
        Options {
            sim: SimConfig {
                auto_approve: true,
                fresh_identity: true,
                rate_limit_per_connection: 0,
                ..SimConfig::default()
            },
            ..Options::default()
        },
    )
    .await;
    // The other process answers its own callbacks, so that its re-authorization is its commit.
    let mut spec = app.broker_spec();
    spec.public_url = None;
    let peer = spec.start().await;
    let (id, _) = app.connect("two-processes").await;
    let (other, _) = app.connect("two-processes-2").await;
    let g1 = grant_read(&app, &id).await;
    grant_read(&app, &other).await;
    let hits = cache_hits(&app).await;
    assert_eq!(grant_read(&app, &id).await, g1);
    assert!(
        cache_hits(&app).await > hits,
        "this process caches the grant"
    );

    // The other process refreshes: this one serves the new grant within the feed's delay.
    let (status, body) = peer.refresh(&id, &g1).await;
    assert_eq!(status, 200, "{body}");
    let g2 = body["grant_id"].as_str().unwrap().to_owned();
    let took = until_read(&app, &id, "the peer's refresh", |status, body| {
        status == 200 && body["grant_id"] == g2.as_str()
    })
    .await;
    eprintln!("the peer's refresh reached this process's cache after {took:?}");

    // A caller still holding the first grant reports it: it gets the current one, and Notion is
    // not called, whatever either process's cache held.
    let refreshes = app.sim_refreshes().await;
    for api in [&*app as &Api, &*peer] {
        let (status, body) = api.refresh(&id, &g1).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["grant_id"], g2.as_str());
        assert_eq!(body["refreshed"], false);
    }
    assert_eq!(app.sim_refreshes().await, refreshes);

    // A re-authorization and a revocation made by the other process reach this one too.
    let landing = peer.reconnect(&id).await;
    assert_eq!(landing.status, "reconnected");
    let g3 = peer.current_grant(&id).await;
    assert_ne!(g3, g2);
    until_read(&app, &id, "the peer's re-authorization", |status, body| {
        status == 200 && body["grant_id"] == g3.as_str()
    })
    .await;
    let r = peer
        .api(reqwest::Method::DELETE, &format!("/v1/connections/{other}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    until_read(&app, &other, "the peer's revocation", |status, _| {
        status == 410
    })
    .await;
}

both_backends!(during_an_outage_reads_come_from_the_cache_never_with_a_grant_known_superseded);

async fn during_an_outage_reads_come_from_the_cache_never_with_a_grant_known_superseded(
    backend: Backend,
) {
    let sim = SimServer::start(SimConfig {
        auto_approve: true,
        fresh_identity: true,
        rate_limit_per_connection: 0,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let mut db = Database::new(backend);
    let spill = tempfile::tempdir().unwrap();
    let spec = BrokerSpec {
        refresh_budget: Duration::from_secs(5),
        ..BrokerSpec::against(&sim, db.url(), spill.path())
    };
    let a = spec.start().await;
    let b = spec.start().await;
    let (kept, _) = a.connect("kept").await;
    let (refreshed, _) = a.connect("refreshed").await;
    let (revoked, _) = a.connect("revoked").await;
    let kept_grant = grant_read(&a, &kept).await;
    let old_grant = grant_read(&a, &refreshed).await;
    grant_read(&a, &revoked).await;
    assert_eq!(metric(&a, "token_cache_entries").await, 3.0);

    // The other process refreshes one connection and revokes another; this process's cache
    // drops both entries (and never refills them: nothing reads them here).
    let (status, body) = b.refresh(&refreshed, &old_grant).await;
    assert_eq!(status, 200, "{body}");
    let new_grant = body["grant_id"].as_str().unwrap().to_owned();
    let r = b
        .api(
            reqwest::Method::DELETE,
            &format!("/v1/connections/{revoked}"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let start = Instant::now();
    while metric(&a, "token_cache_entries").await != 1.0 {
        assert!(
            start.elapsed() < CONVERGE_WITHIN,
            "the peer's changes reach the cache"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // The database goes away.
    db.go_away();
    if backend == Backend::Postgres {
        // The feed's connection is gone: from now on nothing can be verified.
        let start = Instant::now();
        while metric(&a, "change_feed_up").await != 0.0 {
            assert!(
                start.elapsed() < CONVERGE_WITHIN,
                "the feed notices the outage"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let (status, body, cached) = read(&a, &kept).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["grant_id"], kept_grant.as_str());
    let (status_r, body_r, _) = read(&a, &refreshed).await;
    let (status_v, body_v, _) = read(&a, &revoked).await;
    match backend {
        Backend::Postgres => {
            // Nothing can be verified: the entry is answered, and marked.
            assert_eq!(cached.as_deref(), Some("database_unavailable"));
            // No entry for the others: what this process knows of them is that they changed.
            assert_eq!(status_r, 503, "{body_r}");
            assert_eq!(body_r["error"]["code"], "database_unavailable");
            assert_eq!(status_v, 503, "{body_v}");
        }
        Backend::Sqlite => {
            // A write lock leaves reads working in WAL mode, the change feed's too: the cache is
            // still verified and needs no mark, and the others are read from the database.
            assert_eq!(cached, None);
            assert_eq!(status_r, 200, "{body_r}");
            assert_eq!(body_r["grant_id"], new_grant.as_str());
            assert_eq!(status_v, 410, "{body_v}");
        }
    }
    assert_ne!(body_r["grant_id"], old_grant.as_str());
    assert_ne!(status_v, 200);

    db.come_back();
    // Back: unmarked answers again, once the feed has reconnected.
    let start = Instant::now();
    loop {
        let (status, body, cached) = read(&a, &kept).await;
        if status == 200 && cached.is_none() {
            assert_eq!(body["grant_id"], kept_grant.as_str());
            break;
        }
        assert!(
            start.elapsed() < CONVERGE_WITHIN,
            "{status} {body} {cached:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(grant_read(&a, &refreshed).await, new_grant);
}
