-- 0003: the reconnect link that 424 answers carry is reused while it lives (PostgreSQL).
--
-- Before, every 424 of a `needs_reauth` connection stored a new reconnect session, so reading
-- a dead connection wrote a row per read. Now each connection has at most one such session
-- alive at a time, handed out again until it is used or expires. Handing it out again needs
-- its `state`, of which only the hash is kept in `state_hash`: `reusable_state` holds the state
-- sealed with the key ring (as tokens are), and is set only on these sessions.
ALTER TABLE connect_sessions ADD COLUMN reusable_state bytea;

-- The lookup under the connection's lock: its newest unused reusable session.
CREATE INDEX connect_sessions_reusable ON connect_sessions (connection_id, created_at)
    WHERE reusable_state IS NOT NULL AND used_at IS NULL;
