//! Where a connect flow may send the user's browser back to: `TOKENKEEPER_ALLOWED_RETURN_URLS`
//! and the `return_to` of each session, checked as URLs rather than as text.
//!
//! A textual prefix check is not enough, because the redirect is built from the parsed URL and
//! a URL parser resolves dot segments: with the prefix `https://app.example/app/`, the text
//! `https://app.example/app/../admin` starts with the prefix but sends the browser to `/admin`.
//! So a candidate is refused outright if it carries what parsers disagree on (control
//! characters, whitespace, backslashes, percent-encoded dots before the query), then parsed
//! with the `url` crate, which implements the WHATWG URL Standard that browsers follow, and
//! compared by its parts: the same scheme, host and port as an allowed entry, and a path under
//! the entry's path at a segment boundary. The redirect is then built from exactly the URL that
//! was checked (`ReturnTo`), never from the text that came in.

use url::Url;

/// One allowed prefix: an origin and a path.
#[derive(Debug, Clone)]
struct Prefix {
    /// The entry as parsed (query and fragment removed); its serialization is the default
    /// `return_to` when it is the first entry.
    url: Url,
}

impl Prefix {
    /// Whether `candidate`, already parsed and normalised, is under this prefix.
    fn admits(&self, candidate: &Url) -> bool {
        if candidate.scheme() != self.url.scheme()
            || candidate.host() != self.url.host()
            || candidate.port_or_known_default() != self.url.port_or_known_default()
        {
            return false;
        }
        under_path(candidate.path(), self.url.path())
    }
}

/// Whether `path` is `prefix` or lies under it at a segment boundary: `/app` admits `/app` and
/// `/app/x` but not `/application`; `/app/` admits `/app/` and `/app/x` only.
fn under_path(path: &str, prefix: &str) -> bool {
    if prefix.ends_with('/') {
        return path.starts_with(prefix);
    }
    path == prefix
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// The parsed `TOKENKEEPER_ALLOWED_RETURN_URLS`.
#[derive(Debug, Clone)]
pub struct AllowedReturnUrls {
    prefixes: Vec<Prefix>,
}

/// Why a `return_to` was refused, in words for the app's developer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("it contains a control character, whitespace or a backslash")]
    HostileCharacter,
    #[error("it contains a percent-encoded dot (%2e) before its query")]
    EncodedDot,
    #[error("it is not an absolute http or https URL")]
    NotHttp,
    #[error("it carries a user name or password")]
    Userinfo,
    #[error("it is not under any of TOKENKEEPER_ALLOWED_RETURN_URLS")]
    OutsideAllowList,
}

/// Refuses what WHATWG parsing would silently strip, rewrite or resolve: ASCII tabs and
/// newlines are removed anywhere in a URL, a backslash is a path separator in http(s) URLs,
/// and `%2e` counts as a dot when dot segments are resolved. Other software on the way (the
/// app's own server, a proxy) may read such text differently from the parser that checked
/// it, so such a candidate is not normalised but refused.
fn screen(text: &str) -> Result<(), Refusal> {
    if text
        .chars()
        .any(|c| c.is_control() || c.is_whitespace() || c == '\\')
    {
        return Err(Refusal::HostileCharacter);
    }
    let before_query = text.split(['?', '#']).next().unwrap_or(text);
    if before_query.to_ascii_lowercase().contains("%2e") {
        return Err(Refusal::EncodedDot);
    }
    Ok(())
}

/// Parses an absolute http(s) URL without userinfo, after `screen`.
fn parse_http(text: &str) -> Result<Url, Refusal> {
    screen(text)?;
    let url = Url::parse(text).map_err(|_| Refusal::NotHttp)?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(Refusal::NotHttp);
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(Refusal::Userinfo);
    }
    Ok(url)
}

impl AllowedReturnUrls {
    /// Parses the entries of `TOKENKEEPER_ALLOWED_RETURN_URLS` (comma-separated, blanks
    /// ignored). An entry must be an absolute http(s) URL without userinfo, query, fragment or
    /// dot segments, and pass the same screening as a `return_to`; the message says which entry
    /// is wrong and why.
    pub fn parse(list: &str) -> Result<Self, String> {
        let mut prefixes = Vec::new();
        for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let url = parse_http(entry).map_err(|why| format!("{entry:?}: {why}"))?;
            if url.query().is_some() || url.fragment().is_some() {
                return Err(format!(
                    "{entry:?}: an allowed return URL is a prefix and cannot carry a query or fragment"
                ));
            }
            // `Url::parse` already resolved them; an entry that needed it was surely not meant.
            let raw_path = entry
                .split_once("://")
                .map(|(_, rest)| rest)
                .and_then(|rest| rest.find('/').map(|i| &rest[i..]))
                .unwrap_or("");
            if raw_path.split('/').any(|s| s == "." || s == "..") {
                return Err(format!(
                    "{entry:?}: an allowed return URL cannot contain . or .. segments"
                ));
            }
            prefixes.push(Prefix { url });
        }
        if prefixes.is_empty() {
            return Err("no URL given".into());
        }
        Ok(AllowedReturnUrls { prefixes })
    }

    /// Only `url` and what lies under it: the default, tokenkeeper's own public URL.
    pub fn only(url: &Url) -> Self {
        let mut url = url.clone();
        url.set_query(None);
        url.set_fragment(None);
        AllowedReturnUrls {
            prefixes: vec![Prefix { url }],
        }
    }

    /// The first entry: where a link made by tokenkeeper itself (a 424's reconnect link) sends
    /// the user back to.
    pub fn first(&self) -> ReturnTo {
        ReturnTo(self.prefixes[0].url.clone())
    }

    /// Checks a `return_to`; on success, the normalised URL the redirect will be built from.
    pub fn check(&self, candidate: &str) -> Result<ReturnTo, Refusal> {
        let url = parse_http(candidate)?;
        if self.prefixes.iter().any(|p| p.admits(&url)) {
            Ok(ReturnTo(url))
        } else {
            Err(Refusal::OutsideAllowList)
        }
    }
}

/// A `return_to` that passed `AllowedReturnUrls::check`, normalised. Sessions store its
/// serialization, and the callback's redirect is built from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReturnTo(Url);

impl ReturnTo {
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    /// The `Location` of the callback's final redirect: this URL with `pairs` added to its
    /// query (form-encoded, so a value cannot add a parameter or leave the query).
    pub fn with_query(&self, pairs: &[(&str, &str)]) -> String {
        let mut url = self.0.clone();
        url.query_pairs_mut().extend_pairs(pairs);
        url.into()
    }
}

impl std::fmt::Display for ReturnTo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn allow(list: &str) -> AllowedReturnUrls {
        AllowedReturnUrls::parse(list).unwrap()
    }

    /// Where a browser lands: the callback's `Location`, resolved the WHATWG way against the
    /// callback's own URL (a `Location` may be relative).
    fn browser_lands(location: &str) -> Url {
        Url::options()
            .base_url(Some(
                &Url::parse("https://tokenkeeper.example/oauth/callback").unwrap(),
            ))
            .parse(location)
            .expect("a Location the browser can follow")
    }

    /// The claim, stated with nothing but the parsed landing URL: the same origin as the
    /// entry, and a path under the entry's path at a segment boundary.
    fn stays_inside(landing: &Url, entry: &str) -> bool {
        let entry = Url::parse(entry).unwrap();
        // Stated again here rather than calling the code under test: `/app` admits `/app` and
        // `/app/…`, `/app/` admits `/app/…`.
        let dir = if entry.path().ends_with('/') {
            entry.path().to_owned()
        } else {
            format!("{}/", entry.path())
        };
        landing.origin() == entry.origin()
            && landing.username().is_empty()
            && landing.password().is_none()
            && (landing.path() == entry.path() || landing.path().starts_with(&dir))
    }

    #[test]
    fn the_old_cases_still_hold() {
        let list = allow("https://app.example");
        assert!(list.check("https://app.example/done").is_ok());
        assert!(list.check("https://app.example").is_ok());
        assert_eq!(
            list.check("https://app.example.evil.com/"),
            Err(Refusal::OutsideAllowList)
        );
        assert_eq!(
            list.check("https://evil.example/steal"),
            Err(Refusal::OutsideAllowList)
        );
        assert_eq!(list.check("javascript:alert(1)"), Err(Refusal::NotHttp));
        let app = allow("https://app.example/app");
        assert!(app.check("https://app.example/app").is_ok());
        assert!(app.check("https://app.example/app?x=1").is_ok());
        assert!(app.check("https://app.example/app/x").is_ok());
        assert!(app.check("https://app.example/application").is_err());
    }

    #[test]
    fn dot_segments_in_every_encoding_cannot_leave_the_prefix() {
        let list = allow("https://app.example/app/");
        for hostile in [
            "https://app.example/app/../admin",
            "https://app.example/app/%2e%2e/admin",
            "https://app.example/app/%2E./admin",
            "https://app.example/app/.%2E/admin",
            "https://app.example/app/..\\admin",
            "https://app.example/app\\..\\admin",
            "https://app.example/app/.\t./admin",
            "https://app.example/app/.\n./admin",
            "https://app.example/app/..%2fadmin/..",
            "https://app.example/app/./../admin",
            "https://app.example@evil.example/app/",
            "https://app.example/app/@evil.example",
            "https://user:pw@app.example/app/",
            "https://app.example:8443/app/",
            "http://app.example/app/",
            "//evil.example/app/",
            "/app/",
            " https://evil.example/app/",
        ] {
            if let Ok(accepted) = list.check(hostile) {
                let landing = browser_lands(&accepted.with_query(&[("status", "connected")]));
                assert!(
                    stays_inside(&landing, "https://app.example/app/"),
                    "{hostile:?} was accepted and lands on {landing}"
                );
            }
        }
        // A dot segment that stays inside is normalised, and the redirect uses the result.
        let inside = list.check("https://app.example/app/x/../y").unwrap();
        assert_eq!(inside.as_str(), "https://app.example/app/y");
    }

    #[test]
    fn bad_entries_are_refused_with_the_entry_named() {
        for bad in [
            "ftp://app.example/",
            "https://app.example/app?x=1",
            "https://app.example/app#top",
            "https://user@app.example/",
            "https://app.example/a/../b",
            "https://app.example/%2e%2e/",
            "https://app.example/a\\b",
            "not a url",
            "",
        ] {
            let e = AllowedReturnUrls::parse(bad).unwrap_err();
            assert!(bad.is_empty() || e.contains(&format!("{bad:?}")), "{e}");
        }
    }

    /// Pieces a hostile `return_to` is made of: every spelling of a dot segment, separators,
    /// authority tricks, userinfo, ports, case changes, queries and fragments.
    fn piece() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec![
            "app",
            "App",
            "admin",
            "x",
            "/",
            "//",
            "\\",
            ".",
            "..",
            "%2e",
            "%2E",
            "%2e%2e",
            ".%2E",
            "%2E.",
            "%252e",
            "\t",
            "\n",
            "\r",
            " ",
            "@",
            ":",
            ":443",
            ":8443",
            "?",
            "#",
            "&",
            "=",
            "%2f",
            "%5c",
            "evil.example",
            "app.example",
            "APP.EXAMPLE",
            "app.example.",
            "user:pw@",
            ";",
            "%00",
            "\u{3002}",
            "\u{ff0e}",
            "\u{2025}",
        ])
    }

    fn candidate() -> impl Strategy<Value = String> {
        let prefix = prop::sample::select(vec![
            "https://app.example/app/",
            "https://app.example/app",
            "https://app.example/",
            "https://app.example",
            "https://APP.example:443/app/",
            "http://app.example/app/",
            "https://app.example:8443/app/",
            "https://",
            "https:",
            "//",
            "",
        ]);
        (prefix, prop::collection::vec(piece(), 0..8))
            .prop_map(|(p, pieces)| format!("{p}{}", pieces.concat()))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        /// Accepted ⇒ the final `Location`, resolved as a browser resolves it, stays under the
        /// entry at a segment boundary and on the entry's origin.
        #[test]
        fn an_accepted_return_to_lands_inside_its_prefix(
            entry in prop::sample::select(vec![
                "https://app.example/app/",
                "https://app.example/app",
                "https://app.example/",
            ]),
            candidate in candidate(),
            status in prop::sample::select(vec!["connected", "denied", "error"]),
        ) {
            let list = allow(entry);
            if let Ok(accepted) = list.check(&candidate) {
                let location = accepted.with_query(&[("status", status), ("error", "a&b=c#d")]);
                let landing = browser_lands(&location);
                prop_assert!(
                    stays_inside(&landing, entry),
                    "{:?} was accepted under {} and lands on {}", candidate, entry, landing
                );
                prop_assert_eq!(
                    landing.query_pairs().find(|(k, _)| k == "status").map(|(_, v)| v.into_owned()),
                    Some(status.to_owned())
                );
            }
        }
    }
}
