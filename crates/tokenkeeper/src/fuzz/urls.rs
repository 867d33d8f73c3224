//! Hostile URLs and URL pieces, for every target that reads a URL, a path or a query from
//! outside: the proxy's path, a connect session's `return_to`, and the OAuth callback's query.
//!
//! They aim at the places where a string check and a WHATWG URL parser (the `url` crate, and
//! every browser) disagree: dot segments in every encoding, backslashes (a `/` in special
//! URLs), tabs and newlines (removed by the parser), `@` and userinfo, ports, case, `//`
//! authority tricks, percent-encoding of delimiters, and invalid escapes.

use proptest::prelude::*;

/// A segment that a WHATWG parser may take for `.` or `..`, or one that only looks like it.
pub(crate) fn dot_segment() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        // Dot segments, as the URL Standard defines them (`%2e` in any case is a dot).
        "..",
        ".%2e",
        "%2e.",
        "%2e%2e",
        "%2E%2E",
        "%2e%2E",
        ".%2E",
        ".",
        "%2e",
        "%2E",
        // With a tab or a newline inside, which the parser removes first.
        ".\t.",
        "\n..",
        "..\r",
        // Not dot segments, though close: double encoding, `;` parameters, fullwidth dots.
        "%252e%252e",
        "..;",
        "...",
        ".. ",
        "\u{ff0e}\u{ff0e}",
        "..%00",
    ])
    .prop_map(str::to_owned)
}

/// What may stand between two segments.
pub(crate) fn separator() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "/", "/", "/", "\\", "%2f", "%2F", "%5c", "%5C", "//", "/./", "\t/", "/\n",
    ])
    .prop_map(str::to_owned)
}

/// An ordinary segment, or one with characters a path may carry.
pub(crate) fn plain_segment() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-zA-Z0-9_-]{1,10}",
        1 => prop::sample::select(vec![
            "v1", "users", "me", "%20", "%00", "%zz", "%", "~", ";p=1", "a@b", "a:b", "é", "%C3%A9",
            "%ff", "!$&'()*+,=", "{x}", "|", "^", "`", "[::1]", "?", "#", "%3F", "%23",
        ])
        .prop_map(str::to_owned),
        1 => "\\PC{1,4}",
    ]
}

/// A path of plain and dot segments joined by hostile separators; it starts with a separator.
pub(crate) fn hostile_path() -> impl Strategy<Value = String> {
    proptest::collection::vec(
        (
            separator(),
            prop_oneof![2 => plain_segment(), 1 => dot_segment()],
        ),
        0..8,
    )
    .prop_map(|parts| parts.into_iter().map(|(sep, seg)| sep + &seg).collect())
}

/// What may follow an allowed prefix to leave its origin: authority tricks.
pub(crate) fn authority_trick() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "@evil.example",
        ":pass@evil.example",
        ".evil.example",
        "evil.example",
        ":443@evil.example/",
        ":8443",
        ":443",
        ":80",
        ":0",
        ":99999",
        "%40evil.example",
        "%2eevil.example",
        "\\@evil.example",
        "#@evil.example",
        "?@evil.example",
        "//evil.example",
        "\\\\evil.example",
        "/\\evil.example",
        "\t.evil.example",
        "%2f%2fevil.example",
        "/%2f%2fevil.example",
        "/..//evil.example",
        "/../../evil.example",
    ])
    .prop_map(str::to_owned)
}

/// A query, or a fragment, that may carry delimiters and escapes.
pub(crate) fn query_or_fragment() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "\\?[a-z=&]{0,12}",
        "#[a-z/.]{0,12}",
        Just("?next=https://evil.example".to_owned()),
        Just("#/../../admin".to_owned()),
        Just("?a=%zz&b=%ff".to_owned()),
    ]
}

/// A URL made to sit after an allowed prefix: a hostile path, authority tricks, queries and
/// fragments, in some order.
pub(crate) fn hostile_suffix() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => (hostile_path(), query_or_fragment()).prop_map(|(p, q)| p + &q),
        1 => (authority_trick(), hostile_path()).prop_map(|(a, p)| a + &p),
        1 => (hostile_path(), authority_trick()).prop_map(|(p, a)| p + &a),
        1 => query_or_fragment(),
    ]
}

/// `url` rewritten in ways a string comparison sees and a URL parser ignores (the scheme and
/// host in another case, a default port, surrounding whitespace or control characters, a
/// trailing dot on the host, userinfo), or refuses (a port out of range, a bad host).
pub(crate) fn disguise(url: String) -> impl Strategy<Value = String> {
    prop_oneof![
        3 => Just(url.clone()),
        1 => Just(url.to_ascii_uppercase()),
        1 => Just(with_authority(&url, |host| format!("{host}:443"))),
        1 => Just(with_authority(&url, |host| format!("{host}:80"))),
        1 => Just(with_authority(&url, |host| format!("{host}."))),
        1 => Just(with_authority(&url, |host| format!("user:pw@{host}"))),
        1 => Just(with_authority(&url, |host| format!("{host}:99999"))),
        1 => Just(with_authority(&url, |host| format!("{host}%"))),
        1 => Just(format!(" {url}")),
        1 => Just(format!("\t{url}\n")),
        1 => Just(url.replacen("//", "\\\\", 1)),
        1 => Just(url.replacen("://", ":/", 1)),
        1 => Just(url.replacen("://", ":///", 1)),
    ]
}

/// `url` with its authority (what follows `://` up to the next `/`, `?` or `#`) rewritten.
fn with_authority(url: &str, f: impl Fn(&str) -> String) -> String {
    let Some(start) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let end = url[start..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| start + i);
    format!("{}{}{}", &url[..start], f(&url[start..end]), &url[end..])
}

/// A URL built on one of `prefixes` (often an allowed one) and made hostile.
pub(crate) fn hostile_url(prefixes: Vec<String>) -> impl Strategy<Value = String> {
    (prop::sample::select(prefixes), hostile_suffix())
        .prop_flat_map(|(prefix, suffix)| disguise(prefix + &suffix))
}

/// A query string for the OAuth callback (`/oauth/callback?…`): `code`, `state` and `error`
/// repeated, empty, missing their `=`, with names or values percent-encoded, `+` for spaces,
/// invalid escapes and invalid UTF-8, huge values, other separators.
pub(crate) fn callback_query() -> impl Strategy<Value = String> {
    let name = prop::sample::select(vec![
        "code",
        "state",
        "error",
        "error_description",
        "st%61te",
        "STATE",
        "code[]",
        "state ",
        "",
        "redirect_uri",
    ]);
    let value = prop_oneof![
        4 => "[A-Za-z0-9_-]{0,40}",
        1 => Just("access_denied".to_owned()),
        1 => Just("%zz".to_owned()),
        1 => Just("%ff%fe".to_owned()),
        1 => Just("a+b%20c".to_owned()),
        1 => Just("%00".to_owned()),
        1 => Just("&state=".to_owned()),
        1 => "[a-z]{1}".prop_map(|c| c.repeat(20_000)),
        1 => "\\PC{0,12}",
    ];
    let pair = prop_oneof![
        6 => (name.clone(), value).prop_map(|(n, v)| format!("{n}={v}")),
        1 => name.prop_map(str::to_owned),
        1 => Just("=".to_owned()),
    ];
    (
        proptest::collection::vec(pair, 0..6),
        prop::sample::select(vec!["&", "&", ";", "&&"]),
        query_or_fragment(),
    )
        .prop_map(|(pairs, sep, tail)| pairs.join(sep) + &tail)
}

/// Whether `path`, taken as a URL path, has a segment that the URL Standard treats as `.` or
/// `..` (so that a parser rewrites the path).
pub(crate) fn has_dot_segment(path: &str) -> bool {
    let cleaned: String = path
        .chars()
        .filter(|c| !matches!(c, '\t' | '\n' | '\r'))
        .collect();
    cleaned.split(['/', '\\']).any(|segment| {
        matches!(
            segment.to_ascii_lowercase().as_str(),
            "." | ".." | "%2e" | ".%2e" | "%2e." | "%2e%2e"
        )
    })
}

#[cfg(test)]
mod tests {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;

    use super::*;

    /// The generators reach what they claim: among a few thousand URLs after an allowed prefix,
    /// each way in which a WHATWG parser departs from the string is seen.
    #[test]
    fn hostile_urls_reach_every_way_a_parser_reads_them_differently() {
        let prefix = "https://app.example/app".to_owned();
        let strategy = hostile_url(vec![prefix.clone()]);
        let mut runner = TestRunner::deterministic();
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..4000 {
            let raw = strategy.new_tree(&mut runner).unwrap().current();
            let Ok(url) = url::Url::parse(&raw) else {
                seen.insert("unparseable");
                continue;
            };
            if !url.path().starts_with("/app") {
                seen.insert("path left the prefix");
            }
            if has_dot_segment(&raw) {
                seen.insert("dot segment");
            }
            if raw.contains('\\') {
                seen.insert("backslash");
            }
            if raw.contains(['\t', '\n']) {
                seen.insert("tab or newline");
            }
            if !url.username().is_empty() {
                seen.insert("userinfo");
            }
            if url.host_str() != Some("app.example") {
                seen.insert("another host");
            }
            if url.port().is_some() {
                seen.insert("another port");
            }
            if raw.contains(":443") && url.port().is_none() {
                seen.insert("default port dropped");
            }
            if raw.starts_with("HTTPS") {
                seen.insert("case");
            }
            if url.as_str().starts_with(&prefix) != raw.starts_with(&prefix) {
                seen.insert("string and parser disagree on the prefix");
            }
        }
        for wanted in [
            "unparseable",
            "path left the prefix",
            "dot segment",
            "backslash",
            "tab or newline",
            "userinfo",
            "another host",
            "another port",
            "default port dropped",
            "case",
            "string and parser disagree on the prefix",
        ] {
            assert!(
                seen.contains(wanted),
                "never generated: {wanted}; saw {seen:?}"
            );
        }
    }

    #[test]
    fn callback_queries_reach_duplicates_bad_escapes_and_huge_values() {
        let mut runner = TestRunner::deterministic();
        let strategy = callback_query();
        let (mut duplicated, mut bad_escape, mut huge) = (false, false, false);
        for _ in 0..2000 {
            let q = strategy.new_tree(&mut runner).unwrap().current();
            duplicated |= q.matches("state=").count() > 1;
            bad_escape |= q.contains("%zz") || q.contains("%ff");
            huge |= q.len() > 10_000;
        }
        assert!(duplicated && bad_escape && huge);
    }

    #[test]
    fn dot_segments_are_recognised_in_every_encoding() {
        for path in [
            "/a/..",
            "/a/%2E%2e/b",
            "/a\\.%2e\\b",
            "/a/.\t./b",
            "/.",
            "/%2e",
        ] {
            assert!(has_dot_segment(path), "{path:?}");
        }
        for path in ["/a/...", "/a/%252e%252e", "/a/..;/b", "/a.b/c"] {
            assert!(!has_dot_segment(path), "{path:?}");
        }
    }
}
