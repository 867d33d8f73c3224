//! Fidelity to real traffic: every JSON body in the recordings (`tests/recordings/`, vendored
//! from notion-sdk-py; see the README there) is matched against what the simulator answers to
//! the same call: the same keys, recursively, with the same JSON value types.
//!
//! The recordings are VCR cassettes in YAML. The only YAML they need parsed is a few scalars
//! (`method`, `uri`, status codes, response bodies as single-quoted or plain scalars), so this
//! file reads those directly instead of adding a YAML dependency to the workspace.

use std::collections::BTreeSet;
use std::path::PathBuf;

use notion_sim::OwnerKind;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::{Answer, Sim};

fn recordings_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/recordings");
    assert!(
        dir.is_dir(),
        "the Notion recordings are missing: expected them at {}",
        dir.display()
    );
    dir
}

/// One recorded request and its answer.
#[derive(Debug)]
struct Interaction {
    file: String,
    method: String,
    uri: String,
    status: u16,
    body: String,
}

/// Reads a YAML single-quoted scalar starting just after its opening quote: `''` is a quote,
/// a line break folds into a space (blank lines into newlines), indentation is dropped.
fn single_quoted(text: &str) -> String {
    let mut out = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' if chars.peek() == Some(&'\'') => {
                chars.next();
                out.push('\'');
            }
            '\'' => return out,
            '\n' => {
                while out.ends_with([' ', '\t']) {
                    out.pop();
                }
                let mut blank_lines = 0;
                loop {
                    while matches!(chars.peek(), Some(' ' | '\t')) {
                        chars.next();
                    }
                    if chars.peek() == Some(&'\n') {
                        chars.next();
                        blank_lines += 1;
                    } else {
                        break;
                    }
                }
                if blank_lines == 0 {
                    out.push(' ');
                } else {
                    out.extend(std::iter::repeat_n('\n', blank_lines));
                }
            }
            c => out.push(c),
        }
    }
    panic!("unterminated single-quoted scalar");
}

fn scalar_after<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.trim_start().strip_prefix(key).map(str::trim)
}

fn parse_cassette(file: &str, text: &str) -> Vec<Interaction> {
    let mut interactions = Vec::new();
    let (mut method, mut uri, mut status, mut body) = (None, None, None, None);
    let mut in_response = false;
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let start = offset;
        offset += line.len();
        let trimmed = line.trim_start();
        if trimmed.starts_with("- request:") {
            in_response = false;
        } else if trimmed.starts_with("response:") {
            in_response = true;
        } else if !in_response {
            if let Some(v) = scalar_after(line, "method:") {
                method = Some(v.to_owned());
            } else if let Some(v) = scalar_after(line, "uri:") {
                uri = Some(v.to_owned());
            }
        } else if let Some(v) =
            scalar_after(line, "string:").or_else(|| scalar_after(line, "content:"))
        {
            body = Some(if v.starts_with('\'') {
                let quote = start + line.find('\'').expect("a quote");
                single_quoted(&text[quote + 1..])
            } else {
                v.to_owned()
            });
        } else if let Some(v) =
            scalar_after(line, "code:").or_else(|| scalar_after(line, "status_code:"))
        {
            status = v.parse().ok();
        }
        if let (Some(_), Some(_), Some(_), Some(_)) = (&method, &uri, &status, &body) {
            interactions.push(Interaction {
                file: file.to_owned(),
                method: method.take().unwrap(),
                uri: uri.take().unwrap(),
                status: status.take().unwrap(),
                body: body.take().unwrap(),
            });
        }
    }
    interactions
}

fn load_recordings() -> Vec<Interaction> {
    let mut all = Vec::new();
    let mut entries: Vec<PathBuf> = std::fs::read_dir(recordings_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    entries.sort();
    for path in entries {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&path).unwrap();
        let found = parse_cassette(&name, &text);
        assert!(!found.is_empty(), "no interaction read from {name}");
        all.extend(found);
    }
    all
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Differences between a recorded body and the simulator's: missing or extra keys and, unless
/// `keys_only`, differing value types. `allowed_extra` names keys the simulator may add (fields
/// docs/notion-wire.md documents that the recording predates).
fn shape_diff(
    recorded: &Value,
    sim: &Value,
    path: &str,
    keys_only: bool,
    allowed_extra: &[&str],
    out: &mut Vec<String>,
) {
    match (recorded, sim) {
        (Value::Object(r), Value::Object(s)) => {
            for (key, rv) in r {
                let here = format!("{path}.{key}");
                match s.get(key) {
                    None => out.push(format!("{here}: missing from the simulator")),
                    Some(sv) => {
                        if !keys_only {
                            shape_diff(rv, sv, &here, keys_only, allowed_extra, out);
                        }
                    }
                }
            }
            for key in s.keys() {
                if !r.contains_key(key) && !allowed_extra.contains(&key.as_str()) {
                    out.push(format!("{path}.{key}: not in the recording"));
                }
            }
        }
        (Value::Array(r), Value::Array(s)) => {
            if let (Some(rv), Some(sv)) = (r.first(), s.first()) {
                shape_diff(rv, sv, &format!("{path}[0]"), keys_only, allowed_extra, out);
            }
        }
        _ if keys_only => {}
        (r, s) if type_name(r) != type_name(s) => out.push(format!(
            "{path}: recorded {} but the simulator sent {}",
            type_name(r),
            type_name(s)
        )),
        _ => {}
    }
}

fn assert_same_shape(
    what: &str,
    recorded: &Value,
    sim: &Value,
    keys_only: bool,
    allowed_extra: &[&str],
) {
    let mut diff = Vec::new();
    shape_diff(recorded, sim, "$", keys_only, allowed_extra, &mut diff);
    assert!(
        diff.is_empty(),
        "{what}: the simulator's body differs from the recording:\n  {}\nrecorded: {recorded}\nsim: {sim}",
        diff.join("\n  ")
    );
}

#[test]
fn the_cassette_reader_folds_multi_line_scalars() {
    let text = "  response:\n    body:\n      string: '{\"a\":\"it''s\n        folded\"}'\n    status:\n      code: 200\n";
    let cassette = format!("- request:\n    method: GET\n    uri: https://x/y\n{text}");
    let found = parse_cassette("t", &cassette);
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].body, "{\"a\":\"it's folded\"}");
    assert_eq!(found[0].status, 200);
}

/// What the simulator answers to the recorded call, and how strictly to compare.
struct Counterpart {
    answer: Answer,
    keys_only: bool,
    allowed_extra: &'static [&'static str],
}

async fn counterpart(sim: &Sim, rec: &Interaction) -> Option<Counterpart> {
    let path = url::Url::parse(&rec.uri).unwrap().path().to_owned();
    let pair = sim.connect().await;
    let strict = |answer| {
        Some(Counterpart {
            answer,
            keys_only: false,
            allowed_extra: &[],
        })
    };
    let shared_page = sim.bot(&pair.bot_id).await["shared_page_ids"][0].clone();
    match (rec.method.as_str(), path.as_str(), rec.status) {
        ("POST", "/v1/oauth/token", 200) => {
            let code = sim.authorize().await;
            Some(Counterpart {
                answer: sim.exchange(&code).await,
                // The recording's values are "..." placeholders: only its keys are evidence.
                keys_only: true,
                // Documented in docs/notion-wire.md §2; the recording predates refresh tokens.
                allowed_extra: &["refresh_token"],
            })
        }
        ("POST", "/v1/oauth/introspect", 200) => strict(sim.introspect(&pair.access).await),
        ("POST", "/v1/oauth/introspect", 401) => {
            strict(sim.send(sim.http.post(sim.url("/v1/oauth/introspect")).json(&json!({"token": pair.access}))).await)
        }
        ("POST", "/v1/oauth/revoke", 200) => strict(
            sim.send(
                sim.http
                    .post(sim.url("/v1/oauth/revoke"))
                    .basic_auth("tokenkeeper-dev", Some("dev-secret-not-for-production"))
                    .json(&json!({"token": pair.access})),
            )
            .await,
        ),
        ("GET", "/v1/invalid", 400) => strict(sim.rest(Method::GET, "/v1/invalid", &pair.access, None).await),
        ("GET", "/v1/users", 401) => strict(sim.rest(Method::GET, "/v1/users", "ntn_revoked", None).await),
        ("GET", "/v1/users/me", 200) => strict(sim.me(&pair.access).await),
        ("POST", "/v1/search", 200) => strict(
            sim.rest(Method::POST, "/v1/search", &pair.access, Some(json!({"query": "no such title"})))
                .await,
        ),
        ("POST", "/v1/pages", 200) => strict(
            sim.rest(
                Method::POST,
                "/v1/pages",
                &pair.access,
                Some(json!({"parent": {"page_id": shared_page}, "properties": {"title": [{"text": {"content": "Test"}}]}, "children": []})),
            )
            .await,
        ),
        _ => None,
    }
}

#[tokio::test]
async fn every_recorded_json_body_has_a_counterpart_of_the_same_shape() {
    let recordings = load_recordings();
    // The recorded bot is an internal integration: workspace-owned.
    let sim = Sim::with(|c| c.owner = OwnerKind::Workspace).await;
    let mut compared = BTreeSet::new();
    let mut not_simulated = BTreeSet::new();
    let mut non_json = Vec::new();
    for rec in &recordings {
        let Ok(recorded) = serde_json::from_str::<Value>(&rec.body) else {
            non_json.push(rec);
            continue;
        };
        let Some(counterpart) = counterpart(&sim, rec).await else {
            not_simulated.insert(format!("{} {} {}", rec.method, rec.uri, rec.status));
            continue;
        };
        let what = format!("{} {} {} ({})", rec.method, rec.uri, rec.status, rec.file);
        assert_eq!(
            counterpart.answer.status.as_u16(),
            rec.status,
            "{what}: {}",
            counterpart.answer.text
        );
        assert_same_shape(
            &what,
            &recorded,
            &counterpart.answer.body,
            counterpart.keys_only,
            counterpart.allowed_extra,
        );
        compared.insert(format!(
            "{} {}",
            rec.method,
            url::Url::parse(&rec.uri).unwrap().path()
        ));
    }
    // Outside the simulated slice, by design: deleting blocks.
    assert!(
        not_simulated
            .iter()
            .all(|s| s.starts_with("DELETE https://api.notion.com/v1/blocks/")),
        "recordings without a counterpart: {not_simulated:?}"
    );
    for expected in [
        "POST /v1/oauth/token",
        "POST /v1/oauth/introspect",
        "POST /v1/oauth/revoke",
        "GET /v1/invalid",
        "GET /v1/users",
        "GET /v1/users/me",
        "POST /v1/search",
        "POST /v1/pages",
    ] {
        assert!(
            compared.contains(expected),
            "{expected} was not compared: {compared:?}"
        );
    }

    // The recorded page object is also the shape of search results.
    let page = recordings
        .iter()
        .find(|r| r.method == "POST" && r.uri.ends_with("/v1/pages"))
        .map(|r| serde_json::from_str::<Value>(&r.body).unwrap())
        .unwrap();
    let mut page_without_id = page.clone();
    page_without_id
        .as_object_mut()
        .unwrap()
        .remove("request_id");
    // Seed pages sit at the top of the workspace: the same page object with a workspace parent.
    page_without_id["parent"] = json!({"type": "workspace", "workspace": true});
    let pair = sim.connect().await;
    let search = sim
        .rest(
            Method::POST,
            "/v1/search",
            &pair.access,
            Some(json!({"query": "Getting Started"})),
        )
        .await;
    assert_same_shape(
        "search result",
        &page_without_id,
        &search.body["results"][0],
        false,
        &[],
    );
    let page_id = search.body["results"][0]["id"].as_str().unwrap();
    let retrieved = sim
        .rest(
            Method::GET,
            &format!("/v1/pages/{page_id}"),
            &pair.access,
            None,
        )
        .await;
    let mut parent_by_workspace = page.clone();
    parent_by_workspace["parent"] = json!({"type": "workspace", "workspace": true});
    assert_same_shape(
        "pages.retrieve",
        &parent_by_workspace,
        &retrieved.body,
        false,
        &[],
    );

    // The edge's plain-text 400: the non_json fault produces its like.
    assert_eq!(non_json.len(), 1, "one non-JSON recording");
    let recorded = non_json[0];
    sim.control_post(
        "/_sim/faults",
        json!({"endpoint": "users.me", "kind": "non_json", "status": recorded.status, "count": 1}),
    )
    .await;
    let answer = sim.me(&pair.access).await;
    assert_eq!(
        answer.status,
        StatusCode::from_u16(recorded.status).unwrap()
    );
    assert_eq!(answer.headers["content-type"], "text/plain");
    assert_eq!(answer.text, recorded.body, "the same body as the recording");
    assert!(serde_json::from_str::<Value>(&answer.text).is_err());
}
