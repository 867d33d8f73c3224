-- 0004: jobs (PostgreSQL): work that must happen at least once, outside the transaction that
-- decided it, and survive restarts: revoking tokens upstream (and, later, webhook deliveries).
--
-- A job is written in the same transaction as the ledger change that calls for it. A worker in
-- any process claims due jobs with `FOR UPDATE SKIP LOCKED` (so workers never wait on each
-- other), pushing `next_attempt_at` past the attempt so that a crashed worker's job comes due
-- again, then records the outcome: done, another try later, or failed for good. No job holds a
-- secret: a revocation names the grant and column whose sealed token it revokes.
CREATE TABLE jobs (
    id              text PRIMARY KEY,
    kind            text NOT NULL,
    connection_id   text REFERENCES connections (id),
    subject         text NOT NULL,
    payload         jsonb NOT NULL DEFAULT '{}',
    status          text NOT NULL CHECK (status IN ('pending', 'done', 'failed')),
    attempts        bigint NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL,
    last_error      text,
    created_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL
);

CREATE INDEX jobs_due ON jobs (status, next_attempt_at);
CREATE INDEX jobs_connection ON jobs (connection_id, kind);

-- The per-connection refresh cap counts a connection's recent attempts.
CREATE INDEX refresh_attempts_connection ON refresh_attempts (connection_id, started_at);
