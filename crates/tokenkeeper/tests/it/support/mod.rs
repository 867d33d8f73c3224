//! Shared test support: databases (`db`) and running tokenkeeper and notion-sim (`app`).

pub mod app;
pub mod db;
