//! Target 7: the OAuth callback's query (`GET /oauth/callback?…`, `api::connect::callback`).
//!
//! Unlike the other targets, this one drives the real thing end to end: tokenkeeper's state
//! built by `app::state` on a SQLite store in a temp dir, the built-in notion-sim as Notion, and
//! `api::serve` on `127.0.0.1:0`. It is served rather than called with `Router::oneshot`
//! because the server's last check (`api::server::finish`, which turns an extractor's plain-text
//! rejection into an HTML page) is not part of the router: a browser gets what `serve` answers,
//! and a `oneshot` would test an answer no browser ever sees.
//!
//! One real connect session is live at any time, made through `POST /v1/connect-sessions` and
//! followed once (`GET /connect/{id}/{state}`) for its attempt cookie. Each case is a query from
//! `fuzz::urls::callback_query`, sometimes with the live session's real state spliced in
//! beside a hostile `code` or `error` (written `{state}` in the case, so that neither proptest
//! nor a failure message ever prints the state). The query goes out as a browser sends it: the
//! `url` crate's WHATWG parsing of the callback URL, which drops tabs, newlines and the fragment
//! and percent-encodes what a request target cannot carry. It is sent twice, without a cookie
//! and with the session's attempt cookie.
//!
//! Properties, on every answer:
//! 1. No panic (a dropped connection) and no 5xx, except the 502 of a code exchange that Notion
//!    refused, which only a callback that consumed the session with a non-empty `code` makes;
//!    the answer is a redirect or an HTML page, never a plain-text rejection.
//! 2. Nothing is stored: no connection and no grant. The session is consumed only with its
//!    attempt cookie, and only by a query that carries exactly its state (one `state`, as the
//!    form-urlencoded reading of the query gives it) or, for Notion's cancelled consent, no
//!    state and an `error`; a clean query of either kind does consume it (so that the property
//!    is not vacuous). Notion is asked to exchange a code only by a callback that consumed the
//!    session; a consumed session with an `error` redirects to its own `return_to` (same origin
//!    and path, its own query kept, `status` `denied` or `error`, and an `error` code of OAuth
//!    shape), with a `code` is the 502 page, else a 400 page. An unconsumed one is a 4xx page.
//! 3. No `Location`, and no link on a page, leads anywhere but under the allowed return URL or
//!    to tokenkeeper's own public URL; and no answer shows the session's state, or a `code` of
//!    the query long enough to be recognised.

use std::cell::RefCell;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::TestRunner;
use serde_json::{json, Value};
use url::form_urlencoded;

use super::return_to::under;
use super::urls::callback_query;
use super::{config, hostile_text, replay_corpus};
use crate::api_keys::ApiKeys;
use crate::clock::Clock;
use crate::ids::ClientSecret;
use crate::provider::notion::NotionSettings;
use crate::return_to::AllowedReturnUrls;
use crate::seal::KeyRing;
use crate::store::sqlite::SqliteStore;
use crate::store::Store;

const ADMIN_KEY: &str = "admin-key-for-the-callback-fuzz-0123";
/// `TOKENKEEPER_ALLOWED_RETURN_URLS`.
const ALLOWED: &str = "https://app.example/app";
/// The live session's `return_to`, with a query of its own that the redirect must keep.
const RETURN_TO: &str = "https://app.example/app/done?from=fuzz";
/// Where a case (or a corpus file) puts the live session's real state.
const STATE: &str = "{state}";

/// What is in the database that a callback must not add to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stored {
    connections: i64,
    grants: i64,
    used_sessions: i64,
}

/// The live connect session: its id, its state and the attempt cookie its link set.
#[derive(Clone)]
struct Live {
    id: String,
    state: String,
    cookie: String,
}

/// An answer, as the browser got it.
struct Answer {
    status: u16,
    location: Option<String>,
    content_type: String,
    set_cookie: Vec<String>,
    body: String,
}

/// How many cases reached each path that consumes a session (the property asserts that each
/// was reached, so that it cannot pass by never getting there).
#[derive(Debug, Default)]
struct Reached {
    error_redirect: u32,
    refused_code: u32,
    missing_code: u32,
}

/// The query as the form-urlencoded parser (the URL Standard's, which the handler's extractor
/// uses too) reads it: the values of the three names the callback looks at.
struct Reading {
    states: Vec<String>,
    codes: Vec<String>,
    errors: Vec<String>,
    /// Whether the request fits the server's limit on a URI (`MAX_URI_BYTES`), beyond which the
    /// handler is never called.
    fits: bool,
}

impl Reading {
    fn of(sent: Option<&str>) -> Reading {
        let (mut states, mut codes, mut errors) = (Vec::new(), Vec::new(), Vec::new());
        for (name, value) in form_urlencoded::parse(sent.unwrap_or("").as_bytes()) {
            match name.as_ref() {
                "state" => states.push(value.into_owned()),
                "code" => codes.push(value.into_owned()),
                "error" => errors.push(value.into_owned()),
                _ => {}
            }
        }
        let target = "/oauth/callback?".len() + sent.map_or(0, str::len);
        Reading {
            states,
            codes,
            errors,
            fits: target <= crate::api::server::MAX_URI_BYTES,
        }
    }

    fn carries_exactly(&self, state: &str) -> bool {
        self.states.len() == 1 && self.states[0] == state
    }

    /// Notion's cancelled consent: no state (or an empty one) and an `error`.
    fn cancelled(&self) -> bool {
        self.states.iter().all(String::is_empty) && !self.errors.is_empty()
    }

    /// Whether a callback with the attempt cookie may consume the session.
    fn may_consume(&self, state: &str) -> bool {
        self.carries_exactly(state) || self.cancelled()
    }

    /// Whether a callback with the attempt cookie must consume it: it may, each name comes at
    /// most once, and the request reaches the handler.
    fn must_consume(&self, state: &str) -> bool {
        self.fits
            && self.states.len() <= 1
            && self.codes.len() <= 1
            && self.errors.len() <= 1
            && self.may_consume(state)
    }
}

/// tokenkeeper served on `127.0.0.1:0` over a SQLite store and the built-in simulator, with
/// one live connect session. Fields drop in order: the server is told to stop, then the
/// simulator and the temp dirs go, and the runtime last.
struct Harness {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    sim: notion_sim::SimServer,
    public: url::Url,
    http: reqwest::Client,
    /// A second, read-only connection to the database file: counts taken beside the store.
    db: rusqlite::Connection,
    live: RefCell<Live>,
    reached: RefCell<Reached>,
    _dirs: [tempfile::TempDir; 2],
    rt: tokio::runtime::Runtime,
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl Harness {
    fn start() -> Harness {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime");
        let (db_dir, spill) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let path = db_dir.path().join("tokenkeeper.db");
        let (public, sim, stop) = rt.block_on(async {
            let keys = Arc::new(KeyRing::parse(&KeyRing::generate_entry()).unwrap());
            let store: Arc<Store> = Arc::new(
                SqliteStore::open(&path, keys, Clock::System)
                    .await
                    .expect("SQLite opens a temp file")
                    .into(),
            );
            store.migrate().await.expect("migrations apply");
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let public =
                url::Url::parse(&format!("http://{}", listener.local_addr().unwrap())).unwrap();
            // As `App::build` starts the built-in simulator.
            let sim_config = notion_sim::SimConfig {
                redirect_uris: vec![public.join("oauth/callback").unwrap().to_string()],
                ..Default::default()
            };
            let sim = notion_sim::SimServer::start(sim_config.clone())
                .await
                .expect("the simulator starts");
            let journal = crate::journal::Journal::start(spill.path(), &store)
                .await
                .expect("the spill journal opens");
            let state = crate::app::state(
                store,
                NotionSettings {
                    client_id: sim_config.client_id.clone(),
                    client_secret: ClientSecret::new(sim_config.client_secret.clone()),
                    base_url: url::Url::parse(&sim.base_url()).unwrap(),
                    version: "2026-03-11".into(),
                },
                crate::app::StateSettings {
                    public_url: public.clone(),
                    allowed_return_urls: AllowedReturnUrls::parse(ALLOWED).unwrap(),
                    api_keys: ApiKeys::parse(&format!("admin:{ADMIN_KEY}")).unwrap(),
                    session_ttl: Duration::from_secs(600),
                    provider_timeout: Duration::from_secs(5),
                    refresh_budget: Duration::from_secs(20),
                    refresh_rate: Default::default(),
                    notion_version: "2026-03-11".into(),
                    bench_baseline_route: false,
                    webhooks: None,
                    server: Default::default(),
                    proxy_timeouts: Default::default(),
                    metrics_gauge_interval: crate::metrics::DEFAULT_GAUGE_INTERVAL,
                    token_cache_size: 0,
                    shared_throttle: false,
                },
                Clock::System,
                Some(sim.base_url()),
                journal,
            );
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            tokio::spawn(crate::api::serve(listener, state, async move {
                let _ = stopped.await;
            }));
            (public, sim, stop)
        });
        let db = rusqlite::Connection::open_with_flags(
            &path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .expect("the database opens read-only");
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        let mut harness = Harness {
            stop: Some(stop),
            sim,
            public,
            http,
            db,
            live: RefCell::new(Live {
                id: String::new(),
                state: String::new(),
                cookie: String::new(),
            }),
            reached: RefCell::default(),
            _dirs: [db_dir, spill],
            rt,
        };
        let live = harness.new_session();
        *harness.live.get_mut() = live;
        harness
    }

    /// A new connect session, through the API and its link, as an app and its user make one.
    fn new_session(&self) -> Live {
        self.rt.block_on(async {
            let created = self
                .http
                .post(self.public.join("v1/connect-sessions").unwrap())
                .bearer_auth(ADMIN_KEY)
                .json(&json!({"provider": "notion", "end_user_id": "fuzz", "return_to": RETURN_TO}))
                .send()
                .await
                .expect("tokenkeeper answers");
            assert_eq!(created.status().as_u16(), 201, "a connect session is made");
            let body: Value = created.json().await.unwrap();
            let link = body["url"].as_str().expect("a link").to_owned();
            let state = link.rsplit('/').next().unwrap().to_owned();
            let followed = self.http.get(&link).send().await.unwrap();
            assert_eq!(
                followed.status().as_u16(),
                303,
                "the link goes on to Notion"
            );
            let cookie = followed
                .headers()
                .get_all(reqwest::header::SET_COOKIE)
                .iter()
                .filter_map(|v| cookie::Cookie::parse(v.to_str().ok()?.to_owned()).ok())
                .find(|c| c.name() == "tokenkeeper_connect")
                .expect("the link sets the attempt cookie");
            assert!(
                cookie.value() == state,
                "the attempt cookie holds the link's state"
            );
            Live {
                id: body["id"].as_str().unwrap().to_owned(),
                cookie: format!("{}={}", cookie.name(), cookie.value()),
                state,
            }
        })
    }

    fn stored(&self) -> Stored {
        self.db
            .query_row(
                "SELECT (SELECT count(*) FROM connections), (SELECT count(*) FROM grants), \
                 (SELECT count(*) FROM connect_sessions WHERE used_at IS NOT NULL)",
                [],
                |row| {
                    Ok(Stored {
                        connections: row.get(0)?,
                        grants: row.get(1)?,
                        used_sessions: row.get(2)?,
                    })
                },
            )
            .expect("the database can be counted")
    }

    fn is_used(&self, session: &str) -> bool {
        self.db
            .query_row(
                "SELECT used_at IS NOT NULL FROM connect_sessions WHERE id = ?1",
                [session],
                |row| row.get(0),
            )
            .expect("the live session is in the database")
    }

    /// Requests that reached the simulator's token endpoint (code exchanges, here).
    fn token_calls(&self) -> u64 {
        self.rt.block_on(async {
            let stats: Value = self
                .http
                .get(format!("{}/_sim/stats", self.sim.base_url()))
                .send()
                .await
                .expect("the simulator answers")
                .json()
                .await
                .unwrap();
            stats["requests"]["oauth.token"].as_u64().unwrap_or(0)
        })
    }

    fn get(&self, url: &url::Url, cookie: Option<&str>) -> Result<Answer, String> {
        self.rt.block_on(async {
            let mut request = self.http.get(url.clone());
            if let Some(cookie) = cookie {
                request = request.header(reqwest::header::COOKIE, cookie);
            }
            // A panic in the handler ends the connection without an answer.
            let response = request
                .send()
                .await
                .map_err(|e| format!("no answer (a panic, or a connection dropped): {e}"))?;
            let header = |name| {
                response
                    .headers()
                    .get(name)
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            };
            let (status, location) = (
                response.status().as_u16(),
                header(reqwest::header::LOCATION),
            );
            let content_type = header(reqwest::header::CONTENT_TYPE).unwrap_or_default();
            let set_cookie = response
                .headers()
                .get_all(reqwest::header::SET_COOKIE)
                .iter()
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .collect();
            let body = response
                .bytes()
                .await
                .map_err(|e| format!("the answer's body broke off: {e}"))?;
            Ok(Answer {
                status,
                location,
                content_type,
                set_cookie,
                body: String::from_utf8_lossy(&body).into_owned(),
            })
        })
    }

    /// Whether a browser that follows `href` from the callback stays under the allowed return
    /// URL or on tokenkeeper's own origin.
    fn leads_home(&self, callback: &url::Url, href: &str) -> bool {
        let Ok(landed) = callback.join(href) else {
            return false;
        };
        let allowed = url::Url::parse(ALLOWED).unwrap();
        (landed.origin() == allowed.origin() && under(landed.path(), allowed.path()))
            || landed.origin() == self.public.origin()
    }

    /// Runs one case (a query with `{state}` for the live session's state): both requests and
    /// every property.
    fn check(&self, case: &str) -> Result<(), TestCaseError> {
        let live = self.live.borrow().clone();
        let result = self.check_with(case, &live);
        if self.is_used(&live.id) {
            *self.live.borrow_mut() = self.new_session();
        }
        // The state must not reach the test's output, whatever a failure message quotes.
        result.map_err(|e| match e {
            TestCaseError::Fail(why) => {
                TestCaseError::fail(why.message().replace(&live.state, STATE))
            }
            TestCaseError::Reject(why) => {
                TestCaseError::reject(why.message().replace(&live.state, STATE))
            }
        })
    }

    fn check_with(&self, case: &str, live: &Live) -> Result<(), TestCaseError> {
        let query = case.replace(STATE, &live.state);
        let url = url::Url::parse(&format!("{}oauth/callback?{query}", self.public))
            .map_err(|e| TestCaseError::fail(format!("the callback URL does not parse: {e}")))?;
        let reading = Reading::of(url.query());
        let (before, calls_before) = (self.stored(), self.token_calls());

        // Without the attempt cookie: nothing is consumed, whatever the query.
        let answer = self.get(&url, None).map_err(TestCaseError::fail)?;
        self.check_answer(&url, &answer, &reading, live, false)?;
        prop_assert!(
            (400..500).contains(&answer.status),
            "without the attempt cookie the answer is {}, not a 4xx page",
            answer.status
        );
        prop_assert_eq!(self.stored(), before, "without the attempt cookie");
        prop_assert_eq!(
            self.token_calls(),
            calls_before,
            "Notion was asked to exchange a code without the attempt cookie"
        );

        // With it.
        let answer = self
            .get(&url, Some(&live.cookie))
            .map_err(TestCaseError::fail)?;
        let after = self.stored();
        let calls = self.token_calls() - calls_before;
        prop_assert_eq!(
            (after.connections, after.grants),
            (before.connections, before.grants),
            "a connection or a grant was stored"
        );
        let consumed = self.is_used(&live.id);
        prop_assert_eq!(
            after.used_sessions - before.used_sessions,
            i64::from(consumed),
            "a session other than the live one was consumed"
        );
        let with_code = reading.errors.is_empty() && reading.codes.iter().any(|c| !c.is_empty());
        self.check_answer(&url, &answer, &reading, live, consumed && with_code)?;
        if !consumed {
            prop_assert!(
                !reading.must_consume(&live.state),
                "a callback that carries exactly the session's state (or a cancelled consent) with its cookie did not consume it: {}",
                answer.status
            );
            prop_assert!(
                (400..500).contains(&answer.status),
                "a callback that consumed nothing answered {}, not a 4xx page",
                answer.status
            );
            prop_assert_eq!(
                calls,
                0,
                "Notion was asked to exchange a code for a callback that consumed no session"
            );
            return Ok(());
        }
        prop_assert!(
            reading.may_consume(&live.state),
            "the session was consumed by a query that does not carry exactly its state"
        );
        let mut reached = self.reached.borrow_mut();
        if !reading.errors.is_empty() {
            reached.error_redirect += 1;
            prop_assert_eq!(answer.status, 303, "an error answer is a redirect");
            prop_assert_eq!(calls, 0, "an error answer exchanged a code");
            let location = answer.location.as_deref().unwrap_or_default();
            let landed = url.join(location).map_err(|e| {
                TestCaseError::fail(format!("{location:?} cannot be followed: {e}"))
            })?;
            let own = url::Url::parse(RETURN_TO).unwrap();
            prop_assert!(
                landed.origin() == own.origin() && landed.path() == own.path(),
                "an error answer sends the browser to {}, not to the session's return_to",
                landed
            );
            let pairs: Vec<(String, String)> = landed.query_pairs().into_owned().collect();
            let status = pairs
                .iter()
                .find(|(k, _)| k == "status")
                .map(|(_, v)| v.as_str());
            let expected = if reading.errors[0] == "access_denied" {
                "denied"
            } else {
                "error"
            };
            prop_assert_eq!(status, Some(expected), "in {}", landed);
            for (name, value) in &pairs {
                let shaped = !value.is_empty()
                    && value.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b)
                    });
                prop_assert!(
                    (name == "from" && value == "fuzz")
                        || name == "status"
                        || (name == "error" && shaped),
                    "the redirect carries {}={:?} ({})",
                    name,
                    value,
                    landed
                );
            }
        } else if with_code {
            reached.refused_code += 1;
            prop_assert_eq!(answer.status, 502, "a code Notion refused");
            prop_assert_eq!(calls, 1, "one code exchange");
        } else {
            reached.missing_code += 1;
            prop_assert_eq!(answer.status, 400, "neither a code nor an error");
            prop_assert_eq!(calls, 0, "an exchange without a code");
        }
        Ok(())
    }

    /// Properties 1 and 3, and the secrets, on one answer.
    fn check_answer(
        &self,
        url: &url::Url,
        answer: &Answer,
        reading: &Reading,
        live: &Live,
        refused_code: bool,
    ) -> Result<(), TestCaseError> {
        let status = answer.status;
        prop_assert!(
            status < 500 || (status == 502 && refused_code),
            "a {} answer: {}",
            status,
            answer.body.chars().take(400).collect::<String>()
        );
        let html = answer.content_type.starts_with("text/html");
        let redirect = (300..400).contains(&status);
        prop_assert!(
            redirect || html,
            "a {} answer that is neither a redirect nor a page ({:?}): {}",
            status,
            answer.content_type,
            answer.body.chars().take(400).collect::<String>()
        );
        if redirect {
            let location = answer.location.as_deref().unwrap_or_default();
            prop_assert!(
                self.leads_home(url, location),
                "a redirect to {:?}",
                location
            );
        }
        for href in hrefs(&answer.body) {
            prop_assert!(self.leads_home(url, &href), "a page links to {:?}", href);
        }
        let mut shown = vec![answer.body.as_str()];
        shown.extend(answer.location.as_deref());
        shown.extend(answer.set_cookie.iter().map(String::as_str));
        let recognisable = |c: &&String| c.len() >= 12;
        for secret in std::iter::once(&live.state).chain(reading.codes.iter().filter(recognisable))
        {
            prop_assert!(
                !shown.iter().any(|s| s.contains(secret.as_str())),
                "the answer shows the state or a code of the query"
            );
        }
        Ok(())
    }
}

/// The `href`s of a page, unescaped as a browser reads them (askama escapes `&<>"'`).
fn hrefs(page: &str) -> Vec<String> {
    page.split("href=\"")
        .skip(1)
        .filter_map(|rest| rest.split('"').next())
        .map(|h| {
            h.replace("&quot;", "\"")
                .replace("&#x27;", "'")
                .replace("&#39;", "'")
                .replace("&#x2f;", "/")
                .replace("&lt;", "<")
                .replace("&gt;", ">")
                .replace("&amp;", "&")
        })
        .collect()
}

/// A value for a spliced `code` or `error`: OAuth-shaped, empty, token-shaped, a URL, an
/// injected header, bad escapes, hostile text (form-encoded), and over the URI limit.
fn hostile_value() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[a-z_]{1,24}",
        2 => "[A-Za-z0-9_-]{12,40}",
        1 => Just("access_denied".to_owned()),
        1 => Just(String::new()),
        2 => prop::sample::select(vec![
            "https://evil.example/",
            "https%3A%2F%2Fevil.example%2F",
            "%2F%2Fevil.example",
            "%0d%0aLocation:%20https://evil.example/",
            "%ff%fe",
            "%zz",
            "ntn_0123456789abcdefghijklmn",
            "a+b%20c",
            "&status=connected&connection_id=con_0190f0c2a0a07d3a9b1c2d3e4f5a6b7c",
        ])
        .prop_map(str::to_owned),
        2 => hostile_text().prop_map(|t| form_urlencoded::byte_serialize(t.as_bytes()).collect()),
    ]
    .prop_filter("within a URI the client can send", |v: &String| {
        v.len() <= 10_000
    })
}

/// The live session's state beside a hostile `code`, `error` or both, to be put before or
/// after a generated query.
fn splice() -> impl Strategy<Value = (bool, String)> {
    let extra = prop_oneof![
        1 => Just(String::new()),
        2 => hostile_value().prop_map(|v| format!("error={v}")),
        2 => hostile_value().prop_map(|v| format!("code={v}")),
        1 => (hostile_value(), hostile_value()).prop_map(|(c, e)| format!("code={c}&error={e}")),
    ];
    (prop::bool::weighted(0.75), extra)
}

/// A case: a generated query, alone, or with the real state spliced in.
fn case() -> impl Strategy<Value = String> {
    let query = prop_oneof![3 => callback_query(), 1 => Just(String::new())]
        // `http::Uri` takes at most 65,534 bytes, so a longer one cannot be sent through
        // `reqwest`; it would be far over the server's 8 KiB URI limit anyway.
        .prop_filter("within a URI the client can send", |q| q.len() <= 40_000);
    (query, prop::option::weighted(0.4, splice())).prop_map(|(query, splice)| match splice {
        None => query,
        Some((true, extra)) => format!("state={STATE}&{extra}&{query}"),
        Some((false, extra)) => format!("{query}&state={STATE}&{extra}"),
    })
}

#[test]
fn a_callback_stores_nothing_consumes_only_its_own_session_and_sends_the_browser_nowhere_else() {
    // Not a `proptest!` block, so that one server serves every case.
    let harness = Harness::start();
    let config = config(512);
    let cases = config.cases;
    let mut runner = TestRunner::new(proptest::test_runner::Config {
        source_file: Some(file!()),
        ..config
    });
    let result = runner.run(&case(), |case| harness.check(&case));
    if let Err(e) = result {
        panic!("{e}\n{runner}");
    }
    // The consuming paths were each reached (a run of a few cases may miss some).
    let reached = harness.reached.borrow();
    if cases >= 128 {
        assert!(
            reached.error_redirect > 0 && reached.refused_code > 0 && reached.missing_code > 0,
            "{reached:?}"
        );
    }
}

#[test]
fn the_callback_corpus_keeps_the_properties() {
    // One query per file; `{state}` stands for the live session's state.
    let harness = Harness::start();
    replay_corpus("callback", |bytes| {
        harness.check(&String::from_utf8_lossy(bytes))
    });
}
