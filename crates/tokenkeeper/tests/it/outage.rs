//! Database outages (invariants 1 and 10): the database goes away while refreshes are in flight
//! at Notion, for longer than the refresh lease, and the tokenkeeper process is killed and
//! restarted in the middle of it. Every pair Notion minted must be in the ledger afterwards, as
//! the connection's current grant; calls that need the database meanwhile are answered 503.
//!
//! The outage is real: PostgreSQL is a server of the test's own, stopped at once
//! (`pg_ctl -m immediate`) and started again; SQLite is locked by another connection holding an
//! exclusive transaction, so nothing else can write. tokenkeeper runs as the built binary, so
//! that it can be killed.
//!
//! The outage lasts `TOKENKEEPER_CHAOS_OUTAGE_SECS` (default: the lease plus 3 s, to stay
//! inside CI's time); docs/RELIABILITY.md reports longer runs made with that variable.

use std::time::{Duration, Instant};

use notion_sim::{SimConfig, SimServer};
use serde_json::Value;

use crate::both_backends;
use crate::support::app::{Browser, Landing};
use crate::support::db::Backend;
use crate::support::outage_db::Database;
use crate::support::process::BrokerSpec;

/// The provider timeout the broker runs with; the lease is 2 × this + 5 s.
const PROVIDER_TIMEOUT: Duration = Duration::from_secs(1);
const LEASE: Duration = Duration::from_secs(7);
const CONNECTIONS: usize = 4;

fn outage_length() -> Duration {
    std::env::var("TOKENKEEPER_CHAOS_OUTAGE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(LEASE + Duration::from_secs(3))
}

both_backends!(
    refreshes_in_flight_survive_an_outage_longer_than_the_lease_and_a_restart,
    an_authorization_whose_commit_meets_an_outage_is_kept_and_reaches_the_app,
);

async fn refreshes_in_flight_survive_an_outage_longer_than_the_lease_and_a_restart(
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
        provider_timeout: PROVIDER_TIMEOUT,
        // The outage's start is one JSON log line an operator can find (docs/OBSERVABILITY.md).
        env: vec![
            ("TOKENKEEPER_LOG_FORMAT".into(), "json".into()),
            ("TOKENKEEPER_LOG".into(), "warn".into()),
        ],
        capture_output: true,
        ..BrokerSpec::against(&sim, db.url(), spill.path())
    };
    let mut broker = spec.start().await;

    let mut connections = Vec::new();
    for n in 0..CONNECTIONS {
        let (id, status) = broker.connect(&format!("user-{n}")).await;
        assert_eq!(status, "connected", "connect through the broker: {id}");
        let grant = broker.current_grant(&id).await;
        connections.push((id, grant));
    }

    // Refreshes reach Notion and are held there, answered only once the database is gone.
    let hold = sim.hold("oauth.token:refresh_token");
    let refreshes: Vec<_> = connections
        .iter()
        .map(|(id, grant)| {
            let (http, url, id, grant) = (
                broker.http.clone(),
                broker.url.clone(),
                id.clone(),
                grant.clone(),
            );
            tokio::spawn(async move {
                let r = http
                    .post(format!("{url}/v1/connections/{id}/refresh"))
                    .bearer_auth(crate::support::app::ADMIN_KEY)
                    .json(&serde_json::json!({ "if_grant": grant }))
                    .send()
                    .await
                    .unwrap();
                (r.status().as_u16(), r.json::<Value>().await.unwrap())
            })
        })
        .collect();
    hold.arrived(CONNECTIONS as u64).await;
    db.go_away();
    let outage_started = Instant::now();
    hold.release_all();

    // Notion minted a pair for each; the callers get them although the database is gone: the
    // pairs are in the spill journal.
    let mut minted = Vec::new();
    for refresh in refreshes {
        let (status, body) = refresh.await.unwrap();
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["refreshed"], true);
        minted.push((
            body["grant_id"].as_str().unwrap().to_owned(),
            body["access_token"].as_str().unwrap().to_owned(),
        ));
    }
    assert_eq!(broker.sim_refreshes().await, CONNECTIONS as u64);

    // Calls that need the database are answered at once, retryably.
    let asked = Instant::now();
    let (status, body) = broker
        .post_json(
            "/v1/connect-sessions",
            serde_json::json!({"provider": "notion", "end_user_id": "someone", "return_to": format!("{}/", broker.url)}),
        )
        .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "database_unavailable");
    // Not ready while it lasts, so a load balancer sends callers elsewhere.
    let (status, body) = broker.get_json("/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "not_ready");
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "answered within the database deadlines, not held: {:?}",
        asked.elapsed()
    );
    if backend == Backend::Postgres {
        let r = broker
            .api(
                reqwest::Method::GET,
                &format!("/v1/connections/{}/access-token", connections[0].0),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 503);
        assert!(r.headers().contains_key("retry-after"));
    }

    let started_line = format!(
        r#""op":"database_outage","phase":"start","backend":"{}""#,
        match backend {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    );
    assert!(
        broker.output.lock().unwrap().contains(&started_line),
        "the outage's start is logged: {}",
        broker.output.lock().unwrap()
    );

    // The process dies in the middle of the outage; a new one starts while it lasts.
    broker.kill().await;
    let restarted = tokio::spawn({
        let spec = spec.clone();
        async move { spec.start().await }
    });
    let length = outage_length();
    tokio::time::sleep(length.saturating_sub(outage_started.elapsed())).await;
    assert!(outage_started.elapsed() > LEASE);
    db.come_back();
    let broker = tokio::time::timeout(Duration::from_secs(60), restarted)
        .await
        .expect("the restarted process listens once the database is back")
        .unwrap();

    let (status, body) = broker.get_json("/readyz").await;
    assert_eq!(status, 200, "ready again once the database is back: {body}");
    // Every minted pair is the connection's current grant, and the connection is active.
    for ((id, before), (grant, access)) in connections.iter().zip(&minted) {
        let connection = broker.connection(id).await;
        assert_eq!(connection["status"], "active", "{connection}");
        assert_eq!(connection["grant_id"], grant.as_str(), "{connection}");
        let (status, token) = broker
            .get_json(&format!("/v1/connections/{id}/access-token"))
            .await;
        assert_eq!(status, 200, "{token}");
        assert_eq!(token["access_token"], access.as_str());
        let grants = broker.grants(id).await;
        assert_eq!(
            grants.len(),
            2,
            "the authorization and the refresh: {grants:?}"
        );
        assert_eq!(grants[1]["parent_grant_id"], before.as_str());
        // Notion agrees the pair is alive.
        let r = broker
            .api(reqwest::Method::GET, &format!("/v1/proxy/{id}/v1/users/me"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
    }
    assert_eq!(
        broker.sim_refreshes().await,
        CONNECTIONS as u64,
        "no refresh repeated"
    );
    let leftover: Vec<_> = std::fs::read_dir(spill.path())
        .unwrap()
        .flatten()
        .filter(|e| e.metadata().map(|m| m.len() > 0).unwrap_or(false))
        .map(|e| e.path())
        .collect();
    assert!(
        leftover.is_empty(),
        "the journal is empty again: {leftover:?}"
    );
    eprintln!(
        "outage of {:?} (lease {LEASE:?}) with a restart: {CONNECTIONS} pairs minted, {CONNECTIONS} kept",
        outage_started.elapsed()
    );
}

async fn an_authorization_whose_commit_meets_an_outage_is_kept_and_reaches_the_app(
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
    let broker = BrokerSpec {
        provider_timeout: PROVIDER_TIMEOUT,
        ..BrokerSpec::against(&sim, db.url(), spill.path())
    }
    .start()
    .await;

    // The user consents; Notion's code exchange is held until the database is gone.
    let link = broker.connect_link("user-1").await;
    let hold = sim.hold("oauth.token:authorization_code");
    let browser = Browser::new();
    let callback = {
        let browser = browser.clone();
        tokio::spawn(async move {
            let to_sim = browser.redirect(&link).await;
            let to_callback = browser.redirect(&to_sim).await;
            let r = browser.get(&to_callback).await;
            (r.status().as_u16(), r.text().await.unwrap())
        })
    };
    hold.arrived(1).await;
    db.go_away();
    hold.release_all();
    let (status, page) = callback.await.unwrap();
    assert_eq!(status, 202, "{page}");
    assert!(page.contains("Authorization kept"), "{page}");
    let pending = page
        .split("url=")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("the page goes on by itself")
        .replace("&amp;", "&");
    assert!(
        pending.starts_with(&format!("{}/connect/pending/", broker.url)),
        "{pending}"
    );
    // While the database is away, the page keeps waiting.
    assert_eq!(browser.get(&pending).await.status().as_u16(), 202);

    db.come_back();
    let deadline = Instant::now() + Duration::from_secs(30);
    let landing = loop {
        let r = browser.get(&pending).await;
        if r.status().is_redirection() {
            break Landing::of(r.headers()["location"].to_str().unwrap());
        }
        assert!(
            Instant::now() < deadline,
            "the authorization is recorded once the database is back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(landing.status, "connected");
    let id = landing.connection_id.expect("the app gets the connection");
    assert_eq!(broker.connection(&id).await["status"], "active");
    // The pair Notion minted during the outage is the one tokenkeeper serves.
    let r = broker
        .api(reqwest::Method::GET, &format!("/v1/proxy/{id}/v1/users/me"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
}
