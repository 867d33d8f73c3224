//! The ledger against a model: random sequences of authorizations, re-authorizations (new pair
//! and same pair), reconnects, refreshes whose parent is current or stale by the time they
//! report, failures, needs_reauth, revocations and the passing of time. After every step the
//! store must agree with a plain in-memory model of DESIGN.md's rules: every pair ever
//! committed is still there and opens to the same tokens (invariants 1, 2), the current grant
//! is the one invariant 3 names, and the outcome of every call is the one the model predicts.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use tokenkeeper::clock::Clock;
use tokenkeeper::ids::{AttemptId, ConnectionId, GrantId, RefreshToken};
use tokenkeeper::ledger::{
    AuthorizationKind, ConnectionStatus, FailureOutcome, Fence, LeaseHolder, LeaseOutcome,
    MintedPair, RefreshCommit, RefreshFailure,
};
use tokenkeeper::store::{Store, StoreError};

use crate::support::db::{connect, key_ring, manual_clock, minted, reconnect, Backend, TestDb};

#[derive(Debug, Clone, Copy)]
enum Finish {
    Success,
    AuthFailure,
    Transient,
}

#[derive(Debug, Clone)]
enum Op {
    /// A plain connect session returns a pair for `bot-{bot}`; `same_pair` replays the pair
    /// that bot's live connection holds (legacy Notion), when there is one.
    Authorize {
        bot: usize,
        same_pair: bool,
    },
    /// A reconnect session of an existing connection returns a pair for `bot-{bot}`.
    Reconnect {
        conn: usize,
        bot: usize,
        same_pair: bool,
    },
    BeginRefresh {
        conn: usize,
        lease_secs: u64,
    },
    /// One refresh in flight reports back.
    FinishRefresh {
        pending: usize,
        finish: Finish,
    },
    Revoke {
        conn: usize,
    },
    Advance {
        secs: i64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let finish = prop_oneof![3 => Just(Finish::Success), 1 => Just(Finish::AuthFailure), 1 => Just(Finish::Transient)];
    prop_oneof![
        4 => (0..3usize, any::<bool>()).prop_map(|(bot, same_pair)| Op::Authorize { bot, same_pair }),
        1 => (any::<usize>(), 0..4usize, any::<bool>())
            .prop_map(|(conn, bot, same_pair)| Op::Reconnect { conn, bot, same_pair }),
        4 => (any::<usize>(), 1..60u64).prop_map(|(conn, lease_secs)| Op::BeginRefresh { conn, lease_secs }),
        4 => (any::<usize>(), finish).prop_map(|(pending, finish)| Op::FinishRefresh { pending, finish }),
        1 => any::<usize>().prop_map(|conn| Op::Revoke { conn }),
        2 => (1..90i64).prop_map(|secs| Op::Advance { secs }),
    ]
}

#[derive(Debug, Clone)]
struct ModelGrant {
    id: GrantId,
    access: String,
    refresh: Option<String>,
    superseded: bool,
    revoked: bool,
    stale_at_birth: bool,
}

#[derive(Debug)]
struct ModelConn {
    id: ConnectionId,
    bot: String,
    status: ConnectionStatus,
    current: GrantId,
    grants: Vec<ModelGrant>,
    fence: Fence,
    /// `Some` while a lease is held (it may have expired).
    lease_until: Option<DateTime<Utc>>,
}

impl ModelConn {
    fn grant(&mut self, id: &GrantId) -> &mut ModelGrant {
        self.grants
            .iter_mut()
            .find(|g| g.id == *id)
            .expect("the model knows the grant")
    }

    fn current(&self) -> &ModelGrant {
        self.grants.iter().find(|g| g.id == self.current).unwrap()
    }
}

#[derive(Debug)]
struct Pending {
    conn: ConnectionId,
    parent: GrantId,
    fence: Fence,
    attempt: AttemptId,
}

#[derive(Debug)]
struct ModelAttempt {
    grant: GrantId,
    fence: Fence,
    finished: bool,
    holder: LeaseHolder,
}

#[derive(Default)]
struct Model {
    conns: Vec<ModelConn>,
    pending: Vec<Pending>,
    attempts: HashMap<AttemptId, ModelAttempt>,
    minted: usize,
}

impl Model {
    fn conn(&mut self, id: &ConnectionId) -> &mut ModelConn {
        self.conns.iter_mut().find(|c| c.id == *id).unwrap()
    }

    fn live_with_bot(&self, bot: &str) -> Option<usize> {
        self.conns
            .iter()
            .position(|c| c.bot == bot && c.status != ConnectionStatus::Revoked)
    }

    fn fresh_pair(&mut self, bot: &str, clock: &Clock) -> MintedPair {
        self.minted += 1;
        minted(bot, &format!("m{}", self.minted), clock)
    }
}

fn model_grant(id: GrantId, pair: &MintedPair) -> ModelGrant {
    ModelGrant {
        id,
        access: pair.access_token.expose_secret().to_owned(),
        refresh: pair
            .refresh_token
            .as_ref()
            .map(|r| r.expose_secret().to_owned()),
        superseded: false,
        revoked: false,
        stale_at_birth: false,
    }
}

/// Replays the current grant's tokens under another bot id: what a legacy re-authorization returns.
fn same_pair_as(grant: &ModelGrant, bot: &str, clock: &Clock) -> MintedPair {
    let mut pair = minted(bot, "replayed", clock);
    pair.access_token = tokenkeeper::ids::AccessToken::new(grant.access.clone());
    pair.refresh_token = grant.refresh.clone().map(RefreshToken::new);
    pair
}

/// Applies an authorization that lands on model connection `idx` (the store said it would).
fn model_reauthorize(
    m: &mut ModelConn,
    pair: &MintedPair,
    bot: &str,
    confirmed: bool,
    new_grant: &GrantId,
) -> bool {
    m.bot = bot.to_owned();
    if !confirmed {
        let previous = m.current.clone();
        m.grant(&previous).superseded = true;
        m.grants.push(model_grant(new_grant.clone(), pair));
        m.current = new_grant.clone();
    }
    let recovered = m.status != ConnectionStatus::Active;
    m.status = ConnectionStatus::Active;
    recovered
}

async fn step(store: &Store, clock: &Clock, model: &mut Model, op: &Op) {
    match op.clone() {
        Op::Authorize { bot, same_pair } => {
            let bot = format!("bot-{bot}");
            let live = model.live_with_bot(&bot);
            let pair = match live {
                Some(i) if same_pair && !model.conns[i].current().revoked => {
                    same_pair_as(model.conns[i].current(), &bot, clock)
                }
                _ => model.fresh_pair(&bot, clock),
            };
            let out = store
                .record_authorization(connect("user", pair.clone()))
                .await
                .unwrap();
            match live {
                None => {
                    assert_eq!(out.kind, AuthorizationKind::Connected);
                    model.conns.push(ModelConn {
                        id: out.connection.id.clone(),
                        bot,
                        status: ConnectionStatus::Active,
                        current: out.grant_id.clone(),
                        grants: vec![model_grant(out.grant_id.clone(), &pair)],
                        fence: Fence(0),
                        lease_until: None,
                    });
                }
                Some(i) => {
                    let m = &mut model.conns[i];
                    assert_eq!(
                        out.connection.id, m.id,
                        "a live bot's authorization lands on its connection"
                    );
                    let confirmed = same_pair && !m.current().revoked;
                    let expected = if confirmed {
                        AuthorizationKind::Confirmed
                    } else {
                        AuthorizationKind::Reauthorized
                    };
                    assert_eq!(out.kind, expected);
                    let recovered = model_reauthorize(m, &pair, &bot, confirmed, &out.grant_id);
                    assert_eq!(out.recovered, recovered);
                }
            }
        }
        Op::Reconnect {
            conn,
            bot,
            same_pair,
        } => {
            if model.conns.is_empty() {
                return;
            }
            let i = conn % model.conns.len();
            let bot = format!("bot-{bot}");
            let target = &model.conns[i];
            let clash = (bot != target.bot || target.status == ConnectionStatus::Revoked)
                && model.live_with_bot(&bot).is_some_and(|j| j != i);
            let confirmed = same_pair && !target.current().revoked;
            let pair = if confirmed {
                same_pair_as(target.current(), &bot, clock)
            } else {
                model.fresh_pair(&bot, clock)
            };
            let id = model.conns[i].id.clone();
            let result = store
                .record_authorization(reconnect(&id, pair.clone()))
                .await;
            if clash {
                assert!(matches!(result, Err(StoreError::Conflict(_))), "{result:?}");
                return;
            }
            let out = result.unwrap();
            assert_eq!(out.connection.id, id);
            let expected = if confirmed {
                AuthorizationKind::Confirmed
            } else {
                AuthorizationKind::Reauthorized
            };
            assert_eq!(out.kind, expected);
            let recovered =
                model_reauthorize(&mut model.conns[i], &pair, &bot, confirmed, &out.grant_id);
            assert_eq!(out.recovered, recovered);
        }
        Op::BeginRefresh { conn, lease_secs } => {
            if model.conns.is_empty() {
                return;
            }
            let i = conn % model.conns.len();
            let now = clock.now();
            let holder = LeaseHolder::new(format!("holder-{}", model.attempts.len()));
            let m = &model.conns[i];
            let id = m.id.clone();
            let outcome = store
                .begin_refresh(&id, None, &holder, Duration::from_secs(lease_secs))
                .await
                .unwrap();
            if m.status != ConnectionStatus::Active {
                assert!(
                    matches!(outcome, LeaseOutcome::NotRefreshable { status, .. } if status == m.status),
                    "{outcome:?}"
                );
                return;
            }
            if let Some(until) = m.lease_until.filter(|until| *until > now) {
                assert!(
                    matches!(outcome, LeaseOutcome::Busy { until: u } if u == until),
                    "{outcome:?}"
                );
                return;
            }
            let LeaseOutcome::Acquired {
                fence,
                attempt_id,
                grant,
                interrupted,
            } = outcome
            else {
                panic!("expected the lease, got {outcome:?}");
            };
            let current = m.current().clone();
            assert_eq!(fence, m.fence.next());
            assert_eq!(
                grant.record.id, current.id,
                "the refresh reads the current grant"
            );
            assert_eq!(grant.access_token.expose_secret(), current.access);
            assert_eq!(
                grant
                    .refresh_token
                    .as_ref()
                    .map(|r| r.expose_secret().to_owned()),
                current.refresh
            );
            let expected_interrupted = model
                .attempts
                .iter()
                .filter(|(_, a)| a.grant == current.id && !a.finished)
                .max_by_key(|(_, a)| a.fence)
                .map(|(id, a)| (id.clone(), a.holder.clone()));
            assert_eq!(
                interrupted.map(|i| (i.attempt_id, i.holder)),
                expected_interrupted
            );
            for a in model
                .attempts
                .values_mut()
                .filter(|a| a.grant == current.id)
            {
                a.finished = true;
            }
            model.attempts.insert(
                attempt_id.clone(),
                ModelAttempt {
                    grant: current.id.clone(),
                    fence,
                    finished: false,
                    holder,
                },
            );
            let m = &mut model.conns[i];
            m.fence = fence;
            m.lease_until = Some(now + chrono::Duration::seconds(lease_secs as i64));
            model.pending.push(Pending {
                conn: id,
                parent: current.id,
                fence,
                attempt: attempt_id,
            });
        }
        Op::FinishRefresh { pending, finish } => {
            if model.pending.is_empty() {
                return;
            }
            let p = model.pending.remove(pending % model.pending.len());
            match finish {
                Finish::Success => {
                    let bot = model.conn(&p.conn).bot.clone();
                    let pair = model.fresh_pair(&bot, clock);
                    let rec = store
                        .record_refresh(
                            &p.conn,
                            &p.parent,
                            p.fence,
                            &p.attempt,
                            &GrantId::generate(),
                            pair.clone(),
                        )
                        .await
                        .unwrap();
                    model.attempts.get_mut(&p.attempt).unwrap().finished = true;
                    let m = model.conn(&p.conn);
                    let wins = m.status != ConnectionStatus::Revoked && m.current == p.parent;
                    let mut g = model_grant(rec.grant_id.clone(), &pair);
                    if wins {
                        assert_eq!(rec.commit, RefreshCommit::Current);
                        m.grant(&p.parent).superseded = true;
                        m.current = rec.grant_id.clone();
                        // A refresh of the current grant proves the connection alive: one that
                        // another holder judged dead meanwhile is recovered (invariant 1's late
                        // commit).
                        assert_eq!(rec.recovered, m.status == ConnectionStatus::NeedsReauth);
                        m.status = ConnectionStatus::Active;
                    } else {
                        assert_eq!(rec.commit, RefreshCommit::SupersededAtBirth);
                        g.superseded = true;
                        g.stale_at_birth = true;
                        g.revoked = m.status == ConnectionStatus::Revoked;
                    }
                    assert_eq!(rec.current, m.current);
                    m.grants.push(g);
                    if m.fence == p.fence {
                        m.lease_until = None;
                    }
                }
                Finish::AuthFailure | Finish::Transient => {
                    let auth = matches!(finish, Finish::AuthFailure);
                    let failure = RefreshFailure {
                        auth_failure: auth,
                        code: Some(
                            if auth {
                                "invalid_grant"
                            } else {
                                "rate_limited"
                            }
                            .into(),
                        ),
                        message: "model failure".into(),
                        provider_request_id: None,
                        outcome_unknown: false,
                        tried: vec![],
                    };
                    let outcome = store
                        .record_refresh_failure(&p.conn, &p.parent, p.fence, &p.attempt, &failure)
                        .await
                        .unwrap();
                    let m = model.conn(&p.conn);
                    if m.fence != p.fence {
                        assert_eq!(outcome, FailureOutcome::Fenced);
                        return;
                    }
                    m.lease_until = None;
                    let current = m.current.clone();
                    let expected = if current != p.parent {
                        FailureOutcome::AlreadyRotated { current }
                    } else if auth && m.status == ConnectionStatus::Active {
                        m.status = ConnectionStatus::NeedsReauth;
                        match &outcome {
                            FailureOutcome::NeedsReauth { diagnosis } => {
                                assert_eq!(diagnosis.grant_id.as_ref(), Some(&p.parent));
                                outcome.clone()
                            }
                            other => panic!("expected NeedsReauth, got {other:?}"),
                        }
                    } else {
                        FailureOutcome::Recorded
                    };
                    assert_eq!(outcome, expected);
                    model.attempts.get_mut(&p.attempt).unwrap().finished = true;
                }
            }
        }
        Op::Revoke { conn } => {
            if model.conns.is_empty() {
                return;
            }
            let i = conn % model.conns.len();
            let m = &mut model.conns[i];
            let after = store.mark_revoked(&m.id, "model").await.unwrap();
            assert_eq!(after.status, ConnectionStatus::Revoked);
            if m.status != ConnectionStatus::Revoked {
                m.status = ConnectionStatus::Revoked;
                m.lease_until = None;
                for g in &mut m.grants {
                    g.revoked = true;
                }
            }
        }
        Op::Advance { secs } => clock.advance(chrono::Duration::seconds(secs)),
    }
}

/// The store, read back in full, equals the model.
async fn agrees(store: &Store, model: &Model) {
    for m in &model.conns {
        let conn = store.get_connection(&m.id).await.unwrap().unwrap();
        assert_eq!(conn.status, m.status);
        assert_eq!(
            conn.grant_id.as_ref(),
            Some(&m.current),
            "the current grant is the one invariant 3 names"
        );
        assert_eq!(conn.bot_id.0, m.bot);
        let records = store.list_grants(&m.id).await.unwrap();
        assert_eq!(
            records.iter().map(|r| &r.id).collect::<Vec<_>>(),
            m.grants.iter().map(|g| &g.id).collect::<Vec<_>>(),
            "every grant ever committed, in commit order, and no other"
        );
        for (record, g) in records.iter().zip(&m.grants) {
            assert_eq!(
                record.superseded_at.is_some(),
                g.superseded,
                "superseded_at of {}",
                g.id
            );
            assert_eq!(
                record.revoked_at.is_some(),
                g.revoked,
                "revoked_at of {}",
                g.id
            );
            assert_eq!(
                record.stale_at_birth, g.stale_at_birth,
                "stale_at_birth of {}",
                g.id
            );
            let open = store.get_grant(&m.id, &g.id).await.unwrap().unwrap();
            assert_eq!(
                open.access_token.expose_secret(),
                g.access,
                "grant {} still opens to its pair",
                g.id
            );
            assert_eq!(
                open.refresh_token
                    .as_ref()
                    .map(|r| r.expose_secret().to_owned()),
                g.refresh
            );
        }
        let live: Vec<_> = records
            .iter()
            .filter(|r| r.superseded_at.is_none() && r.revoked_at.is_none())
            .map(|r| &r.id)
            .collect();
        if m.status == ConnectionStatus::Revoked {
            assert!(live.is_empty());
        } else {
            assert_eq!(
                live,
                [&m.current],
                "exactly one live grant, the current one"
            );
        }
        let (_, current) = store.current_grant(&m.id).await.unwrap().unwrap();
        assert_eq!(
            current.unwrap().access_token.expose_secret(),
            m.current().access
        );
    }
}

async fn run(backend: Backend, ops: Vec<Op>) {
    let clock = manual_clock();
    let db = TestDb::new(backend, key_ring().0, clock.clone()).await;
    let mut model = Model::default();
    for (n, op) in ops.iter().enumerate() {
        step(&db.store, &clock, &mut model, op).await;
        agrees(&db.store, &model).await;
        let _ = n;
    }
}

fn check(backend: Backend, cases: u32) {
    if backend == Backend::Postgres {
        crate::support::db::postgres_url();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: 200,
        ..Config::default()
    });
    let result = runner.run(&prop::collection::vec(op(), 1..40), |ops| {
        rt.block_on(run(backend, ops));
        Ok(())
    });
    if let Err(e) = result {
        panic!("the store disagrees with the model: {e}");
    }
}

#[test]
fn the_ledger_matches_its_model_sqlite() {
    check(Backend::Sqlite, 48);
}

#[test]
fn the_ledger_matches_its_model_postgres() {
    check(Backend::Postgres, 16);
}
