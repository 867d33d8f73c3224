//! Target 6: where a connect session may send the user back to (`return_to`, checked when
//! a session is created and again by the callback, which redirects there).
//!
//! The hostile URLs come from `fuzz::urls`.
//!
//! Property: a `return_to` that is accepted ends in a redirect whose WHATWG resolution (what a
//! browser does with the `Location` header, computed with the `url` crate) has the origin of an
//! allowed prefix and a path under that prefix's path at a segment boundary. (The textual check
//! this replaced accepted `https://app.example/app/..//evil.example`, kept as a seed.)

use proptest::prelude::*;
use proptest::test_runner::TestRunner;

use super::urls::hostile_url;
use super::{config, hostile_text};
use crate::return_to::{AllowedReturnUrls, ReturnTo};

/// The allowed prefixes: with and without a path, a trailing slash, a port.
const PREFIXES: [&str; 5] = [
    "https://app.example/app",
    "https://app.example/cb/",
    "http://localhost:3000",
    "https://app.example:8443/x",
    "https://sub.app.example",
];

/// The allow-list as `TOKENKEEPER_ALLOWED_RETURN_URLS` would give it.
fn allowed() -> AllowedReturnUrls {
    AllowedReturnUrls::parse(&PREFIXES.join(",")).expect("the prefixes are a valid allow-list")
}

/// Where the callback sends the browser for a session returning to `return_to`: the checked
/// URL with the callback's query, as `api::connect` builds it.
fn final_redirect(return_to: &ReturnTo) -> String {
    return_to.with_query(&[
        ("connection_id", "con_0190f0c2a0a07d3a9b1c2d3e4f5a6b7c"),
        ("status", "connected"),
    ])
}

/// Whether `path` is `prefix`'s path or below it at a segment boundary.
pub(super) fn under(path: &str, prefix: &str) -> bool {
    if prefix.ends_with('/') {
        path.starts_with(prefix)
    } else {
        path == prefix || path.starts_with(&format!("{prefix}/"))
    }
}

fn check(allowed: &AllowedReturnUrls, return_to: &str) -> Result<(), TestCaseError> {
    let Ok(checked) = allowed.check(return_to) else {
        return Ok(());
    };
    let location = final_redirect(&checked);
    let callback = url::Url::parse("https://tokenkeeper.example/oauth/callback").unwrap();
    let Ok(landed) = callback.join(&location) else {
        return Err(TestCaseError::fail(format!(
            "{return_to:?} is accepted but a browser cannot follow {location:?}"
        )));
    };
    let inside = PREFIXES.iter().any(|p| {
        let p = url::Url::parse(p).unwrap();
        landed.origin() == p.origin() && under(landed.path(), p.path())
    });
    prop_assert!(
        inside,
        "{:?} is accepted, and the browser lands on {}",
        return_to,
        landed
    );
    Ok(())
}

fn return_to() -> impl Strategy<Value = String> {
    let prefixes: Vec<String> = PREFIXES.iter().map(|p| (*p).to_owned()).collect();
    prop_oneof![
        6 => hostile_url(prefixes),
        1 => prop::sample::select(PREFIXES.to_vec()).prop_map(str::to_owned),
        1 => hostile_text(),
    ]
}

#[test]
fn an_accepted_return_to_lands_under_its_prefix() {
    // Not a `proptest!` block, so that the allow-list is parsed once for every case.
    let allowed = allowed();
    let mut runner = TestRunner::new(proptest::test_runner::Config {
        source_file: Some(file!()),
        ..config(1024)
    });
    let result = runner.run(&return_to(), |r| check(&allowed, &r));
    if let Err(e) = result {
        panic!("{e}\n{runner}");
    }
}

#[test]
fn allowed_prefixes_and_ordinary_paths_under_them_are_accepted() {
    let allowed = allowed();
    for ok in [
        "https://app.example/app",
        "https://app.example/app/done?x=1",
        "https://app.example/cb/",
        "http://localhost:3000/callback#top",
        "https://sub.app.example/",
    ] {
        assert!(allowed.check(ok).is_ok(), "{ok}");
        check(&allowed, ok).unwrap();
    }
    for refused in [
        "https://app.example/application",
        "https://app.example.evil.com/",
        "https://app.example@evil.example/app",
        "javascript:alert(1)//https://app.example/app",
    ] {
        assert!(allowed.check(refused).is_err(), "{refused}");
    }
}
