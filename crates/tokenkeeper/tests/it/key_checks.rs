//! Invariant 11, a wrong key never touches the data, as an operator meets it: the built binary,
//! started on one database with other key rings, a lost key file, a database from before key
//! checks, and a key rotation across processes.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use notion_sim::{SimConfig, SimServer};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};

use tokenkeeper::clock::Clock;
use tokenkeeper::seal::KeyRing;

use crate::both_backends;
use crate::support::db::{connect, key_ring, minted, Backend, TestDb};

const BIN: &str = env!("CARGO_BIN_EXE_tokenkeeper");
const ADMIN_KEY: &str = "admin-key-for-key-checks-0123456789";

/// One database, one simulated Notion, and a directory for the processes.
struct World {
    db: TestDb,
    sim: SimServer,
    http: reqwest::Client,
    /// The processes' working directory (their spill journal goes there with PostgreSQL).
    dir: tempfile::TempDir,
}

/// A `serve` that is listening; killed when dropped.
struct Node {
    url: String,
    child: Child,
}

/// A command that stopped by itself.
#[derive(Debug)]
struct Finished {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl World {
    /// A fresh database nobody has started on. The store `TestDb` opens is never used.
    async fn new(backend: Backend) -> World {
        World::on(TestDb::unmigrated(backend, key_ring().0, Clock::System).await).await
    }

    async fn on(db: TestDb) -> World {
        let sim = SimServer::start(SimConfig {
            auto_approve: true,
            rate_limit_per_connection: 0,
            ..SimConfig::default()
        })
        .await
        .expect("the simulator starts");
        World {
            db,
            sim,
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// The binary on this database and simulator, with `ring` as its key ring (none: the
    /// embedded default's `<db>.key` on SQLite) and no other `TOKENKEEPER_*` variable.
    fn command(&self, ring: Option<&str>, args: &[&str]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.kill_on_drop(true).current_dir(self.dir.path());
        for (k, _) in std::env::vars() {
            if k.starts_with("TOKENKEEPER_") {
                cmd.env_remove(k);
            }
        }
        cmd.args(args)
            .env("TOKENKEEPER_DATABASE_URL", &self.db.url)
            .env("TOKENKEEPER_API_KEYS", format!("admin:{ADMIN_KEY}"))
            .env("TOKENKEEPER_LISTEN", "127.0.0.1:0")
            .env("TOKENKEEPER_NOTION_CLIENT_ID", "tokenkeeper-dev")
            .env(
                "TOKENKEEPER_NOTION_CLIENT_SECRET",
                "dev-secret-not-for-production",
            )
            .env("TOKENKEEPER_NOTION_BASE_URL", self.sim.base_url())
            .env("TOKENKEEPER_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(ring) = ring {
            cmd.env("TOKENKEEPER_ENCRYPTION_KEY", ring);
        }
        cmd
    }

    /// Starts `serve`: `Ok` once it listens, `Err` with its output if it stops first.
    async fn serve(&self, ring: Option<&str>) -> Result<Node, Finished> {
        let mut child = self
            .command(ring, &["serve"])
            .spawn()
            .expect("the binary starts");
        let mut stderr = child.stderr.take().unwrap();
        let stderr = tokio::spawn(async move {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text).await;
            text
        });
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut stdout = String::new();
        let listening = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                stdout.push_str(&line);
                stdout.push('\n');
                if let Some(url) = line.split("listening on ").nth(1) {
                    return Some(url.trim().to_owned());
                }
            }
            None
        })
        .await
        .expect("serve listens or stops within 30 s");
        match listening {
            Some(url) => {
                // Keep reading, so that the process never blocks on a full pipe.
                tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
                Ok(Node { url, child })
            }
            None => {
                let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
                    .await
                    .expect("serve exits once its output is closed")
                    .unwrap();
                Err(Finished {
                    code: status.code(),
                    stdout,
                    stderr: stderr.await.unwrap(),
                })
            }
        }
    }

    async fn serving(&self, ring: Option<&str>) -> Node {
        match self.serve(ring).await {
            Ok(node) => node,
            Err(out) => panic!("serve refused to start: {out:?}"),
        }
    }

    async fn refused(&self, ring: Option<&str>) -> Finished {
        match self.serve(ring).await {
            Ok(node) => panic!("serve started at {} where it must refuse", node.url),
            Err(out) => out,
        }
    }

    /// Runs a command that finishes by itself (`migrate`, `keys rotate`).
    async fn run(&self, ring: Option<&str>, args: &[&str]) -> Finished {
        let out = tokio::time::timeout(Duration::from_secs(60), self.command(ring, args).output())
            .await
            .expect("the command finishes within 60 s")
            .unwrap();
        Finished {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Connects `end_user` through `node`, as a user's browser would; returns the connection id.
    async fn connect(&self, node: &Node, end_user: &str) -> String {
        let r = self
            .http
            .post(format!("{}/v1/connect-sessions", node.url))
            .bearer_auth(ADMIN_KEY)
            .json(&json!({
                "provider": "notion",
                "end_user_id": end_user,
                "return_to": format!("{}/done", node.url),
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "connect session on {}", node.url);
        let body: serde_json::Value = r.json().await.unwrap();
        let mut url = body["url"].as_str().unwrap().to_owned();
        // tokenkeeper → Notion's consent → tokenkeeper's callback → the app's return_to, in a
        // browser that keeps the connect attempt's cookie.
        let browser = crate::support::app::Browser::new();
        for _ in 0..3 {
            url = browser.redirect(&url).await;
        }
        let landing = url::Url::parse(&url).unwrap();
        let id = landing
            .query_pairs()
            .find(|(k, _)| k == "connection_id")
            .map(|(_, v)| v.into_owned());
        id.unwrap_or_else(|| panic!("the connect flow landed without a connection: {url}"))
    }

    /// The status of `GET /v1/connections/{id}/access-token` on `node`.
    async fn token_status(&self, node: &Node, id: &str) -> u16 {
        self.http
            .get(format!("{}/v1/connections/{id}/access-token", node.url))
            .bearer_auth(ADMIN_KEY)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    /// Every process in `nodes` answers every connection's token.
    async fn all_tokens_open(&self, nodes: &[&Node], ids: &[&str]) {
        for node in nodes {
            for id in ids {
                assert_eq!(
                    self.token_status(node, id).await,
                    200,
                    "{} reads the token of {id}",
                    node.url
                );
            }
        }
    }

    /// Runs a query on the database; every value as text, bytes in hex.
    async fn rows(&self, sql: &str) -> Vec<Vec<String>> {
        fn hex(b: &[u8]) -> String {
            b.iter().map(|b| format!("{b:02x}")).collect()
        }
        match self.db.backend {
            Backend::Sqlite => {
                let conn =
                    rusqlite::Connection::open(self.db.sqlite_path.as_ref().unwrap()).unwrap();
                let mut stmt = conn.prepare(sql).unwrap();
                let width = stmt.column_count();
                let rows = stmt
                    .query_map([], |row| {
                        (0..width)
                            .map(|i| {
                                use rusqlite::types::ValueRef;
                                Ok(match row.get_ref(i)? {
                                    ValueRef::Null => "null".to_owned(),
                                    ValueRef::Integer(n) => n.to_string(),
                                    ValueRef::Real(x) => x.to_string(),
                                    ValueRef::Text(t) => String::from_utf8_lossy(t).into_owned(),
                                    ValueRef::Blob(b) => hex(b),
                                })
                            })
                            .collect::<rusqlite::Result<Vec<_>>>()
                    })
                    .unwrap();
                rows.map(Result::unwrap).collect()
            }
            Backend::Postgres => {
                let (client, connection) =
                    tokio_postgres::connect(&self.db.url, tokio_postgres::NoTls)
                        .await
                        .unwrap();
                tokio::spawn(connection);
                use tokio_postgres::types::Type;
                client
                    .query(sql, &[])
                    .await
                    .unwrap()
                    .iter()
                    .map(|row| {
                        (0..row.len())
                            .map(|i| {
                                let ty = row.columns()[i].type_();
                                if *ty == Type::INT8 {
                                    row.get::<_, Option<i64>>(i).map(|n| n.to_string())
                                } else if *ty == Type::BYTEA {
                                    row.get::<_, Option<Vec<u8>>>(i).map(|b| hex(&b))
                                } else if *ty == Type::TIMESTAMPTZ {
                                    row.get::<_, Option<chrono::DateTime<chrono::Utc>>>(i)
                                        .map(|t| t.to_rfc3339())
                                } else {
                                    row.get::<_, Option<String>>(i)
                                }
                                .unwrap_or_else(|| "null".to_owned())
                            })
                            .collect()
                    })
                    .collect()
            }
        }
    }

    /// The key ids registered with the database, in order.
    async fn registered(&self) -> Vec<String> {
        self.column("SELECT key_id FROM key_checks ORDER BY key_id")
            .await
    }

    /// The key id of every grant, in order.
    async fn grant_keys(&self) -> Vec<String> {
        self.column("SELECT key_id FROM grants ORDER BY seq").await
    }

    async fn column(&self, sql: &str) -> Vec<String> {
        self.rows(sql)
            .await
            .into_iter()
            .map(|mut r| r.remove(0))
            .collect()
    }

    /// Everything a process could have written: row counts, every grant's sealed bytes, every
    /// key check.
    async fn snapshot(&self) -> Vec<Vec<String>> {
        let mut out = Vec::new();
        for table in [
            "connections",
            "grants",
            "events",
            "refresh_attempts",
            "connect_sessions",
            "key_checks",
            "schema_migrations",
        ] {
            let mut count = self.rows(&format!("SELECT count(*) FROM {table}")).await;
            count[0].insert(0, table.to_owned());
            out.extend(count);
        }
        out.extend(
            self.rows(
                "SELECT id, key_id, access_token, refresh_token, superseded_at FROM grants ORDER BY id",
            )
            .await,
        );
        out.extend(
            self.rows("SELECT key_id, check_value FROM key_checks ORDER BY key_id")
                .await,
        );
        out
    }

    /// The embedded default's key ring file, beside the SQLite database.
    fn key_file(&self) -> PathBuf {
        let mut path = self.db.sqlite_path.clone().unwrap().into_os_string();
        path.push(".key");
        PathBuf::from(path)
    }
}

impl Node {
    /// SIGKILL, as a crash or a hurried restart would.
    async fn stop(mut self) {
        self.child.kill().await.unwrap();
    }
}

/// A new key-ring entry and its key id.
fn entry() -> (String, String) {
    let entry = KeyRing::generate_entry();
    let id = entry.split_once(':').unwrap().0.to_owned();
    (entry, id)
}

/// The same key id as `entry`, with other key bytes: a mistyped or mixed-up copy.
fn other_bytes(entry: &str) -> String {
    let id = entry.split_once(':').unwrap().0;
    let fresh = KeyRing::generate_entry();
    format!("{id}:{}", fresh.split_once(':').unwrap().1)
}

/// The key material of ring entries, which no output may contain.
fn materials(entries: &[&str]) -> Vec<String> {
    entries
        .iter()
        .flat_map(|ring| ring.split(','))
        .map(|e| e.split_once(':').unwrap().1.to_owned())
        .collect()
}

/// A refusal as the user sees it: exit status 2, nothing on standard output (it never
/// listened), one line naming the setting and `names`, and no key material.
fn assert_refused(out: &Finished, setting: &str, names: &[&str], entries: &[&str]) {
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(out.stdout.is_empty(), "it printed before refusing: {out:?}");
    let lines: Vec<_> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {out:?}");
    assert!(
        lines[0].starts_with(&format!("error: {setting} (--")),
        "{out:?}"
    );
    for name in names {
        assert!(lines[0].contains(name), "names {name}: {out:?}");
    }
    for material in materials(entries) {
        assert!(!out.stderr.contains(&material), "key material in {out:?}");
    }
}

both_backends!(
    a_second_serve_with_another_key_ring_is_refused_and_writes_nothing,
    a_ring_with_the_right_key_id_but_other_key_bytes_is_refused,
    a_fresh_database_registers_its_key_on_first_start_and_a_restart_serves,
    a_database_from_before_key_checks_is_verified_by_opening_its_grants_and_registered,
    keys_rotate_refuses_a_ring_that_does_not_open_every_key_in_use_before_resealing_anything,
    a_key_rotation_across_processes_follows_the_documented_procedure,
    processes_starting_at_once_on_an_empty_database_with_different_rings_leave_one_serving,
);

async fn a_second_serve_with_another_key_ring_is_refused_and_writes_nothing(backend: Backend) {
    let w = World::new(backend).await;
    let ((a, a_id), (b, _)) = (entry(), entry());
    let first = w.serving(Some(&a)).await;
    let id = w.connect(&first, "u1").await;
    let before = w.snapshot().await;

    let out = w.refused(Some(&b)).await;
    assert_refused(&out, "TOKENKEEPER_ENCRYPTION_KEY", &[&a_id], &[&a, &b]);
    assert!(out.stderr.contains("does not open"), "{out:?}");
    assert_eq!(
        w.snapshot().await,
        before,
        "the refused process wrote nothing"
    );

    // The same ring with the other key added, still active, is just as wrong: it would seal
    // with a key the first process does not have.
    let out = w.refused(Some(&format!("{b},{a}"))).await;
    let b_id = b.split_once(':').unwrap().0;
    assert_refused(
        &out,
        "TOKENKEEPER_ENCRYPTION_KEY",
        &[b_id, "tokenkeeper keys rotate"],
        &[&a, &b],
    );
    assert_eq!(
        w.snapshot().await,
        before,
        "the refused process wrote nothing"
    );
    w.all_tokens_open(&[&first], &[&id]).await;
    assert_eq!(w.registered().await, [a_id]);
}

async fn a_ring_with_the_right_key_id_but_other_key_bytes_is_refused(backend: Backend) {
    let w = World::new(backend).await;
    let (a, a_id) = entry();
    let forged = other_bytes(&a);

    // Before any grant exists, only the check value can tell the two keys apart.
    w.serving(Some(&a)).await.stop().await;
    let before = w.snapshot().await;
    let out = w.refused(Some(&forged)).await;
    assert_refused(
        &out,
        "TOKENKEEPER_ENCRYPTION_KEY",
        &[&a_id, "other key bytes"],
        &[&a, &forged],
    );
    assert_eq!(w.snapshot().await, before);

    // With grants, the same.
    let node = w.serving(Some(&a)).await;
    let id = w.connect(&node, "u1").await;
    node.stop().await;
    let before = w.snapshot().await;
    let out = w.refused(Some(&forged)).await;
    assert_refused(&out, "TOKENKEEPER_ENCRYPTION_KEY", &[&a_id], &[&a, &forged]);
    assert_eq!(w.snapshot().await, before);
    let node = w.serving(Some(&a)).await;
    w.all_tokens_open(&[&node], &[&id]).await;
}

async fn a_fresh_database_registers_its_key_on_first_start_and_a_restart_serves(backend: Backend) {
    let w = World::new(backend).await;
    let (a, a_id) = entry();

    // `migrate` works without a key, and registers neither a throwaway key nor, with one, its
    // active key: only a first `serve` or `keys rotate` does.
    let out = w.run(None, &["migrate"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains("keys not checked"), "{out:?}");
    let out = w.run(Some(&a), &["migrate"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(w.registered().await.is_empty());
    if backend == Backend::Sqlite {
        assert!(!w.key_file().exists(), "migrate creates no key ring file");
    }

    let first = w.serving(Some(&a)).await;
    assert_eq!(w.registered().await, [a_id.as_str()]);
    let id = w.connect(&first, "u1").await;
    first.stop().await;

    let again = w.serving(Some(&a)).await;
    assert_eq!(w.registered().await, [a_id.as_str()]);
    let second = w.connect(&again, "u2").await;
    w.all_tokens_open(&[&again], &[&id, &second]).await;
}

async fn a_database_from_before_key_checks_is_verified_by_opening_its_grants_and_registered(
    backend: Backend,
) {
    let w = World::new(backend).await;
    let ((a, a_id), (b, _)) = (entry(), entry());
    let forged = other_bytes(&a);
    let node = w.serving(Some(&a)).await;
    let id = w.connect(&node, "u1").await;
    node.stop().await;
    // A database that holds grants but no key checks, as one migrated from schema 1 does.
    w.db.execute("DELETE FROM key_checks").await;
    let before = w.snapshot().await;

    // Opening a grant tells the right key from a wrong one, and a refusal registers nothing.
    for wrong in [&forged, &b] {
        let out = w.refused(Some(wrong)).await;
        assert_refused(&out, "TOKENKEEPER_ENCRYPTION_KEY", &[&a_id], &[&a, wrong]);
        assert_eq!(w.snapshot().await, before);
    }

    let node = w.serving(Some(&a)).await;
    assert_eq!(w.registered().await, [a_id.as_str()]);
    w.all_tokens_open(&[&node], &[&id]).await;
    node.stop().await;

    // `migrate` with the key ring registers it the same way.
    w.db.execute("DELETE FROM key_checks").await;
    let out = w.run(Some(&a), &["migrate"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains(&a_id), "{out:?}");
    assert_eq!(w.registered().await, [a_id]);
}

async fn keys_rotate_refuses_a_ring_that_does_not_open_every_key_in_use_before_resealing_anything(
    backend: Backend,
) {
    // Grants sealed with two keys, from before key checks: `old` seals three, `mid` one.
    let ((old, old_id), (mid, mid_id), (new, _)) = (entry(), entry(), entry());
    let db = TestDb::new(backend, KeyRing::parse(&old).unwrap().into(), Clock::System).await;
    for n in 0..3 {
        let pair = minted(&format!("bot-{n}"), &format!("old-{n}"), &Clock::System);
        db.store
            .record_authorization(connect(&format!("u{n}"), pair))
            .await
            .unwrap();
    }
    let mid_store = db
        .open_another(KeyRing::parse(&mid).unwrap().into(), Clock::System)
        .await;
    let pair = minted("bot-mid", "mid", &Clock::System);
    mid_store
        .record_authorization(connect("u-mid", pair))
        .await
        .unwrap();
    drop(mid_store);
    let w = World::on(db).await;
    assert_eq!(
        w.grant_keys().await,
        [old_id.as_str(), &old_id, &old_id, &mid_id]
    );
    let before = w.snapshot().await;

    let ring = format!("{new},{old}");
    let out = w
        .run(Some(&ring), &["keys", "rotate", "--batch", "1"])
        .await;
    assert_refused(
        &out,
        "TOKENKEEPER_ENCRYPTION_KEY",
        &[&mid_id],
        &[&ring, &mid],
    );
    assert_eq!(
        w.snapshot().await,
        before,
        "nothing re-sealed, nothing registered"
    );

    // With every key, it registers the new one and re-seals everything.
    let ring = format!("{new},{old},{mid}");
    let out = w
        .run(Some(&ring), &["keys", "rotate", "--batch", "1"])
        .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let new_id = new.split_once(':').unwrap().0.to_owned();
    assert_eq!(w.grant_keys().await, vec![new_id.clone(); 4]);
    let mut registered = vec![old_id, mid_id, new_id];
    registered.sort();
    assert_eq!(w.registered().await, registered);
}

/// README, "Commands", key rotation, step by step, with two processes serving throughout.
async fn a_key_rotation_across_processes_follows_the_documented_procedure(backend: Backend) {
    let w = World::new(backend).await;
    let ((old, old_id), (new, new_id)) = (entry(), entry());
    let (old_new, new_old) = (format!("{old},{new}"), format!("{new},{old}"));
    let rings = [old.as_str(), new.as_str()];

    let p1 = w.serving(Some(&old)).await;
    let p2 = w.serving(Some(&old)).await;
    let c1 = w.connect(&p1, "u1").await;
    let c2 = w.connect(&p2, "u2").await;

    // Skipping to the new ring is refused: the database has not been told about the new key.
    let before = w.snapshot().await;
    let out = w.refused(Some(&new_old)).await;
    assert_refused(
        &out,
        "TOKENKEEPER_ENCRYPTION_KEY",
        &[&new_id, "tokenkeeper keys rotate"],
        &rings,
    );
    assert_eq!(w.snapshot().await, before);

    // 1. Every process gets `old,new`, the old key still active, and restarts.
    p1.stop().await;
    let p1 = w.serving(Some(&old_new)).await;
    p2.stop().await;
    let p2 = w.serving(Some(&old_new)).await;
    let c3 = w.connect(&p1, "u3").await;
    assert_eq!(w.registered().await, [old_id.as_str()]);

    // 2. `keys rotate` with `new,old` registers the new key and re-seals every grant with it;
    // every process can open them, since each has the new key.
    let out = w.run(Some(&new_old), &["keys", "rotate"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        out.stderr.contains(&format!("registered key {new_id}")),
        "{out:?}"
    );
    let mut both = vec![old_id.clone(), new_id.clone()];
    both.sort();
    assert_eq!(w.registered().await, both);
    assert!(w.grant_keys().await.iter().all(|k| *k == new_id));
    w.all_tokens_open(&[&p1, &p2], &[&c1, &c2, &c3]).await;

    // 3. Every process gets `new,old` and restarts, one after the other: meanwhile the one not
    // yet restarted still seals with the old key, which every process has.
    p1.stop().await;
    let p1 = w.serving(Some(&new_old)).await;
    let c4 = w.connect(&p2, "u4").await;
    let c5 = w.connect(&p1, "u5").await;
    w.all_tokens_open(&[&p1, &p2], &[&c1, &c2, &c3, &c4, &c5])
        .await;
    p2.stop().await;
    let p2 = w.serving(Some(&new_old)).await;
    assert!(w.grant_keys().await.contains(&old_id), "u4's grant");

    // Dropping the old key now would be refused: a grant is still sealed with it.
    let out = w.refused(Some(&new)).await;
    assert_refused(&out, "TOKENKEEPER_ENCRYPTION_KEY", &[&old_id], &rings);

    // 4. `keys rotate` once more re-seals what the stragglers sealed.
    let out = w.run(Some(&new_old), &["keys", "rotate"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains("done: 1 grants re-sealed"), "{out:?}");
    assert!(w.grant_keys().await.iter().all(|k| *k == new_id));

    // Later, the old key leaves the key ring.
    p1.stop().await;
    p2.stop().await;
    let p3 = w.serving(Some(&new)).await;
    w.all_tokens_open(&[&p3], &[&c1, &c2, &c3, &c4, &c5]).await;
}

/// The first start's registration is one transaction under the key lock: of several processes
/// that find the database empty at once, one registers its key and the others are refused.
async fn processes_starting_at_once_on_an_empty_database_with_different_rings_leave_one_serving(
    backend: Backend,
) {
    let w = World::new(backend).await;
    // Migrated first, so that the starts race on the key check rather than on the migrations.
    assert_eq!(w.run(None, &["migrate"]).await.code, Some(0));
    let rings: Vec<(String, String)> = (0..4).map(|_| entry()).collect();
    let starts = rings.iter().map(|(ring, _)| w.serve(Some(ring)));
    let results = futures::future::join_all(starts).await;
    let mut serving = Vec::new();
    for ((_, id), result) in rings.iter().zip(results) {
        match result {
            Ok(node) => serving.push((id.clone(), node)),
            Err(out) => {
                let all: Vec<&str> = rings.iter().map(|(r, _)| r.as_str()).collect();
                assert_refused(&out, "TOKENKEEPER_ENCRYPTION_KEY", &[id], &all);
            }
        }
    }
    assert_eq!(serving.len(), 1, "exactly one process serves");
    assert_eq!(w.registered().await, [serving[0].0.clone()]);
    let id = w.connect(&serving[0].1, "u1").await;
    w.all_tokens_open(&[&serving[0].1], &[&id]).await;
}

/// The embedded default (SQLite, no key configured) never puts a new key ring over sealed data.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_key_file_on_the_embedded_default_is_refused_and_no_new_key_is_made() {
    let w = World::new(Backend::Sqlite).await;
    let node = w.serving(None).await;
    let saved = std::fs::read_to_string(w.key_file()).expect("the first start made <db>.key");
    let key_id = saved.trim().split_once(':').unwrap().0.to_owned();
    node.stop().await;

    // Lost before anything was connected: the database still holds the key's check value.
    std::fs::remove_file(w.key_file()).unwrap();
    let before = w.snapshot().await;
    let out = w.refused(None).await;
    assert_refused(
        &out,
        "TOKENKEEPER_ENCRYPTION_KEY",
        &[&key_id, "tokenkeeper.db.key"],
        &[saved.trim()],
    );
    assert!(!w.key_file().exists(), "no new key ring was made");
    assert_eq!(w.snapshot().await, before);

    // Lost with grants sealed.
    std::fs::write(w.key_file(), &saved).unwrap();
    let node = w.serving(None).await;
    let id = w.connect(&node, "u1").await;
    node.stop().await;
    std::fs::remove_file(w.key_file()).unwrap();
    let before = w.snapshot().await;
    let out = w.refused(None).await;
    assert_refused(
        &out,
        "TOKENKEEPER_ENCRYPTION_KEY",
        &[&key_id],
        &[saved.trim()],
    );
    assert!(!w.key_file().exists(), "no new key ring was made");
    assert_eq!(w.snapshot().await, before);

    // Restored, it serves what it sealed.
    std::fs::write(w.key_file(), &saved).unwrap();
    let node = w.serving(None).await;
    w.all_tokens_open(&[&node], &[&id]).await;
    assert_eq!(w.registered().await, [key_id]);
}
