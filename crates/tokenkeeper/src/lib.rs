//! tokenkeeper: a self-hosted OAuth token broker for Notion.
//!
//! See ARCHITECTURE.md for the map of this crate and the invariants each module keeps.

pub mod clock;
pub mod ids;
pub mod ledger;
pub mod seal;
pub mod store;
