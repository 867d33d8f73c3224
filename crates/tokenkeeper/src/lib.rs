//! tokenkeeper: a self-hosted OAuth token broker for Notion.
//!
//! See ARCHITECTURE.md for the map of this crate and the invariants each module keeps.

pub mod api;
pub mod api_keys;
pub mod app;
pub mod clock;
pub mod config;
#[cfg(test)]
mod fuzz;
pub mod health;
pub mod ids;
pub mod import;
pub mod jobs;
pub mod journal;
pub mod keycheck;
pub mod ledger;
pub mod logging;
pub mod metrics;
pub mod provider;
pub mod refresh;
pub mod return_to;
pub mod seal;
pub mod store;
pub mod webhooks;
