//! The simulator's integration tests: one binary (one link step), a real server on port 0 per
//! test, driven over HTTP with reqwest.

mod control;
mod faults;
mod fidelity;
mod holds;
mod lifecycle;
mod limits;
mod oauth;
mod rest;

use std::time::Duration;

use notion_sim::{SimClock, SimConfig, SimServer};
use reqwest::{header::HeaderMap, Method, StatusCode};
use serde_json::{json, Value};

pub const REDIRECT: &str = "http://localhost:3000/oauth/callback";

/// A running simulator and an HTTP client that does not follow redirects.
pub struct Sim {
    pub server: SimServer,
    pub http: reqwest::Client,
}

/// The result of one authorization: a token pair and whom it belongs to.
#[derive(Debug, Clone)]
pub struct Pair {
    pub access: String,
    pub refresh: String,
    pub bot_id: String,
    pub workspace_id: String,
}

impl Pair {
    pub fn from_response(body: &Value) -> Pair {
        let field = |name: &str| {
            body[name]
                .as_str()
                .unwrap_or_else(|| panic!("token response without {name}: {body}"))
                .to_owned()
        };
        Pair {
            access: field("access_token"),
            refresh: field("refresh_token"),
            bot_id: field("bot_id"),
            workspace_id: field("workspace_id"),
        }
    }
}

pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
    pub text: String,
}

impl Sim {
    /// A simulator that auto-approves, with no rate limits unless a test sets them.
    pub async fn start() -> Sim {
        Sim::with(|_| {}).await
    }

    pub async fn with(f: impl FnOnce(&mut SimConfig)) -> Sim {
        Sim::with_clock(SimClock::system(), f).await
    }

    /// A simulator whose time stands still until the test moves it with `sim.clock().advance`.
    pub async fn manual(f: impl FnOnce(&mut SimConfig)) -> Sim {
        Sim::with_clock(SimClock::manual(), f).await
    }

    async fn with_clock(clock: SimClock, f: impl FnOnce(&mut SimConfig)) -> Sim {
        let mut config = SimConfig {
            auto_approve: true,
            rate_limit_per_connection: 0,
            ..SimConfig::default()
        };
        f(&mut config);
        let server = SimServer::start_with_clock(config, clock)
            .await
            .expect("sim starts");
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        Sim { server, http }
    }

    pub fn clock(&self) -> SimClock {
        self.server.clock()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.server.base_url(), path)
    }

    pub async fn send(&self, request: reqwest::RequestBuilder) -> Answer {
        let response = request.send().await.expect("request reaches the sim");
        let status = response.status();
        let headers = response.headers().clone();
        let text = response.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Answer {
            status,
            headers,
            body,
            text,
        }
    }

    /// `GET /v1/oauth/authorize` with a state; returns the redirect's `Location`.
    pub async fn authorize_location(&self) -> url::Url {
        let answer = self
            .send(self.http.get(self.url("/v1/oauth/authorize")).query(&[
                ("client_id", "tokenkeeper-dev"),
                ("redirect_uri", REDIRECT),
                ("response_type", "code"),
                ("owner", "user"),
                ("state", "st4te"),
            ]))
            .await;
        assert_eq!(answer.status, StatusCode::FOUND, "{}", answer.text);
        let location = answer.headers["location"].to_str().unwrap();
        url::Url::parse(location).unwrap()
    }

    pub async fn authorize(&self) -> String {
        let location = self.authorize_location().await;
        query_param(&location, "code").expect("redirect carries a code")
    }

    /// `POST /v1/oauth/token` with the right client credentials.
    pub async fn token(&self, body: Value) -> Answer {
        self.send(
            self.http
                .post(self.url("/v1/oauth/token"))
                .basic_auth("tokenkeeper-dev", Some("dev-secret-not-for-production"))
                .header("Notion-Version", "2022-06-28")
                .json(&body),
        )
        .await
    }

    pub async fn exchange(&self, code: &str) -> Answer {
        self.token(
            json!({"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT}),
        )
        .await
    }

    pub async fn refresh(&self, refresh_token: &str) -> Answer {
        self.token(json!({"grant_type": "refresh_token", "refresh_token": refresh_token}))
            .await
    }

    /// Authorizes and exchanges the code: a new pair.
    pub async fn connect(&self) -> Pair {
        let code = self.authorize().await;
        let answer = self.exchange(&code).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
        Pair::from_response(&answer.body)
    }

    pub async fn refreshed(&self, refresh_token: &str) -> Pair {
        let answer = self.refresh(refresh_token).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
        Pair::from_response(&answer.body)
    }

    /// A REST call with a bearer token and `Notion-Version`.
    pub async fn rest(
        &self,
        method: Method,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> Answer {
        let mut request = self
            .http
            .request(method, self.url(path))
            .bearer_auth(token)
            .header("Notion-Version", "2026-03-11");
        if let Some(body) = body {
            request = request.json(&body);
        }
        self.send(request).await
    }

    pub async fn me(&self, token: &str) -> Answer {
        self.rest(Method::GET, "/v1/users/me", token, None).await
    }

    pub async fn control_get(&self, path: &str) -> Value {
        let answer = self.send(self.http.get(self.url(path))).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
        answer.body
    }

    pub async fn control_post(&self, path: &str, body: Value) -> Value {
        let answer = self.send(self.http.post(self.url(path)).json(&body)).await;
        assert_eq!(answer.status, StatusCode::OK, "{path}: {}", answer.text);
        answer.body
    }

    /// How many requests reached `endpoint`, by `GET /_sim/stats`.
    pub async fn count(&self, endpoint: &str) -> u64 {
        let stats = self.control_get("/_sim/stats").await;
        stats["requests"][endpoint]
            .as_u64()
            .expect("a counted endpoint")
    }

    /// Waits until `n` requests in all have reached `endpoint`: the sim counts a request before
    /// any fault or processing, so this tells that a request arrived without guessing how long
    /// the trip takes. Polling, because a `delay` fault stalls before any hold could see it.
    pub async fn until_counted(&self, endpoint: &str, n: u64) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while self.count(endpoint).await < n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{n} requests never reached {endpoint}"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    pub async fn introspect(&self, token: &str) -> Answer {
        self.send(
            self.http
                .post(self.url("/v1/oauth/introspect"))
                .basic_auth("tokenkeeper-dev", Some("dev-secret-not-for-production"))
                .json(&json!({"token": token})),
        )
        .await
    }

    pub async fn bot(&self, bot_id: &str) -> Value {
        let bots = self.control_get("/_sim/bots").await;
        bots["bots"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["bot_id"] == bot_id)
            .cloned()
            .unwrap_or_else(|| panic!("no bot {bot_id} in {bots}"))
    }
}

pub fn query_param(url: &url::Url, name: &str) -> Option<String> {
    url.query_pairs()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// Asserts Notion's REST error envelope with this status and code.
pub fn assert_notion_error(answer: &Answer, status: u16, code: &str) {
    assert_eq!(answer.status.as_u16(), status, "{}", answer.text);
    assert_eq!(answer.body["object"], "error", "{}", answer.text);
    assert_eq!(answer.body["status"], status, "{}", answer.text);
    assert_eq!(answer.body["code"], code, "{}", answer.text);
    assert!(answer.body["message"].is_string(), "{}", answer.text);
    let request_id = answer.body["request_id"].as_str().expect("request_id");
    assert_eq!(answer.headers["x-notion-request-id"], request_id);
}

/// Asserts an OAuth-style error from the token endpoint.
pub fn assert_oauth_error(answer: &Answer, status: u16, error: &str) {
    assert_eq!(answer.status.as_u16(), status, "{}", answer.text);
    assert_eq!(answer.body["error"], error, "{}", answer.text);
    assert!(answer.body["request_id"].is_string(), "{}", answer.text);
}
