//! What a handler gets and gives: the state every handler shares, a routed call, a reply, and
//! the JSON answers Notion writes. `server` routes calls to the handlers (`oauth`, `rest`,
//! `control`); they and it all build on this, so none of them imports another's router.

use std::sync::{Arc, Mutex};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Response, StatusCode};
use serde_json::{json, Value};

use crate::clock::{Moment, SimClock};
use crate::config::SimConfig;
use crate::endpoint::Endpoint;
use crate::faults::Faults;
use crate::hold::Holds;
use crate::limits::RateLimiter;
use crate::observe::{RequestLog, Stats};
use crate::world::{Id, World};

pub(crate) type Body = Full<Bytes>;

/// Everything the request handlers share.
pub(crate) struct Shared {
    /// Swapped whole on update, so a request reads one consistent snapshot without holding a
    /// lock.
    config: Mutex<Arc<SimConfig>>,
    pub world: Mutex<World>,
    pub stats: Stats,
    pub log: RequestLog,
    pub faults: Faults,
    pub limits: RateLimiter,
    pub holds: Holds,
    /// Every time-dependent decision reads this, never `Instant::now()` or `Utc::now()`.
    pub clock: SimClock,
}

impl Shared {
    pub fn new(config: SimConfig, clock: SimClock) -> Shared {
        Shared {
            config: Mutex::new(Arc::new(config)),
            world: Mutex::new(World::default()),
            stats: Stats::default(),
            log: RequestLog::default(),
            faults: Faults::default(),
            limits: RateLimiter::default(),
            holds: Holds::default(),
            clock,
        }
    }

    pub fn config(&self) -> Arc<SimConfig> {
        self.config.lock().expect("config lock").clone()
    }

    pub fn set_config(&self, config: SimConfig) {
        *self.config.lock().expect("config lock") = Arc::new(config);
    }

    pub fn update_config(&self, f: impl FnOnce(&mut SimConfig)) {
        let mut slot = self.config.lock().expect("config lock");
        let mut config = SimConfig::clone(&slot);
        f(&mut config);
        *slot = Arc::new(config);
    }

    pub fn world(&self) -> std::sync::MutexGuard<'_, World> {
        self.world.lock().expect("world lock")
    }
}

/// A simulated request after routing, with what its handler needs.
pub(crate) struct Call {
    pub endpoint: Endpoint,
    pub method: hyper::Method,
    pub headers: hyper::HeaderMap,
    pub query: Option<String>,
    /// The `{id}` of `/v1/pages/{id}`.
    pub path_id: Option<String>,
    pub body: Bytes,
    pub config: Arc<SimConfig>,
    pub request_id: String,
    /// The simulator's clock when processing started.
    pub now: Moment,
}

/// A handler's answer, with what the request log records about it.
pub(crate) struct Reply {
    pub response: Response<Body>,
    pub bot_id: Option<Id>,
    /// The token presented (bearer or body token), for the log's fingerprint.
    pub token: Option<String>,
    pub token_is_newest_live: Option<bool>,
    /// The grant type of a token request: it selects a grant-specific latency.
    pub grant_type: Option<&'static str>,
}

impl Reply {
    pub fn plain(response: Response<Body>) -> Reply {
        Reply {
            response,
            bot_id: None,
            token: None,
            token_is_newest_live: None,
            grant_type: None,
        }
    }
}

/// A JSON answer; `request_id` is added to the body and sent as `x-notion-request-id`.
pub(crate) fn json_response(
    status: StatusCode,
    mut body: Value,
    request_id: &str,
) -> Response<Body> {
    if let Value::Object(map) = &mut body {
        map.insert(
            "request_id".to_owned(),
            Value::String(request_id.to_owned()),
        );
    }
    let mut response = plain_json(status, &body);
    if let Ok(value) = HeaderValue::from_str(request_id) {
        response.headers_mut().insert("x-notion-request-id", value);
    }
    response
}

/// A JSON answer as is.
pub(crate) fn plain_json(status: StatusCode, body: &Value) -> Response<Body> {
    let bytes = serde_json::to_vec(body).expect("JSON values serialize");
    let mut response = Response::new(Full::new(Bytes::from(bytes)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    response
}

/// Notion's REST error envelope.
pub(crate) fn notion_error(
    status: StatusCode,
    code: &str,
    message: &str,
    request_id: &str,
) -> Response<Body> {
    json_response(
        status,
        json!({"object": "error", "status": status.as_u16(), "code": code, "message": message}),
        request_id,
    )
}

/// A 429 as Notion sends it: the header and `additional_data` agree.
pub(crate) fn rate_limited(reason: &str, retry_after: u64, request_id: &str) -> Response<Body> {
    let mut response = json_response(
        StatusCode::TOO_MANY_REQUESTS,
        json!({
            "object": "error",
            "status": 429,
            "code": "rate_limited",
            "message": "You have been rate limited. Please try again in a few minutes.",
            "additional_data": {
                "retry_after": retry_after.to_string(),
                "rate_limit_reason": reason,
            },
        }),
        request_id,
    );
    response
        .headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from(retry_after));
    response
}
