//! Shared test support: databases (`db`), tokenkeeper and notion-sim in this process (`app`),
//! tokenkeeper as a process of its own (`process`), PostgreSQL servers a test may stop
//! (`pg_server`), and Python's implementations that tests judge tokenkeeper by (`python`).

pub mod app;
pub mod db;
pub mod outage_db;
pub mod pg_server;
pub mod process;
pub mod python;
