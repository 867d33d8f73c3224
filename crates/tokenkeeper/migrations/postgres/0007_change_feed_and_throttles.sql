-- 0007: what every process must learn of at once (PostgreSQL): a notification on the channel
-- `tokenkeeper_changes`, sent by a trigger in the transaction of each change (PostgreSQL
-- delivers it at commit, in commit order, to every session that listens), and Notion's
-- throttles shared by every process.
--
-- Each process keeps the current grant of the connections it serves in memory and must drop
-- an entry as soon as another process moves that connection's current grant or status. A
-- trigger, not the store's code, sends the notification, so that no writer can forget it (a
-- new rule, `tokenkeeper import`, a hand-written UPDATE). The payload names the schema, since
-- channels are database-wide and several schemas may share a database.
CREATE FUNCTION tokenkeeper_connection_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('tokenkeeper_changes', json_build_object(
        'schema', TG_TABLE_SCHEMA,
        'kind', 'connection',
        'subject', NEW.id,
        'grant', NEW.current_grant_id,
        'status', NEW.status)::text);
    RETURN NULL;
END
$$;

-- A change of the refresh lease's holder is notified too: a refresh waiting for another
-- process's learns of its end (or of its release after a failure) without polling.
CREATE TRIGGER connections_changed AFTER UPDATE ON connections FOR EACH ROW
WHEN (OLD.current_grant_id IS DISTINCT FROM NEW.current_grant_id
   OR OLD.status IS DISTINCT FROM NEW.status
   OR OLD.workspace_id IS DISTINCT FROM NEW.workspace_id
   OR OLD.lease_holder IS DISTINCT FROM NEW.lease_holder)
EXECUTE FUNCTION tokenkeeper_connection_changed();

-- A 429 or 529 from Notion holds every process's proxied calls of one connection or workspace
-- until `until`. Written only when Notion throttles; expired rows are removed by the next write.
CREATE TABLE throttles (
    scope   text NOT NULL CHECK (scope IN ('connection', 'workspace')),
    subject text NOT NULL,
    until   timestamptz NOT NULL,
    reason  text NOT NULL,
    PRIMARY KEY (scope, subject)
);

CREATE FUNCTION tokenkeeper_throttled() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('tokenkeeper_changes', json_build_object(
        'schema', TG_TABLE_SCHEMA,
        'kind', 'throttle',
        'subject', NEW.scope || ':' || NEW.subject,
        'until', to_char(NEW.until AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
        'reason', NEW.reason)::text);
    RETURN NULL;
END
$$;

CREATE TRIGGER throttles_changed AFTER INSERT OR UPDATE ON throttles FOR EACH ROW
EXECUTE FUNCTION tokenkeeper_throttled();
