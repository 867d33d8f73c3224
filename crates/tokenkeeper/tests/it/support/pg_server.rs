//! A PostgreSQL server of a test's own, which the test may stop and start (a real outage)
//! without disturbing the shared server the other tests use. Started the way
//! `scripts/with-postgres` starts its server, from the binaries it names.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

pub struct PgServer {
    dir: tempfile::TempDir,
    bin: PathBuf,
    user: Option<String>,
    pub port: u16,
}

fn required(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!(
            "{var} is not set. Outage tests never skip: run them under `scripts/with-postgres`, \
             which names PostgreSQL's binaries"
        )
    })
}

impl PgServer {
    /// Creates and starts a fresh server on a free loopback port.
    pub fn start() -> PgServer {
        let bin = PathBuf::from(required("TOKENKEEPER_TEST_PG_BIN"));
        let user = Some(required("TOKENKEEPER_TEST_PG_USER")).filter(|u| !u.is_empty());
        let dir = tempfile::tempdir().expect("a temp dir for PostgreSQL");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let server = PgServer {
            dir,
            bin,
            user,
            port,
        };
        if let Some(user) = &server.user {
            let status = Command::new("chown")
                .args(["-R", user])
                .arg(server.dir.path())
                .status()
                .unwrap();
            assert!(status.success());
        }
        server.run(
            "initdb",
            &[
                "-D",
                &server.data(),
                "-U",
                "tokenkeeper",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        server.up();
        server.run(
            "createdb",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &server.port.to_string(),
                "-U",
                "tokenkeeper",
                "chaos",
            ],
        );
        server
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn run(&self, program: &str, args: &[&str]) {
        let path = self.bin.join(program);
        let mut cmd = match &self.user {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&path);
                c
            }
            None => Command::new(&path),
        };
        let out = cmd.args(args).output().expect("a PostgreSQL binary runs");
        assert!(
            out.status.success(),
            "{program} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn url(&self) -> String {
        format!("postgres://tokenkeeper@127.0.0.1:{}/chaos", self.port)
    }

    /// Starts the server (again) on its port, and waits until it accepts connections.
    pub fn up(&self) {
        let log = self.dir.path().join("server.log").display().to_string();
        let options = format!(
            "-c listen_addresses=127.0.0.1 -c port={} -c unix_socket_directories={} -c fsync=off \
             -c full_page_writes=off -c max_connections=100",
            self.port,
            self.dir.path().display()
        );
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data(),
                "-l",
                &log,
                "-w",
                "-t",
                "60",
                "-o",
                &options,
                "start",
            ],
        );
    }

    /// Stops the server the way a failover does: at once, every connection cut.
    pub fn down(&self) {
        self.run(
            "pg_ctl",
            &["-D", &self.data(), "-m", "immediate", "-w", "stop"],
        );
        // Nothing must answer on the port any more.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            assert!(std::time::Instant::now() < deadline, "PostgreSQL stopped");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let path = self.bin.join("pg_ctl");
        let data = self.data();
        let mut cmd = match &self.user {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&path);
                c
            }
            None => Command::new(&path),
        };
        let _ = cmd.args(["-D", &data, "-m", "immediate", "stop"]).output();
    }
}
