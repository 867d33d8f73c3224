//! The key check at start (invariant 11: a wrong key never touches the data).
//!
//! Before `serve` listens, and before `migrate` or `keys rotate` change anything, the store
//! checks the key ring against the database (`Store::check_keys`): every key id that seals a
//! grant must be in the ring and really open, and so must every registered key id the ring has.
//! A ring that fails stops the command with one line naming the key ids, never key material,
//! and exit status 2 (a `ConfigError` naming the key ring's setting).
//!
//! Only two things register a new active key id: the first start of a database that holds
//! nothing sealed, and `keys rotate`. A `serve` whose active key is not registered refuses to
//! start, so two processes with different key rings cannot both write, and no process seals with
//! a key that the others were not given first (README, "Commands").
//!
//! The embedded default (SQLite, no key configured) creates `<db>.key` only on such a first
//! start, decided with the database open: a database that holds anything sealed, whose file is
//! gone, is refused and never given a new key ring.
//!
//! `migrate` checks a configured key ring the same way, and registers only key ids it proves by
//! opening their grants (databases from before key checks), never an active key. Without a key
//! ring it applies migrations and checks nothing.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::clock::Clock;
use crate::config::{self, ConfigError, KeySource};
use crate::seal::KeyRing;
use crate::store::{self, DatabaseUrl, KeyCheck, KeyRegistration, Store, StoreError};

/// The command a store is opened for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Serve,
    Migrate,
    Rotate,
    /// `import --dry-run`: checks as `serve` would, and changes nothing: no migration, no key
    /// registered, no key ring file or SQLite file created.
    DryRun,
}

impl Command {
    fn registration(self) -> KeyRegistration {
        match self {
            Command::Serve | Command::DryRun => KeyRegistration::FirstStart,
            Command::Migrate => KeyRegistration::ProvenOnly,
            Command::Rotate => KeyRegistration::Active,
        }
    }
}

/// A store whose key ring passed the check, its schema ready for the command.
pub struct Opened {
    pub store: Store,
    pub schema_version: i64,
    /// What the check found; `None` for `migrate` without a key ring, which checks nothing.
    pub check: Option<KeyCheck>,
    /// The embedded default's key ring file, when this start created it.
    pub created_key_file: Option<PathBuf>,
}

/// Opens the store for `command`, migrates it (`serve`, `migrate`) or checks that its schema is
/// current (`keys rotate`), and checks the key ring against it. A ring that fails the check is
/// a `ConfigError`, and then nothing was registered.
pub async fn open(
    url: &DatabaseUrl,
    source: &KeySource,
    command: Command,
    clock: Clock,
) -> anyhow::Result<Opened> {
    if command == Command::DryRun {
        if let DatabaseUrl::Sqlite(path) = url {
            if !path.exists() {
                return Err(ConfigError::new(
                    "TOKENKEEPER_DATABASE_URL",
                    format!(
                        "there is no database at {}, and a dry run creates none: import without \
                         --dry-run, or run `tokenkeeper migrate` first",
                        path.display()
                    ),
                )
                .into());
            }
        }
    }
    match source {
        KeySource::Ring {
            keys,
            setting,
            file,
        } => {
            let (store, schema_version) = wait_for_database(|| async {
                let store = store::open(url, keys.clone(), clock.clone()).await?;
                let version = match command {
                    Command::Serve | Command::Migrate => store.migrate().await?,
                    Command::Rotate | Command::DryRun => store.check_schema().await?,
                };
                Ok((store, version))
            })
            .await?;
            let check = if command == Command::DryRun {
                store
                    .check_keys_without_writing(command.registration())
                    .await?
            } else {
                store.check_keys(command.registration()).await?
            };
            judge(&check, command, setting, file.as_deref())?;
            Ok(Opened {
                store,
                schema_version,
                check: Some(check),
                created_key_file: None,
            })
        }
        KeySource::EmbeddedDefault { file } if command == Command::Serve => {
            first_start(url, file, clock).await
        }
        KeySource::EmbeddedDefault { file } if command == Command::DryRun => Err(ConfigError::new(
            "TOKENKEEPER_ENCRYPTION_KEY_FILE",
            format!(
                "{} does not exist, and a dry run creates no key ring: import without \
                 --dry-run, or start `tokenkeeper serve` once",
                file.display()
            ),
        )
        .into()),
        _ if command == Command::Migrate => {
            // The store wants a key ring; migrations seal nothing, and this one is never asked
            // to seal or registered.
            let unused =
                KeyRing::parse(&KeyRing::generate_entry()).expect("a generated entry parses");
            let store = store::open(url, Arc::new(unused), clock).await?;
            let schema_version = store.migrate().await?;
            Ok(Opened {
                store,
                schema_version,
                check: None,
                created_key_file: None,
            })
        }
        _ => Err(config::no_key_ring(source).into()),
    }
}

/// The embedded default without its key ring file: a new key ring, but only for a database that
/// holds nothing sealed and knows no key.
async fn first_start(url: &DatabaseUrl, file: &Path, clock: Clock) -> anyhow::Result<Opened> {
    let entry = KeyRing::generate_entry();
    let keys = KeyRing::parse(&entry).expect("a generated entry parses");
    let keys = Arc::new(keys);
    let (store, schema_version) = wait_for_database(|| async {
        let store = store::open(url, keys.clone(), clock.clone()).await?;
        let version = store.migrate().await?;
        Ok((store, version))
    })
    .await?;
    let held = store.sealed_key_ids().await?;
    if !held.is_empty() {
        return Err(ConfigError::new(
            "TOKENKEEPER_ENCRYPTION_KEY",
            format!(
                "no key configured and {file} does not exist, but the database holds values \
                 sealed with key ids {ids}: restore {file} (or configure the key ring that has \
                 them); a new key ring would not open them",
                file = file.display(),
                ids = list(&held),
            ),
        )
        .into());
    }
    config::create_key_ring_file(file, &entry)?;
    // A database error here keeps the file: the key may have been registered all the same, and
    // the next start then finds both.
    let check = store.check_keys(KeyRegistration::FirstStart).await?;
    if let Err(refused) = judge(
        &check,
        Command::Serve,
        "TOKENKEEPER_ENCRYPTION_KEY_FILE",
        Some(file),
    ) {
        // Another process sealed or registered a key since the look above, so this key was not
        // registered; a file beside the database that opens nothing in it must not stay.
        let _ = std::fs::remove_file(file);
        return Err(refused.into());
    }
    Ok(Opened {
        store,
        schema_version,
        check: Some(check),
        created_key_file: Some(file.to_path_buf()),
    })
}

/// The one line a failed check stops the command with, naming key ids only.
fn judge(
    check: &KeyCheck,
    command: Command,
    setting: &str,
    file: Option<&Path>,
) -> Result<(), ConfigError> {
    let ring = match file {
        Some(file) => format!("the key ring in {}", file.display()),
        None => "this key ring".to_owned(),
    };
    if !check.opens_everything() {
        let unopened: BTreeSet<&String> = check.missing.iter().chain(&check.wrong).collect();
        let mut why = Vec::new();
        if !check.missing.is_empty() {
            why.push(format!("not in the ring: {}", list(&check.missing)));
        }
        if !check.wrong.is_empty() {
            why.push(format!(
                "in the ring with other key bytes: {}",
                list(&check.wrong)
            ));
        }
        return Err(ConfigError::new(
            setting,
            format!(
                "the database holds values sealed with key ids {} that {ring} does not open ({})",
                list(unopened),
                why.join("; ")
            ),
        ));
    }
    if matches!(command, Command::Serve | Command::DryRun) && !check.active_registered() {
        return Err(ConfigError::new(
            setting,
            format!(
                "the active key {active} is new to this database, which knows key ids {known}: \
                 run `tokenkeeper keys rotate` with {ring} first, once every process sharing the \
                 database has {active} in its key ring (README, key rotation)",
                active = check.active,
                known = list(&check.registered),
            ),
        ));
    }
    Ok(())
}

fn list<'a>(ids: impl IntoIterator<Item = &'a String>) -> String {
    let ids: Vec<&str> = ids.into_iter().map(String::as_str).collect();
    if ids.is_empty() {
        "none".to_owned()
    } else {
        ids.join(", ")
    }
}

/// Runs `open` until the database answers: a process (re)started during an outage waits for
/// the database, saying so once, instead of exiting; any other failure stops it at once.
async fn wait_for_database<T, F, Fut>(open: F) -> Result<T, StoreError>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let mut said = false;
    loop {
        match open().await {
            Err(StoreError::Unavailable(reason)) => {
                if !said {
                    tracing::warn!(
                        "the database is unavailable ({reason}); waiting for it before listening"
                    );
                    said = true;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            other => return other,
        }
    }
}
