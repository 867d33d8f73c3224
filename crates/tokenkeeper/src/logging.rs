//! The log: `TOKENKEEPER_LOG` as the user wrote it (default `info`), with the HTTP, TLS and
//! database client libraries capped at `info` whatever it says.
//!
//! At `debug` and `trace` those libraries describe what they send and receive: requests with
//! their headers (the Basic credentials of every token call, the bearer token of every proxied
//! call) and statements with their parameters. Secrets never appear in logs at any level
//! (invariant 7), so no filter a user writes may let those levels through: the cap is a second
//! filter that every event must also pass, so even a more specific directive such as
//! `hyper::proto=trace` cannot lift it.

use tracing::level_filters::LevelFilter;
use tracing_subscriber::filter::{EnvFilter, FilterExt, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// The libraries whose `debug` and `trace` events may print headers, bodies or statement
/// parameters. A target is capped with everything below it (`hyper` covers `hyper::proto::h1`).
pub const CAPPED_TARGETS: &[&str] = &[
    "hyper",
    "hyper_util",
    "reqwest",
    "h2",
    "rustls",
    "tokio_postgres",
    "postgres_protocol",
    "deadpool_postgres",
];

/// The level the libraries of `CAPPED_TARGETS` are held to.
pub const CAP: LevelFilter = LevelFilter::INFO;

/// The cap as a filter: `CAP` for the libraries above, anything for everyone else.
pub fn cap() -> Targets {
    CAPPED_TARGETS.iter().fold(
        Targets::new().with_default(LevelFilter::TRACE),
        |t, target| t.with_target(*target, CAP),
    )
}

/// Installs the process's logger: text on standard error, filtered by `TOKENKEEPER_LOG`
/// (default `info`) and the cap. Events of the `log` crate (reqwest, rustls) come through
/// tracing-log with their module as target, so the cap applies to them too.
pub fn init() {
    let user =
        EnvFilter::try_from_env("TOKENKEEPER_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_filter(user.and(cap())),
        )
        .init();
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::Level;

    #[test]
    fn the_cap_holds_the_http_libraries_and_their_submodules_and_leaves_the_rest() {
        let cap = cap();
        for target in [
            "hyper::proto::h1::io",
            "reqwest::connect",
            "h2::codec",
            "tokio_postgres::query",
        ] {
            assert!(cap.would_enable(target, &Level::INFO), "{target}");
            assert!(!cap.would_enable(target, &Level::DEBUG), "{target}");
            assert!(!cap.would_enable(target, &Level::TRACE), "{target}");
        }
        assert!(cap.would_enable("tokenkeeper::refresh", &Level::TRACE));
    }
}
