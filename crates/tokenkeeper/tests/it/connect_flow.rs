//! The connect flow as users and attackers use it (issue 11 §1, §2): the attempt is bound to
//! the browser that started it, a cancelled consent brings the user back to the app, and
//! `return_to` cannot leave the allow-list.

use std::time::Duration;

use serde_json::{json, Value};

use crate::both_backends;
use crate::support::app::{Browser, Landing, Options, TestApp};
use crate::support::db::Backend;

both_backends!(
    the_connect_link_sets_a_short_lived_httponly_lax_cookie_scoped_to_the_callback,
    a_cancelled_consent_sends_the_user_back_to_the_app_with_status_denied,
    a_callback_from_another_browser_is_refused_and_stores_nothing,
    a_callback_with_neither_state_nor_cookie_explains_and_offers_a_way_back,
    other_provider_errors_come_back_as_status_error_with_a_sanitised_code,
    a_return_to_is_checked_as_a_url_and_the_redirect_is_built_from_the_checked_url,
);

/// The simulator shows its consent page instead of approving at once.
fn with_consent_page() -> Options {
    let mut options = Options::default();
    options.sim.auto_approve = false;
    options
}

async fn connections(app: &TestApp) -> Vec<Value> {
    let (status, body) = app.get_json("/v1/connections").await;
    assert_eq!(status, 200, "{body}");
    body["data"].as_array().unwrap().clone()
}

/// The hidden fields of the simulator's consent form, as a browser would post them back.
fn consent_form(html: &str) -> Vec<(String, String)> {
    let unescape = |s: &str| {
        s.replace("&quot;", "\"")
            .replace("&#39;", "'")
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&amp;", "&")
    };
    html.split("<input type=\"hidden\" ")
        .skip(1)
        .map(|field| {
            let attr = |name: &str| {
                let start = field.find(&format!("{name}=\"")).unwrap() + name.len() + 2;
                unescape(&field[start..start + field[start..].find('"').unwrap()])
            };
            (attr("name"), attr("value"))
        })
        .collect()
}

/// A session's link, followed by `browser` up to Notion: returns the authorize URL.
async fn open_link(browser: &Browser, link: &str) -> String {
    browser.redirect(link).await
}

async fn the_connect_link_sets_a_short_lived_httponly_lax_cookie_scoped_to_the_callback(
    backend: Backend,
) {
    let app = TestApp::start(backend).await;
    let link = app.connect_link("user-1").await;
    let r = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(&link)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_redirection());
    let cookies: Vec<_> = r
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        cookies.len(),
        1,
        "one cookie names the attempt: {cookies:?}"
    );
    let attributes: Vec<String> = cookies[0]
        .split(';')
        .map(|a| a.trim().to_ascii_lowercase())
        .collect();
    assert!(
        attributes[0].starts_with("tokenkeeper_connect="),
        "{attributes:?}"
    );
    for wanted in ["httponly", "samesite=lax", "path=/oauth/callback"] {
        assert!(
            attributes.iter().any(|a| a == wanted),
            "{wanted} in {attributes:?}"
        );
    }
    assert!(
        !attributes.iter().any(|a| a == "secure"),
        "not Secure on an http public URL, or the browser would never send it back"
    );
    let max_age: i64 = attributes
        .iter()
        .find_map(|a| a.strip_prefix("max-age="))
        .expect("a lifetime")
        .parse()
        .unwrap();
    assert!(
        (590..=600).contains(&max_age),
        "the cookie lives as long as the session (600 s): {max_age}"
    );
}

async fn a_cancelled_consent_sends_the_user_back_to_the_app_with_status_denied(backend: Backend) {
    let app = TestApp::with(backend, with_consent_page()).await;
    let link = app.connect_link("user-1").await;
    let browser = Browser::new();
    let authorize = open_link(&browser, &link).await;
    let consent = browser.get(&authorize).await;
    assert_eq!(
        consent.status(),
        200,
        "the simulator shows its consent page"
    );
    let mut form = consent_form(&consent.text().await.unwrap());
    assert!(form.iter().any(|(k, _)| k == "state"), "{form:?}");
    // The user presses Cancel: the form posts back and Notion redirects with an empty state.
    form.push(("decision".into(), "cancel".into()));
    let cancelled = browser
        .client
        .post(format!("{}/v1/oauth/authorize", app.sim.base_url()))
        .form(&form)
        .send()
        .await
        .unwrap();
    assert_eq!(cancelled.status(), 302);
    let to_callback = cancelled.headers()["location"].to_str().unwrap().to_owned();
    let callback_query = url::Url::parse(&to_callback).unwrap();
    assert_eq!(
        callback_query.query(),
        Some("error=access_denied&state="),
        "Notion's cancel carries no state (notion-wire.md §1)"
    );

    let landing = Landing::of(&browser.redirect(&to_callback).await);
    assert_eq!(
        landing.url.path(),
        "/done",
        "back to the app: {}",
        landing.url
    );
    assert_eq!(landing.status, "denied");
    assert_eq!(landing.connection_id, None);
    assert!(connections(&app).await.is_empty(), "nothing was stored");
    let again = browser.get(&link).await;
    assert_eq!(
        again.status(),
        410,
        "the cancelled attempt's link is used up"
    );
    let replay = browser.get(&to_callback).await;
    assert_eq!(
        replay.status(),
        400,
        "the browser forgot the attempt: a second cancel finds nothing to end"
    );

    // A reconnect link cancelled the same way comes back with its connection, untouched.
    app.sim.update_config(|c| c.auto_approve = true);
    let (id, _) = app.connect("user-2").await;
    let grant = app.current_grant(&id).await;
    app.sim.update_config(|c| c.auto_approve = false);
    let (status, body) = app
        .post_json(
            &format!("/v1/connections/{id}/reconnect-sessions"),
            json!({}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let browser = Browser::new();
    let authorize = open_link(&browser, body["url"].as_str().unwrap()).await;
    let mut form = consent_form(&browser.get(&authorize).await.text().await.unwrap());
    form.push(("decision".into(), "cancel".into()));
    let cancelled = browser
        .client
        .post(format!("{}/v1/oauth/authorize", app.sim.base_url()))
        .form(&form)
        .send()
        .await
        .unwrap();
    let to_callback = cancelled.headers()["location"].to_str().unwrap().to_owned();
    let landing = Landing::of(&browser.redirect(&to_callback).await);
    assert_eq!(landing.status, "denied");
    assert_eq!(landing.connection_id.as_deref(), Some(id.as_str()));
    let connection = app.connection(&id).await;
    assert_eq!(connection["status"], "active");
    assert_eq!(connection["grant_id"], grant.as_str());
}

async fn a_callback_from_another_browser_is_refused_and_stores_nothing(backend: Backend) {
    let app = TestApp::start(backend).await;
    let alice = Browser::new();
    let link = app.connect_link("alice").await;
    let authorize = open_link(&alice, &link).await;
    // Notion approves and sends Alice's browser to the callback with a code and her state;
    // the test holds that hop and presents it from other browsers first.
    let to_callback = alice.redirect(&authorize).await;
    assert!(to_callback.contains("code=") && to_callback.contains("state="));

    let mallory = Browser::new();
    let r = mallory.get(&to_callback).await;
    assert_eq!(
        r.status(),
        400,
        "a browser without the attempt's cookie is refused"
    );
    let page = r.text().await.unwrap();
    assert!(page.contains("not started in this browser"), "{page}");
    assert!(
        page.contains("<a href="),
        "the page offers a way back: {page}"
    );

    let eve = Browser::new();
    let _ = open_link(&eve, &app.connect_link("eve").await).await;
    let r = eve.get(&to_callback).await;
    assert_eq!(
        r.status(),
        400,
        "a browser holding the cookie of another attempt is refused"
    );
    assert!(connections(&app).await.is_empty(), "nothing was stored");

    // Her own browser, with `state` twice: the callback's own page says so, with a way back,
    // not a deserialiser's message, and consumes nothing.
    let r = alice.get(&format!("{to_callback}&state=other")).await;
    assert_eq!(r.status(), 400);
    let page = r.text().await.unwrap();
    assert!(page.contains("carried `state` twice"), "{page}");
    assert!(!page.contains("deserialize"), "{page}");
    assert!(
        page.contains("<a href="),
        "the page offers a way back: {page}"
    );

    // Alice's own browser completes her attempt: the refusals consumed nothing.
    let landing = Landing::of(&alice.redirect(&to_callback).await);
    assert_eq!(landing.status, "connected");
    let listed = connections(&app).await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["end_user_id"], "alice");
}

async fn a_callback_with_neither_state_nor_cookie_explains_and_offers_a_way_back(backend: Backend) {
    let app = TestApp::start(backend).await;
    let r = Browser::new()
        .get(&format!(
            "{}/oauth/callback?error=access_denied&state=",
            app.url
        ))
        .await;
    assert_eq!(r.status(), 400);
    let page = r.text().await.unwrap();
    assert!(page.contains("Nothing was stored"), "{page}");
    assert!(
        page.contains(&format!("<a href=\"{}/\">", app.url)),
        "a link back to the application: {page}"
    );
    assert!(connections(&app).await.is_empty());
}

async fn other_provider_errors_come_back_as_status_error_with_a_sanitised_code(backend: Backend) {
    let app = TestApp::with(backend, with_consent_page()).await;

    // Without state (as Notion sends its errors), the cookie names the attempt.
    let browser = Browser::new();
    let _ = open_link(&browser, &app.connect_link("user-1").await).await;
    let landing = Landing::of(
        &browser
            .redirect(&format!(
                "{}/oauth/callback?error=server_error&state=",
                app.url
            ))
            .await,
    );
    assert_eq!(
        (landing.status.as_str(), landing.param("error").as_deref()),
        ("error", Some("server_error"))
    );

    // With the state, and a code that is no OAuth code: it is not passed on as it came.
    let browser = Browser::new();
    let authorize = open_link(&browser, &app.connect_link("user-1").await).await;
    let state = url::Url::parse(&authorize)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "state")
        .unwrap()
        .1
        .into_owned();
    let hostile = format!("<script>alert(1)</script>{}", "A".repeat(300));
    let mut callback = url::Url::parse(&format!("{}/oauth/callback", app.url)).unwrap();
    callback
        .query_pairs_mut()
        .append_pair("error", &hostile)
        .append_pair("state", &state);
    let landing = Landing::of(&browser.redirect(callback.as_str()).await);
    assert_eq!(landing.status, "error");
    assert_eq!(
        landing.param("error").as_deref(),
        Some("unrecognized_error")
    );
    assert!(connections(&app).await.is_empty());
}

async fn a_return_to_is_checked_as_a_url_and_the_redirect_is_built_from_the_checked_url(
    backend: Backend,
) {
    let options = Options {
        allowed_return_urls: Some(|url| format!("{url}/app/")),
        ..Options::default()
    };
    let app = TestApp::with(backend, options).await;
    let base = app.url.clone();
    let host_port = base.trim_start_matches("http://").to_owned();
    let hostile = [
        format!("{base}/app/../admin"),
        format!("{base}/app/%2e%2e/admin"),
        format!("{base}/app/%2E./admin"),
        format!("{base}/app/.%2e/admin"),
        format!("{base}/app/..\\admin"),
        format!("{base}/app\\..\\admin"),
        format!("{base}/app/.\t./admin"),
        format!("{base}/app/.\n./admin"),
        format!("{base}/app/./../admin"),
        format!("http://{host_port}.evil.example/app/"),
        format!("http://{host_port}@evil.example/app/"),
        format!("http://user:pw@{host_port}/app/"),
        format!("https://{host_port}/app/"),
        format!("{base}/application"),
        format!("{base}/App/"),
        "/app/".to_owned(),
        format!("//{host_port}/app/"),
        "javascript:alert(1)//app/".to_owned(),
    ];
    for return_to in &hostile {
        let (status, body) = app
            .post_json(
                "/v1/connect-sessions",
                json!({"provider": "notion", "end_user_id": "u", "return_to": return_to}),
            )
            .await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (400, Some("return_to_not_allowed")),
            "{return_to:?}: {body}"
        );
    }
    assert_eq!(
        app.db.count("SELECT count(*) FROM connect_sessions").await,
        0,
        "no refused return_to made a session"
    );

    // A dot segment that stays inside is resolved, and the user lands where the check looked.
    let (status, body) = app
        .post_json(
            "/v1/connect-sessions",
            json!({"provider": "notion", "end_user_id": "u", "return_to": format!("{base}/app/x/../done?from=tk")}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let landing = app.follow(body["url"].as_str().unwrap()).await;
    assert_eq!(landing.status, "connected");
    assert_eq!(landing.url.path(), "/app/done");
    assert_eq!(landing.param("from").as_deref(), Some("tk"));
    let (status, body) = app
        .post_json(
            "/v1/connect-sessions",
            json!({"provider": "notion", "end_user_id": "u", "return_to": format!("{base}/app")}),
        )
        .await;
    assert_eq!(
        status, 400,
        "`{base}/app/` does not admit `{base}/app`: {body}"
    );
}

/// A bad `TOKENKEEPER_ALLOWED_RETURN_URLS` entry stops `serve` before it listens, with one line
/// naming the setting and exit status 2.
#[tokio::test]
async fn bad_allowed_return_urls_stop_the_program_with_one_line_and_status_2() {
    let dir = tempfile::tempdir().unwrap();
    for entry in [
        "https://app.example/app?next=1",
        "https://app.example/app#top",
        "https://user@app.example/",
        "https://app.example/a/../b",
        "https://app.example/%2e%2e/admin",
        "https://app.example/a\\b",
    ] {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_tokenkeeper"));
        cmd.kill_on_drop(true).current_dir(dir.path()).arg("serve");
        for (k, _) in std::env::vars() {
            if k.starts_with("TOKENKEEPER_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("TOKENKEEPER_LISTEN", "127.0.0.1:0")
            .env("TOKENKEEPER_ALLOWED_RETURN_URLS", entry);
        let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
            .await
            .unwrap_or_else(|_| panic!("{entry:?} was accepted: the program started serving"))
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{entry:?}: {stderr}");
        let lines: Vec<_> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{entry:?}: {stderr}");
        assert!(
            lines[0].contains("TOKENKEEPER_ALLOWED_RETURN_URLS"),
            "{entry:?}: {stderr}"
        );
    }
}
