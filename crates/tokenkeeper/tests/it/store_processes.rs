//! Real concurrency on one connection: several tokio tasks in this process and two more OS
//! processes (this test binary again, running the ignored `child_burst`) refresh and
//! re-authorize the same connection on one database at once. Afterwards nothing minted is
//! lost, exactly one grant is current, and the audit trail replays as invariant 3 says:
//! every refresh that became current had a current parent; every other one is stale at birth.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use serde::{Deserialize, Serialize};
use tokenkeeper::clock::Clock;
use tokenkeeper::ids::{ConnectionId, GrantId};
use tokenkeeper::ledger::{
    AuthorizationKind, EventKind, GrantOrigin, LeaseHolder, LeaseOutcome, RefreshCommit,
};
use tokenkeeper::seal::KeyRing;
use tokenkeeper::store::{self, DatabaseUrl, Store};

use crate::both_backends;
use crate::support::db::{connect, key_ring, minted, reconnect, Backend, TestDb};

const BOT: &str = "bot-shared";
const ROUNDS: usize = 24;
const TASKS: usize = 4;
const CHILDREN: usize = 2;

/// One pair a worker saw committed.
#[derive(Debug, Serialize, Deserialize)]
struct Committed {
    grant: GrantId,
    access: String,
    refresh: Option<String>,
    /// For a refresh: whether it became current.
    current: Option<bool>,
}

/// A burst of refreshes and re-authorizations of one connection, as a busy broker would make:
/// some leases are shorter than the "provider call", so others take over and fences move.
async fn burst(store: Store, id: ConnectionId, tag: String) -> Vec<Committed> {
    let clock = Clock::System;
    let mut committed = Vec::new();
    for round in 0..ROUNDS {
        let (reauth, lease, work, pause) = {
            let mut rng = rand::thread_rng();
            (
                rng.gen_ratio(1, 6),
                if rng.gen_ratio(1, 3) {
                    Duration::from_millis(15)
                } else {
                    Duration::from_secs(10)
                },
                Duration::from_millis(rng.gen_range(0..30)),
                Duration::from_millis(rng.gen_range(1..10)),
            )
        };
        if reauth {
            let pair = minted(BOT, &format!("{tag}-auth-{round}"), &clock);
            // Alternate the plain connect path (advisory lock) and the reconnect path (row lock).
            let auth = if round % 2 == 0 {
                connect("user", pair.clone())
            } else {
                reconnect(&id, pair.clone())
            };
            let out = store.record_authorization(auth).await.unwrap();
            assert_eq!(out.connection.id, id);
            assert_eq!(out.kind, AuthorizationKind::Reauthorized);
            committed.push(Committed {
                grant: out.grant_id,
                access: pair.access_token.expose_secret().to_owned(),
                refresh: pair.refresh_token.map(|r| r.expose_secret().to_owned()),
                current: None,
            });
            continue;
        }
        match store
            .begin_refresh(
                &id,
                None,
                &LeaseHolder::new(format!("{tag}-{round}")),
                lease,
            )
            .await
            .unwrap()
        {
            LeaseOutcome::Acquired {
                fence,
                attempt_id,
                grant,
                ..
            } => {
                tokio::time::sleep(work).await;
                let pair = minted(BOT, &format!("{tag}-refresh-{round}"), &clock);
                let rec = store
                    .record_refresh(
                        &id,
                        &grant.record.id,
                        fence,
                        &attempt_id,
                        &GrantId::generate(),
                        pair.clone(),
                    )
                    .await
                    .unwrap();
                committed.push(Committed {
                    grant: rec.grant_id,
                    access: pair.access_token.expose_secret().to_owned(),
                    refresh: pair.refresh_token.map(|r| r.expose_secret().to_owned()),
                    current: Some(rec.commit == RefreshCommit::Current),
                });
            }
            LeaseOutcome::Busy { .. } => tokio::time::sleep(pause).await,
            other => panic!("unexpected {other:?}"),
        }
    }
    committed
}

both_backends!(tasks_and_processes_writing_one_connection_lose_nothing_and_keep_invariant_3);

async fn tasks_and_processes_writing_one_connection_lose_nothing_and_keep_invariant_3(
    backend: Backend,
) {
    let (keys, entry) = key_ring();
    let db = TestDb::new(backend, keys, Clock::System).await;
    let origin = db
        .store
        .record_authorization(connect("user", minted(BOT, "origin", &Clock::System)))
        .await
        .unwrap();
    let id = origin.connection.id.clone();
    let out_dir = tempfile::tempdir().unwrap();

    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..CHILDREN)
        .map(|n| {
            let out = out_dir.path().join(format!("child-{n}.json"));
            let child = tokio::process::Command::new(&exe)
                .args([
                    "--exact",
                    "store_processes::child_burst",
                    "--ignored",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env("TK_CHILD_DATABASE_URL", &db.url)
                .env("TK_CHILD_KEY_RING", &entry)
                .env("TK_CHILD_CONNECTION", id.as_str())
                .env("TK_CHILD_TAG", format!("proc{n}"))
                .env("TK_CHILD_OUT", &out)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .expect("the test binary runs again as a child");
            (child, out)
        })
        .collect();
    let tasks: Vec<_> = (0..TASKS)
        .map(|n| tokio::spawn(burst((*db.store).clone(), id.clone(), format!("task{n}"))))
        .collect();

    let mut committed = Vec::new();
    for task in tasks {
        committed.extend(task.await.unwrap());
    }
    for (child, out) in children {
        let output = child.wait_with_output().await.unwrap();
        assert!(
            output.status.success(),
            "a child process failed: {output:?}"
        );
        let theirs: Vec<Committed> = serde_json::from_slice(
            &std::fs::read(&out).expect("the child wrote what it committed"),
        )
        .unwrap();
        assert!(!theirs.is_empty(), "the child committed something");
        committed.extend(theirs);
    }

    let s = &*db.store;
    // Nothing minted is lost: every pair any worker saw committed is there and opens.
    for c in &committed {
        let open = s
            .get_grant(&id, &c.grant)
            .await
            .unwrap()
            .expect("a committed grant exists");
        assert_eq!(open.access_token.expose_secret(), c.access);
        assert_eq!(
            open.refresh_token
                .as_ref()
                .map(|r| r.expose_secret().to_owned()),
            c.refresh
        );
        if let Some(current) = c.current {
            assert_eq!(open.record.stale_at_birth, !current);
        }
    }
    let grants = s.list_grants(&id).await.unwrap();
    assert_eq!(
        grants.len(),
        committed.len() + 1,
        "the ledger holds exactly what was committed"
    );

    // Exactly one live grant, and it is the current one.
    let conn = s.get_connection(&id).await.unwrap().unwrap();
    let live: Vec<_> = grants
        .iter()
        .filter(|g| g.superseded_at.is_none() && g.revoked_at.is_none())
        .map(|g| &g.id)
        .collect();
    assert_eq!(live, [conn.grant_id.as_ref().unwrap()]);

    // Replay the trail in commit order: the pointer moves only as invariant 3 allows.
    let by_id: std::collections::HashMap<_, _> = grants.iter().map(|g| (&g.id, g)).collect();
    let mut current = origin.grant_id.clone();
    let (mut refreshed, mut stale) = (0, 0);
    for e in s.list_events(&id).await.unwrap() {
        match e.kind {
            EventKind::Reauthorized => current = e.grant_id.clone().unwrap(),
            EventKind::Refreshed => {
                let grant = e.grant_id.clone().unwrap();
                assert_eq!(
                    e.related_grant_id.as_ref(),
                    Some(&current),
                    "a refresh became current from a stale parent"
                );
                assert_eq!(by_id[&grant].parent_grant_id.as_ref(), Some(&current));
                assert!(!by_id[&grant].stale_at_birth);
                current = grant;
                refreshed += 1;
            }
            EventKind::Superseded if e.detail["by"] == "superseded_at_birth" => {
                let grant = by_id[e.grant_id.as_ref().unwrap()];
                assert!(grant.stale_at_birth);
                assert_ne!(
                    grant.parent_grant_id.as_ref(),
                    Some(&current),
                    "a refresh of the current grant was shelved"
                );
                stale += 1;
            }
            _ => {}
        }
    }
    assert_eq!(
        Some(&current),
        conn.grant_id.as_ref(),
        "the replayed pointer is the stored pointer"
    );
    let refreshes = grants
        .iter()
        .filter(|g| g.origin == GrantOrigin::Refresh)
        .count();
    assert_eq!(
        refreshed + stale,
        refreshes,
        "every refresh grant is either current-at-birth or stale-at-birth"
    );
    assert!(refreshes > 0, "the burst refreshed at least once");

    // Whatever the race left behind, the connection refreshes normally afterwards.
    let LeaseOutcome::Acquired {
        fence,
        attempt_id,
        grant,
        ..
    } = s
        .begin_refresh(
            &id,
            None,
            &LeaseHolder::new("after"),
            Duration::from_secs(10),
        )
        .await
        .unwrap()
    else {
        panic!("every lease was released or has expired");
    };
    assert_eq!(Some(&grant.record.id), conn.grant_id.as_ref());
    let rec = s
        .record_refresh(
            &id,
            &grant.record.id,
            fence,
            &attempt_id,
            &GrantId::generate(),
            minted(BOT, "after", &Clock::System),
        )
        .await
        .unwrap();
    assert_eq!(rec.commit, RefreshCommit::Current);
}

/// The other process of the test above; does nothing when run on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a child process of tasks_and_processes_writing_one_connection_lose_nothing_and_keep_invariant_3"]
async fn child_burst() {
    let Ok(url) = std::env::var("TK_CHILD_DATABASE_URL") else {
        return;
    };
    let keys = Arc::new(KeyRing::parse(&std::env::var("TK_CHILD_KEY_RING").unwrap()).unwrap());
    let id = ConnectionId::parse(&std::env::var("TK_CHILD_CONNECTION").unwrap()).unwrap();
    let tag = std::env::var("TK_CHILD_TAG").unwrap();
    let out = std::env::var("TK_CHILD_OUT").unwrap();
    let store = store::open(&DatabaseUrl::parse(&url).unwrap(), keys, Clock::System)
        .await
        .unwrap();
    store
        .check_schema()
        .await
        .expect("the parent migrated the database");
    // Two tasks in this process too, so each process has concurrency of its own.
    let a = tokio::spawn(burst(store.clone(), id.clone(), format!("{tag}a")));
    let b = tokio::spawn(burst(store.clone(), id.clone(), format!("{tag}b")));
    let mut committed = a.await.unwrap();
    committed.extend(b.await.unwrap());
    std::fs::write(out, serde_json::to_vec(&committed).unwrap()).unwrap();
}
