-- 0005: bringing existing integrations in, and the health check (PostgreSQL).
--
-- `import` recognises a pair it already recorded by its fingerprints, looked up per bot under
-- the bot's lock (no plaintext is ever compared in SQL): `grants_bot` makes that one indexed
-- read, whichever connection (live or revoked) holds the pair.
CREATE INDEX grants_bot ON grants (bot_id, access_fp);

-- The health check's last word on each connection: when its current access token was last
-- introspected, which grant that was, and what Notion said (`unknown` when introspection itself
-- failed or was throttled, which never changes a connection's status).
ALTER TABLE connections ADD COLUMN last_checked_at timestamptz;
ALTER TABLE connections ADD COLUMN last_check_result text
    CHECK (last_check_result IN ('active', 'inactive', 'unknown'));
ALTER TABLE connections ADD COLUMN last_checked_grant_id text;

-- The sweeper's next connections: active ones, least recently checked (never checked first).
CREATE INDEX connections_due_check ON connections (status, last_checked_at NULLS FIRST);

-- Named leases that let one process at a time do a job for all of them (the health check's
-- sweeper); `fence` grows with every new holder.
CREATE TABLE sweeper_leases (
    name   text PRIMARY KEY,
    holder text,
    until  timestamptz,
    fence  bigint NOT NULL DEFAULT 0
);
