-- 0001: the ledger (SQLite).
--
-- Timestamps are TEXT in one fixed-width UTC form, `YYYY-MM-DDTHH:MM:SS.ffffffZ`, so that
-- comparing them as strings compares them as times. JSON columns are TEXT holding JSON.
-- Tokens are BLOBs sealed by `seal.rs`; no column ever holds a plaintext token.
-- `schema_migrations` is created by the migrator itself, not here.

-- One authorized link to an external account. `current_grant_id` is the pointer that
-- invariant 3 moves; `lease_*` is the refresh lease of invariant 4 (`lease_fence` only grows).
CREATE TABLE connections (
    id               TEXT PRIMARY KEY,
    provider         TEXT NOT NULL,
    bot_id           TEXT NOT NULL,
    workspace_id     TEXT NOT NULL,
    workspace_name   TEXT,
    workspace_icon   TEXT,
    end_user_id      TEXT NOT NULL,
    status           TEXT NOT NULL CHECK (status IN ('active', 'needs_reauth', 'revoked')),
    current_grant_id TEXT REFERENCES grants (id),
    diagnosis        TEXT,
    created_at       TEXT NOT NULL,
    updated_at       TEXT NOT NULL,
    lease_holder     TEXT,
    lease_until      TEXT,
    lease_fence      INTEGER NOT NULL DEFAULT 0
) STRICT;

-- `(provider, bot_id)` is unique among live connections; a revoked connection's bot may
-- connect anew.
CREATE UNIQUE INDEX connections_live_bot ON connections (provider, bot_id) WHERE status <> 'revoked';
CREATE INDEX connections_end_user ON connections (end_user_id, id);
CREATE INDEX connections_status ON connections (status, id);

-- Every token pair ever minted. Rows are never deleted; the only updates set
-- `superseded_at`/`revoked_at` or re-seal the same plaintext under another key.
-- `seq` orders a connection's grants by commit.
CREATE TABLE grants (
    seq                 INTEGER PRIMARY KEY AUTOINCREMENT,
    id                  TEXT NOT NULL UNIQUE,
    connection_id       TEXT NOT NULL REFERENCES connections (id),
    origin              TEXT NOT NULL CHECK (origin IN ('authorization', 'reauthorization', 'refresh', 'import')),
    parent_grant_id     TEXT REFERENCES grants (id),
    bot_id              TEXT NOT NULL,
    obtained_at         TEXT NOT NULL,
    expires_at          TEXT,
    superseded_at       TEXT,
    revoked_at          TEXT,
    stale_at_birth      INTEGER NOT NULL DEFAULT 0 CHECK (stale_at_birth IN (0, 1)),
    access_token        BLOB NOT NULL,
    refresh_token       BLOB,
    access_fp           TEXT NOT NULL,
    refresh_fp          TEXT,
    key_id              TEXT NOT NULL,
    provider_request_id TEXT,
    metadata            TEXT NOT NULL DEFAULT '{}'
) STRICT;

CREATE INDEX grants_connection ON grants (connection_id, seq);
CREATE INDEX grants_key ON grants (key_id);

-- The audit trail, append-only. `seq` orders a connection's events by commit, because every
-- write to a connection is serialized by its lock.
CREATE TABLE events (
    seq                 INTEGER PRIMARY KEY AUTOINCREMENT,
    id                  TEXT NOT NULL UNIQUE,
    connection_id       TEXT NOT NULL REFERENCES connections (id),
    kind                TEXT NOT NULL,
    grant_id            TEXT REFERENCES grants (id),
    related_grant_id    TEXT REFERENCES grants (id),
    provider_request_id TEXT,
    detail              TEXT NOT NULL DEFAULT '{}',
    at                  TEXT NOT NULL
) STRICT;

CREATE INDEX events_connection ON events (connection_id, seq);

-- One row per lease taken by `begin_refresh`, written before the provider is called, so that
-- an attempt whose holder vanished can be named later (`outcome = 'interrupted'`).
CREATE TABLE refresh_attempts (
    id            TEXT PRIMARY KEY,
    connection_id TEXT NOT NULL REFERENCES connections (id),
    grant_id      TEXT NOT NULL REFERENCES grants (id),
    fence         INTEGER NOT NULL,
    holder        TEXT NOT NULL,
    started_at    TEXT NOT NULL,
    lease_until   TEXT NOT NULL,
    finished_at   TEXT,
    outcome       TEXT CHECK (outcome IN ('refreshed', 'failed', 'interrupted'))
) STRICT;

CREATE INDEX refresh_attempts_grant ON refresh_attempts (grant_id, fence);

-- Connect and reconnect sessions; only the SHA-256 of `state` is kept.
CREATE TABLE connect_sessions (
    id            TEXT PRIMARY KEY,
    provider      TEXT NOT NULL,
    state_hash    TEXT NOT NULL UNIQUE,
    end_user_id   TEXT NOT NULL,
    return_to     TEXT NOT NULL,
    connection_id TEXT REFERENCES connections (id),
    created_at    TEXT NOT NULL,
    expires_at    TEXT NOT NULL,
    used_at       TEXT
) STRICT;
