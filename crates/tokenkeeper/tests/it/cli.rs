//! The `tokenkeeper` binary as a user runs it: settings, first start, keys, migrations.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::process::Command;

use tokio::io::{AsyncBufReadExt, BufReader};

use tokenkeeper::clock::Clock;
use tokenkeeper::ids::{AccessToken, BotId, RefreshToken};
use tokenkeeper::ledger::{AuthorizationTarget, MintedPair, NewAuthorization, Provider};
use tokenkeeper::seal::KeyRing;
use tokenkeeper::store::{sqlite::SqliteStore, Store, StoreError};

const BIN: &str = env!("CARGO_BIN_EXE_tokenkeeper");

/// The binary with no `TOKENKEEPER_*` variables from the test's own environment; killed if the
/// test ends first.
fn tokenkeeper(dir: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.kill_on_drop(true);
    cmd.current_dir(dir);
    for (k, _) in std::env::vars() {
        if k.starts_with("TOKENKEEPER_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

/// Runs a command that must finish by itself: a regression that makes it serve fails the test
/// instead of hanging it.
async fn finished(cmd: &mut Command) -> std::process::Output {
    tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .expect("the command finishes within 30 s")
        .unwrap()
}

#[tokio::test]
async fn bad_settings_stop_the_program_before_it_listens_with_one_line_and_status_2() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&[(&str, &str)], &str)] = &[
        (
            &[("TOKENKEEPER_DATABASE_URL", "mysql://x")],
            "TOKENKEEPER_DATABASE_URL",
        ),
        (
            &[("TOKENKEEPER_DATABASE_URL", "postgres://u@h:notaport/db")],
            "TOKENKEEPER_DATABASE_URL",
        ),
        (
            &[("TOKENKEEPER_ENCRYPTION_KEY", "k1:AAAA")],
            "TOKENKEEPER_ENCRYPTION_KEY",
        ),
        (
            &[("TOKENKEEPER_ENCRYPTION_KEY_FILE", "/nonexistent/keys")],
            "TOKENKEEPER_ENCRYPTION_KEY_FILE",
        ),
        (&[("TOKENKEEPER_LISTEN", "nope")], "TOKENKEEPER_LISTEN"),
        (
            &[("TOKENKEEPER_NOTION_CLIENT_ID", "only-the-id")],
            "TOKENKEEPER_NOTION_CLIENT_SECRET",
        ),
        (&[("TOKENKEEPER_API_KEYS", "short")], "TOKENKEEPER_API_KEYS"),
        (
            &[("TOKENKEEPER_API_KEYS", "reader:0123456789abcdef0")],
            "TOKENKEEPER_API_KEYS",
        ),
        (
            &[("TOKENKEEPER_DATABASE_URL", "postgres://u@127.0.0.1:1/db")],
            "TOKENKEEPER_ENCRYPTION_KEY",
        ),
        (
            &[("TOKENKEEPER_PUBLIC_URL", "ftp://x")],
            "TOKENKEEPER_PUBLIC_URL",
        ),
        (
            &[("TOKENKEEPER_SESSION_TTL", "ten")],
            "TOKENKEEPER_SESSION_TTL",
        ),
        (
            &[("TOKENKEEPER_HEADER_READ_TIMEOUT", "soon")],
            "TOKENKEEPER_HEADER_READ_TIMEOUT",
        ),
        (
            &[("TOKENKEEPER_BODY_READ_TIMEOUT", "0s")],
            "TOKENKEEPER_BODY_READ_TIMEOUT",
        ),
        (
            &[("TOKENKEEPER_IDLE_TIMEOUT", "1m")],
            "TOKENKEEPER_IDLE_TIMEOUT",
        ),
        (
            &[("TOKENKEEPER_MAX_CONNECTIONS", "0")],
            "TOKENKEEPER_MAX_CONNECTIONS",
        ),
        (
            &[("TOKENKEEPER_PROXY_FIRST_BYTE_TIMEOUT", "-1s")],
            "TOKENKEEPER_PROXY_FIRST_BYTE_TIMEOUT",
        ),
        (
            &[("TOKENKEEPER_PROXY_IDLE_TIMEOUT", "30 parsecs")],
            "TOKENKEEPER_PROXY_IDLE_TIMEOUT",
        ),
        (
            &[("TOKENKEEPER_LOG_FORMAT", "xml")],
            "TOKENKEEPER_LOG_FORMAT",
        ),
    ];
    for (env, setting) in cases {
        let mut cmd = tokenkeeper(dir.path());
        cmd.arg("serve").env("TOKENKEEPER_LISTEN", "127.0.0.1:0");
        for (k, v) in *env {
            cmd.env(k, v);
        }
        let out = finished(&mut cmd).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{env:?}: {stderr}");
        assert!(
            out.stdout.is_empty(),
            "{env:?} printed before failing: it must not listen"
        );
        let lines: Vec<_> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{env:?}: one line: {stderr}");
        assert!(
            lines[0].starts_with(&format!("error: {setting} (--")),
            "{env:?}: {stderr}"
        );
    }
    // A refused key never appears in the message.
    let out = finished(tokenkeeper(dir.path()).args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--api-keys",
        "tokens:tiny-secret",
    ]))
    .await;
    assert_eq!(out.status.code(), Some(2));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("tiny-secret"));
}

#[tokio::test]
async fn a_first_start_on_sqlite_creates_private_key_and_database_files_and_says_where() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = tokio::process::Command::new(BIN)
        .current_dir(dir.path())
        .arg("serve")
        .env("TOKENKEEPER_LISTEN", "127.0.0.1:0")
        .env("TOKENKEEPER_LOG", "warn")
        .env_remove("TOKENKEEPER_DATABASE_URL")
        .env_remove("TOKENKEEPER_ENCRYPTION_KEY")
        .env_remove("TOKENKEEPER_API_KEYS")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut banner = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let done = line.starts_with("Open ");
            banner.push(line);
            if done {
                break;
            }
        }
    })
    .await
    .expect("serve prints its banner");
    let text = banner.join("\n");
    assert!(text.contains("listening on http://127.0.0.1:"), "{text}");
    assert!(text.contains("built-in notion-sim"), "{text}");
    assert!(
        text.contains("Created the encryption key ring tokenkeeper.db.key (mode 0600)"),
        "{text}"
    );
    assert!(text.contains("tokenkeeper.db.api-key"), "{text}");
    use std::os::unix::fs::PermissionsExt;
    // The database too, and the WAL and shared-memory files SQLite makes beside it (issue 11 §8).
    for file in [
        "tokenkeeper.db.key",
        "tokenkeeper.db.api-key",
        "tokenkeeper.db",
        "tokenkeeper.db-wal",
        "tokenkeeper.db-shm",
    ] {
        let mode = std::fs::metadata(dir.path().join(file))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{file} is readable by its owner only");
    }
    let key = std::fs::read_to_string(dir.path().join("tokenkeeper.db.api-key")).unwrap();
    assert!(
        !text.contains(key.trim().trim_start_matches("admin:")),
        "the key itself is never printed"
    );
    child.kill().await.unwrap();

    // The second start reuses the files and says nothing about creating them.
    let out = finished(tokenkeeper(dir.path()).args(["serve", "--listen", "nope"])).await;
    assert_eq!(
        out.status.code(),
        Some(2),
        "the listen address is still checked"
    );
}

fn pair(n: u32) -> MintedPair {
    MintedPair {
        access_token: AccessToken::new(format!("ntn_rotate_access_{n}")),
        refresh_token: Some(RefreshToken::new(format!("nrt_rotate_refresh_{n}"))),
        bot_id: BotId(format!("bot-{n}")),
        workspace_id: format!("ws-{n}"),
        workspace_name: None,
        workspace_icon: None,
        metadata: serde_json::json!({}),
        provider_request_id: None,
        obtained_at: chrono::Utc::now(),
        expires_at: None,
    }
}

#[tokio::test]
async fn keys_generate_and_rotate_reseal_every_grant_under_the_new_key() {
    let dir = tempfile::tempdir().unwrap();
    let mut entries = Vec::new();
    for _ in 0..2 {
        let out = finished(tokenkeeper(dir.path()).args(["keys", "generate"])).await;
        assert!(out.status.success());
        entries.push(String::from_utf8(out.stdout).unwrap().trim().to_owned());
    }
    let (old, new) = (entries[0].clone(), entries[1].clone());
    assert_ne!(old, new);
    let db = dir.path().join("rotate.db");
    let old_ring = Arc::new(KeyRing::parse(&old).unwrap());
    let store: Store = SqliteStore::open(&db, old_ring, Clock::System)
        .await
        .unwrap()
        .into();
    store.migrate().await.unwrap();
    let mut ids = Vec::new();
    for n in 0..7 {
        let outcome = store
            .record_authorization(NewAuthorization::new(
                Provider::Notion,
                AuthorizationTarget::Connect {
                    end_user_id: format!("u{n}"),
                },
                pair(n),
            ))
            .await
            .unwrap();
        ids.push((outcome.connection.id, outcome.grant_id));
    }
    drop(store);

    let out = finished(
        tokenkeeper(dir.path())
            .args(["keys", "rotate", "--batch", "3"])
            .env(
                "TOKENKEEPER_DATABASE_URL",
                format!("sqlite://{}", db.display()),
            )
            .env("TOKENKEEPER_ENCRYPTION_KEY", format!("{new},{old}")),
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("remaining"),
        "progress is reported: {stderr}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("7 grants re-sealed"));

    // The new key alone now opens every grant; the old key alone opens none.
    let new_only: Store =
        SqliteStore::open(&db, Arc::new(KeyRing::parse(&new).unwrap()), Clock::System)
            .await
            .unwrap()
            .into();
    for (n, (connection, grant)) in ids.iter().enumerate() {
        let open = new_only
            .get_grant(connection, grant)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            open.access_token.expose_secret(),
            format!("ntn_rotate_access_{n}")
        );
    }
    let old_only: Store =
        SqliteStore::open(&db, Arc::new(KeyRing::parse(&old).unwrap()), Clock::System)
            .await
            .unwrap()
            .into();
    let (connection, grant) = &ids[0];
    assert!(matches!(
        old_only.get_grant(connection, grant).await,
        Err(StoreError::Seal(_))
    ));
}

#[tokio::test]
async fn migrate_applies_the_schema_and_serve_refuses_a_newer_one() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("m.db").display());
    let out = finished(tokenkeeper(dir.path()).args(["migrate", "--database-url", &url])).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The newest migration this binary knows, whichever that is.
    let expected = format!(
        "schema at version {}",
        tokenkeeper::store::sqlite::SCHEMA_VERSION
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&expected),
        "{expected}: {}",
        String::from_utf8_lossy(&out.stdout)
    );

    let conn = rusqlite::Connection::open(dir.path().join("m.db")).unwrap();
    conn.execute(
        "INSERT INTO schema_migrations (version, applied_at) VALUES (999, '2030-01-01T00:00:00Z')",
        [],
    )
    .unwrap();
    drop(conn);
    let out = finished(tokenkeeper(dir.path()).args([
        "serve",
        "--database-url",
        &url,
        "--listen",
        "127.0.0.1:0",
    ]))
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("newer than this binary"), "{stderr}");
}
