-- 0002: key checks (PostgreSQL), for invariant 11: a wrong key never touches the data.
--
-- One row per key id the database has been told about: a known plaintext sealed with that key
-- (`seal.rs`), bound by its associated data to the key id, so that a process can prove at start
-- that its key ring opens what the database holds, before it writes anything.
-- A row is written when its key is first registered: on the first start of an empty database,
-- by `keys rotate` for its new active key, or for a key id that sealed grants before this table
-- existed, once one of those grants has opened with it. Rows are never changed or deleted: a
-- key id dropped from every key ring after rotation stays registered, and is no longer checked
-- once no grant is sealed with it. Registrations serialize on a transaction-scoped advisory lock.
CREATE TABLE key_checks (
    key_id        text PRIMARY KEY,
    check_value   bytea NOT NULL,
    registered_at timestamptz NOT NULL
);
