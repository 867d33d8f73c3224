//! Python's implementations that tests judge tokenkeeper by: Prometheus's own text parser
//! (`tests/python/parse_metrics.py`). The interpreter is `TOKENKEEPER_TEST_PYTHON`, else the
//! repository's `.venv-test/bin/python`, which `scripts/test` creates with
//! `tests/python/requirements.txt`. Without either a test fails, it never skips, as a PostgreSQL
//! case does without its server.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;
use tokio::io::AsyncWriteExt;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The interpreter that has the packages of `tests/python/requirements.txt`.
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("TOKENKEEPER_TEST_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = repo().join(".venv-test/bin/python");
    assert!(
        venv.exists(),
        "this test needs Python with tests/python/requirements.txt: run scripts/test (which \
         makes .venv-test), or set TOKENKEEPER_TEST_PYTHON"
    );
    venv
}

/// One sample as Prometheus's parser read it.
#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// A scrape as Prometheus's parser read it.
#[derive(Debug)]
pub struct Scrape {
    /// Family name (without `_total`) → type (`counter`, `gauge`, `histogram`, …).
    pub families: Vec<(String, String)>,
    pub samples: Vec<Sample>,
}

impl Scrape {
    /// The value of the one sample named `name` whose labels include `labels`; panics when
    /// there is none or several.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let found: Vec<&Sample> = self.matching(name, labels).collect();
        assert_eq!(
            found.len(),
            1,
            "one sample {name}{labels:?}, found {found:?} among {} samples",
            self.samples.len()
        );
        found[0].value
    }

    /// The value of the sample, or 0 when the parser found no such sample (a series that was
    /// never touched is not written).
    pub fn value_or_zero(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|s| s.value).sum()
    }

    fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.iter().any(|(lk, lv)| lk == k && lv == v))
        })
    }

    pub fn family_type(&self, name: &str) -> Option<&str> {
        self.families
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.as_str())
    }
}

/// Parses `text` with `prometheus_client.parser`, in a Python process bounded to 60 s.
pub async fn parse_metrics(text: &str) -> Scrape {
    let script = repo().join("tests/python/parse_metrics.py");
    let mut child = tokio::process::Command::new(python())
        .arg(&script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the test's Python starts");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(text.as_bytes()).await.unwrap();
    drop(stdin);
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("the parser ends within 60 s")
        .unwrap();
    assert!(
        out.status.success(),
        "Prometheus's parser refused the scrape: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let read: Value = serde_json::from_slice(&out.stdout).unwrap();
    let families = read["families"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
        .collect();
    let samples = read["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| Sample {
            name: s["name"].as_str().unwrap().to_owned(),
            labels: s["labels"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
                .collect(),
            value: s["value"].as_f64().unwrap(),
        })
        .collect();
    Scrape { families, samples }
}
