//! Bringing existing integrations in (issue 13): `tokenkeeper audit` and `tokenkeeper import`
//! as a user runs them (the built binary), on tables in the shapes integrations really have,
//! filled through notion-sim, and `POST /v1/connections/import`.
//!
//! The fixtures (issue 13 §4) are the article's two shapes, on SQLite and on PostgreSQL:
//! - "before": `bot_id TEXT PRIMARY KEY`, access, refresh, `updated_at`: one pair per bot,
//!   kept by upsert, so a pair that was rotated away can be all the table has.
//! - "after": a serial id and several rows per bot, with `revoked_at`.
//!
//! Their pairs are real: minted by the simulator, rotated, re-authorized, uninstalled, and
//! copied twice, so what audit counts and what import records can be checked against what the
//! simulator knows.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use crate::both_backends;
use crate::support::app::{Api, TestApp};
use crate::support::db::{postgres_url, Backend};

both_backends!(
    audit_counts_what_is_wrong_with_both_shapes_as_the_simulator_knows_it_and_writes_nothing,
    import_records_every_pair_once_serves_every_live_connection_and_a_second_run_imports_nothing,
    import_verify_rescues_a_dead_access_token_and_marks_an_uninstalled_bot_needs_reauth,
    a_dry_run_reports_what_it_would_import_and_writes_nothing,
    an_import_while_serve_refreshes_on_the_same_database_loses_nothing,
    the_api_imports_a_batch_with_one_result_per_row_and_recognises_it_again,
);

const BIN: &str = env!("CARGO_BIN_EXE_tokenkeeper");

/// A token pair the simulator minted.
#[derive(Clone)]
pub struct Pair {
    pub bot_id: String,
    pub workspace_id: String,
    pub access: String,
    pub refresh: String,
}

/// The simulator, as the old integration talked to it: its own OAuth client, no tokenkeeper.
pub struct OldApp<'a> {
    pub api: &'a Api,
    pub client_id: String,
    pub client_secret: String,
}

impl OldApp<'_> {
    pub fn of(app: &TestApp) -> OldApp<'_> {
        let config = app.sim.config();
        OldApp {
            api: app,
            client_id: config.client_id,
            client_secret: config.client_secret,
        }
    }

    /// An authorization by `user` in `workspace` (the same pair of names again is a
    /// re-authorization of the same bot, which mints a fresh pair).
    pub async fn authorize(&self, workspace: &str, user: &str) -> Pair {
        self.api
            .sim_json(
                reqwest::Method::POST,
                "/_sim/next-authorization",
                Some(json!({"workspace_id": workspace, "user_id": user})),
            )
            .await;
        let redirect = "http://localhost/old-app/callback";
        let r = self
            .api
            .http
            .get(format!("{}/v1/oauth/authorize", self.api.sim_url))
            .query(&[
                ("client_id", self.client_id.as_str()),
                ("redirect_uri", redirect),
                ("response_type", "code"),
                ("owner", "user"),
                ("state", "s"),
            ])
            .send()
            .await
            .unwrap();
        assert!(r.status().is_redirection(), "{}", r.status());
        let location = url::Url::parse(r.headers()["location"].to_str().unwrap()).unwrap();
        let code = location
            .query_pairs()
            .find(|(k, _)| k == "code")
            .map(|(_, v)| v.into_owned())
            .expect("a code");
        self.token(
            json!({"grant_type": "authorization_code", "code": code, "redirect_uri": redirect}),
        )
        .await
    }

    pub async fn refresh(&self, pair: &Pair) -> Pair {
        self.token(json!({"grant_type": "refresh_token", "refresh_token": pair.refresh}))
            .await
    }

    async fn token(&self, body: Value) -> Pair {
        let r = self
            .api
            .http
            .post(format!("{}/v1/oauth/token", self.api.sim_url))
            .basic_auth(&self.client_id, Some(&self.client_secret))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let v: Value = r.json().await.unwrap();
        Pair {
            bot_id: v["bot_id"].as_str().unwrap().to_owned(),
            workspace_id: v["workspace_id"].as_str().unwrap().to_owned(),
            access: v["access_token"].as_str().unwrap().to_owned(),
            refresh: v["refresh_token"].as_str().unwrap().to_owned(),
        }
    }

    /// The user removes the connection: every token of the bot dies.
    pub async fn uninstall(&self, bot: &str) {
        self.api
            .sim_json(
                reqwest::Method::POST,
                &format!("/_sim/bots/{bot}/revoke"),
                Some(json!({})),
            )
            .await;
    }

    /// Kills one access token, its refresh token left alive.
    pub async fn revoke_access(&self, pair: &Pair) {
        let r = self
            .api
            .http
            .post(format!("{}/v1/oauth/revoke", self.api.sim_url))
            .basic_auth(&self.client_id, Some(&self.client_secret))
            .json(&json!({"token": pair.access}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
    }
}

/// One row of an old token table.
#[derive(Clone)]
pub struct Row {
    pub pair: Pair,
    pub refresh: bool,
    pub revoked: bool,
    pub end_user: String,
}

impl Row {
    pub fn of(pair: &Pair, end_user: &str) -> Row {
        Row {
            pair: pair.clone(),
            refresh: true,
            revoked: false,
            end_user: end_user.into(),
        }
    }
}

/// Which of the article's shapes.
#[derive(Clone, Copy, PartialEq)]
pub enum Shape {
    Before,
    After,
}

/// An old integration's token table, on SQLite or PostgreSQL.
pub struct OldTable {
    pub backend: Backend,
    /// `--from`.
    pub from: String,
    /// `--query`.
    pub query: String,
    sqlite: Option<PathBuf>,
    pg_schema: Option<String>,
    _dir: tempfile::TempDir,
}

impl OldTable {
    pub async fn create(backend: Backend, shape: Shape, rows: &[Row]) -> OldTable {
        let dir = tempfile::tempdir().unwrap();
        let base = chrono::Utc::now() - chrono::Duration::hours(1);
        let at = |i: usize| (base + chrono::Duration::seconds(i as i64)).to_rfc3339();
        match backend {
            Backend::Sqlite => {
                let path = dir.path().join("old-app.db");
                let conn = rusqlite::Connection::open(&path).unwrap();
                let ddl = match shape {
                    Shape::Before => {
                        "CREATE TABLE notion_tokens (bot_id TEXT PRIMARY KEY, \
                         access_token TEXT NOT NULL, refresh_token TEXT, updated_at TEXT NOT NULL)"
                    }
                    Shape::After => {
                        "CREATE TABLE notion_tokens (id INTEGER PRIMARY KEY \
                         AUTOINCREMENT, bot_id TEXT NOT NULL, access_token TEXT NOT NULL, \
                         refresh_token TEXT, workspace_id TEXT, end_user_id TEXT, \
                         authorized_at TEXT, revoked_at TEXT); \
                         CREATE INDEX notion_tokens_bot ON notion_tokens (bot_id)"
                    }
                };
                conn.execute_batch(ddl).unwrap();
                for (i, row) in rows.iter().enumerate() {
                    let refresh = row.refresh.then_some(row.pair.refresh.as_str());
                    match shape {
                        // The upsert that was the first hazard.
                        Shape::Before => conn.execute(
                            "INSERT INTO notion_tokens VALUES (?1, ?2, ?3, ?4) ON CONFLICT \
                             (bot_id) DO UPDATE SET access_token = excluded.access_token, \
                             refresh_token = excluded.refresh_token, updated_at = excluded.updated_at",
                            rusqlite::params![row.pair.bot_id, row.pair.access, refresh, at(i)],
                        ),
                        Shape::After => conn.execute(
                            "INSERT INTO notion_tokens (bot_id, access_token, refresh_token, \
                             workspace_id, end_user_id, authorized_at, revoked_at) \
                             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                            rusqlite::params![
                                row.pair.bot_id,
                                row.pair.access,
                                refresh,
                                row.pair.workspace_id,
                                row.end_user,
                                at(i),
                                row.revoked.then(|| at(i + 1000)),
                            ],
                        ),
                    }
                    .unwrap();
                }
                OldTable {
                    backend,
                    from: format!("sqlite://{}", path.display()),
                    query: "SELECT * FROM notion_tokens".into(),
                    sqlite: Some(path),
                    pg_schema: None,
                    _dir: dir,
                }
            }
            Backend::Postgres => {
                let schema = format!("old_app_{}", uuid::Uuid::new_v4().simple());
                let client = pg().await;
                let ddl = match shape {
                    Shape::Before => format!(
                        "CREATE SCHEMA {schema}; CREATE TABLE {schema}.notion_tokens (bot_id text \
                         PRIMARY KEY, access_token text NOT NULL, refresh_token text, \
                         updated_at timestamptz NOT NULL)"
                    ),
                    Shape::After => format!(
                        "CREATE SCHEMA {schema}; CREATE TABLE {schema}.notion_tokens (id \
                         bigserial PRIMARY KEY, bot_id text NOT NULL, access_token text NOT NULL, \
                         refresh_token text, workspace_id text, end_user_id text, \
                         authorized_at timestamptz, revoked_at timestamptz); \
                         CREATE INDEX ON {schema}.notion_tokens (bot_id)"
                    ),
                };
                client.batch_execute(&ddl).await.unwrap();
                for (i, row) in rows.iter().enumerate() {
                    let refresh = row.refresh.then_some(row.pair.refresh.as_str());
                    let ts = |s: String| chrono::DateTime::parse_from_rfc3339(&s).unwrap().to_utc();
                    match shape {
                        Shape::Before => client
                            .execute(
                                &format!(
                                    "INSERT INTO {schema}.notion_tokens VALUES ($1, $2, $3, $4) \
                                     ON CONFLICT (bot_id) DO UPDATE SET access_token = \
                                     excluded.access_token, refresh_token = \
                                     excluded.refresh_token, updated_at = excluded.updated_at"
                                ),
                                &[&row.pair.bot_id, &row.pair.access, &refresh, &ts(at(i))],
                            )
                            .await
                            .unwrap(),
                        Shape::After => client
                            .execute(
                                &format!(
                                    "INSERT INTO {schema}.notion_tokens (bot_id, access_token, \
                                     refresh_token, workspace_id, end_user_id, authorized_at, \
                                     revoked_at) VALUES ($1, $2, $3, $4, $5, $6, $7)"
                                ),
                                &[
                                    &row.pair.bot_id,
                                    &row.pair.access,
                                    &refresh,
                                    &row.pair.workspace_id,
                                    &row.end_user,
                                    &ts(at(i)),
                                    &row.revoked.then(|| ts(at(i + 1000))),
                                ],
                            )
                            .await
                            .unwrap(),
                    };
                }
                OldTable {
                    backend,
                    from: postgres_url(),
                    query: format!("SELECT * FROM {schema}.notion_tokens ORDER BY 1"),
                    sqlite: None,
                    pg_schema: Some(schema),
                    _dir: dir,
                }
            }
        }
    }

    /// Everything the table holds, to show nothing wrote to it.
    pub async fn contents(&self) -> String {
        match self.backend {
            Backend::Sqlite => {
                let conn = rusqlite::Connection::open(self.sqlite.as_ref().unwrap()).unwrap();
                let mut stmt = conn
                    .prepare("SELECT * FROM notion_tokens ORDER BY 1")
                    .unwrap();
                let n = stmt.column_count();
                let rows: Vec<String> = stmt
                    .query_map([], |r| {
                        Ok((0..n)
                            .map(|i| format!("{:?}", r.get_ref(i).unwrap()))
                            .collect::<Vec<_>>()
                            .join("|"))
                    })
                    .unwrap()
                    .map(Result::unwrap)
                    .collect();
                rows.join("\n")
            }
            Backend::Postgres => {
                let schema = self.pg_schema.as_ref().unwrap();
                pg().await
                    .query_one(
                        &format!(
                            "SELECT coalesce(string_agg(t::text, E'\\n' ORDER BY t::text), '') \
                             FROM {schema}.notion_tokens t"
                        ),
                        &[],
                    )
                    .await
                    .unwrap()
                    .get(0)
            }
        }
    }
}

async fn pg() -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(&postgres_url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
}

/// What one run of the binary printed, and how it ended.
pub struct Run {
    pub status: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn json(&self) -> Value {
        assert_eq!(self.status, Some(0), "stderr: {}", self.stderr);
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("{e}: {}", self.stdout))
    }

    /// Fails if the output holds any of `secrets`, without printing them.
    pub fn assert_holds_none_of(&self, secrets: &[String]) {
        for (i, s) in secrets.iter().enumerate() {
            assert!(
                !self.stdout.contains(s.as_str()) && !self.stderr.contains(s.as_str()),
                "the output holds secret #{i}"
            );
        }
    }
}

/// Runs `tokenkeeper <args>` with `env` (and no other `TOKENKEEPER_*`), bounded in time.
pub async fn run(dir: &Path, args: &[&str], env: &[(&str, String)]) -> Run {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.kill_on_drop(true).current_dir(dir).args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("TOKENKEEPER_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("TOKENKEEPER_LOG", "warn");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("the command finishes within 120 s")
        .unwrap();
    Run {
        status: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The settings that let the binary reach the app's simulator (for `--verify`).
pub fn notion_env(app: &TestApp) -> Vec<(&'static str, String)> {
    let config = app.sim.config();
    vec![
        ("TOKENKEEPER_NOTION_CLIENT_ID", config.client_id),
        ("TOKENKEEPER_NOTION_CLIENT_SECRET", config.client_secret),
        ("TOKENKEEPER_NOTION_BASE_URL", app.sim.base_url()),
    ]
}

/// The settings of `import` on the app's own database, and the simulator.
pub fn store_env(app: &TestApp) -> Vec<(&'static str, String)> {
    let mut env = notion_env(app);
    env.push(("TOKENKEEPER_DATABASE_URL", app.db.url.clone()));
    env.push(("TOKENKEEPER_ENCRYPTION_KEY", app.key_ring.clone()));
    env.push((
        "TOKENKEEPER_SPILL_DIR",
        app.spill.path().display().to_string(),
    ));
    env
}

/// The "after" fixture: seven bots in ten rows, one of each thing an old table holds.
pub struct AfterFixture {
    pub rows: Vec<Row>,
    pub live: Pair,
    pub rotated_away: Pair,
    pub rotated: Pair,
    pub first_auth: Pair,
    pub second_auth: Pair,
    pub uninstalled: Pair,
    pub duplicated: Pair,
    pub dead_access: Pair,
    pub no_refresh: Pair,
}

impl AfterFixture {
    pub async fn make(old: &OldApp<'_>) -> AfterFixture {
        let live = old.authorize("ws-live", "u-live").await;
        let rotated_away = old.authorize("ws-rot", "u-rot").await;
        // The old app refreshed, inserted the new row and marked the old one revoked.
        let rotated = old.refresh(&rotated_away).await;
        let first_auth = old.authorize("ws-twice", "u-twice").await;
        let second_auth = old.authorize("ws-twice", "u-twice").await;
        assert_eq!(first_auth.bot_id, second_auth.bot_id);
        let uninstalled = old.authorize("ws-gone", "u-gone").await;
        old.uninstall(&uninstalled.bot_id).await;
        let duplicated = old.authorize("ws-dup", "u-dup").await;
        let dead_access = old.authorize("ws-dead-at", "u-dead-at").await;
        old.revoke_access(&dead_access).await;
        let no_refresh = old.authorize("ws-norefresh", "u-norefresh").await;
        let rows = vec![
            Row::of(&live, "user-live"),
            Row {
                revoked: true,
                ..Row::of(&rotated_away, "user-rot")
            },
            Row::of(&rotated, "user-rot"),
            Row::of(&first_auth, "user-twice"),
            Row::of(&second_auth, "user-twice"),
            Row::of(&uninstalled, "user-gone"),
            Row::of(&duplicated, "user-dup"),
            Row::of(&duplicated, "user-dup"),
            Row::of(&dead_access, "user-dead-at"),
            Row {
                refresh: false,
                ..Row::of(&no_refresh, "user-norefresh")
            },
        ];
        AfterFixture {
            rows,
            live,
            rotated_away,
            rotated,
            first_auth,
            second_auth,
            uninstalled,
            duplicated,
            dead_access,
            no_refresh,
        }
    }

    pub fn secrets(&self) -> Vec<String> {
        self.rows
            .iter()
            .flat_map(|r| [r.pair.access.clone(), r.pair.refresh.clone()])
            .collect()
    }
}

async fn audit_counts_what_is_wrong_with_both_shapes_as_the_simulator_knows_it_and_writes_nothing(
    backend: Backend,
) {
    let app = TestApp::start(backend).await;
    let old = OldApp::of(&app);
    let dir = tempfile::tempdir().unwrap();

    // The "before" shape: one row per bot, kept by upsert. A bot's stored pair was rotated
    // away by a refresh whose answer the upsert lost; another bot was uninstalled.
    let live = old.authorize("ws-a", "u-a").await;
    let stale = old.authorize("ws-b", "u-b").await;
    let _lost = old.refresh(&stale).await;
    let gone = old.authorize("ws-c", "u-c").await;
    old.uninstall(&gone.bot_id).await;
    let before = OldTable::create(
        backend,
        Shape::Before,
        &[
            Row::of(&live, "a"),
            Row::of(&stale, "b"),
            Row::of(&gone, "c"),
        ],
    )
    .await;
    let contents = before.contents().await;
    let out = run(
        dir.path(),
        &[
            "audit",
            "--from",
            &before.from,
            "--query",
            &before.query,
            "--verify",
            "--json",
        ],
        &notion_env(&app),
    )
    .await;
    let secrets: Vec<String> = [&live, &stale, &gone]
        .iter()
        .flat_map(|p| [p.access.clone(), p.refresh.clone()])
        .collect();
    out.assert_holds_none_of(&secrets);
    let report = out.json();
    assert_eq!(report["rows"], 3, "{report}");
    assert_eq!(report["bots"], 3);
    assert_eq!(report["bots_with_several_rows"], 0);
    assert_eq!(report["rows_revoked"], 0);
    assert_eq!(report["bot_id_unique"], true, "the first hazard is named");
    assert!(report["table"].as_str().unwrap().contains("notion_tokens"));
    // A refreshed-away pair's access token stays live at Notion; the uninstalled bot's not.
    assert_eq!(report["access_tokens_live"], 2);
    assert_eq!(report["access_tokens_dead"], 1);
    assert_eq!(report["access_tokens_unknown"], 0);
    assert_eq!(
        before.contents().await,
        contents,
        "audit wrote to the source"
    );

    // The "after" shape, in words this time.
    let fixture = AfterFixture::make(&old).await;
    let after = OldTable::create(backend, Shape::After, &fixture.rows).await;
    let contents = after.contents().await;
    let introspections_before = sim_count(&app, "oauth.introspect").await;
    let out = run(
        dir.path(),
        &[
            "audit",
            "--from",
            &after.from,
            "--query",
            &after.query,
            "--json",
        ],
        &[],
    )
    .await;
    out.assert_holds_none_of(&fixture.secrets());
    let report = out.json();
    assert_eq!(report["rows"], 10, "{report}");
    assert_eq!(report["bots"], 7);
    assert_eq!(report["pairs"], 9);
    assert_eq!(report["bots_with_several_rows"], 3);
    assert_eq!(report["bots_with_several_rows_same_pair"], 1);
    assert_eq!(report["bots_with_several_rows_different_pairs"], 2);
    assert_eq!(report["duplicate_rows"], 1);
    assert_eq!(report["rows_revoked"], 1);
    assert_eq!(report["rows_without_refresh_token"], 1);
    assert_eq!(report["bot_id_unique"], false);
    assert!(
        report.get("access_tokens_live").is_none(),
        "no verification without --verify"
    );
    assert_eq!(
        sim_count(&app, "oauth.introspect").await,
        introspections_before,
        "audit without --verify asks Notion nothing"
    );
    let out = run(
        dir.path(),
        &[
            "audit",
            "--from",
            &after.from,
            "--query",
            &after.query,
            "--verify",
        ],
        &notion_env(&app),
    )
    .await;
    assert_eq!(out.status, Some(0), "{}", out.stderr);
    out.assert_holds_none_of(&fixture.secrets());
    assert!(
        out.stdout
            .contains("10 rows, 7 bots, 9 distinct token pairs."),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("bot_id is not unique"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .contains("Notion calls 7 access tokens live, 2 dead"),
        "{}",
        out.stdout
    );
    assert_eq!(
        after.contents().await,
        contents,
        "audit wrote to the source"
    );
    // Nothing reached tokenkeeper's own database either.
    assert_eq!(app.db.count("SELECT count(*) FROM grants").await, 0);
}

async fn sim_count(app: &TestApp, endpoint: &str) -> u64 {
    let stats = app
        .sim_json(reqwest::Method::GET, "/_sim/stats", None)
        .await;
    stats["requests"][endpoint].as_u64().unwrap_or(0)
}

/// The connection of a bot, from the API.
async fn connection_of(app: &TestApp, bot: &str) -> Value {
    let (status, body) = app.get_json("/v1/connections?limit=1000").await;
    assert_eq!(status, 200);
    body["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["bot_id"] == bot)
        .unwrap_or_else(|| panic!("no connection for bot {bot}"))
        .clone()
}

fn fp(token: &str) -> String {
    tokenkeeper::ids::fingerprint(token)
}

async fn import_records_every_pair_once_serves_every_live_connection_and_a_second_run_imports_nothing(
    backend: Backend,
) {
    let app = TestApp::start(backend).await;
    let old = OldApp::of(&app);
    let fixture = AfterFixture::make(&old).await;
    let table = OldTable::create(backend, Shape::After, &fixture.rows).await;
    let dir = tempfile::tempdir().unwrap();
    let authorized = authorizations(&app).await;

    let out = run(
        dir.path(),
        &[
            "import",
            "--from",
            &table.from,
            "--query",
            &table.query,
            "--json",
        ],
        &store_env(&app),
    )
    .await;
    out.assert_holds_none_of(&fixture.secrets());
    assert!(
        !out.stderr.contains('\r'),
        "no progress bar is drawn when standard error is not a terminal"
    );
    let report = out.json();
    assert_eq!(report["rows"], 10, "{report}");
    assert_eq!(report["bots"], 7);
    assert_eq!(report["bots_with_several_rows"], 3);
    assert_eq!(report["rows_revoked"], 1);
    assert_eq!(report["imported_connections"], 7);
    assert_eq!(report["imported_grants"], 9);
    assert_eq!(report["skipped_duplicates"], 1);
    assert_eq!(report["dry_run"], false);
    assert_eq!(app.db.count("SELECT count(*) FROM connections").await, 7);
    assert_eq!(
        app.db
            .count("SELECT count(*) FROM grants WHERE origin = 'import'")
            .await,
        9
    );

    // The ledger against the table: every pair once, the newest live one current, the revoked
    // row superseded; no token at rest in plaintext.
    let rotated = connection_of(&app, &fixture.rotated.bot_id).await;
    let grants = app.grants(rotated["id"].as_str().unwrap()).await;
    assert_eq!(grants.len(), 2);
    let current = grants
        .iter()
        .find(|g| g["id"] == rotated["grant_id"])
        .unwrap();
    assert_eq!(
        current["access_token_fingerprint"],
        fp(&fixture.rotated.access)
    );
    assert!(current["superseded_at"].is_null());
    let old_grant = grants
        .iter()
        .find(|g| g["id"] != rotated["grant_id"])
        .unwrap();
    assert_eq!(
        old_grant["access_token_fingerprint"],
        fp(&fixture.rotated_away.access)
    );
    assert!(
        !old_grant["superseded_at"].is_null(),
        "the revoked row is superseded"
    );
    assert!(grants.iter().all(|g| g["origin"] == "import"));
    assert_eq!(rotated["end_user_id"], "user-rot");
    assert_eq!(
        rotated["workspace_id"],
        fixture.rotated.workspace_id.as_str()
    );
    let twice = connection_of(&app, &fixture.second_auth.bot_id).await;
    let twice_grants = app.grants(twice["id"].as_str().unwrap()).await;
    assert!(twice_grants.iter().any(|g| g["access_token_fingerprint"]
        == fp(&fixture.first_auth.access)
        && !g["superseded_at"].is_null()));
    let current = twice_grants
        .iter()
        .find(|g| g["id"] == twice["grant_id"])
        .unwrap();
    assert_eq!(
        current["access_token_fingerprint"],
        fp(&fixture.second_auth.access),
        "the newer of two authorizations is current"
    );
    let duplicated = connection_of(&app, &fixture.duplicated.bot_id).await;
    assert_eq!(
        app.grants(duplicated["id"].as_str().unwrap()).await.len(),
        1
    );
    let at_rest = app.db.bytes_at_rest().await;
    for (i, secret) in fixture.secrets().iter().enumerate() {
        assert!(
            !at_rest
                .windows(secret.len())
                .any(|w| w == secret.as_bytes()),
            "secret #{i} is at rest in plaintext"
        );
    }

    // Every connection whose pair is alive at Notion is served through tokenkeeper, and no
    // user authorized anything.
    let sim_bots = app.sim_json(reqwest::Method::GET, "/_sim/bots", None).await;
    for pair in [
        &fixture.live,
        &fixture.rotated,
        &fixture.second_auth,
        &fixture.duplicated,
        &fixture.no_refresh,
    ] {
        let connection = connection_of(&app, &pair.bot_id).await;
        assert_eq!(connection["status"], "active");
        let id = connection["id"].as_str().unwrap();
        let r = app
            .api(reqwest::Method::GET, &format!("/v1/proxy/{id}/v1/users/me"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "bot {}", pair.bot_id);
        let bot = sim_bots["bots"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["bot_id"] == pair.bot_id.as_str())
            .unwrap();
        assert_eq!(
            bot["newest_access_token_fingerprint"],
            fp(&pair.access),
            "tokenkeeper serves the bot's newest pair"
        );
    }
    // The pair whose access token was revoked is served after one refresh by the proxy.
    let dead_access = connection_of(&app, &fixture.dead_access.bot_id).await;
    let id = dead_access["id"].as_str().unwrap();
    let r = app
        .api(reqwest::Method::GET, &format!("/v1/proxy/{id}/v1/users/me"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(
        authorizations(&app).await,
        authorized,
        "no user authorized anything"
    );

    // A second run imports nothing, and says so.
    let grants_before = app.db.count("SELECT count(*) FROM grants").await;
    let events_before = app.db.count("SELECT count(*) FROM events").await;
    let out = run(
        dir.path(),
        &["import", "--from", &table.from, "--query", &table.query],
        &store_env(&app),
    )
    .await;
    assert_eq!(out.status, Some(0), "{}", out.stderr);
    assert!(
        out.stdout.contains("Nothing new to import"),
        "{}",
        out.stdout
    );
    let out = run(
        dir.path(),
        &[
            "import",
            "--from",
            &table.from,
            "--query",
            &table.query,
            "--json",
        ],
        &store_env(&app),
    )
    .await;
    let report = out.json();
    assert_eq!(report["imported_connections"], 0, "{report}");
    assert_eq!(report["imported_grants"], 0);
    assert_eq!(report["skipped_duplicates"], 10);
    assert_eq!(report["rows_already_in_ledger"], 10);
    assert_eq!(app.db.count("SELECT count(*) FROM connections").await, 7);
    assert_eq!(
        app.db.count("SELECT count(*) FROM grants").await,
        grants_before
    );
    assert_eq!(
        app.db.count("SELECT count(*) FROM events").await,
        events_before
    );
}

/// Authorization-code exchanges the simulator has answered.
async fn authorizations(app: &TestApp) -> u64 {
    let stats = app
        .sim_json(reqwest::Method::GET, "/_sim/stats", None)
        .await;
    stats["token_requests"]["total"]["authorization_code"]
        .as_u64()
        .unwrap_or(0)
}

async fn import_verify_rescues_a_dead_access_token_and_marks_an_uninstalled_bot_needs_reauth(
    backend: Backend,
) {
    let app = TestApp::start(backend).await;
    let old = OldApp::of(&app);
    let fixture = AfterFixture::make(&old).await;
    let table = OldTable::create(backend, Shape::After, &fixture.rows).await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("verdicts.jsonl");
    let refreshes = app.sim_refreshes().await;

    let out = run(
        dir.path(),
        &[
            "import",
            "--from",
            &table.from,
            "--query",
            &table.query,
            "--verify",
            "--rate",
            "50/s",
            "--state",
            state.to_str().unwrap(),
            "--json",
        ],
        &store_env(&app),
    )
    .await;
    out.assert_holds_none_of(&fixture.secrets());
    let report = out.json();
    assert_eq!(report["access_tokens_live"], 7, "{report}");
    assert_eq!(report["access_tokens_dead"], 2);
    assert_eq!(report["imported_connections"], 7);
    assert_eq!(report["rescued"], 1);
    assert_eq!(report["rescue_failed"], 1);
    assert_eq!(report["connections_active"], 6);
    assert_eq!(report["connections_needs_reauth"], 1);
    // One refresh rescued the dead access token; one was refused for the uninstalled bot.
    assert_eq!(app.sim_refreshes().await, refreshes + 2);

    let rescued = connection_of(&app, &fixture.dead_access.bot_id).await;
    assert_eq!(rescued["status"], "active");
    let grants = app.grants(rescued["id"].as_str().unwrap()).await;
    let current = grants
        .iter()
        .find(|g| g["id"] == rescued["grant_id"])
        .unwrap();
    assert_eq!(current["origin"], "refresh", "{grants:?}");
    let id = rescued["id"].as_str().unwrap();
    let r = app
        .api(reqwest::Method::GET, &format!("/v1/proxy/{id}/v1/users/me"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);

    let gone = connection_of(&app, &fixture.uninstalled.bot_id).await;
    assert_eq!(gone["status"], "needs_reauth", "{gone}");
    assert_eq!(
        gone["diagnosis"]["reason"], "introspection_inactive",
        "{gone}"
    );
    assert!(
        gone["diagnosis"]["message"]
            .as_str()
            .unwrap()
            .contains("introspection found the token inactive"),
        "{gone}"
    );
    assert_eq!(gone["last_check_result"], "inactive");
    let live = connection_of(&app, &fixture.live.bot_id).await;
    assert_eq!(live["last_check_result"], "active");
    assert!(!live["last_checked_at"].is_null());

    // Resumable: the verdicts are in the state file, by fingerprint, never a token; a run
    // with it asks Notion nothing more, and the ledger already holds everything.
    let kept = std::fs::read_to_string(&state).unwrap();
    assert_eq!(kept.lines().count(), 9, "{kept}");
    for (i, secret) in fixture.secrets().iter().enumerate() {
        assert!(
            !kept.contains(secret.as_str()),
            "secret #{i} in the state file"
        );
    }
    let introspections = sim_count(&app, "oauth.introspect").await;
    let out = run(
        dir.path(),
        &[
            "import",
            "--from",
            &table.from,
            "--query",
            &table.query,
            "--verify",
            "--state",
            state.to_str().unwrap(),
            "--json",
        ],
        &store_env(&app),
    )
    .await;
    let report = out.json();
    assert_eq!(report["imported_grants"], 0, "{report}");
    assert_eq!(
        sim_count(&app, "oauth.introspect").await,
        introspections,
        "nothing already imported is asked about again"
    );
    let out = run(
        dir.path(),
        &[
            "audit",
            "--from",
            &table.from,
            "--query",
            &table.query,
            "--verify",
            "--state",
            state.to_str().unwrap(),
            "--json",
        ],
        &notion_env(&app),
    )
    .await;
    assert_eq!(out.json()["access_tokens_live"], 7);
    assert_eq!(
        sim_count(&app, "oauth.introspect").await,
        introspections,
        "audit resumes from the state file"
    );
}

async fn a_dry_run_reports_what_it_would_import_and_writes_nothing(backend: Backend) {
    let app = TestApp::start(backend).await;
    let old = OldApp::of(&app);
    let fixture = AfterFixture::make(&old).await;
    let table = OldTable::create(backend, Shape::After, &fixture.rows).await;
    let dir = tempfile::tempdir().unwrap();
    let refreshes = app.sim_refreshes().await;
    let out = run(
        dir.path(),
        &[
            "import",
            "--from",
            &table.from,
            "--query",
            &table.query,
            "--dry-run",
            "--verify",
            "--rate",
            "50/s",
            "--json",
        ],
        &store_env(&app),
    )
    .await;
    let report = out.json();
    assert_eq!(report["dry_run"], true);
    assert_eq!(report["imported_connections"], 7, "{report}");
    assert_eq!(report["imported_grants"], 9);
    assert_eq!(report["access_tokens_dead"], 2);
    assert_eq!(app.db.count("SELECT count(*) FROM connections").await, 0);
    assert_eq!(app.db.count("SELECT count(*) FROM grants").await, 0);
    assert_eq!(app.db.count("SELECT count(*) FROM events").await, 0);
    assert_eq!(
        app.sim_refreshes().await,
        refreshes,
        "a dry run spends no refresh token"
    );

    // A dry run creates nothing either: not a database where there is none (SQLite), nor the
    // tables of an empty PostgreSQL schema (which `serve` or `import` would migrate).
    let schema = format!("tk_dry_{}", uuid::Uuid::new_v4().simple());
    let pg = match backend {
        Backend::Sqlite => None,
        Backend::Postgres => {
            let (client, conn) = tokio_postgres::connect(&postgres_url(), tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(conn);
            client
                .batch_execute(&format!("CREATE SCHEMA {schema}"))
                .await
                .unwrap();
            Some(client)
        }
    };
    let fresh_url = match backend {
        Backend::Sqlite => format!("sqlite://{}", dir.path().join("absent.db").display()),
        Backend::Postgres => {
            let base = postgres_url();
            let sep = if base.contains('?') { '&' } else { '?' };
            format!("{base}{sep}options=-csearch_path%3D{schema}")
        }
    };
    let env: Vec<(&str, String)> = store_env(&app)
        .into_iter()
        .map(|(name, value)| match name {
            "TOKENKEEPER_DATABASE_URL" => (name, fresh_url.clone()),
            _ => (name, value),
        })
        .collect();
    let out = run(
        dir.path(),
        &[
            "import",
            "--from",
            &table.from,
            "--query",
            &table.query,
            "--dry-run",
        ],
        &env,
    )
    .await;
    assert_ne!(out.status, Some(0), "refused: {}", out.stdout);
    match pg {
        None => {
            assert!(
                out.stderr.contains("a dry run creates none"),
                "{}",
                out.stderr
            );
            assert!(!dir.path().join("absent.db").exists());
        }
        Some(client) => {
            assert!(out.stderr.contains("tokenkeeper migrate"), "{}", out.stderr);
            let tables: i64 = client
                .query_one(
                    "SELECT count(*) FROM information_schema.tables WHERE table_schema = $1",
                    &[&schema],
                )
                .await
                .unwrap()
                .get(0);
            assert_eq!(tables, 0, "the dry run created no table");
        }
    }
}

async fn an_import_while_serve_refreshes_on_the_same_database_loses_nothing(backend: Backend) {
    // Refreshes are capped per connection; this test refreshes as fast as it can.
    let options = crate::support::app::Options {
        refresh_rate: tokenkeeper::refresh::RefreshRate {
            limit: 100_000,
            window: Duration::from_secs(600),
        },
        ..Default::default()
    };
    let mut options = options;
    options.sim.fresh_identity = true;
    let app = TestApp::with(backend, options).await;
    // Connections tokenkeeper already serves, refreshed in a loop during the import.
    let mut served = Vec::new();
    for i in 0..3 {
        served.push(app.connect(&format!("served-{i}")).await.0);
    }
    let dir = tempfile::tempdir().unwrap();
    // A large old table, written as CSV: 600 bots, their pairs made up (an import never calls
    // Notion without --verify).
    let csv = dir.path().join("tokens.csv");
    let mut text = String::from("bot_id,access_token,refresh_token,end_user_id\n");
    let mut secrets = Vec::new();
    for i in 0..600 {
        let (a, r) = (
            format!("ntn_made_up_access_{i:04}_Qz8"),
            format!("nrt_made_up_refresh_{i:04}_Qz8"),
        );
        text.push_str(&format!("bot-{i:04},{a},{r},user-{i}\n"));
        secrets.extend([a, r]);
    }
    std::fs::write(&csv, text).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let refresher = {
        let (url, stop, served) = (app.url.clone(), stop.clone(), served.clone());
        let sim_url = app.sim.base_url();
        let config = app.sim.config();
        let client = (config.client_id, config.client_secret);
        tokio::spawn(async move {
            let api = Api::new(url, String::new());
            let mut done = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) && done < 3000 {
                for id in &served {
                    // As an app does: its token got a 401 (Notion killed it), so it asks for a
                    // refresh.
                    let (_, token) = api
                        .get_json(&format!("/v1/connections/{id}/access-token"))
                        .await;
                    let r = api
                        .http
                        .post(format!("{sim_url}/v1/oauth/revoke"))
                        .basic_auth(&client.0, Some(&client.1))
                        .json(&json!({"token": token["access_token"]}))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status().as_u16(), 200);
                    let grant = token["grant_id"].as_str().unwrap().to_owned();
                    let (status, body) = api.refresh(id, &grant).await;
                    assert_eq!(status, 200, "a refresh during the import: {body}");
                    done += 1;
                }
            }
            done
        })
    };
    let out = run(
        dir.path(),
        &[
            "import",
            "--from",
            csv.to_str().unwrap(),
            "--batch",
            "50",
            "--json",
        ],
        &store_env(&app),
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let refreshed = refresher.await.unwrap();
    out.assert_holds_none_of(&secrets);
    let report = out.json();
    assert_eq!(report["imported_connections"], 600, "{report}");
    assert_eq!(report["imported_grants"], 600);
    assert!(refreshed > 0);
    assert_eq!(app.db.count("SELECT count(*) FROM connections").await, 603);
    // Every refresh is in the ledger: one grant per refresh, besides each first grant.
    assert_eq!(
        app.db
            .count("SELECT count(*) FROM grants WHERE origin = 'refresh'")
            .await,
        refreshed as i64
    );
    for id in &served {
        assert_eq!(app.connection(id).await["status"], "active");
    }
}

async fn the_api_imports_a_batch_with_one_result_per_row_and_recognises_it_again(backend: Backend) {
    let app = TestApp::start(backend).await;
    let old = OldApp::of(&app);
    let a = old.authorize("ws-api-a", "u-api-a").await;
    let b1 = old.authorize("ws-api-b", "u-api-b").await;
    let b2 = old.refresh(&b1).await;
    let row = |p: &Pair, extra: Value| {
        let mut v = json!({"bot_id": p.bot_id, "access_token": p.access, "refresh_token": p.refresh, "end_user_id": "user-api"});
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        v
    };
    let body = json!({"connections": [
        row(&a, json!({"workspace_name": "A", "authorized_at": "2026-06-01T10:00:00Z"})),
        row(&b1, json!({"authorized_at": "2026-06-01 10:00:00+00", "revoked_at": "2026-06-02 10:00:00+00"})),
        row(&b2, json!({"authorized_at": "2026-06-02T10:00:00Z"})),
        row(&a, json!({})),
        {"bot_id": "", "access_token": "ntn_nothing"},
    ]});
    // Only an admin key may import.
    let r = app
        .http
        .post(format!("{}/v1/connections/import", app.url))
        .bearer_auth(crate::support::app::TOKENS_KEY)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    let (status, answer) = app.post_json("/v1/connections/import", body.clone()).await;
    assert_eq!(status, 200, "{answer}");
    let results = answer["results"].as_array().unwrap();
    assert_eq!(results.len(), 5, "{answer}");
    let kinds: Vec<&str> = results
        .iter()
        .map(|r| r["result"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["imported", "imported", "imported", "duplicate", "invalid"]
    );
    assert_eq!(results[4]["problem"], "bot_id is empty");
    assert_eq!(results[0]["connection_id"], results[3]["connection_id"]);
    assert_eq!(answer["summary"]["imported_connections"], 2);
    assert_eq!(answer["summary"]["imported_grants"], 3);
    for secret in [&a.access, &a.refresh, &b1.access, &b2.refresh] {
        assert!(
            !answer.to_string().contains(secret.as_str()),
            "a token in the answer"
        );
    }
    let b = connection_of(&app, &b2.bot_id).await;
    let grants = app.grants(b["id"].as_str().unwrap()).await;
    let current = grants.iter().find(|g| g["id"] == b["grant_id"]).unwrap();
    assert_eq!(current["access_token_fingerprint"], fp(&b2.access));
    assert_eq!(
        current["obtained_at"], "2026-06-02T10:00:00Z",
        "authorized_at is when the grant was obtained"
    );
    let (_, events) = app
        .get_json(&format!(
            "/v1/connections/{}/events",
            b["id"].as_str().unwrap()
        ))
        .await;
    assert!(events["data"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["kind"] == "imported"));

    // The same batch again: recognised, nothing written.
    let (status, again) = app.post_json("/v1/connections/import", body).await;
    assert_eq!(status, 200, "{again}");
    let kinds: Vec<&str> = again["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["result"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "already_imported",
            "already_imported",
            "already_imported",
            "already_imported",
            "invalid"
        ]
    );
    assert_eq!(again["summary"]["imported_grants"], 0);
    assert_eq!(app.db.count("SELECT count(*) FROM grants").await, 3);

    // A new pair for a bot tokenkeeper already serves is kept, but never made current.
    let a2 = old.refresh(&a).await;
    let (status, added) = app
        .post_json(
            "/v1/connections/import",
            json!({"connections": [row(&a2, json!({}))]}),
        )
        .await;
    assert_eq!(status, 200, "{added}");
    assert_eq!(added["results"][0]["result"], "added");
    let conn_a = connection_of(&app, &a.bot_id).await;
    let grants = app.grants(conn_a["id"].as_str().unwrap()).await;
    assert_eq!(grants.len(), 2);
    let current = grants
        .iter()
        .find(|g| g["id"] == conn_a["grant_id"])
        .unwrap();
    assert_eq!(current["access_token_fingerprint"], fp(&a.access));

    // A malformed body says where, and never echoes what it held.
    let (status, bad) = app
        .post_json(
            "/v1/connections/import",
            json!({"connections": [{"bot_id": "x", "access_token": 12345678901234567u64}]}),
        )
        .await;
    assert_eq!(status, 400, "{bad}");
    assert!(!bad.to_string().contains("12345678901234567"), "{bad}");

    // Verifying asks Notion at 2 a second: a call takes at most 40 rows, so that it answers in
    // about 20 seconds; more are refused before anything is asked or written.
    let introspections = || async {
        app.sim_json(reqwest::Method::GET, "/_sim/stats", None)
            .await["requests"]["oauth.introspect"]
            .clone()
    };
    let before = introspections().await;
    let many: Vec<Value> = (0..41)
        .map(|i| json!({"bot_id": format!("bot-many-{i}"), "access_token": format!("secret-{i}")}))
        .collect();
    let (status, refused) = app
        .post_json(
            "/v1/connections/import",
            json!({"connections": many, "verify": true}),
        )
        .await;
    assert_eq!(status, 400, "{refused}");
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("at most 40"),
        "{refused}"
    );
    assert_eq!(introspections().await, before);
    assert_eq!(app.db.count("SELECT count(*) FROM grants").await, 4);
}
