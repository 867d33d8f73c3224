//! The OAuth endpoints: authorize, the code's lifecycle, client auth, redirect_uri rules,
//! introspect and revoke.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;

use crate::{assert_oauth_error, query_param, Sim, REDIRECT};

fn authorize_query(redirect: Option<&str>) -> Vec<(&'static str, String)> {
    let mut query = vec![
        ("client_id", "tokenkeeper-dev".to_owned()),
        ("response_type", "code".to_owned()),
        ("owner", "user".to_owned()),
        ("state", "abc".to_owned()),
    ];
    if let Some(redirect) = redirect {
        query.push(("redirect_uri", redirect.to_owned()));
    }
    query
}

#[tokio::test]
async fn auto_approve_redirects_with_a_code_and_the_state() {
    let sim = Sim::start().await;
    let location = sim.authorize_location().await;
    assert!(location.as_str().starts_with(REDIRECT), "{location}");
    assert_eq!(query_param(&location, "state").as_deref(), Some("st4te"));
    let code = query_param(&location, "code").unwrap();
    assert!(
        uuid::Uuid::parse_str(&code).is_ok(),
        "uuid-like code: {code}"
    );
}

#[tokio::test]
async fn the_consent_page_offers_allow_and_cancel_and_both_redirect() {
    let sim = Sim::with(|c| c.auto_approve = false).await;
    let page = sim
        .send(
            sim.http
                .get(sim.url("/v1/oauth/authorize"))
                .query(&authorize_query(Some(REDIRECT))),
        )
        .await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    assert!(page.text.contains("Allow access") && page.text.contains("Cancel"));

    let mut form = authorize_query(Some(REDIRECT));
    form.push(("decision", "allow".to_owned()));
    let allowed = sim
        .send(sim.http.post(sim.url("/v1/oauth/authorize")).form(&form))
        .await;
    assert_eq!(allowed.status, StatusCode::FOUND);
    let location = url::Url::parse(allowed.headers["location"].to_str().unwrap()).unwrap();
    let code = query_param(&location, "code").expect("code after allow");
    assert_eq!(sim.exchange(&code).await.status, StatusCode::OK);

    form.pop();
    form.push(("decision", "cancel".to_owned()));
    let cancelled = sim
        .send(sim.http.post(sim.url("/v1/oauth/authorize")).form(&form))
        .await;
    let location = url::Url::parse(cancelled.headers["location"].to_str().unwrap()).unwrap();
    assert_eq!(
        query_param(&location, "error").as_deref(),
        Some("access_denied")
    );
    assert_eq!(query_param(&location, "state").as_deref(), Some(""));
    assert_eq!(query_param(&location, "code"), None);
}

#[tokio::test]
async fn the_consent_page_lets_the_person_pick_who_they_are() {
    let sim = &Sim::with(|c| c.auto_approve = false).await;
    let consent = |identity: Option<&str>| {
        let mut form = authorize_query(Some(REDIRECT));
        form.push(("decision", "allow".to_owned()));
        if let Some(identity) = identity {
            form.push(("identity", identity.to_owned()));
        }
        sim.send(sim.http.post(sim.url("/v1/oauth/authorize")).form(&form))
    };
    let bot_of = |answer: crate::Answer| async move {
        assert_eq!(answer.status, StatusCode::FOUND, "{}", answer.text);
        let location = url::Url::parse(answer.headers["location"].to_str().unwrap()).unwrap();
        let code = query_param(&location, "code").expect("a code");
        sim.exchange(&code).await.body["bot_id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let page = || async {
        sim.send(
            sim.http
                .get(sim.url("/v1/oauth/authorize"))
                .query(&authorize_query(Some(REDIRECT))),
        )
        .await
        .text
    };
    // On an empty simulator: the default user (made on approval) is offered and checked.
    let first = page().await;
    assert!(
        first.contains("The simulator&#39;s default user, in a new workspace"),
        "{first}"
    );
    assert!(first.contains("value=\"new\""));
    // Without a choice, as before: the default identity.
    let default_bot = bot_of(consent(None).await).await;
    // Now the default user is offered by name, checked, beside a new user in its workspace.
    let second = page().await;
    assert!(second.contains("Sim User"), "{second}");
    assert!(second.contains("A new user in Workspace"), "{second}");
    let checked = second
        .split("<input type=\"radio\" name=\"identity\" value=\"")
        .skip(1)
        .find(|field| field.contains("checked"))
        .and_then(|field| field.split('"').next())
        .unwrap()
        .to_owned();
    assert!(checked.starts_with("user:"), "{checked}");
    // The same user again re-authorizes the same bot; a new user makes another.
    assert_eq!(bot_of(consent(Some(&checked)).await).await, default_bot);
    let other = bot_of(consent(Some("new")).await).await;
    assert_ne!(other, default_bot);
    let workspace = checked.split(':').nth(1).unwrap();
    let colleague = bot_of(consent(Some(&format!("new-user:{workspace}"))).await).await;
    assert!(![&default_bot, &other].contains(&&colleague));
    // An identity the simulator does not know is refused, not guessed at.
    let refused = consent(Some("user:nope:nobody")).await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    assert!(refused.text.contains("not one this simulator knows"));
}

#[tokio::test]
async fn authorize_validates_its_parameters() {
    let sim = Sim::with(|c| c.redirect_uris = vec![REDIRECT.to_owned()]).await;
    let get = |query: Vec<(&'static str, String)>| {
        sim.send(sim.http.get(sim.url("/v1/oauth/authorize")).query(&query))
    };

    let mut wrong_client = authorize_query(Some(REDIRECT));
    wrong_client[0].1 = "someone-else".to_owned();
    assert_eq!(get(wrong_client).await.status, StatusCode::BAD_REQUEST);

    let unregistered = authorize_query(Some("http://evil.example/cb"));
    let answer = get(unregistered).await;
    assert_eq!(
        answer.status,
        StatusCode::BAD_REQUEST,
        "never redirect to an unregistered URI"
    );
    assert!(answer.headers.get("location").is_none());

    let mut wrong_type = authorize_query(Some(REDIRECT));
    wrong_type[1].1 = "token".to_owned();
    let answer = get(wrong_type).await;
    let location = url::Url::parse(answer.headers["location"].to_str().unwrap()).unwrap();
    assert_eq!(
        query_param(&location, "error").as_deref(),
        Some("unsupported_response_type")
    );

    let mut wrong_owner = authorize_query(Some(REDIRECT));
    wrong_owner[2].1 = "workspace".to_owned();
    let answer = get(wrong_owner).await;
    let location = url::Url::parse(answer.headers["location"].to_str().unwrap()).unwrap();
    assert_eq!(
        query_param(&location, "error").as_deref(),
        Some("invalid_request")
    );

    // With exactly one registered URI, the authorize URL may omit it.
    let answer = get(authorize_query(None)).await;
    assert_eq!(answer.status, StatusCode::FOUND);
    assert!(answer.headers["location"]
        .to_str()
        .unwrap()
        .starts_with(REDIRECT));
}

#[tokio::test]
async fn a_queued_deny_redirects_with_access_denied() {
    let sim = Sim::start().await;
    sim.control_post("/_sim/next-authorization", json!({"outcome": "deny"}))
        .await;
    let location = sim.authorize_location().await;
    assert_eq!(
        query_param(&location, "error").as_deref(),
        Some("access_denied")
    );
    // The queue entry is consumed: the next one is approved.
    let location = sim.authorize_location().await;
    assert!(query_param(&location, "code").is_some());
}

#[tokio::test]
async fn codes_are_single_use() {
    let sim = Sim::start().await;
    let code = sim.authorize().await;
    let first = sim.exchange(&code).await;
    assert_eq!(first.status, StatusCode::OK);
    let second = sim.exchange(&code).await;
    assert_oauth_error(&second, 400, "invalid_grant");
    assert_oauth_error(&sim.exchange("not-a-code").await, 400, "invalid_grant");
}

#[tokio::test]
async fn codes_expire() {
    let sim = Sim::manual(|c| c.code_ttl = Duration::from_millis(100)).await;
    let code = sim.authorize().await;
    sim.clock().advance(Duration::from_millis(250));
    assert_oauth_error(&sim.exchange(&code).await, 400, "invalid_grant");
    // The clock stands still, so the same short lifetime holds a fresh code however slow the
    // machine is.
    let fresh = sim.authorize().await;
    assert_eq!(sim.exchange(&fresh).await.status, StatusCode::OK);
}

#[tokio::test]
async fn the_token_endpoint_needs_basic_client_auth() {
    let sim = Sim::start().await;
    let code = sim.authorize().await;
    let body = json!({"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT});
    for request in [
        sim.http.post(sim.url("/v1/oauth/token")).json(&body),
        sim.http
            .post(sim.url("/v1/oauth/token"))
            .basic_auth("tokenkeeper-dev", Some("wrong"))
            .json(&body),
        sim.http
            .post(sim.url("/v1/oauth/token"))
            .bearer_auth("dev-secret-not-for-production")
            .json(&body),
    ] {
        let answer = sim.send(request).await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
        let keys: Vec<&String> = answer.body.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["error", "request_id"], "exactly the recorded shape");
        assert_eq!(answer.body["error"], "invalid_client");
    }
    // The refused attempts did not consume the code.
    assert_eq!(sim.exchange(&code).await.status, StatusCode::OK);
    for path in ["/v1/oauth/introspect", "/v1/oauth/revoke"] {
        let answer = sim
            .send(sim.http.post(sim.url(path)).json(&json!({"token": "x"})))
            .await;
        assert_oauth_error(&answer, 401, "invalid_client");
    }
}

#[tokio::test]
async fn the_token_endpoint_rejects_bad_requests() {
    let sim = Sim::start().await;
    assert_oauth_error(&sim.token(json!({})).await, 400, "invalid_request");
    assert_oauth_error(
        &sim.token(json!({"grant_type": "password"})).await,
        400,
        "unsupported_grant_type",
    );
    assert_oauth_error(
        &sim.token(json!({"grant_type": "authorization_code"})).await,
        400,
        "invalid_request",
    );
    assert_oauth_error(
        &sim.token(json!({"grant_type": "refresh_token"})).await,
        400,
        "invalid_request",
    );
    let not_json = sim
        .send(
            sim.http
                .post(sim.url("/v1/oauth/token"))
                .basic_auth("tokenkeeper-dev", Some("dev-secret-not-for-production"))
                .body("grant_type=refresh_token"),
        )
        .await;
    assert_oauth_error(&not_json, 400, "invalid_request");
}

/// notion-wire.md §2: required when the authorize URL carried one or several are registered;
/// rejected when exactly one is registered and the authorize URL omitted it.
async fn authorize_without_redirect(sim: &Sim) -> crate::Answer {
    let request = sim
        .http
        .get(sim.url("/v1/oauth/authorize"))
        .query(&authorize_query(None));
    sim.send(request).await
}

#[tokio::test]
async fn the_redirect_uri_rule_is_conditional() {
    // Authorize URL carried it: required, and must match.
    let sim = Sim::start().await;
    let code = sim.authorize().await;
    let missing = sim
        .token(json!({"grant_type": "authorization_code", "code": code}))
        .await;
    assert_oauth_error(&missing, 400, "invalid_request");
    let code = sim.authorize().await;
    let other = sim
        .token(json!({"grant_type": "authorization_code", "code": code, "redirect_uri": "http://localhost:3000/other"}))
        .await;
    assert_oauth_error(&other, 400, "invalid_grant");

    // Exactly one registered and omitted from the authorize URL: must be omitted.
    let sim = Sim::with(|c| c.redirect_uris = vec![REDIRECT.to_owned()]).await;
    let code_of = |answer: crate::Answer| {
        let location = url::Url::parse(answer.headers["location"].to_str().unwrap()).unwrap();
        query_param(&location, "code").unwrap()
    };
    let code = code_of(authorize_without_redirect(&sim).await);
    assert_oauth_error(&sim.exchange(&code).await, 400, "invalid_request");
    let code = code_of(authorize_without_redirect(&sim).await);
    let ok = sim
        .token(json!({"grant_type": "authorization_code", "code": code}))
        .await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text);

    // Several registered: required even when the authorize URL omitted it... which it cannot.
    let sim = Sim::with(|c| {
        c.redirect_uris = vec![REDIRECT.to_owned(), "http://localhost:4000/cb".to_owned()]
    })
    .await;
    let answer = authorize_without_redirect(&sim).await;
    assert_eq!(
        answer.status,
        StatusCode::BAD_REQUEST,
        "no default among several URIs"
    );
    let code = sim.authorize().await;
    let missing = sim
        .token(json!({"grant_type": "authorization_code", "code": code}))
        .await;
    assert_oauth_error(&missing, 400, "invalid_request");
}

#[tokio::test]
async fn the_token_response_has_every_documented_field_and_no_expiry() {
    let sim = Sim::start().await;
    let code = sim.authorize().await;
    let answer = sim.exchange(&code).await;
    let body = &answer.body;
    assert!(body["access_token"].as_str().unwrap().starts_with("ntn_"));
    assert!(body["refresh_token"].as_str().unwrap().starts_with("nrt_"));
    assert_eq!(body["token_type"], "bearer");
    assert!(uuid::Uuid::parse_str(body["bot_id"].as_str().unwrap()).is_ok());
    assert!(uuid::Uuid::parse_str(body["workspace_id"].as_str().unwrap()).is_ok());
    assert!(body["workspace_name"].is_string());
    assert!(body["workspace_icon"].is_null());
    assert_eq!(body["owner"]["type"], "user");
    assert_eq!(body["owner"]["user"]["object"], "user");
    assert!(body["owner"]["user"]["person"]["email"].is_string());
    assert!(body["duplicated_template_id"].is_null());
    assert!(body["request_id"].is_string());
    assert!(body.get("expires_in").is_none());
}

#[tokio::test]
async fn introspect_reports_live_tokens_with_iat_in_milliseconds() {
    let sim = Sim::start().await;
    let before = chrono::Utc::now().timestamp_millis();
    let pair = sim.connect().await;
    let answer = sim.introspect(&pair.access).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.body["active"], true);
    assert_eq!(
        answer.body["scope"],
        "read_content insert_content update_content read_user_with_email"
    );
    let iat = answer.body["iat"].as_i64().unwrap();
    assert!(
        iat >= before - 1000 && iat <= chrono::Utc::now().timestamp_millis() + 1000,
        "{iat} is in ms"
    );
    assert_eq!(sim.introspect("ntn_unknown").await.body["active"], false);
}

#[tokio::test]
async fn revoke_kills_the_token_given() {
    let sim = Sim::start().await;
    let pair = sim.connect().await;
    let answer = sim
        .send(
            sim.http
                .post(sim.url("/v1/oauth/revoke"))
                .basic_auth("tokenkeeper-dev", Some("dev-secret-not-for-production"))
                .json(&json!({"token": pair.access})),
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert!(answer.body["request_id"].is_string());
    assert_eq!(sim.me(&pair.access).await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(sim.introspect(&pair.access).await.body["active"], false);
}

#[tokio::test]
async fn a_workspace_owner_gives_the_legacy_owner_object() {
    let sim = Sim::with(|c| c.owner = notion_sim::OwnerKind::Workspace).await;
    let code = sim.authorize().await;
    let answer = sim.exchange(&code).await;
    assert_eq!(
        answer.body["owner"],
        json!({"type": "workspace", "workspace": true})
    );
    let access = answer.body["access_token"].as_str().unwrap();
    assert_eq!(
        sim.me(access).await.body["bot"]["owner"],
        json!({"type": "workspace", "workspace": true})
    );
}
