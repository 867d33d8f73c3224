//! The key checks of invariant 11, written once for both backends: which key ids the database
//! holds values sealed with, whether the store's key ring opens each of them, and the
//! registration of key ids (`key_checks`, one sealed check value per key id).
//!
//! What a refusal means, and which command may register what, is decided by the caller
//! (`keycheck.rs`) and passed in as a `KeyRegistration`; this module only reports and writes.

use std::collections::BTreeSet;

use super::db::{Db, Param};
use super::sealed::open_grant;
use super::{sql, StoreError};

/// Which key ids a key check may register, besides the key ids it proves by opening a grant
/// they sealed before key checks existed (those are always registered, when the ring opens
/// everything).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyRegistration {
    /// No other (`migrate`).
    ProvenOnly,
    /// The active key, when the database holds nothing sealed and no registered key: the first
    /// start of an empty database (`serve`).
    FirstStart,
    /// The active key, whatever the database holds (`keys rotate`).
    Active,
}

/// What a key check found, and what it registered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyCheck {
    /// The ring's active key id.
    pub active: String,
    /// The key ids that seal grants.
    pub in_use: BTreeSet<String>,
    /// The key ids the database has a check value for, after this check.
    pub registered: BTreeSet<String>,
    /// Key ids the database holds values sealed with that the ring lacks.
    pub missing: BTreeSet<String>,
    /// Key ids the ring has under another key than the one that sealed the database's values.
    pub wrong: BTreeSet<String>,
    /// The key ids this check registered.
    pub newly_registered: BTreeSet<String>,
}

impl KeyCheck {
    /// Whether the ring opens everything the database holds. When it does not, the check wrote
    /// nothing.
    pub fn opens_everything(&self) -> bool {
        self.missing.is_empty() && self.wrong.is_empty()
    }

    /// Whether the database has been told about the key this ring seals with.
    pub fn active_registered(&self) -> bool {
        self.registered.contains(&self.active)
    }
}

/// Checks the key ring against the database, under the key lock, and registers what
/// `registration` allows if, and only if, the ring opens everything (see `Store::check_keys`).
pub(crate) async fn check_keys(
    db: &impl Db,
    registration: KeyRegistration,
) -> Result<KeyCheck, StoreError> {
    db.lock_keys().await?;
    let keys = db.keys();
    let checks = db.query(sql::KEY_CHECKS, &[], sql::key_check).await?;
    let in_use: BTreeSet<String> = db
        .query(sql::KEY_IDS_IN_USE, &[], sql::key_id)
        .await?
        .into_iter()
        .collect();
    let mut report = KeyCheck {
        active: keys.active_key_id().to_owned(),
        in_use,
        registered: checks.iter().map(|(id, _)| id.clone()).collect(),
        ..KeyCheck::default()
    };

    // A registered key id is judged by its check value, whether or not grants use it: that is
    // what catches a ring holding the right key id with other key bytes before it seals anything.
    // A registered key id the ring lacks matters only while grants are sealed with it.
    for (id, value) in &checks {
        if keys.contains(id) && keys.open_check(id, value).is_err() {
            report.wrong.insert(id.clone());
        }
    }
    let mut proven = Vec::new();
    for id in &report.in_use {
        if !keys.contains(id) {
            report.missing.insert(id.clone());
        } else if !report.registered.contains(id) {
            // Sealed before key checks existed: one grant that opens proves the key.
            let sample = db
                .query_opt(sql::GRANT_SEALED_WITH_KEY, &[Param::Text(id)], sql::grant)
                .await?;
            match sample.map(|grant| open_grant(keys, grant)) {
                Some(Ok(_)) => proven.push(id.clone()),
                Some(Err(_)) => {
                    report.wrong.insert(id.clone());
                }
                // The grant went away between the two reads, which append-only rules out.
                None => {}
            }
        }
    }
    if !report.opens_everything() {
        return Ok(report);
    }

    let active = report.active.clone();
    let register_active = !report.registered.contains(&active)
        && !proven.contains(&active)
        && match registration {
            KeyRegistration::ProvenOnly => false,
            KeyRegistration::FirstStart => report.registered.is_empty() && report.in_use.is_empty(),
            KeyRegistration::Active => true,
        };
    if register_active {
        proven.push(active);
    }
    let now = db.now();
    for id in proven {
        let value = keys
            .seal_check(&id)
            .expect("only key ids of the ring are registered");
        db.execute(
            sql::INSERT_KEY_CHECK,
            &[Param::Text(&id), Param::Bytes(&value), Param::Time(now)],
        )
        .await?;
        report.registered.insert(id.clone());
        report.newly_registered.insert(id);
    }
    Ok(report)
}

/// Every key id the database holds a sealed value of: those that seal grants, and those with a
/// check value. Needs no key.
pub(crate) async fn sealed_key_ids(db: &impl Db) -> Result<BTreeSet<String>, StoreError> {
    let mut ids: BTreeSet<String> = db
        .query(sql::KEY_IDS_IN_USE, &[], sql::key_id)
        .await?
        .into_iter()
        .collect();
    ids.extend(
        db.query(sql::KEY_CHECKS, &[], sql::key_check)
            .await?
            .into_iter()
            .map(|(id, _)| id),
    );
    Ok(ids)
}
