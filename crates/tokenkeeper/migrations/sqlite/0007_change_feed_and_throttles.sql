-- 0007: what every process must learn of at once (SQLite): a change log that triggers fill in
-- the transaction of each change, and Notion's throttles shared by every process.
--
-- Each process keeps the current grant of the connections it serves in memory and must drop
-- an entry as soon as another process moves that connection's current grant or status. The
-- rows below are written by triggers, not by the store's code, so that no writer can forget
-- one (a new rule, `tokenkeeper import`, a hand-written UPDATE). Processes poll
-- `PRAGMA data_version` every few milliseconds and read the rows after the last seq they saw;
-- the log keeps its last 10,000 rows, and a process that finds a gap re-validates everything.
CREATE TABLE change_log (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    kind    TEXT NOT NULL CHECK (kind IN ('connection', 'throttle')),
    -- A connection id, or `<scope>:<subject>` of a throttle.
    subject TEXT NOT NULL,
    -- JSON: the connection's grant and status after the change, or the throttle's end.
    detail  TEXT NOT NULL
) STRICT;

-- A change of the refresh lease's holder is logged too: a refresh waiting for another process's
-- learns of its end (or of its release after a failure) without polling.
CREATE TRIGGER connections_changed
AFTER UPDATE OF current_grant_id, status, workspace_id, lease_holder ON connections
WHEN OLD.current_grant_id IS NOT NEW.current_grant_id
  OR OLD.status IS NOT NEW.status
  OR OLD.workspace_id IS NOT NEW.workspace_id
  OR OLD.lease_holder IS NOT NEW.lease_holder
BEGIN
    INSERT INTO change_log (kind, subject, detail)
    VALUES ('connection', NEW.id,
            json_object('grant', NEW.current_grant_id, 'status', NEW.status));
    DELETE FROM change_log WHERE seq <= last_insert_rowid() - 10000;
END;

-- A 429 or 529 from Notion holds every process's proxied calls of one connection or workspace
-- until `until` (RFC 3339, UTC, microseconds). Written only when Notion throttles; expired rows
-- are removed by the next write.
CREATE TABLE throttles (
    scope   TEXT NOT NULL CHECK (scope IN ('connection', 'workspace')),
    subject TEXT NOT NULL,
    until   TEXT NOT NULL,
    reason  TEXT NOT NULL,
    PRIMARY KEY (scope, subject)
) STRICT;

CREATE TRIGGER throttles_inserted AFTER INSERT ON throttles
BEGIN
    INSERT INTO change_log (kind, subject, detail)
    VALUES ('throttle', NEW.scope || ':' || NEW.subject,
            json_object('until', NEW.until, 'reason', NEW.reason));
    DELETE FROM change_log WHERE seq <= last_insert_rowid() - 10000;
END;

CREATE TRIGGER throttles_updated AFTER UPDATE ON throttles
BEGIN
    INSERT INTO change_log (kind, subject, detail)
    VALUES ('throttle', NEW.scope || ':' || NEW.subject,
            json_object('until', NEW.until, 'reason', NEW.reason));
    DELETE FROM change_log WHERE seq <= last_insert_rowid() - 10000;
END;
