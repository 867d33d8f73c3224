//! Crashes (invariants 1, 4 and 5): `kill -9` of a serve process at random moments while
//! users connect and re-authorize and callers stampede refreshes, the process restarted each
//! time. Afterwards nothing a caller was answered with is missing from the ledger, no
//! connection is in `needs_reauth` without a diagnosis that names the interrupted refresh that
//! explains it, and every active connection's token works at Notion.
//!
//! Bounded in time and count: `TOKENKEEPER_CHAOS_KILLS` kills (default 5), each after a random
//! delay of at most 400 ms into a round of work; `TOKENKEEPER_CHAOS_SEED` replays a run (the
//! seed is printed). docs/RELIABILITY.md reports longer runs.

use std::collections::HashMap;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokenkeeper::ids::AccessToken;

use crate::both_backends;
use crate::support::app::{Api, Browser, Landing, Options, TestApp};
use crate::support::db::Backend;
use crate::support::process::{Broker, BrokerSpec};

both_backends!(
    after_kill_9s_at_random_moments_nothing_answered_is_missing_and_every_needs_reauth_is_explained
);

/// What a caller was told.
#[derive(Debug, Clone)]
enum Answer {
    Connected {
        connection: String,
    },
    Refreshed {
        connection: String,
        grant: String,
        access_fingerprint: String,
    },
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Follows a connect (or reconnect) link in a fresh browser to the `return_to` redirect;
/// `None` if a process died on the way.
async fn follow(link: &str) -> Option<Landing> {
    let browser = Browser::new();
    let mut url = link.to_owned();
    for _ in 0..3 {
        let r = browser.client.get(&url).send().await.ok()?;
        if !r.status().is_redirection() {
            return None;
        }
        url = r.headers().get("location")?.to_str().ok()?.to_owned();
    }
    Some(Landing::of(&url))
}

async fn connect(api: &Api, end_user: &str) -> Option<Answer> {
    let r = api
        .api(reqwest::Method::POST, "/v1/connect-sessions")
        .json(&json!({"provider": "notion", "end_user_id": end_user, "return_to": format!("{}/done", api.url)}))
        .send()
        .await
        .ok()?;
    let body: Value = r.json().await.ok()?;
    let landing = follow(body["url"].as_str()?).await?;
    Some(Answer::Connected {
        connection: landing.connection_id?,
    })
}

async fn reconnect(api: &Api, id: &str) -> Option<Answer> {
    let r = api
        .api(
            reqwest::Method::POST,
            &format!("/v1/connections/{id}/reconnect-sessions"),
        )
        .json(&json!({}))
        .send()
        .await
        .ok()?;
    let body: Value = r.json().await.ok()?;
    let landing = follow(body["url"].as_str()?).await?;
    Some(Answer::Connected {
        connection: landing.connection_id?,
    })
}

async fn refresh(api: &Api, id: &str, if_grant: &str) -> Option<Answer> {
    let r = api
        .api(
            reqwest::Method::POST,
            &format!("/v1/connections/{id}/refresh"),
        )
        .json(&json!({ "if_grant": if_grant }))
        .send()
        .await
        .ok()?;
    if r.status().as_u16() != 200 {
        return None;
    }
    let body: Value = r.json().await.ok()?;
    Some(Answer::Refreshed {
        connection: id.to_owned(),
        grant: body["grant_id"].as_str()?.to_owned(),
        access_fingerprint: AccessToken::new(body["access_token"].as_str()?.to_owned())
            .fingerprint(),
    })
}

async fn after_kill_9s_at_random_moments_nothing_answered_is_missing_and_every_needs_reauth_is_explained(
    backend: Backend,
) {
    let kills = env_number("TOKENKEEPER_CHAOS_KILLS", 5);
    let seed = env_number("TOKENKEEPER_CHAOS_SEED", rand::random());
    eprintln!("chaos: {kills} kills, seed {seed} (TOKENKEEPER_CHAOS_SEED replays it)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    let mut options = Options::default();
    options.sim.fresh_identity = true;
    // Refreshes take a moment at Notion, so that kills land in the middle of some.
    options.sim.latency.insert(
        "oauth.token:refresh_token".into(),
        Duration::from_millis(80),
    );
    let app = TestApp::with(backend, options).await;
    let spec = BrokerSpec {
        public_url: None,
        provider_timeout: Duration::from_secs(1),
        refresh_budget: Duration::from_secs(30),
        ..app.broker_spec()
    };
    let survivor: Broker = spec.start().await;
    let mut victim: Broker = spec.start().await;

    let mut answers: Vec<Answer> = Vec::new();
    let mut connections: Vec<String> = Vec::new();
    // Connections whose refresh was in flight at Notion when its process was killed.
    let mut held_kills: Vec<String> = Vec::new();
    for n in 0..3 {
        if let Some(Answer::Connected { connection }) =
            connect(&survivor, &format!("seed-user-{n}")).await
        {
            connections.push(connection);
        }
    }
    assert_eq!(connections.len(), 3);

    for round in 0..kills {
        let mut work = Vec::new();
        let apis = [survivor.url.clone(), victim.url.clone()];
        let pick = |rng: &mut rand::rngs::StdRng| {
            Api::new(apis[rng.gen_range(0..2)].clone(), app.sim.base_url())
        };
        for n in 0..3 {
            let api = pick(&mut rng);
            let user = format!("user-{round}-{n}");
            work.push(tokio::spawn(async move { connect(&api, &user).await }));
        }
        for _ in 0..2 {
            let api = pick(&mut rng);
            let id = pick_connection(&mut rng, &connections, &held_kills);
            work.push(tokio::spawn(async move { reconnect(&api, &id).await }));
        }
        // A stampede on one connection, across both processes.
        let id = pick_connection(&mut rng, &connections, &held_kills);
        if let Some(grant) = current_grant(&survivor, &id).await {
            for _ in 0..20 {
                let (api, id, grant) = (pick(&mut rng), id.clone(), grant.clone());
                work.push(tokio::spawn(
                    async move { refresh(&api, &id, &grant).await },
                ));
            }
        }
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..400))).await;
        victim.kill().await;
        let mut new_connections = Vec::new();
        for task in work {
            if let Some(answer) = task.await.unwrap() {
                if let Answer::Connected { connection } = &answer {
                    if !connections.contains(connection) {
                        connections.push(connection.clone());
                        new_connections.push(connection.clone());
                    }
                }
                answers.push(answer);
            }
        }
        victim = spec.start().await;

        // And one kill that lands for certain while Notion's answer to the victim's refresh is
        // on its way back: Notion minted a pair that never reached tokenkeeper. On a connection
        // made this round, whose grant came from an authorization: a grant refreshed moments
        // ago would not be refreshed again (409 token_rejected_after_refresh).
        let Some(id) = new_connections.first().cloned() else {
            continue;
        };
        if let Some(grant) = current_grant(&victim, &id).await {
            let hold = app.sim.hold("oauth.token:refresh_token");
            let before = hold.arrivals();
            let call = {
                let api = Api::new(victim.url.clone(), app.sim.base_url());
                let (id, grant) = (id.clone(), grant.clone());
                tokio::spawn(async move { refresh(&api, &id, &grant).await })
            };
            hold.arrived(before + 1).await;
            victim.kill().await;
            drop(hold);
            assert!(
                call.await.unwrap().is_none(),
                "a killed process answers nothing"
            );
            held_kills.push(id);
            victim = spec.start().await;
        }
    }

    assert!(
        !held_kills.is_empty(),
        "some rounds made a connection to kill a refresh of"
    );

    // Every connection is judged once more, after every dead holder's lease has run out: a
    // refresh spent by a killed process is found now, and must be explained.
    for id in &connections {
        if let Some(grant) = current_grant(&survivor, id).await {
            let _ = refresh(&survivor, id, &grant).await;
        }
    }

    // Nothing a caller was answered with is missing.
    let mut grants_of: HashMap<String, Vec<Value>> = HashMap::new();
    for id in &connections {
        grants_of.insert(id.clone(), survivor.grants(id).await);
    }
    let (mut connected, mut refreshed) = (0, 0);
    for answer in &answers {
        match answer {
            Answer::Connected { connection } => {
                connected += 1;
                assert!(grants_of.contains_key(connection), "{answer:?}");
            }
            Answer::Refreshed {
                connection,
                grant,
                access_fingerprint,
            } => {
                refreshed += 1;
                let kept = grants_of[connection].iter().any(|g| {
                    g["id"] == grant.as_str()
                        && g["access_token_fingerprint"] == access_fingerprint.as_str()
                });
                assert!(kept, "an answered refresh is in the ledger: {answer:?}");
            }
        }
    }

    // No connection is in needs_reauth without a kill to explain it; the others work.
    let mut explained = 0;
    for id in &connections {
        let connection = survivor.connection(id).await;
        match connection["status"].as_str().unwrap() {
            "active" => {
                let r = survivor
                    .api(reqwest::Method::GET, &format!("/v1/proxy/{id}/v1/users/me"))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status().as_u16(), 200, "active {id} works at Notion");
            }
            "needs_reauth" => {
                let diagnosis = &connection["diagnosis"];
                assert!(
                    diagnosis["interrupted_attempt"].is_object(),
                    "needs_reauth only where a killed refresh explains it: {connection}"
                );
                explained += 1;
            }
            other => panic!("{id} is {other}"),
        }
    }
    // A refresh killed in flight spent the connection's refresh token at Notion: the connection
    // was either rescued with another unused refresh token of its own, or it is in
    // needs_reauth naming that attempt.
    let mut rescued = 0;
    for id in &held_kills {
        let connection = survivor.connection(id).await;
        if connection["status"] == "active" {
            let kinds = survivor.event_kinds(id).await;
            assert!(
                kinds.iter().any(|k| k == "rescued"),
                "{id} is active after its refresh token was spent by a killed process: {kinds:?}"
            );
            rescued += 1;
        }
    }
    eprintln!(
        "chaos: {} kills ({} of them mid-refresh at Notion); {} connections; {connected} \
         connects and {refreshed} refreshes answered, all in the ledger; {explained} connections \
         in needs_reauth, each naming the interrupted refresh; {rescued} rescued",
        kills + held_kills.len() as u64,
        held_kills.len(),
        connections.len()
    );
}

/// A connection to work on: not one whose fate a mid-refresh kill is to decide (its fate is
/// judged at the end, untouched by later reconnects).
fn pick_connection(
    rng: &mut rand::rngs::StdRng,
    connections: &[String],
    held_kills: &[String],
) -> String {
    let open: Vec<&String> = connections
        .iter()
        .filter(|c| !held_kills.contains(c))
        .collect();
    open[rng.gen_range(0..open.len())].clone()
}

/// The connection's current grant, if it is active.
async fn current_grant(api: &Api, id: &str) -> Option<String> {
    let r = api
        .api(reqwest::Method::GET, &format!("/v1/connections/{id}"))
        .send()
        .await
        .ok()?;
    let body: Value = r.json().await.ok()?;
    if body["status"] != "active" {
        return None;
    }
    body["grant_id"].as_str().map(str::to_owned)
}
