//! Token lifecycles under every behaviour setting: rotation, reuse, re-authorization, previous
//! pairs, uninstall, access-token expiry, latency.

use std::time::{Duration, Instant};

use notion_sim::{PreviousPairPolicy, ReauthMode, RefreshReusePolicy};
use reqwest::StatusCode;
use serde_json::json;

use crate::{assert_notion_error, assert_oauth_error, Sim};

#[tokio::test]
async fn a_refresh_rotates_both_tokens_and_keeps_the_bot() {
    let sim = Sim::start().await;
    let first = sim.connect().await;
    let second = sim.refreshed(&first.refresh).await;
    assert_ne!(second.access, first.access);
    assert_ne!(second.refresh, first.refresh);
    assert_eq!(second.bot_id, first.bot_id);
    assert_eq!(second.workspace_id, first.workspace_id);
    assert_eq!(sim.me(&second.access).await.status, StatusCode::OK);
    // Refreshing again from the new refresh token works: the chain goes on.
    let third = sim.refreshed(&second.refresh).await;
    assert_eq!(sim.me(&third.access).await.status, StatusCode::OK);
}

#[tokio::test]
async fn reusing_a_refresh_token_is_rejected_by_default() {
    let sim = Sim::start().await;
    let first = sim.connect().await;
    let second = sim.refreshed(&first.refresh).await;
    assert_oauth_error(&sim.refresh(&first.refresh).await, 400, "invalid_grant");
    // Rejection alone changes nothing else: the newer pair still works.
    assert_eq!(sim.me(&second.access).await.status, StatusCode::OK);
    assert_eq!(sim.refresh(&second.refresh).await.status, StatusCode::OK);
}

#[tokio::test]
async fn reuse_within_the_grace_window_is_accepted_then_rejected() {
    let sim = Sim::manual(|c| {
        c.refresh_reuse = RefreshReusePolicy::Grace;
        c.refresh_grace = Duration::from_millis(1000);
    })
    .await;
    let first = sim.connect().await;
    let second = sim.refreshed(&first.refresh).await;
    let again = sim.refreshed(&first.refresh).await;
    assert_ne!(
        again.access, second.access,
        "a reuse within grace mints a pair"
    );
    assert_eq!(sim.me(&again.access).await.status, StatusCode::OK);
    sim.clock().advance(Duration::from_millis(1100));
    assert_oauth_error(&sim.refresh(&first.refresh).await, 400, "invalid_grant");
}

#[tokio::test]
async fn reuse_revokes_the_whole_grant_under_revoke_grant() {
    let sim = Sim::with(|c| c.refresh_reuse = RefreshReusePolicy::RevokeGrant).await;
    let first = sim.connect().await;
    let second = sim.refreshed(&first.refresh).await;
    assert_oauth_error(&sim.refresh(&first.refresh).await, 400, "invalid_grant");
    assert_notion_error(&sim.me(&second.access).await, 401, "unauthorized");
    assert_notion_error(&sim.me(&first.access).await, 401, "unauthorized");
    assert_oauth_error(&sim.refresh(&second.refresh).await, 400, "invalid_grant");
    // Only that grant: a new authorization of the same bot works.
    let fresh = sim.connect().await;
    assert_eq!(fresh.bot_id, first.bot_id);
    assert_eq!(sim.me(&fresh.access).await.status, StatusCode::OK);
}

#[tokio::test]
async fn reauthorization_mints_a_fresh_pair_for_the_same_bot_by_default() {
    let sim = Sim::start().await;
    let first = sim.connect().await;
    let second = sim.connect().await;
    assert_eq!(
        second.bot_id, first.bot_id,
        "same user, same workspace: same bot"
    );
    assert_ne!(second.access, first.access);
    assert_ne!(second.refresh, first.refresh);
    // Previous pair kept alive (default).
    assert_eq!(sim.me(&first.access).await.status, StatusCode::OK);
    assert_eq!(sim.refresh(&first.refresh).await.status, StatusCode::OK);
}

#[tokio::test]
async fn legacy_reauthorization_returns_the_active_pair() {
    let sim = Sim::with(|c| c.reauth = ReauthMode::Legacy).await;
    let first = sim.connect().await;
    let second = sim.connect().await;
    assert_eq!(second.access, first.access);
    assert_eq!(second.refresh, first.refresh);
    // After a refresh, the active pair is the refreshed one.
    let refreshed = sim.refreshed(&first.refresh).await;
    let third = sim.connect().await;
    assert_eq!(third.access, refreshed.access);
    assert_eq!(third.refresh, refreshed.refresh);
}

#[tokio::test]
async fn previous_pair_policies_on_reauthorization() {
    let sim = Sim::with(|c| c.previous_pair = PreviousPairPolicy::KillRefresh).await;
    let first = sim.connect().await;
    let second = sim.connect().await;
    assert_eq!(
        sim.me(&first.access).await.status,
        StatusCode::OK,
        "access kept"
    );
    assert_oauth_error(&sim.refresh(&first.refresh).await, 400, "invalid_grant");
    assert_eq!(sim.refresh(&second.refresh).await.status, StatusCode::OK);

    let sim = Sim::with(|c| c.previous_pair = PreviousPairPolicy::KillBoth).await;
    let first = sim.connect().await;
    let refreshed = sim.refreshed(&first.refresh).await;
    let second = sim.connect().await;
    for access in [&first.access, &refreshed.access] {
        assert_notion_error(&sim.me(access).await, 401, "unauthorized");
    }
    assert_oauth_error(&sim.refresh(&refreshed.refresh).await, 400, "invalid_grant");
    assert_eq!(sim.me(&second.access).await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_setting_mints_a_new_bot_id_on_reauthorization() {
    let sim = Sim::with(|c| c.new_bot_id_on_reauth = true).await;
    let first = sim.connect().await;
    let second = sim.connect().await;
    assert_ne!(second.bot_id, first.bot_id);
    assert_eq!(second.workspace_id, first.workspace_id);
}

#[tokio::test]
async fn fresh_identity_gives_every_authorization_its_own_workspace() {
    let sim = Sim::with(|c| c.fresh_identity = true).await;
    let first = sim.connect().await;
    let second = sim.connect().await;
    assert_ne!(second.bot_id, first.bot_id);
    assert_ne!(second.workspace_id, first.workspace_id);
}

#[tokio::test]
async fn queued_identities_decide_the_workspace_and_user() {
    let sim = Sim::start().await;
    sim.control_post(
        "/_sim/next-authorization",
        json!({"workspace_id": "ws-a", "user_id": "alice"}),
    )
    .await;
    sim.control_post(
        "/_sim/next-authorization",
        json!({"workspace_id": "ws-a", "user_id": "bob"}),
    )
    .await;
    let alice = sim.connect().await;
    let bob = sim.connect().await;
    assert_eq!(alice.workspace_id, "ws-a");
    assert_eq!(bob.workspace_id, "ws-a");
    assert_ne!(alice.bot_id, bob.bot_id, "two users, two bots");
    assert_eq!(sim.bot(&bob.bot_id).await["user_id"], "bob");
    // Queue empty again: the default identity, a third bot.
    let default = sim.connect().await;
    assert_ne!(default.workspace_id, "ws-a");
}

#[tokio::test]
async fn uninstalling_kills_every_token_and_a_reinstall_is_a_new_bot() {
    let sim = Sim::start().await;
    let first = sim.connect().await;
    let second = sim.connect().await;
    sim.control_post(&format!("/_sim/bots/{}/revoke", first.bot_id), json!({}))
        .await;
    for pair in [&first, &second] {
        assert_notion_error(&sim.me(&pair.access).await, 401, "unauthorized");
        assert_oauth_error(&sim.refresh(&pair.refresh).await, 400, "invalid_grant");
        assert_eq!(sim.introspect(&pair.access).await.body["active"], false);
    }
    let bot = sim.bot(&first.bot_id).await;
    assert_eq!(bot["status"], "uninstalled");
    assert_eq!(bot["live_access_token_fingerprints"], json!([]));
    let again = sim.connect().await;
    assert_ne!(again.bot_id, first.bot_id);
    assert_eq!(sim.me(&again.access).await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_code_issued_before_an_uninstall_cannot_be_exchanged() {
    let sim = Sim::start().await;
    let pair = sim.connect().await;
    let code = sim.authorize().await;
    sim.control_post(&format!("/_sim/bots/{}/revoke", pair.bot_id), json!({}))
        .await;
    assert_oauth_error(&sim.exchange(&code).await, 400, "invalid_grant");
}

#[tokio::test]
async fn access_tokens_expire_after_the_configured_ttl() {
    let sim = Sim::manual(|c| c.access_token_ttl = Some(Duration::from_millis(1000))).await;
    let pair = sim.connect().await;
    assert_eq!(sim.me(&pair.access).await.status, StatusCode::OK);
    sim.clock().advance(Duration::from_millis(1100));
    assert_notion_error(&sim.me(&pair.access).await, 401, "unauthorized");
    assert_eq!(sim.introspect(&pair.access).await.body["active"], false);
    // The refresh token outlives it.
    let refreshed = sim.refreshed(&pair.refresh).await;
    assert_eq!(sim.me(&refreshed.access).await.status, StatusCode::OK);
}

#[tokio::test]
async fn access_tokens_never_expire_by_default() {
    let sim = Sim::manual(|_| {}).await;
    let pair = sim.connect().await;
    // A TTL set later applies to existing tokens; clearing it brings them back.
    sim.clock().advance(Duration::from_secs(365 * 24 * 3600));
    assert_eq!(sim.me(&pair.access).await.status, StatusCode::OK);
    sim.server
        .update_config(|c| c.access_token_ttl = Some(Duration::from_millis(1)));
    assert_eq!(sim.me(&pair.access).await.status, StatusCode::UNAUTHORIZED);
    sim.server.update_config(|c| c.access_token_ttl = None);
    assert_eq!(sim.me(&pair.access).await.status, StatusCode::OK);
}

/// The latency is spent after the refresh happened: a client that gives up early has lost its
/// refresh token.
///
/// Latency is real time by design (it models a slow network, whatever the simulator's clock),
/// so this test uses real time too, without a bound that a loaded machine could miss: it waits
/// until the refresh was processed, sees that the answer has not come, and gives up then.
#[tokio::test]
async fn latency_is_spent_after_processing() {
    let sim = Sim::with(|c| {
        c.latency
            .insert("oauth.token:refresh_token".into(), Duration::from_secs(60));
        c.latency
            .insert("oauth.token".into(), Duration::from_millis(0));
    })
    .await;
    let pair = sim.connect().await;

    let hurried = tokio::spawn(
        sim.http
            .post(sim.url("/v1/oauth/token"))
            .basic_auth("tokenkeeper-dev", Some("dev-secret-not-for-production"))
            .json(&json!({"grant_type": "refresh_token", "refresh_token": pair.refresh}))
            .send(),
    );
    let live = |bot: serde_json::Value| {
        bot["live_access_token_fingerprints"]
            .as_array()
            .unwrap()
            .len()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while live(sim.bot(&pair.bot_id).await) < 2 {
        assert!(Instant::now() < deadline, "the refresh was never processed");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(
        !hurried.is_finished(),
        "the refresh was processed and its answer is still on the way"
    );
    hurried.abort();
    assert_eq!(live(sim.bot(&pair.bot_id).await), 2);

    // Grant-specific latency does not apply to the code grant: its answer comes long before
    // the refresh's 60 s could pass.
    let code = sim.authorize().await;
    let answer = sim
        .http
        .post(sim.url("/v1/oauth/token"))
        .basic_auth("tokenkeeper-dev", Some("dev-secret-not-for-production"))
        .timeout(Duration::from_secs(30))
        .json(&json!({"grant_type": "authorization_code", "code": code, "redirect_uri": crate::REDIRECT}))
        .send()
        .await
        .expect("the code grant answers without the refresh latency");
    assert_eq!(answer.status(), StatusCode::OK);

    // The refresh happened anyway: the old refresh token is spent. (Without the latency now,
    // which the refusal would otherwise wait out too.)
    sim.server.update_config(|config| config.latency.clear());
    assert_oauth_error(&sim.refresh(&pair.refresh).await, 400, "invalid_grant");
}

/// Real time, as latency is: the claim is that the answer took at least the latency, a lower
/// bound that a slow machine can only exceed.
#[tokio::test]
async fn endpoint_latency_slows_rest_answers() {
    let sim = Sim::with(|c| {
        c.latency
            .insert("users.me".into(), Duration::from_millis(300));
    })
    .await;
    let pair = sim.connect().await;
    let started = Instant::now();
    assert_eq!(sim.me(&pair.access).await.status, StatusCode::OK);
    assert!(started.elapsed() >= Duration::from_millis(300));
}
