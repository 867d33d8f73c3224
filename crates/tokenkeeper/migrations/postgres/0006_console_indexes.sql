-- 0006: what the admin console filters and searches by, each an indexed read in id order
-- (PostgreSQL), so that a page of connections stays a short index range at a million of them.
--
-- Filters by workspace and by bot (the live-bot index covers only live connections), and the
-- search box's exact, case-insensitive match on a workspace's name. End user and status
-- already have `connections_end_user` and `connections_status`.
CREATE INDEX connections_workspace ON connections (workspace_id, id);
CREATE INDEX connections_bot ON connections (bot_id, id);
CREATE INDEX connections_workspace_name ON connections (lower(workspace_name), id);

-- Webhook deliveries by state, newest first (`GET /v1/webhook-deliveries`, the console): the
-- delivered ones pile up, and a page of failed ones must not scan them.
CREATE INDEX jobs_kind_status ON jobs (kind, status, id);
