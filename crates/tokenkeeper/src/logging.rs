//! The log: `TOKENKEEPER_LOG` as the user wrote it (default `info`), with the HTTP, TLS and
//! database client libraries capped at `info` whatever it says, written as text or as one JSON
//! object per line (`TOKENKEEPER_LOG_FORMAT`).
//!
//! Every operation an operator may need to find later (an authorization, a refresh, a
//! revocation, a rejected API key, a database outage) is one line with an `op` field and the
//! fields docs/OBSERVABILITY.md lists; those names are an interface, kept stable like the API's.
//!
//! At `debug` and `trace` those libraries describe what they send and receive: requests with
//! their headers (the Basic credentials of every token call, the bearer token of every proxied
//! call) and statements with their parameters. Secrets never appear in logs at any level
//! (invariant 7), so no filter a user writes may let those levels through: the cap is a second
//! filter that every event must also pass, so even a more specific directive such as
//! `hyper::proto=trace` cannot lift it.

use std::io::IsTerminal;

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

/// How log lines are written (`TOKENKEEPER_LOG_FORMAT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// One line of text per event; colours only when standard error is a terminal, so that a
    /// file or a log collector never receives escape codes.
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `message`, and the event's own
    /// fields beside them (tracing-subscriber's JSON format, flattened).
    Json,
}

impl LogFormat {
    pub fn parse(s: &str) -> Result<LogFormat, String> {
        match s.trim() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("{other:?} is not a log format (text or json)")),
        }
    }
}

/// Installs the process's logger on standard error, in `format`, filtered by `TOKENKEEPER_LOG`
/// (default `info`) and the cap. Events of the `log` crate (reqwest, rustls) come through
/// tracing-log with their module as target, so the cap applies to them too.
pub fn init(format: LogFormat) {
    let user =
        EnvFilter::try_from_env("TOKENKEEPER_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let layer = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(layer.with_filter(user.and(cap())))
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

    #[test]
    fn log_formats_parse_and_others_are_refused() {
        assert_eq!(LogFormat::parse("json"), Ok(LogFormat::Json));
        assert_eq!(LogFormat::parse("text"), Ok(LogFormat::Text));
        assert!(LogFormat::parse("xml").is_err());
        assert!(LogFormat::parse("JSON").is_err());
    }
}
