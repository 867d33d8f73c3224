//! Faults on demand: rules added by `POST /_sim/faults` that make some requests to an endpoint
//! fail (a chosen status, a non-JSON body, a dropped connection) or stall before processing.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::endpoint::Endpoint;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum FaultKind {
    /// Answer `status` with Notion's error envelope (and `Retry-After` if `retry_after` is set,
    /// always for 429).
    Status,
    /// Answer `status` (default 400) with a body that is not JSON (`content_type`, default
    /// `text/plain`; `text/html` gives an HTML page).
    NonJson,
    /// Sleep `delay_ms`, then process the request normally.
    Delay,
    /// Close the TCP connection without any HTTP response.
    Drop,
}

/// A fault rule as the control API takes and shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FaultSpec {
    /// An endpoint name, or `*` for every simulated endpoint.
    pub endpoint: String,
    pub kind: FaultKind,
    #[serde(default)]
    pub status: Option<u16>,
    /// Fire for this many matching requests, then disappear. Unset: until reset.
    #[serde(default)]
    pub count: Option<u64>,
    /// Fire for this fraction (0..=1) of matching requests. Unset: every one.
    #[serde(default)]
    pub fraction: Option<f64>,
    /// Seconds for the `Retry-After` header and `additional_data.retry_after`.
    #[serde(default)]
    pub retry_after: Option<u64>,
    /// For 429: `additional_data.rate_limit_reason` (default `public_api_request_rate_limit`).
    #[serde(default)]
    pub rate_limit_reason: Option<String>,
    #[serde(default)]
    pub delay_ms: Option<u64>,
    #[serde(default)]
    pub content_type: Option<String>,
    /// For `non_json`: the body to send instead of the default one.
    #[serde(default)]
    pub body: Option<String>,
}

impl FaultSpec {
    pub fn validate(&self) -> Result<(), String> {
        if self.endpoint != "*" && Endpoint::from_name(&self.endpoint).is_none() {
            return Err(format!("unknown endpoint {:?}", self.endpoint));
        }
        if self.count == Some(0) {
            return Err(
                "count must be at least 1 (omit it for a rule that lasts until reset)".to_owned(),
            );
        }
        if let Some(f) = self.fraction {
            if !(0.0..=1.0).contains(&f) {
                return Err("fraction must be between 0 and 1".to_owned());
            }
        }
        if let Some(status) = self.status {
            if !(100..=999).contains(&status) {
                return Err(format!("invalid status {status}"));
            }
        }
        match self.kind {
            FaultKind::Status if self.status.is_none() => {
                Err("a status fault needs a status".to_owned())
            }
            FaultKind::Delay if self.delay_ms.is_none() => {
                Err("a delay fault needs delay_ms".to_owned())
            }
            _ => Ok(()),
        }
    }

    fn matches(&self, endpoint: Endpoint) -> bool {
        self.endpoint == "*" || self.endpoint == endpoint.name()
    }
}

/// What a fired rule asks of the request.
pub(crate) enum FaultAction {
    Delay(Duration),
    Drop,
    /// Answer with this rule instead of processing the request.
    Respond(FaultSpec),
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Fault {
    pub id: u64,
    #[serde(flatten)]
    pub spec: FaultSpec,
}

#[derive(Default)]
pub(crate) struct Faults {
    /// Lets the common case (no faults) skip the lock.
    any: AtomicBool,
    next_id: AtomicU64,
    rules: Mutex<Vec<Fault>>,
}

impl Faults {
    pub fn add(&self, spec: FaultSpec) -> Fault {
        let fault = Fault {
            id: self.next_id.fetch_add(1, Ordering::Relaxed) + 1,
            spec,
        };
        let mut rules = self.rules.lock().expect("faults lock");
        rules.push(fault.clone());
        self.any.store(true, Ordering::Release);
        fault
    }

    pub fn list(&self) -> Vec<Fault> {
        self.rules.lock().expect("faults lock").clone()
    }

    pub fn clear(&self) {
        let mut rules = self.rules.lock().expect("faults lock");
        rules.clear();
        self.any.store(false, Ordering::Release);
    }

    /// The first rule for this endpoint that fires, consuming one of its `count`.
    pub fn fire(&self, endpoint: Endpoint) -> Option<FaultAction> {
        if !self.any.load(Ordering::Acquire) {
            return None;
        }
        let mut rules = self.rules.lock().expect("faults lock");
        let index = rules.iter().position(|rule| {
            rule.spec.matches(endpoint)
                && rule
                    .spec
                    .fraction
                    .is_none_or(|f| rand::thread_rng().gen::<f64>() < f)
        })?;
        let spec = rules[index].spec.clone();
        if let Some(count) = &mut rules[index].spec.count {
            *count = count.saturating_sub(1);
            if *count == 0 {
                rules.remove(index);
                self.any.store(!rules.is_empty(), Ordering::Release);
            }
        }
        Some(match spec.kind {
            FaultKind::Delay => {
                FaultAction::Delay(Duration::from_millis(spec.delay_ms.unwrap_or(0)))
            }
            FaultKind::Drop => FaultAction::Drop,
            FaultKind::Status | FaultKind::NonJson => FaultAction::Respond(spec),
        })
    }
}
