//! tokenkeeper as a process of its own (the built binary): for claims about several processes,
//! crashes (`kill -9`) and restarts.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};

use super::app::{Api, ADMIN_KEY, TOKENS_KEY};

/// Everything a `tokenkeeper serve` process is started with.
#[derive(Clone)]
pub struct BrokerSpec {
    pub database_url: String,
    pub key_ring: String,
    pub sim_url: String,
    pub client_id: String,
    pub client_secret: String,
    /// `None`: the process's own address once bound.
    pub public_url: Option<String>,
    pub spill_dir: PathBuf,
    pub provider_timeout: Duration,
    pub refresh_budget: Duration,
    /// More `TOKENKEEPER_*` settings.
    pub env: Vec<(String, String)>,
    /// Keep everything the process writes (stdout and stderr) in `Broker::output`, for tests
    /// that search its log; otherwise stderr goes to the test's.
    pub capture_output: bool,
}

/// A running tokenkeeper process; killed when dropped.
pub struct Broker {
    api: Api,
    pub child: tokio::process::Child,
    /// What the process wrote, when started with `capture_output`.
    pub output: Arc<Mutex<String>>,
}

impl std::ops::Deref for Broker {
    type Target = Api;

    fn deref(&self) -> &Api {
        &self.api
    }
}

impl BrokerSpec {
    /// A process with a new key ring on `database_url`, talking to `sim`, its public URL its
    /// own address, a 1 s provider timeout and a 30 s refresh budget; a test changes what it
    /// needs with `..BrokerSpec::against(…)`.
    pub fn against(
        sim: &notion_sim::SimServer,
        database_url: String,
        spill_dir: &std::path::Path,
    ) -> BrokerSpec {
        let config = sim.config();
        BrokerSpec {
            database_url,
            key_ring: tokenkeeper::seal::KeyRing::generate_entry(),
            sim_url: sim.base_url(),
            client_id: config.client_id.clone(),
            client_secret: config.client_secret.clone(),
            public_url: None,
            spill_dir: spill_dir.to_path_buf(),
            provider_timeout: Duration::from_secs(1),
            refresh_budget: Duration::from_secs(30),
            env: Vec::new(),
            capture_output: false,
        }
    }

    fn command(&self) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_tokenkeeper"));
        cmd.arg("serve")
            .env("TOKENKEEPER_DATABASE_URL", &self.database_url)
            .env("TOKENKEEPER_ENCRYPTION_KEY", &self.key_ring)
            .env(
                "TOKENKEEPER_API_KEYS",
                format!("admin:{ADMIN_KEY},tokens:{TOKENS_KEY}"),
            )
            .env("TOKENKEEPER_LISTEN", "127.0.0.1:0")
            .env("TOKENKEEPER_NOTION_CLIENT_ID", &self.client_id)
            .env("TOKENKEEPER_NOTION_CLIENT_SECRET", &self.client_secret)
            .env("TOKENKEEPER_NOTION_BASE_URL", &self.sim_url)
            .env("TOKENKEEPER_SPILL_DIR", &self.spill_dir)
            .env(
                "TOKENKEEPER_PROVIDER_TIMEOUT",
                format!("{}ms", self.provider_timeout.as_millis()),
            )
            .env(
                "TOKENKEEPER_REFRESH_BUDGET",
                format!("{}ms", self.refresh_budget.as_millis()),
            )
            .env("TOKENKEEPER_LOG", "warn")
            // Off unless a test turns it on: its introspections would show in other tests'
            // counts of calls at the simulator.
            .env("TOKENKEEPER_HEALTH_CHECK_INTERVAL", "0")
            .stdout(std::process::Stdio::piped())
            .stderr(if self.capture_output {
                std::process::Stdio::piped()
            } else {
                std::process::Stdio::inherit()
            })
            .kill_on_drop(true);
        if let Some(public) = &self.public_url {
            cmd.env("TOKENKEEPER_PUBLIC_URL", public);
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    /// Starts the process and waits until it listens (it may first wait for the database).
    pub async fn start(&self) -> Broker {
        let mut child = self
            .command()
            .spawn()
            .expect("the tokenkeeper binary starts");
        let output = Arc::new(Mutex::new(String::new()));
        let capture = self.capture_output;
        let keep = {
            let output = output.clone();
            move |line: &str| {
                if capture {
                    let mut all = output.lock().unwrap();
                    all.push_str(line);
                    all.push('\n');
                }
            }
        };
        if let Some(stderr) = child.stderr.take() {
            let keep = keep.clone();
            let mut lines = BufReader::new(stderr).lines();
            tokio::spawn(async move {
                while let Ok(Some(line)) = lines.next_line().await {
                    keep(&line);
                }
            });
        }
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let url = tokio::time::timeout(Duration::from_secs(120), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                keep(&line);
                if let Some(rest) = line.split("listening on ").nth(1) {
                    return rest.trim().to_owned();
                }
            }
            panic!("tokenkeeper exited before listening");
        })
        .await
        .expect("tokenkeeper listens within 120 s");
        // Keep reading so the process never blocks on a full pipe.
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                keep(&line);
            }
        });
        Broker {
            api: Api::new(url, self.sim_url.clone()),
            child,
            output,
        }
    }
}

impl Broker {
    /// SIGKILL: no shutdown, no cleanup, like a crash.
    pub async fn kill(&mut self) {
        self.child.kill().await.expect("the process can be killed");
    }
}
