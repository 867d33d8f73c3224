//! The broker through its HTTP API, against notion-sim, on both backends (issue 4).
//! Each test is named after what it proves.

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};

use crate::both_backends;
use crate::support::app::{Browser, Options, TestApp, ADMIN_KEY, TOKENS_KEY};
use crate::support::db::Backend;
use notion_sim::{PreviousPairPolicy, ReauthMode, RefreshReusePolicy, SimConfig};

fn sim(f: impl FnOnce(&mut SimConfig)) -> Options {
    let mut options = Options::default();
    f(&mut options.sim);
    options
}

fn current_of(grants: &[Value], current: &str) -> Value {
    grants
        .iter()
        .find(|g| g["id"] == current)
        .cloned()
        .expect("the current grant is listed")
}

both_backends!(
    reauthorizing_twice_keeps_all_three_pairs_and_serves_the_newest,
    a_callback_for_a_known_bot_persists_the_new_pair_and_the_next_refresh_uses_it,
    a_reauthorization_during_a_refresh_wins_and_the_refresh_is_superseded_at_birth,
    concurrent_refreshes_across_processes_cause_exactly_one_provider_refresh,
    an_uninstall_ends_in_needs_reauth_with_a_diagnosis_and_a_reconnect_recovers,
    a_legacy_reauthorization_returning_the_same_pair_adds_no_grant,
    a_process_killed_mid_refresh_is_diagnosed_after_its_lease_and_nothing_is_lost,
    throttling_5xx_and_timeouts_at_the_token_endpoint_never_change_the_status,
    transient_token_endpoint_failures_are_retried_within_the_budget,
    bad_input_gets_the_documented_status_and_stores_nothing,
    a_reconnect_answered_with_a_new_bot_id_keeps_the_connection_and_records_the_change,
    deleting_a_connection_revokes_upstream_and_keeps_the_history,
    a_timed_out_refresh_that_consumed_the_token_is_named_in_the_later_diagnosis,
);

async fn reauthorizing_twice_keeps_all_three_pairs_and_serves_the_newest(backend: Backend) {
    let app = TestApp::start(backend).await;
    let (id, first) = app.connect("user-1").await;
    let (again, second) = app.connect("user-1").await;
    let (third_id, third) = app.connect("user-1").await;
    assert_eq!(
        (first.as_str(), second.as_str(), third.as_str()),
        ("connected", "reconnected", "reconnected")
    );
    assert_eq!(id, again);
    assert_eq!(id, third_id);

    let grants = app.grants(&id).await;
    assert_eq!(
        grants.len(),
        3,
        "every pair Notion minted is kept: {grants:?}"
    );
    let origins: Vec<_> = grants
        .iter()
        .map(|g| g["origin"].as_str().unwrap())
        .collect();
    assert_eq!(
        origins,
        ["authorization", "reauthorization", "reauthorization"]
    );
    assert!(grants[0]["superseded_at"].is_string() && grants[1]["superseded_at"].is_string());
    assert!(grants[2]["superseded_at"].is_null());
    let fingerprints: std::collections::HashSet<_> = grants
        .iter()
        .map(|g| g["access_token_fingerprint"].as_str().unwrap())
        .collect();
    assert_eq!(fingerprints.len(), 3, "three distinct pairs");

    let (status, token) = app
        .get_json(&format!("/v1/connections/{id}/access-token"))
        .await;
    assert_eq!(status, 200, "{token}");
    assert_eq!(
        token["grant_id"], grants[2]["id"],
        "the newest grant is served"
    );
    assert_eq!(
        tokenkeeper::ids::fingerprint(token["access_token"].as_str().unwrap()),
        grants[2]["access_token_fingerprint"].as_str().unwrap()
    );
    // Each older pair still opens: nothing was overwritten.
    let cid = tokenkeeper::ids::ConnectionId::parse(&id).unwrap();
    for g in &grants {
        let gid = tokenkeeper::ids::GrantId::parse(g["id"].as_str().unwrap()).unwrap();
        let open = app
            .db
            .store
            .get_grant(&cid, &gid)
            .await
            .unwrap()
            .expect("grant exists");
        assert_eq!(
            open.access_token.fingerprint(),
            g["access_token_fingerprint"].as_str().unwrap()
        );
    }
}

async fn a_callback_for_a_known_bot_persists_the_new_pair_and_the_next_refresh_uses_it(
    backend: Backend,
) {
    // The sim kills the previous pair on re-authorization and rejects refresh-token reuse: a
    // broker that skipped the "duplicate" callback would refresh with a dead token.
    let app = TestApp::with(
        backend,
        sim(|s| {
            s.previous_pair = PreviousPairPolicy::KillBoth;
            s.refresh_reuse = RefreshReusePolicy::Reject;
        }),
    )
    .await;
    let (id, _) = app.connect("user-1").await;
    let (again, status) = app.connect("user-1").await;
    assert_eq!(
        (again.as_str(), status.as_str()),
        (id.as_str(), "reconnected")
    );
    let current = app.current_grant(&id).await;

    let (status, body) = app.refresh(&id, &current).await;
    assert_eq!(
        status, 200,
        "the refresh uses the re-authorization's refresh token: {body}"
    );
    assert_eq!(body["refreshed"], true);
    assert_ne!(body["grant_id"].as_str().unwrap(), current);
    let grants = app.grants(&id).await;
    let refreshed = current_of(&grants, body["grant_id"].as_str().unwrap());
    assert_eq!(refreshed["parent_grant_id"], current.as_str());
    assert_eq!(app.connection(&id).await["status"], "active");
    assert_eq!(app.sim_refreshes().await, 1);
}

async fn a_reauthorization_during_a_refresh_wins_and_the_refresh_is_superseded_at_birth(
    backend: Backend,
) {
    let app = TestApp::start(backend).await;
    let (id, _) = app.connect("user-1").await;
    let first = app.current_grant(&id).await;
    // The sim rotates at once but answers the refresh only when the test releases it.
    let held = app.sim.hold("oauth.token:refresh_token");
    let in_flight = {
        let (http, url, id, first) = (app.http.clone(), app.url.clone(), id.clone(), first.clone());
        tokio::spawn(async move {
            let r = http
                .post(format!("{url}/v1/connections/{id}/refresh"))
                .bearer_auth(ADMIN_KEY)
                .json(&json!({"if_grant": first}))
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        })
    };
    // The refresh has reached Notion and rotated; its answer is in flight.
    held.arrived(1).await;
    let (again, status) = app.connect("user-1").await;
    assert_eq!(
        (again.as_str(), status.as_str()),
        (id.as_str(), "reconnected")
    );
    let reauthorized = app.current_grant(&id).await;
    assert_ne!(reauthorized, first);
    assert!(!in_flight.is_finished(), "the refresh is still in flight");

    held.release_all();
    let (status, body) = in_flight.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["grant_id"],
        reauthorized.as_str(),
        "the caller gets the grant that is current"
    );
    let grants = app.grants(&id).await;
    assert_eq!(
        grants.len(),
        3,
        "the late refresh result is kept: {grants:?}"
    );
    let late = grants
        .iter()
        .find(|g| g["origin"] == "refresh")
        .expect("the refresh result is recorded");
    assert_eq!(late["parent_grant_id"], first.as_str());
    assert_eq!(late["stale_at_birth"], true);
    assert!(late["superseded_at"].is_string());
    assert_eq!(app.connection(&id).await["grant_id"], reauthorized.as_str());

    let (status, body) = app.refresh(&id, &reauthorized).await;
    assert_eq!(status, 200, "the next refresh succeeds: {body}");
    let next = current_of(&app.grants(&id).await, body["grant_id"].as_str().unwrap());
    assert_eq!(next["parent_grant_id"], reauthorized.as_str());
}

async fn concurrent_refreshes_across_processes_cause_exactly_one_provider_refresh(
    backend: Backend,
) {
    let app = TestApp::start(backend).await;
    let (id, _) = app.connect("user-1").await;
    let first = app.current_grant(&id).await;
    app.sim.update_config(|c| {
        c.latency.insert(
            "oauth.token:refresh_token".into(),
            Duration::from_millis(300),
        );
    });
    let peers = match backend {
        Backend::Postgres => 2,
        Backend::Sqlite => 1,
    };
    let mut processes = Vec::new();
    for _ in 0..peers {
        processes.push(app.spawn_peer(&[]).await);
    }
    let mut urls = vec![app.url.clone()];
    urls.extend(processes.iter().map(|p| p.url.clone()));

    const CALLERS: usize = 500;
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(CALLERS));
    let mut tasks = Vec::new();
    for i in 0..CALLERS {
        let (http, url, id, first, start) = (
            app.http.clone(),
            urls[i % urls.len()].clone(),
            id.clone(),
            first.clone(),
            start.clone(),
        );
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            let r = http
                .post(format!("{url}/v1/connections/{id}/refresh"))
                .bearer_auth(TOKENS_KEY)
                .json(&json!({"if_grant": first}))
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }));
    }
    let mut tokens = std::collections::HashSet::new();
    let mut grants = std::collections::HashSet::new();
    for t in tasks {
        let (status, body) = t.await.unwrap();
        assert_eq!(status, 200, "{body}");
        tokens.insert(body["access_token"].as_str().unwrap().to_owned());
        grants.insert(body["grant_id"].as_str().unwrap().to_owned());
    }
    assert_eq!(
        app.sim_refreshes().await,
        1,
        "exactly one refresh reached Notion"
    );
    assert_eq!(
        tokens.len(),
        1,
        "all {CALLERS} callers got the same new token"
    );
    assert_eq!(grants.len(), 1);
    assert!(!grants.contains(&first));
    assert_eq!(app.grants(&id).await.len(), 2);
}

async fn an_uninstall_ends_in_needs_reauth_with_a_diagnosis_and_a_reconnect_recovers(
    backend: Backend,
) {
    let app = TestApp::start(backend).await;
    let (id, _) = app.connect("user-1").await;
    let connection = app.connection(&id).await;
    let grant = connection["grant_id"].as_str().unwrap().to_owned();
    let bot = connection["bot_id"].as_str().unwrap().to_owned();
    app.sim_json(Method::POST, &format!("/_sim/bots/{bot}/revoke"), None)
        .await;

    let (status, body) = app.refresh(&id, &grant).await;
    assert_eq!(status, 424, "{body}");
    assert_eq!(body["error"]["code"], "needs_reauth");
    assert_eq!(body["error"]["diagnosis"]["grant_id"], grant.as_str());
    assert_eq!(body["error"]["diagnosis"]["code"], "invalid_grant");
    let reconnect = body["error"]["reconnect_url"]
        .as_str()
        .expect("a reconnect link")
        .to_owned();
    assert_eq!(app.connection(&id).await["status"], "needs_reauth");
    let (status, body) = app
        .get_json(&format!("/v1/connections/{id}/access-token"))
        .await;
    assert_eq!(status, 424, "{body}");
    assert!(body["error"]["reconnect_url"].is_string());

    let landing = app.follow(&reconnect).await;
    assert_eq!(
        landing.connection_id.as_deref(),
        Some(id.as_str()),
        "the reconnect lands on the same connection"
    );
    assert_eq!(landing.status, "reconnected");
    assert_eq!(app.connection(&id).await["status"], "active");
    let kinds = app.event_kinds(&id).await;
    for expected in ["refresh_failed", "needs_reauth", "recovered"] {
        assert!(
            kinds.iter().any(|k| k == expected),
            "{expected} in {kinds:?}"
        );
    }
    let (status, _) = app
        .get_json(&format!("/v1/connections/{id}/access-token"))
        .await;
    assert_eq!(status, 200);
}

async fn a_legacy_reauthorization_returning_the_same_pair_adds_no_grant(backend: Backend) {
    let app = TestApp::with(backend, sim(|s| s.reauth = ReauthMode::Legacy)).await;
    let (id, _) = app.connect("user-1").await;
    let (again, status) = app.connect("user-1").await;
    assert_eq!(
        (again.as_str(), status.as_str()),
        (id.as_str(), "reconnected")
    );
    assert_eq!(
        app.grants(&id).await.len(),
        1,
        "the same pair is not a new grant"
    );
    assert!(app
        .event_kinds(&id)
        .await
        .iter()
        .any(|k| k == "reauthorization_confirmed"));
}

async fn a_process_killed_mid_refresh_is_diagnosed_after_its_lease_and_nothing_is_lost(
    backend: Backend,
) {
    // Lease = 2 × 1 s + 5 s. The sim rotates at once and answers after 3 s: the peer is killed
    // while Notion has consumed the refresh token and before the peer could commit.
    let options = Options {
        provider_timeout: Duration::from_secs(1),
        refresh_budget: Duration::from_secs(30),
        ..Options::default()
    };
    let app = TestApp::with(backend, options).await;
    let (id, _) = app.connect("user-1").await;
    let grant = app.current_grant(&id).await;
    app.sim.update_config(|c| {
        c.latency
            .insert("oauth.token:refresh_token".into(), Duration::from_secs(3));
    });
    let mut peer = app.spawn_peer(&[]).await;
    let doomed = {
        let (http, url, id, grant) = (
            app.http.clone(),
            peer.url.clone(),
            id.clone(),
            grant.clone(),
        );
        tokio::spawn(async move {
            http.post(format!("{url}/v1/connections/{id}/refresh"))
                .bearer_auth(ADMIN_KEY)
                .json(&json!({"if_grant": grant}))
                .send()
                .await
        })
    };
    // Wait until the peer's refresh has reached the sim, then kill the peer.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while app.sim_refreshes().await == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the peer's refresh reached the sim"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    peer.kill().await;
    assert!(
        doomed.await.unwrap().is_err(),
        "the killed peer never answered"
    );
    app.sim.update_config(|c| c.latency.clear());

    // This process waits for the dead holder's lease, takes over, and judges the failure.
    let (status, body) = app.refresh(&id, &grant).await;
    assert_eq!(status, 424, "{body}");
    let diagnosis = &body["error"]["diagnosis"];
    assert_eq!(diagnosis["grant_id"], grant.as_str());
    assert!(
        diagnosis["interrupted_attempt"].is_object(),
        "the diagnosis names the interrupted attempt: {diagnosis}"
    );
    assert_eq!(app.sim_refreshes().await, 2);
    let grants = app.grants(&id).await;
    assert_eq!(grants.len(), 1, "nothing committed was lost or invented");
    assert_eq!(grants[0]["id"], grant.as_str());
}

async fn throttling_5xx_and_timeouts_at_the_token_endpoint_never_change_the_status(
    backend: Backend,
) {
    let options = Options {
        provider_timeout: Duration::from_millis(500),
        refresh_budget: Duration::from_millis(1500),
        ..Options::default()
    };
    let app = TestApp::with(backend, options).await;
    let (id, _) = app.connect("user-1").await;
    let grant = app.current_grant(&id).await;
    let faults = [
        json!({"endpoint": "oauth.token", "kind": "status", "status": 429, "retry_after": 1}),
        json!({"endpoint": "oauth.token", "kind": "status", "status": 503}),
        json!({"endpoint": "oauth.token", "kind": "status", "status": 529, "retry_after": 1}),
        json!({"endpoint": "oauth.token", "kind": "non_json", "status": 502, "content_type": "text/html"}),
        json!({"endpoint": "oauth.token", "kind": "delay", "delay_ms": 2000}),
    ];
    for fault in faults {
        app.sim_json(Method::POST, "/_sim/reset", Some(json!({})))
            .await;
        app.sim_fault(fault.clone()).await;
        let (status, body) = app.refresh(&id, &grant).await;
        assert_eq!(status, 503, "{fault}: {body}");
        assert_eq!(body["error"]["code"], "provider_unavailable", "{fault}");
        let connection = app.connection(&id).await;
        assert_eq!(
            connection["status"], "active",
            "{fault} left the connection active"
        );
        assert_eq!(connection["grant_id"], grant.as_str());
    }
    assert!(app
        .event_kinds(&id)
        .await
        .iter()
        .any(|k| k == "refresh_failed"));
}

async fn transient_token_endpoint_failures_are_retried_within_the_budget(backend: Backend) {
    let app = TestApp::start(backend).await;
    let (id, _) = app.connect("user-1").await;
    let grant = app.current_grant(&id).await;
    app.sim_fault(json!({"endpoint": "oauth.token", "kind": "status", "status": 503, "count": 2}))
        .await;
    let (status, body) = app.refresh(&id, &grant).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        app.sim_refreshes().await,
        3,
        "two 503s, then the refresh that worked"
    );
    assert_eq!(app.connection(&id).await["status"], "active");
}

async fn bad_input_gets_the_documented_status_and_stores_nothing(backend: Backend) {
    let app = TestApp::start(backend).await;
    let (id, _) = app.connect("user-1").await;
    let grants_before = app.grants(&id).await.len();
    let url = |p: &str| format!("{}{p}", app.url);

    // Keys.
    let r = app.http.get(url("/v1/connections")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "unauthorized"
    );
    let r = app
        .http
        .get(url("/v1/connections"))
        .bearer_auth("wrong-key-0123456789abcdef")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = app
        .http
        .post(url("/v1/connect-sessions"))
        .bearer_auth(TOKENS_KEY)
        .json(&json!({"provider": "notion", "end_user_id": "u", "return_to": url("/done")}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "a tokens key cannot create sessions");
    let r = app
        .http
        .get(url(&format!(
            "/v1/connections/{id}/access-token?include_refresh_token=true"
        )))
        .bearer_auth(TOKENS_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "a tokens key cannot read refresh tokens");
    let (status, body) = app
        .get_json(&format!(
            "/v1/connections/{id}/access-token?include_refresh_token=true"
        ))
        .await;
    assert_eq!(status, 200);
    assert!(
        body["refresh_token"].is_string(),
        "an admin key can, when it asks"
    );
    let (_, body) = app
        .get_json(&format!("/v1/connections/{id}/access-token"))
        .await;
    assert!(body.get("refresh_token").is_none(), "never unasked");

    // Ids and bodies.
    let (status, body) = app
        .get_json("/v1/connections/con_00000000000000000000000000000000")
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    let (status, body) = app.get_json("/v1/connections/not-an-id").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_request"))
    );
    let r = app
        .api(Method::POST, "/v1/connect-sessions")
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "invalid_request"
    );
    let (status, body) = app
        .post_json(
            &format!("/v1/connections/{id}/refresh"),
            json!({"if_grant": "nope"}),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_request"))
    );
    let (status, body) = app
        .post_json(
            "/v1/connect-sessions",
            json!({"provider": "notion", "end_user_id": "u", "return_to": "https://evil.example/steal"}),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("return_to_not_allowed"))
    );
    let evil_suffix = format!("{}.evil.example/", app.url);
    let (status, _) = app
        .post_json(
            "/v1/connect-sessions",
            json!({"provider": "notion", "end_user_id": "u", "return_to": evil_suffix}),
        )
        .await;
    assert_eq!(status, 400, "a prefix must end at a URL boundary");
    let (status, body) = app
        .post_json(
            "/v1/connect-sessions",
            json!({"provider": "github", "end_user_id": "u", "return_to": url("/done")}),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("unsupported_provider"))
    );

    // Replayed and forged state, on a second user in another workspace.
    app.sim_json(
        Method::POST,
        "/_sim/next-authorization",
        Some(json!({"workspace_id": "c0ffee00-0000-4000-8000-000000000002", "user_id": "c0ffee00-0000-4000-8000-000000000022", "outcome": "approve"})),
    )
    .await;
    let link = app.connect_link("user-2").await;
    let browser = Browser::new();
    let to_sim = browser.redirect(&link).await;
    let to_callback = browser.redirect(&to_sim).await;
    let landing = browser.redirect(&to_callback).await;
    assert!(landing.contains("status=connected"), "{landing}");
    let replay = browser.get(&to_callback).await;
    assert_eq!(replay.status(), 400, "a replayed callback is refused");
    assert!(replay.text().await.unwrap().contains("already"));
    let forged = to_callback.replace("state=", "state=forged");
    let forged = browser.get(&forged).await;
    assert_eq!(forged.status(), 400);
    let again = app.http.get(&link).send().await.unwrap();
    assert_eq!(
        again.status(),
        410,
        "a used link does not start another flow"
    );

    let (_, list) = app.get_json("/v1/connections").await;
    assert_eq!(
        list["data"].as_array().unwrap().len(),
        2,
        "only the two real authorizations"
    );
    assert_eq!(app.grants(&id).await.len(), grants_before);
}

async fn a_reconnect_answered_with_a_new_bot_id_keeps_the_connection_and_records_the_change(
    backend: Backend,
) {
    let app = TestApp::start(backend).await;
    let (id, _) = app.connect("user-1").await;
    let before = app.connection(&id).await;
    // The user uninstalled and reinstalled: Notion answers the reconnect with another bot.
    app.sim.update_config(|c| c.new_bot_id_on_reauth = true);
    let landing = app.reconnect(&id).await;
    assert_eq!(landing.connection_id.as_deref(), Some(id.as_str()));
    assert_eq!(landing.status, "reconnected");
    let after = app.connection(&id).await;
    assert_ne!(
        after["bot_id"], before["bot_id"],
        "the connection follows the new bot"
    );
    assert_eq!(after["end_user_id"], before["end_user_id"]);
    assert_eq!(
        app.grants(&id).await.len(),
        2,
        "the history stays with the connection"
    );
    assert!(app
        .event_kinds(&id)
        .await
        .iter()
        .any(|k| k == "bot_changed"));
    let (_, list) = app.get_json("/v1/connections").await;
    assert_eq!(
        list["data"].as_array().unwrap().len(),
        1,
        "no second connection appeared"
    );
}

async fn deleting_a_connection_revokes_upstream_and_keeps_the_history(backend: Backend) {
    let app = TestApp::start(backend).await;
    let (id, _) = app.connect("user-1").await;
    let (_, token) = app
        .get_json(&format!("/v1/connections/{id}/access-token"))
        .await;
    let access = token["access_token"].as_str().unwrap().to_owned();
    let r = app
        .api(Method::DELETE, &format!("/v1/connections/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["upstream_revoked"], true, "{body}");
    assert_eq!(body["connection"]["status"], "revoked");

    let upstream = app
        .http
        .get(format!("{}/v1/users/me", app.sim.base_url()))
        .bearer_auth(&access)
        .header("Notion-Version", "2026-03-11")
        .send()
        .await
        .unwrap();
    assert_eq!(upstream.status(), 401, "the token is dead at Notion");
    let (status, body) = app
        .get_json(&format!("/v1/connections/{id}/access-token"))
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (410, Some("connection_revoked"))
    );
    let grants = app.grants(&id).await;
    assert_eq!(grants.len(), 1, "the history is kept");
    assert!(grants[0]["revoked_at"].is_string());
    assert!(app.event_kinds(&id).await.iter().any(|k| k == "revoked"));
    // The grant is still readable in the ledger, sealed as it was.
    let cid = tokenkeeper::ids::ConnectionId::parse(&id).unwrap();
    let gid = tokenkeeper::ids::GrantId::parse(grants[0]["id"].as_str().unwrap()).unwrap();
    let kept = app
        .state
        .store
        .get_grant(&cid, &gid)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(kept.access_token.expose_secret(), access);
}

async fn a_timed_out_refresh_that_consumed_the_token_is_named_in_the_later_diagnosis(
    backend: Backend,
) {
    let options = Options {
        provider_timeout: Duration::from_millis(400),
        refresh_budget: Duration::from_millis(1000),
        ..Options::default()
    };
    let app = TestApp::with(backend, options).await;
    let (id, _) = app.connect("user-1").await;
    let grant = app.current_grant(&id).await;
    // Notion rotates the pair, but its answer arrives after our timeout.
    app.sim.update_config(|c| {
        c.latency
            .insert("oauth.token:refresh_token".into(), Duration::from_secs(2));
    });
    let (status, body) = app.refresh(&id, &grant).await;
    assert_eq!(status, 503, "a timeout is transient: {body}");
    assert_eq!(app.connection(&id).await["status"], "active");

    app.sim.update_config(|c| c.latency.clear());
    let (status, body) = app.refresh(&id, &grant).await;
    assert_eq!(
        status, 424,
        "the rotated-away refresh token is rejected: {body}"
    );
    let interrupted = &body["error"]["diagnosis"]["interrupted_attempt"];
    assert!(
        interrupted.is_object(),
        "the diagnosis names the attempt whose answer never arrived: {body}"
    );
}
