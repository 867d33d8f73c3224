-- 0001: the ledger (PostgreSQL).
--
-- Tables are created in the first schema of the session's search_path. Tokens are bytea
-- sealed by `seal.rs`; no column ever holds a plaintext token.
-- `schema_migrations` is created by the migrator itself, not here.

-- One authorized link to an external account. `current_grant_id` is the pointer that
-- invariant 3 moves; `lease_*` is the refresh lease of invariant 4 (`lease_fence` only grows).
-- Writers serialize on a connection with `SELECT … FOR UPDATE` on its row.
CREATE TABLE connections (
    id               text PRIMARY KEY,
    provider         text NOT NULL,
    bot_id           text NOT NULL,
    workspace_id     text NOT NULL,
    workspace_name   text,
    workspace_icon   text,
    end_user_id      text NOT NULL,
    status           text NOT NULL CHECK (status IN ('active', 'needs_reauth', 'revoked')),
    current_grant_id text,
    diagnosis        jsonb,
    created_at       timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL,
    lease_holder     text,
    lease_until      timestamptz,
    lease_fence      bigint NOT NULL DEFAULT 0
);

-- `(provider, bot_id)` is unique among live connections; a revoked connection's bot may
-- connect anew. Writers also take an advisory lock on `(provider, bot_id)` first, so this
-- index is the backstop, not the mechanism.
CREATE UNIQUE INDEX connections_live_bot ON connections (provider, bot_id) WHERE status <> 'revoked';
CREATE INDEX connections_end_user ON connections (end_user_id, id);
CREATE INDEX connections_status ON connections (status, id);

-- Every token pair ever minted. Rows are never deleted; the only updates set
-- `superseded_at`/`revoked_at` or re-seal the same plaintext under another key.
-- `seq` orders a connection's grants by commit (they are inserted under its row lock).
CREATE TABLE grants (
    seq                 bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
    id                  text PRIMARY KEY,
    connection_id       text NOT NULL REFERENCES connections (id),
    origin              text NOT NULL CHECK (origin IN ('authorization', 'reauthorization', 'refresh', 'import')),
    parent_grant_id     text REFERENCES grants (id),
    bot_id              text NOT NULL,
    obtained_at         timestamptz NOT NULL,
    expires_at          timestamptz,
    superseded_at       timestamptz,
    revoked_at          timestamptz,
    stale_at_birth      boolean NOT NULL DEFAULT false,
    access_token        bytea NOT NULL,
    refresh_token       bytea,
    access_fp           text NOT NULL,
    refresh_fp          text,
    key_id              text NOT NULL,
    provider_request_id text,
    metadata            jsonb NOT NULL DEFAULT '{}'
);

ALTER TABLE connections ADD CONSTRAINT connections_current_grant_fk
    FOREIGN KEY (current_grant_id) REFERENCES grants (id);

CREATE INDEX grants_connection ON grants (connection_id, seq);
CREATE INDEX grants_key ON grants (key_id);

-- The audit trail, append-only, ordered by `seq` within a connection.
CREATE TABLE events (
    seq                 bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
    id                  text PRIMARY KEY,
    connection_id       text NOT NULL REFERENCES connections (id),
    kind                text NOT NULL,
    grant_id            text REFERENCES grants (id),
    related_grant_id    text REFERENCES grants (id),
    provider_request_id text,
    detail              jsonb NOT NULL DEFAULT '{}',
    at                  timestamptz NOT NULL
);

CREATE INDEX events_connection ON events (connection_id, seq);

-- One row per lease taken by `begin_refresh`, written before the provider is called, so that
-- an attempt whose holder vanished can be named later (`outcome = 'interrupted'`).
CREATE TABLE refresh_attempts (
    id            text PRIMARY KEY,
    connection_id text NOT NULL REFERENCES connections (id),
    grant_id      text NOT NULL REFERENCES grants (id),
    fence         bigint NOT NULL,
    holder        text NOT NULL,
    started_at    timestamptz NOT NULL,
    lease_until   timestamptz NOT NULL,
    finished_at   timestamptz,
    outcome       text CHECK (outcome IN ('refreshed', 'failed', 'interrupted'))
);

CREATE INDEX refresh_attempts_grant ON refresh_attempts (grant_id, fence);

-- Connect and reconnect sessions; only the SHA-256 of `state` is kept.
CREATE TABLE connect_sessions (
    id            text PRIMARY KEY,
    provider      text NOT NULL,
    state_hash    text NOT NULL UNIQUE,
    end_user_id   text NOT NULL,
    return_to     text NOT NULL,
    connection_id text REFERENCES connections (id),
    created_at    timestamptz NOT NULL,
    expires_at    timestamptz NOT NULL,
    used_at       timestamptz
);
