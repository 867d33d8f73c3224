-- 0004: jobs (SQLite): work that must happen at least once, outside the transaction that
-- decided it, and survive restarts: revoking tokens upstream (and, later, webhook deliveries).
--
-- A job is written in the same transaction as the ledger change that calls for it. A worker in
-- any process claims due jobs (under the write lock here; `FOR UPDATE SKIP LOCKED` on
-- PostgreSQL), pushing `next_attempt_at` past the attempt so that a crashed worker's job comes
-- due again, then records the outcome: done, another try later, or failed for good. No job
-- holds a secret: a revocation names the grant and column whose sealed token it revokes.
CREATE TABLE jobs (
    id              TEXT PRIMARY KEY,
    kind            TEXT NOT NULL,
    connection_id   TEXT REFERENCES connections (id),
    subject         TEXT NOT NULL,
    payload         TEXT NOT NULL DEFAULT '{}',
    status          TEXT NOT NULL CHECK (status IN ('pending', 'done', 'failed')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TEXT NOT NULL,
    last_error      TEXT,
    created_at      TEXT NOT NULL,
    updated_at      TEXT NOT NULL
) STRICT;

CREATE INDEX jobs_due ON jobs (status, next_attempt_at);
CREATE INDEX jobs_connection ON jobs (connection_id, kind);

-- The per-connection refresh cap counts a connection's recent attempts.
CREATE INDEX refresh_attempts_connection ON refresh_attempts (connection_id, started_at);
