//! tokenkeeper's integration tests: one test binary, so there is one link step on 2 cores.
//!
//! Every case that touches storage runs on SQLite and on PostgreSQL (`TOKENKEEPER_TEST_POSTGRES_URL`,
//! set by `scripts/test`); a PostgreSQL case without that variable fails, it never skips.

mod support;

mod broker;
mod chaos;
mod cli;
mod connect_flow;
mod console;
mod console_store;
mod health_check;
mod import;
mod key_checks;
mod ledger_model;
mod limits;
mod observability;
mod openapi;
mod outage;
mod provider_text;
mod proxy;
mod reconnect_links;
mod refusals;
mod rescue;
mod revocation;
mod shared_throttle;
mod store_contract;
mod store_processes;
mod token_cache;
mod webhooks;
