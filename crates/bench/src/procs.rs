//! The processes under test: `tokenkeeper notion-sim` and `tokenkeeper serve`, started from the
//! release binary on loopback, their URLs read from their first stdout lines, their logs kept
//! in the run directory, their memory read from `/proc/<pid>/status`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use http::{Method, StatusCode};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::client::{self, request};

/// The simulator's registered client, as `notion-sim` has it by default.
pub const CLIENT_ID: &str = "tokenkeeper-dev";
pub const CLIENT_SECRET: &str = "dev-secret-not-for-production";
pub const NOTION_VERSION: &str = "2026-03-11";

/// A child process that is stopped (SIGTERM, then SIGKILL) when dropped or stopped.
pub struct Proc {
    name: String,
    child: Child,
    pub pid: u32,
}

/// Resident memory of a process, from `/proc/<pid>/status`.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Memory {
    /// Resident set size now, MB (10^6 bytes).
    pub rss_mb: f64,
    /// Peak resident set size, MB.
    pub hwm_mb: f64,
    /// Anonymous resident memory now (heap and stacks, without mapped files), MB.
    pub anon_mb: f64,
}

impl Proc {
    /// Spawns `program args` with `env`, stdout piped (the caller reads the first lines) and
    /// stderr appended to `<log_dir>/<name>.log`.
    fn spawn(
        name: &str,
        program: &Path,
        args: &[&str],
        env: &[(&str, String)],
        log_dir: &Path,
    ) -> anyhow::Result<Proc> {
        let log_path = log_dir.join(format!("{name}.log"));
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("cannot create {}", log_path.display()))?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot run {}", program.display()))?;
        let pid = child.id().context("the child has no pid")?;
        Ok(Proc {
            name: name.to_owned(),
            child,
            pid,
        })
    }

    /// Reads stdout lines until one starts with `prefix`; returns the rest of that line. The
    /// remaining output is drained in the background so the pipe never fills.
    async fn read_until(&mut self, prefix: &str, timeout: Duration) -> anyhow::Result<String> {
        let stdout = self.child.stdout.take().context("stdout already taken")?;
        let mut lines = BufReader::new(stdout).lines();
        let found = tokio::time::timeout(timeout, async {
            while let Some(line) = lines.next_line().await? {
                if let Some(rest) = line
                    .find(prefix)
                    .map(|i| line[i + prefix.len()..].to_owned())
                {
                    return anyhow::Ok(Some(rest));
                }
            }
            anyhow::Ok(None)
        })
        .await;
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        match found {
            Ok(Ok(Some(rest))) => Ok(rest.trim().to_owned()),
            Ok(Ok(None)) => bail!(
                "{} exited before printing {prefix:?}; see its log",
                self.name
            ),
            Ok(Err(e)) => Err(e),
            Err(_) => bail!("{} did not print {prefix:?} within {timeout:?}", self.name),
        }
    }

    pub fn memory(&self) -> anyhow::Result<Memory> {
        memory_of(self.pid)
    }

    /// Stops the process with SIGTERM, waiting up to 5 s before SIGKILL.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if self.child.try_wait()?.is_none() {
            // `kill -TERM` rather than a signal crate: the workspace forbids unsafe code.
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &self.pid.to_string()])
                .status();
            if tokio::time::timeout(Duration::from_secs(5), self.child.wait())
                .await
                .is_err()
            {
                eprintln!("  {} did not stop within 5 s; killing it", self.name);
                self.child.kill().await?;
            }
        }
        Ok(())
    }
}

pub fn memory_of(pid: u32) -> anyhow::Result<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> anyhow::Result<f64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("no {name} in /proc/{pid}/status"))?;
        let kib: f64 = line
            .split_whitespace()
            .nth(1)
            .context("malformed status line")?
            .parse()?;
        Ok((kib * 1024.0 / 1e6 * 10.0).round() / 10.0)
    };
    Ok(Memory {
        rss_mb: field("VmRSS:")?,
        hwm_mb: field("VmHWM:")?,
        anon_mb: field("RssAnon:")?,
    })
}

/// CPU time (user + system, every thread) a process has used, ms, from `/proc/<pid>/stat`.
pub fn cpu_ms(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may hold spaces; the fields after its closing parenthesis do not.
    let rest = &stat[stat.rfind(')').context("malformed stat")? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat(5), 12 and 13 after the name and state.
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    Ok(ticks * 1000.0 / CLOCK_TICKS)
}

/// `sysconf(_SC_CLK_TCK)`, which is 100 on every Linux this runs on.
const CLOCK_TICKS: f64 = 100.0;

/// A free loopback port, asked of the kernel. `serve` needs its port before it starts, because
/// its public URL (the OAuth callback) is derived from it.
pub fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// A running `tokenkeeper notion-sim`.
pub struct Sim {
    pub proc: Proc,
    pub url: String,
    pub addr: SocketAddr,
}

impl Sim {
    /// Starts the simulator with auto-approval, a fresh identity per authorization and no rate
    /// limit, plus `extra` flags.
    pub async fn start(
        bin: &Path,
        log_dir: &Path,
        name: &str,
        extra: &[&str],
    ) -> anyhow::Result<Sim> {
        let mut args = vec![
            "notion-sim",
            "--listen",
            "127.0.0.1:0",
            "--auto-approve",
            "--fresh-identity",
            // The request log is a ring buffer behind a lock; keep it small so it costs little.
            "--request-log-capacity",
            "100",
        ];
        // No rate limit, unless the scenario sets one.
        if !extra.contains(&"--rate-limit-per-connection") {
            args.extend(["--rate-limit-per-connection", "0"]);
        }
        args.extend_from_slice(extra);
        let mut proc = Proc::spawn(name, bin, &args, &[], log_dir)?;
        let url = proc
            .read_until("notion-sim listening on ", Duration::from_secs(10))
            .await?;
        let addr = client::addr_of(&url)?;
        Ok(Sim { proc, url, addr })
    }

    pub async fn stats(&self) -> anyhow::Result<Value> {
        client::once(
            self.addr,
            request(Method::GET, self.addr, "/_sim/stats").empty(),
        )
        .await?
        .expect(StatusCode::OK)?
        .json()
    }

    /// `token_requests.total.<grant>` of `/_sim/stats`.
    pub async fn token_requests(&self, grant: &str) -> anyhow::Result<u64> {
        let stats = self.stats().await?;
        Ok(stats["token_requests"]["total"][grant]
            .as_u64()
            .unwrap_or(0))
    }

    pub async fn stop(self) -> anyhow::Result<()> {
        self.proc.stop().await
    }
}

/// What every `serve` of one scenario shares.
#[derive(Clone)]
pub struct BrokerSpec {
    pub bin: PathBuf,
    pub log_dir: PathBuf,
    pub database_url: String,
    pub encryption_key: String,
    /// The admin key, without its `admin:` prefix (what a caller sends as a bearer).
    pub api_key: String,
    pub sim_url: String,
    /// More `TOKENKEEPER_*` settings for every `serve` (`--serve-env`).
    pub extra_env: Vec<(String, String)>,
}

/// A running `tokenkeeper serve`.
pub struct Broker {
    pub proc: Proc,
    pub url: String,
    pub addr: SocketAddr,
    /// From spawning the process to the first `/readyz` 200.
    pub startup: Duration,
}

impl Broker {
    pub async fn start(spec: &BrokerSpec, name: &str) -> anyhow::Result<Broker> {
        Broker::start_with(spec, name, &[]).await
    }

    /// `start`, with more `TOKENKEEPER_*` settings.
    pub async fn start_with(
        spec: &BrokerSpec,
        name: &str,
        extra: &[(&str, String)],
    ) -> anyhow::Result<Broker> {
        let port = free_port()?;
        let url = format!("http://127.0.0.1:{port}");
        let env = [
            ("TOKENKEEPER_LISTEN", format!("127.0.0.1:{port}")),
            ("TOKENKEEPER_BENCH_BASELINE_ROUTE", "true".to_owned()),
            ("TOKENKEEPER_PUBLIC_URL", url.clone()),
            ("TOKENKEEPER_DATABASE_URL", spec.database_url.clone()),
            ("TOKENKEEPER_ENCRYPTION_KEY", spec.encryption_key.clone()),
            ("TOKENKEEPER_API_KEYS", format!("admin:{}", spec.api_key)),
            ("TOKENKEEPER_NOTION_CLIENT_ID", CLIENT_ID.to_owned()),
            ("TOKENKEEPER_NOTION_CLIENT_SECRET", CLIENT_SECRET.to_owned()),
            ("TOKENKEEPER_NOTION_BASE_URL", spec.sim_url.clone()),
            // The health check would introspect the seeded tokens, which the simulator never
            // minted, and mark them needs_reauth in the middle of a measurement.
            ("TOKENKEEPER_HEALTH_CHECK_INTERVAL", "0".to_owned()),
        ];
        let spawned = Instant::now();
        let env: Vec<(&str, String)> = env
            .into_iter()
            .chain(spec.extra_env.iter().map(|(k, v)| (k.as_str(), v.clone())))
            .chain(extra.iter().cloned())
            .collect();
        let mut proc = Proc::spawn(name, &spec.bin, &["serve"], &env, &spec.log_dir)?;
        let printed = proc
            .read_until("listening on ", Duration::from_secs(60))
            .await?;
        let addr = client::addr_of(&printed)?;
        let ready_by = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = client::once(addr, request(Method::GET, addr, "/readyz").empty()).await;
            if matches!(&ready, Ok(r) if r.status == StatusCode::OK) {
                break;
            }
            if Instant::now() > ready_by {
                bail!(
                    "{name} was not ready within 60 s: {:?}",
                    ready.map(|r| r.text())
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(Broker {
            proc,
            url,
            addr,
            startup: spawned.elapsed(),
        })
    }

    pub async fn stop(self) -> anyhow::Result<()> {
        self.proc.stop().await
    }
}

/// The samples of a `serve`'s `/metrics`, by series (name and labels as written).
pub async fn scrape(
    addr: SocketAddr,
    key: &str,
) -> anyhow::Result<std::collections::HashMap<String, f64>> {
    let reply = client::once(
        addr,
        request(Method::GET, addr, "/metrics").bearer(key).empty(),
    )
    .await?
    .expect(StatusCode::OK)?;
    Ok(String::from_utf8_lossy(&reply.body)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect())
}
