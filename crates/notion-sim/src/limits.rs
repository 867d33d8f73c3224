//! Notion's rate limits: a fixed window per connection (bot) and one per workspace.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::SimConfig;
use crate::world::Id;

#[derive(Clone, Copy)]
struct Window {
    start: Instant,
    count: u32,
}

impl Window {
    /// Rolls the window over if it ended, and returns whether one more request fits.
    fn roll(&mut self, now: Instant, length: Duration, budget: u32) -> bool {
        if now.saturating_duration_since(self.start) >= length {
            *self = Window {
                start: now,
                count: 0,
            };
        }
        budget == 0 || self.count < budget
    }

    /// Whole seconds until the window ends, at least 1 (`Retry-After` is an integer).
    fn retry_after(&self, now: Instant, length: Duration) -> u64 {
        let left = (self.start + length).saturating_duration_since(now);
        left.as_secs_f64().ceil().max(1.0) as u64
    }
}

pub(crate) enum Verdict {
    Allowed,
    Limited {
        reason: &'static str,
        retry_after: u64,
    },
}

#[derive(Default)]
pub(crate) struct RateLimiter {
    windows: Mutex<Windows>,
}

#[derive(Default)]
struct Windows {
    bots: HashMap<Id, Window>,
    workspaces: HashMap<Id, Window>,
}

impl RateLimiter {
    /// Charges one request to the bot and its workspace, unless either budget is spent (then
    /// nothing is charged).
    pub fn check(&self, config: &SimConfig, bot: &Id, workspace: &Id, now: Instant) -> Verdict {
        let per_bot = config.rate_limit_per_connection;
        let per_ws = config.rate_limit_per_workspace;
        if per_bot == 0 && per_ws == 0 {
            return Verdict::Allowed;
        }
        let length = config.rate_limit_window;
        let fresh = Window {
            start: now,
            count: 0,
        };
        let mut windows = self.windows.lock().expect("rate limit lock");
        let Windows { bots, workspaces } = &mut *windows;
        let bot_window = bots.entry(bot.clone()).or_insert(fresh);
        if !bot_window.roll(now, length, per_bot) {
            return Verdict::Limited {
                reason: "public_api_request_rate_limit",
                retry_after: bot_window.retry_after(now, length),
            };
        }
        let ws_window = workspaces.entry(workspace.clone()).or_insert(fresh);
        if !ws_window.roll(now, length, per_ws) {
            return Verdict::Limited {
                reason: "public_api_space_request_rate_limit",
                retry_after: ws_window.retry_after(now, length),
            };
        }
        bot_window.count += 1;
        ws_window.count += 1;
        Verdict::Allowed
    }

    pub fn clear(&self) {
        *self.windows.lock().expect("rate limit lock") = Windows::default();
    }
}
