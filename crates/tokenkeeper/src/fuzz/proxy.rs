//! Target 5: what the proxy takes from the caller's request (`api::proxy::rest_of_path` and
//! `outgoing_headers`).
//!
//! Properties, beyond "never panics":
//! - The URL a request is forwarded to keeps the configured Notion base URL's scheme, host and
//!   port, and its path stays under the base URL's path at a segment boundary, as the `url`
//!   crate (which follows the WHATWG URL Standard, like reqwest) resolves it: no `..`, in any
//!   encoding, leaves it. A path without dot segments or backslashes reaches Notion as the
//!   caller wrote it, and the query as it came.
//! - No `Authorization` header, no `tokenkeeper-*` header, no `Expect`, no hop-by-hop header
//!   (RFC 9110 §7.6.1's `Connection`, `Proxy-Connection`, `Keep-Alive`, `TE`,
//!   `Transfer-Encoding`, `Upgrade`, and `Proxy-Authenticate`, `Proxy-Authorization`,
//!   `Trailer`, `Host`) is forwarded, nor any header that a `Connection` header names,
//!   whatever else that `Connection` value holds; every other header passes with all its
//!   values in order; `Notion-Version` is the caller's or, without one, the configured one.

use std::str::FromStr;

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use proptest::prelude::*;

use super::urls::{has_dot_segment, hostile_path, query_or_fragment};
use super::{config, replay_corpus};
use crate::api::proxy::{outgoing_headers, rest_of_path, target_url};

/// Notion base URLs as an operator may configure them: Notion's own, or behind a gateway that
/// serves other things beside it.
fn bases() -> Vec<&'static str> {
    vec![
        "https://api.notion.com",
        "https://api.notion.com/",
        "http://127.0.0.1:9999",
        "http://gateway.internal:8080/notion",
        "https://gateway.internal/egress/notion/",
        "https://gateway.internal/a%2Fb/notion",
    ]
}

/// A request target for the proxy: `/v1/proxy/{id}` (or without `/v1`, as the nested router
/// sees it), then a hostile path and query.
fn request_target() -> impl Strategy<Value = String> {
    (
        prop::sample::select(vec!["/v1/proxy/", "/proxy/", "/v1/proxy/", "/v1/proxy//"]),
        prop_oneof![
            Just("con_0190f0c2a0a07d3a9b1c2d3e4f5a6b7c".to_owned()),
            Just("..".to_owned()),
            "[a-z_0-9%.]{0,12}",
        ],
        hostile_path(),
        query_or_fragment(),
    )
        .prop_map(|(start, id, path, query)| format!("{start}{id}{path}{query}"))
}

/// Checks the forwarded URL for one request target; targets that `http` refuses never reach
/// the proxy (hyper answers 400 first), so they are skipped.
fn check_target(target: &str) -> Result<(), TestCaseError> {
    let Ok(uri) = axum::http::Uri::from_str(target) else {
        return Ok(());
    };
    for base in bases() {
        let base = url::Url::parse(base).unwrap();
        let rest = rest_of_path(uri.path());
        let Some(out) = target_url(&base, uri.path(), uri.query()) else {
            // Refused: only a path that goes up may be.
            prop_assert!(has_dot_segment(rest), "{} is refused", target);
            continue;
        };
        prop_assert_eq!(out.scheme(), base.scheme());
        prop_assert_eq!(out.host_str(), base.host_str());
        prop_assert_eq!(out.port_or_known_default(), base.port_or_known_default());
        prop_assert!(out.username().is_empty() && out.password().is_none());
        let base_path = base.path().trim_end_matches('/');
        prop_assert!(
            base_path.is_empty()
                || out.path() == base_path
                || out.path().starts_with(&format!("{base_path}/")),
            "{target} is forwarded to {out}, outside {base}"
        );
        if !has_dot_segment(rest) && !rest.contains('\\') {
            let sent = format!("{base_path}{rest}");
            // An empty path is `/` in an http URL; characters that a path may not hold raw
            // (non-ASCII, for one) are percent-encoded, which changes no byte a server reads.
            let sent = if sent.is_empty() {
                "/".to_owned()
            } else {
                sent
            };
            prop_assert_eq!(
                percent_decoded(out.path()),
                percent_decoded(&sent),
                "the path {} is rewritten to {}",
                sent,
                out.path()
            );
        }
        prop_assert_eq!(
            out.query().map(percent_decoded),
            uri.query().map(percent_decoded),
            "the query is rewritten"
        );
    }
    Ok(())
}

/// The bytes a server reads from a path: `%XX` escapes decoded, anything else as it is.
fn percent_decoded(path: &str) -> Vec<u8> {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

/// RFC 9110 §7.6.1's connection-specific fields, and the other fields that describe one hop.
const HOP_BY_HOP: [&str; 10] = [
    "connection",
    "proxy-connection",
    "keep-alive",
    "te",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
    "proxy-authorization",
    "trailer",
    "host",
];

fn header_name() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => prop::sample::select(vec![
            "authorization", "Authorization", "tokenkeeper-retries", "Tokenkeeper-Grant-Id",
            "tokenkeeper-", "expect", "notion-version", "Notion-Version", "content-type",
            "accept", "x-request-id", "cookie", "x-tokenkeeper", "authorizations",
        ])
        .prop_map(str::to_owned),
        2 => prop::sample::select(HOP_BY_HOP.to_vec()).prop_map(str::to_owned),
        2 => "x-[a-z0-9-]{1,12}",
        1 => "[!#$%&'*+.^_`|~0-9A-Za-z-]{1,16}",
    ]
}

fn header_value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => "[ -~]{0,24}".prop_map(String::into_bytes),
        1 => proptest::collection::vec(prop_oneof![32u8..127, 128u8..=255, Just(b'\t')], 0..24),
    ]
}

/// A `Connection` value naming some of `names`, in any case, with empty items, whitespace,
/// and sometimes bytes that are not UTF-8.
fn connection_value(names: Vec<String>) -> impl Strategy<Value = Vec<u8>> {
    (
        proptest::collection::vec(
            (
                prop::sample::select(if names.is_empty() {
                    vec!["close".to_owned()]
                } else {
                    names
                }),
                any::<bool>(),
            ),
            0..4,
        ),
        prop::sample::select(vec![",", ", ", " ,", ",,", "\t,"]),
        prop_oneof![3 => Just(Vec::new()), 1 => Just(b", caf\xe9".to_vec()), 1 => Just(b"\xff".to_vec())],
    )
        .prop_map(|(listed, sep, tail)| {
            let mut v: Vec<u8> = listed
                .into_iter()
                .map(|(n, upper)| if upper { n.to_ascii_uppercase() } else { n })
                .collect::<Vec<_>>()
                .join(sep)
                .into_bytes();
            v.extend_from_slice(&tail);
            v
        })
}

fn headers() -> impl Strategy<Value = HeaderMap> {
    proptest::collection::vec((header_name(), header_value()), 0..10).prop_flat_map(|pairs| {
        let names: Vec<String> = pairs.iter().map(|(n, _)| n.clone()).collect();
        (
            Just(pairs),
            proptest::collection::vec(connection_value(names), 0..3),
        )
            .prop_map(|(pairs, connections)| {
                let mut h = HeaderMap::new();
                for (name, value) in pairs {
                    if let (Ok(n), Ok(v)) = (
                        HeaderName::from_bytes(name.as_bytes()),
                        HeaderValue::from_bytes(&value),
                    ) {
                        h.append(n, v);
                    }
                }
                for value in connections {
                    if let Ok(v) = HeaderValue::from_bytes(&value) {
                        h.append("connection", v);
                    }
                }
                h
            })
    })
}

/// The names a request's `Connection` headers list, read from the raw bytes.
fn listed_in_connection(from: &HeaderMap) -> Vec<String> {
    from.get_all("connection")
        .iter()
        .flat_map(|v| {
            String::from_utf8_lossy(v.as_bytes())
                .split(',')
                .map(|n| n.trim().to_ascii_lowercase())
                .collect::<Vec<_>>()
        })
        .collect()
}

fn check_headers(from: &HeaderMap, version: &str) -> Result<(), TestCaseError> {
    let out = outgoing_headers(from, version);
    let listed = listed_in_connection(from);
    let dropped = |name: &str| {
        name == "authorization"
            || name.starts_with("tokenkeeper-")
            || name == "expect"
            || HOP_BY_HOP.contains(&name)
            || listed.iter().any(|l| l == name)
    };
    for name in out.keys() {
        prop_assert!(
            !dropped(name.as_str()) || name == "notion-version",
            "{name} is forwarded"
        );
    }
    for name in from.keys() {
        let sent: Vec<_> = from.get_all(name).iter().collect();
        let passed: Vec<_> = out.get_all(name).iter().collect();
        if dropped(name.as_str()) {
            if name != "notion-version" {
                prop_assert!(passed.is_empty(), "{name} is forwarded");
            }
        } else {
            prop_assert_eq!(passed, sent, "{} is not forwarded as it came", name);
        }
    }
    let theirs = from
        .get("notion-version")
        .filter(|_| !dropped("notion-version"));
    match theirs {
        Some(v) => prop_assert_eq!(out.get("notion-version"), Some(v)),
        None => {
            let configured = HeaderValue::from_str(version).ok();
            prop_assert_eq!(out.get("notion-version"), configured.as_ref());
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(4096))]

    #[test]
    fn forwarded_paths_stay_under_the_base_path(target in request_target()) {
        check_target(&target)?;
    }
}

proptest! {
    #![proptest_config(config(4096))]

    #[test]
    fn credentials_and_hop_by_hop_headers_never_pass(
        from in headers(),
        version in prop_oneof![Just("2026-03-11".to_owned()), "[ -~]{0,12}", Just("bad\u{7f}".to_owned())],
    ) {
        check_headers(&from, &version)?;
    }
}

#[test]
fn the_proxy_path_corpus_stays_under_the_base_path() {
    // One request target per line.
    replay_corpus("proxy-path", |bytes| {
        String::from_utf8_lossy(bytes)
            .lines()
            .try_for_each(check_target)
    });
}

#[test]
fn the_proxy_header_corpus_keeps_the_properties() {
    // `name: value` lines; values are taken as bytes, so they may hold any octet.
    replay_corpus("proxy-headers", |bytes| {
        let mut from = HeaderMap::new();
        for line in bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let colon = line.iter().position(|b| *b == b':').expect("`name: value`");
            let name = HeaderName::from_bytes(&line[..colon]).expect("a header name");
            let value = line[colon + 1..].trim_ascii();
            from.append(
                name,
                HeaderValue::from_bytes(value).expect("a header value"),
            );
        }
        check_headers(&from, "2026-03-11")
    });
}
