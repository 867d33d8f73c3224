//! The admin console over HTTP: who may sign in, the session cookie, CSRF on every form, the
//! limit on failed sign-ins, a `needs_reauth` connection explained with its reconnect link, no
//! token on any page, and the page a connect without `return_to` ends on. (The same pages in
//! a real browser: `tests/node/console.test.mjs`.)

use reqwest::header::{LOCATION, RETRY_AFTER, SET_COOKIE};
use serde_json::json;

use crate::both_backends;
use crate::support::app::{Browser, TestApp, ADMIN_KEY, TOKENS_KEY};
use crate::support::db::Backend;

both_backends!(
    only_an_admin_key_signs_in_and_every_form_needs_its_sessions_csrf_token,
    a_needs_reauth_connection_is_explained_with_its_reconnect_link_and_no_page_shows_a_token,
    a_connect_session_without_return_to_ends_on_the_connected_page,
);

/// A person's browser on the console: keeps cookies, does not follow redirects.
struct Admin {
    browser: Browser,
    url: String,
}

impl Admin {
    fn new(app: &TestApp) -> Admin {
        Admin {
            browser: Browser::new(),
            url: app.url.clone(),
        }
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        self.browser.get(&format!("{}{path}", self.url)).await
    }

    async fn page(&self, path: &str) -> String {
        let r = self.get(path).await;
        assert_eq!(r.status(), 200, "GET {path}");
        r.text().await.unwrap()
    }

    async fn post(&self, path: &str, form: &[(&str, &str)]) -> reqwest::Response {
        self.browser
            .client
            .post(format!("{}{path}", self.url))
            .form(form)
            .send()
            .await
            .unwrap()
    }

    /// Fills the sign-in form with `key` and sends it, as a person would.
    async fn sign_in(&self, key: &str) -> reqwest::Response {
        let form = self.page("/admin").await;
        let csrf = csrf_of(&form);
        self.post("/admin/sign-in", &[("key", key), ("csrf", &csrf)])
            .await
    }

    /// The CSRF token of the forms on the page at `path`.
    async fn csrf(&self, path: &str) -> String {
        csrf_of(&self.page(path).await)
    }
}

fn csrf_of(html: &str) -> String {
    let start = html
        .find("name=\"csrf\" value=\"")
        .expect("the page has a form with a CSRF token")
        + "name=\"csrf\" value=\"".len();
    html[start..start + html[start..].find('"').unwrap()].to_owned()
}

fn location(r: &reqwest::Response) -> String {
    r.headers()[LOCATION].to_str().unwrap().to_owned()
}

/// The session cookie a response sets, if it sets one with a value.
fn session_cookie(r: &reqwest::Response) -> Option<String> {
    r.headers()
        .get_all(SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|c| c.starts_with("tokenkeeper_admin=") && !c.starts_with("tokenkeeper_admin=;"))
        .map(str::to_owned)
}

async fn only_an_admin_key_signs_in_and_every_form_needs_its_sessions_csrf_token(backend: Backend) {
    let app = TestApp::start(backend).await;
    let (id, _) = app.connect("user-a").await;
    let admin = Admin::new(&app);
    let status_of = |body: serde_json::Value| body["status"].as_str().unwrap().to_owned();

    // Signed out, every page sends the browser to sign in, and no action is taken.
    let r = admin.get("/admin/connections").await;
    assert_eq!((r.status().as_u16(), location(&r)), (303, "/admin".into()));
    let r = admin
        .post(&format!("/admin/connections/{id}/revoke"), &[("csrf", "x")])
        .await;
    assert_eq!((r.status().as_u16(), location(&r)), (303, "/admin".into()));
    assert_eq!(status_of(app.connection(&id).await), "active");

    // The sign-in form carries a token of its own: a form posted from elsewhere is refused
    // before the key is looked at.
    let r = admin
        .post("/admin/sign-in", &[("key", ADMIN_KEY), ("csrf", "forged")])
        .await;
    assert_eq!(r.status(), 403);
    assert_eq!(session_cookie(&r), None);

    // A tokens key and an unknown key do not sign in.
    let r = admin.sign_in(TOKENS_KEY).await;
    assert_eq!(r.status(), 403);
    assert_eq!(session_cookie(&r), None);
    assert!(r.text().await.unwrap().contains("That is a tokens key"));
    let r = admin.sign_in("no-such-key-0123456789abcdef").await;
    assert_eq!(r.status(), 401);
    assert_eq!(session_cookie(&r), None);
    assert_eq!(admin.get("/admin/connections").await.status(), 303);

    // An admin key does, with a cookie scripts cannot read and other sites cannot send.
    let r = admin.sign_in(ADMIN_KEY).await;
    assert_eq!(
        (r.status().as_u16(), location(&r)),
        (303, "/admin/connections".into())
    );
    let cookie = session_cookie(&r).expect("a session cookie");
    for part in [
        "HttpOnly",
        "SameSite=Strict",
        "Path=/admin",
        "Max-Age=28800",
    ] {
        assert!(cookie.split("; ").any(|p| p == part), "{part} in {cookie}");
    }
    assert!(
        !cookie.contains("Secure"),
        "the public URL is http: {cookie}"
    );
    let value = cookie["tokenkeeper_admin=".len()..]
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    assert!(admin.page("/admin/connections").await.contains(&id));

    // Every action needs this session's CSRF token: none, or another session's, does nothing.
    let other = Admin::new(&app);
    assert_eq!(other.sign_in(ADMIN_KEY).await.status(), 303);
    let others = other.csrf("/admin/connections").await;
    let mine = admin.csrf(&format!("/admin/connections/{id}")).await;
    assert_ne!(mine, others);
    for form in [vec![], vec![("csrf", others.as_str())]] {
        let r = admin
            .post(&format!("/admin/connections/{id}/revoke"), &form)
            .await;
        assert_eq!(r.status(), 403, "{form:?}");
        assert_eq!(status_of(app.connection(&id).await), "active");
    }
    let confirm = admin.page(&format!("/admin/connections/{id}/revoke")).await;
    assert!(confirm.contains("Revoke this connection?"));
    let r = admin
        .post(
            &format!("/admin/connections/{id}/revoke"),
            &[("csrf", &csrf_of(&confirm))],
        )
        .await;
    assert_eq!(
        (r.status().as_u16(), location(&r)),
        (303, format!("/admin/connections/{id}?done=revoked"))
    );
    assert_eq!(status_of(app.connection(&id).await), "revoked");
    assert!(app.event_kinds(&id).await.contains(&"revoked".to_owned()));

    // Signing out needs the token too, and ends the session on the server: the old cookie,
    // replayed, no longer works.
    let r = admin.post("/admin/sign-out", &[]).await;
    assert_eq!(r.status(), 403);
    assert_eq!(admin.get("/admin/connections").await.status(), 200);
    let r = admin
        .post(
            "/admin/sign-out",
            &[("csrf", &admin.csrf("/admin/health").await)],
        )
        .await;
    assert_eq!(r.status(), 303);
    let replayed = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(format!("{}/admin/connections", app.url))
        .header("cookie", format!("tokenkeeper_admin={value}"))
        .send()
        .await
        .unwrap();
    assert_eq!(replayed.status(), 303);
    // The other session is untouched.
    assert_eq!(other.get("/admin/connections").await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_sign_ins_from_one_address_are_refused_after_five_whatever_the_key() {
    let app = TestApp::start(Backend::Sqlite).await;
    let admin = Admin::new(&app);
    for _ in 0..tokenkeeper::api::admin::session::MAX_FAILURES {
        assert_eq!(
            admin.sign_in("wrong-key-0123456789abcdef").await.status(),
            401
        );
    }
    // Past the limit the key is not even looked at: the right one is refused as well.
    let r = admin.sign_in(ADMIN_KEY).await;
    assert_eq!(r.status(), 429);
    assert_eq!(session_cookie(&r), None);
    let wait: i64 = r.headers()[RETRY_AFTER].to_str().unwrap().parse().unwrap();
    assert!((1..=300).contains(&wait), "Retry-After {wait}");
    assert!(r.text().await.unwrap().contains("Too many failed sign-ins"));
}

async fn a_needs_reauth_connection_is_explained_with_its_reconnect_link_and_no_page_shows_a_token(
    backend: Backend,
) {
    let app = TestApp::start(backend).await;
    let (alive, _) = app.connect("user-alive").await;
    // Another simulated Notion user in another workspace: a second bot.
    app.sim_json(
        reqwest::Method::POST,
        "/_sim/next-authorization",
        Some(json!({
            "workspace_id": "00000000-0000-4000-8000-0000000000c2",
            "user_id": "00000000-0000-4000-8000-0000000000d2",
        })),
    )
    .await;
    let (dead, _) = app.connect("user-dead").await;
    let bot = app.connection(&dead).await["bot_id"]
        .as_str()
        .unwrap()
        .to_owned();
    app.sim_json(
        reqwest::Method::POST,
        &format!("/_sim/bots/{bot}/revoke"),
        None,
    )
    .await;
    let grant = app.current_grant(&dead).await;
    let (status, body) = app.refresh(&dead, &grant).await;
    assert_eq!(status, 424, "{body}");
    let link = body["error"]["reconnect_url"].as_str().unwrap().to_owned();

    let admin = Admin::new(&app);
    assert_eq!(admin.sign_in(ADMIN_KEY).await.status(), 303);
    let list = admin.page("/admin/connections").await;
    assert!(list.contains(&alive) && list.contains(&dead));
    for (query, shown, hidden) in [
        ("status=needs_reauth", &dead, &alive),
        ("status=active", &alive, &dead),
        ("end_user=user-alive", &alive, &dead),
        ("q=user-dead", &dead, &alive),
        (&format!("bot={bot}") as &str, &dead, &alive),
        (&format!("q={bot}&status=needs_reauth"), &dead, &alive),
    ] {
        let page = admin.page(&format!("/admin/connections?{query}")).await;
        assert!(
            page.contains(shown.as_str()) && !page.contains(hidden.as_str()),
            "{query}"
        );
    }
    let nothing = admin
        .page("/admin/connections?q=nobody-has-this&status=active")
        .await;
    assert!(nothing.contains("No connection matches these filters"));

    let page = admin.page(&format!("/admin/connections/{dead}")).await;
    for words in [
        "Needs reconnect",
        "Why it needs its user back",
        "Notion refused to refresh the connection",
        "invalid_grant",
        &grant,
        "No other unused refresh token",
    ] {
        assert!(page.contains(words), "{words:?} on the page");
    }
    // The reconnect link is the one 424 answers carry.
    assert!(page.contains(&format!("value=\"{link}\"")), "{link}");

    // No page shows a token, a key or the client secret: every token of every grant, read
    // from the ledger itself.
    let mut secrets = vec![
        ADMIN_KEY.to_owned(),
        TOKENS_KEY.to_owned(),
        notion_sim::SimConfig::default().client_secret,
    ];
    for id in [&alive, &dead] {
        let connection = tokenkeeper::ids::ConnectionId::parse(id).unwrap();
        for g in app.state.store.list_grants(&connection).await.unwrap() {
            let open = app
                .state
                .store
                .get_grant(&connection, &g.id)
                .await
                .unwrap()
                .unwrap();
            secrets.push(open.access_token.expose_secret().to_owned());
            secrets.extend(open.refresh_token.map(|t| t.expose_secret().to_owned()));
        }
    }
    assert!(secrets.len() >= 7, "{}", secrets.len());
    for path in [
        "/".to_owned(),
        "/admin".into(),
        "/admin/connections".into(),
        "/admin/connections?status=needs_reauth".into(),
        format!("/admin/connections/{alive}"),
        format!("/admin/connections/{dead}"),
        format!("/admin/connections/{alive}/revoke"),
        "/admin/webhook-deliveries".into(),
        "/admin/webhook-deliveries?status=pending".into(),
        "/admin/webhook-deliveries?status=delivered".into(),
        "/admin/health".into(),
    ] {
        let r = admin.get(&path).await;
        let status = r.status();
        let html = r.text().await.unwrap();
        assert!(status == 200 || status == 303, "{path}: {status}");
        for secret in &secrets {
            assert!(!html.contains(secret.as_str()), "a secret on {path}");
        }
    }
}

async fn a_connect_session_without_return_to_ends_on_the_connected_page(backend: Backend) {
    let app = TestApp::start(backend).await;
    let (status, body) = app
        .post_json(
            "/v1/connect-sessions",
            json!({"provider": "notion", "end_user_id": "no-return"}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let landing = app.follow(body["url"].as_str().unwrap()).await;
    assert_eq!(landing.url.path(), "/connect/done");
    assert_eq!(landing.status, "connected");
    let id = landing.connection_id.clone().expect("a connection id");
    assert_eq!(app.connection(&id).await["end_user_id"], "no-return");
    let page = Browser::new().get(landing.url.as_str()).await;
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    assert!(html.contains("Connected") && html.contains("You can close this tab"));

    // A return_to that is given is checked as before.
    let (status, body) = app
        .post_json(
            "/v1/connect-sessions",
            json!({"provider": "notion", "end_user_id": "u", "return_to": "https://elsewhere.example/"}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "return_to_not_allowed");
}
