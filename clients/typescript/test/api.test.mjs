// Every method of the client against the real binary: `tokenkeeper serve` (SQLite, a temporary
// directory) with `tokenkeeper notion-sim` playing Notion. Users connect over HTTP as a browser
// would, through the links the client makes.

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { inspect } from "node:util";

import { Tokenkeeper, TokenkeeperError } from "@tokenkeeper/client";

import { ADMIN_KEY, TOKENS_KEY, followLink, startSim, startTokenkeeper } from "./harness.mjs";

let sim;
let server;
/** The app's backend, with an admin key. */
let admin;
/** An app server, with a tokens key. */
let app;

before(async () => {
  sim = await startSim();
  server = await startTokenkeeper({ sim });
  admin = new Tokenkeeper({ url: server.url, apiKey: ADMIN_KEY, notionBaseUrl: sim.url });
  app = new Tokenkeeper({ url: server.url, apiKey: TOKENS_KEY, notionBaseUrl: sim.url });
});

after(async () => {
  await server?.stop();
  await sim?.stop();
});

let users = 0;
/** Connects a new end user, in a workspace of their own (so a bot of their own), through the client's link. */
async function connectNewUser() {
  users += 1;
  const endUser = `api-user-${users}`;
  await sim.post("/next-authorization", { workspace_id: `ws-api-${users}`, user_id: `u-api-${users}` });
  const session = await admin.createConnectSession({ end_user_id: endUser, return_to: `${server.url}/done` });
  const landed = await followLink(session.url);
  assert.equal(landed.status, "connected", JSON.stringify(landed));
  return { id: landed.connection_id, endUser };
}

/** Asserts that `promise` rejects with a `TokenkeeperError` of this status and code; returns it. */
async function rejectsWith(promise, status, code) {
  let caught;
  await assert.rejects(promise, (error) => {
    assert.ok(error instanceof TokenkeeperError, `a TokenkeeperError, got ${inspect(error)}`);
    assert.equal(error.status, status, error.message);
    assert.equal(error.code, code, error.message);
    caught = error;
    return true;
  });
  return caught;
}

test("health, ready, the OpenAPI document and the metrics", { timeout: 20_000 }, async () => {
  assert.deepEqual(await app.health(), { status: "ok" });
  const ready = await app.ready();
  assert.equal(ready.status, "ready");
  assert.equal(ready.backend, "sqlite");
  assert.ok(Number.isInteger(ready.schema_version) && ready.schema_version > 0);
  const document = await app.openapi();
  assert.equal(document.openapi, "3.1.0");
  assert.ok("/v1/connections/{id}/refresh" in document.paths);
  const metrics = await app.metrics();
  assert.equal(typeof metrics, "string");
  assert.match(metrics, /^tokenkeeper_http_request_duration_seconds_count\{route="\/healthz",method="GET",status="200"\} [1-9]/m);
});

test("a connect session's link connects the user; the connection reads back without tokens", { timeout: 20_000 }, async () => {
  const session = await admin.createConnectSession({ end_user_id: "reader", return_to: `${server.url}/done` });
  assert.match(session.id, /^cs_[0-9a-f]{32}$/);
  assert.ok(session.url.startsWith(`${server.url}/connect/`), session.url);
  assert.ok(Date.parse(session.expires_at) > Date.now());
  await sim.post("/next-authorization", { workspace_id: "ws-reader", user_id: "u-reader" });
  const landed = await followLink(session.url);
  assert.equal(landed.status, "connected");

  const connection = await app.getConnection(landed.connection_id);
  assert.equal(connection.id, landed.connection_id);
  assert.equal(connection.status, "active");
  assert.equal(connection.end_user_id, "reader");
  assert.equal(connection.provider, "notion");
  assert.match(connection.grant_id, /^grt_/);
  const bots = (await sim.get("/bots")).bots;
  assert.ok(bots.some((b) => b.bot_id === connection.bot_id && b.workspace_id === "ws-reader"));
  assert.doesNotMatch(JSON.stringify(connection), /ntn_|nrt_/, "no token in a connection");
});

test("listConnections filters and pages by cursor; iterateConnections walks every page", { timeout: 30_000 }, async () => {
  const made = [await connectNewUser(), await connectNewUser(), await connectNewUser()];
  const ids = new Set(made.map((c) => c.id));

  const first = await app.listConnections({ limit: 1 });
  assert.equal(first.data.length, 1);
  assert.match(first.next_after, /^con_/, "a full page names the next one");
  const second = await app.listConnections({ limit: 1, after: first.next_after });
  assert.equal(second.data.length, 1);
  assert.ok(second.data[0].id > first.data[0].id, "pages follow the id order");

  const walked = [];
  for await (const connection of app.iterateConnections({ limit: 1 })) walked.push(connection.id);
  const all = (await app.listConnections({ limit: 1000 })).data.map((c) => c.id);
  assert.deepEqual(walked, all, "one page at a time, every connection once, in order");
  for (const id of ids) assert.ok(walked.includes(id));

  const mine = await app.listConnections({ end_user_id: made[1].endUser });
  assert.deepEqual(mine.data.map((c) => c.id), [made[1].id]);
  assert.equal(mine.next_after ?? null, null);
  const active = await app.listConnections({ status: "active", limit: 1000 });
  assert.ok(active.data.every((c) => c.status === "active"));

  await rejectsWith(app.listConnections({ limit: 0 }), 400, "invalid_request");
});

test("accessToken answers the current grant; its refresh token only to an admin key", { timeout: 20_000 }, async () => {
  const { id } = await connectNewUser();
  const connection = await app.getConnection(id);
  const token = await app.accessToken(id);
  assert.equal(token.connection_id, id);
  assert.equal(token.grant_id, connection.grant_id);
  assert.match(token.access_token, /^ntn_/);
  assert.equal(token.refresh_token ?? null, null, "no refresh token unless asked");

  const withRefresh = await admin.accessToken(id, { include_refresh_token: true });
  assert.match(withRefresh.refresh_token, /^nrt_/);
  await rejectsWith(app.accessToken(id, { include_refresh_token: true }), 403, "forbidden");
});

test("refresh with if_grant refreshes once; the same if_grant again answers the new grant without Notion", { timeout: 20_000 }, async () => {
  const { id } = await connectNewUser();
  const { grant_id: first } = await app.accessToken(id);
  const refreshesBefore = await sim.refreshes();

  const refreshed = await app.refresh(id, { if_grant: first });
  assert.equal(refreshed.refreshed, true);
  assert.notEqual(refreshed.grant_id, first);
  assert.match(refreshed.access_token, /^ntn_/);
  assert.equal(await sim.refreshes(), refreshesBefore + 1);

  const again = await app.refresh(id, { if_grant: first });
  assert.equal(again.refreshed, false, "the grant had been replaced already");
  assert.equal(again.grant_id, refreshed.grant_id);
  assert.equal(await sim.refreshes(), refreshesBefore + 1, "Notion was not called again");
  assert.equal((await app.accessToken(id)).grant_id, refreshed.grant_id);
});

test("grants and events show the ledger and the audit trail, fingerprints only", { timeout: 20_000 }, async () => {
  const { id } = await connectNewUser();
  const { grant_id: first } = await app.accessToken(id);
  const { grant_id: second } = await app.refresh(id, { if_grant: first });

  const grants = await admin.grants(id);
  assert.equal(grants.connection_id, id);
  assert.equal(grants.current_grant_id, second);
  assert.deepEqual(grants.data.map((g) => g.id), [first, second], "oldest first");
  assert.deepEqual(grants.data.map((g) => g.origin), ["authorization", "refresh"]);
  assert.equal(grants.data[1].parent_grant_id, first);
  assert.match(grants.data[0].access_token_fingerprint, /^sha256:[0-9a-f]{16}$/);
  assert.ok(grants.data[0].superseded_at, "the first grant was superseded");

  const events = await admin.events(id);
  assert.equal(events.connection_id, id);
  const kinds = events.data.map((e) => e.kind);
  for (const kind of ["authorized", "refresh_started", "refreshed"]) assert.ok(kinds.includes(kind), `${kind} in ${kinds}`);
  assert.doesNotMatch(JSON.stringify([grants, events]), /ntn_|nrt_/, "never a token");

  await rejectsWith(app.grants(id), 403, "forbidden");
  await rejectsWith(app.events(id), 403, "forbidden");
});

test("a reconnect session's link re-authorizes the same connection", { timeout: 20_000 }, async () => {
  const { id } = await connectNewUser();
  const before = await app.getConnection(id);
  const session = await admin.createReconnectSession(id, { return_to: `${server.url}/again` });
  assert.match(session.id, /^cs_/);
  // The same user in the same workspace authorizes again.
  await sim.post("/next-authorization", { workspace_id: before.workspace_id, user_id: `u-api-${users}` });
  const landed = await followLink(session.url);
  assert.equal(landed.status, "reconnected");
  assert.equal(landed.connection_id, id);
  const after = await app.getConnection(id);
  assert.notEqual(after.grant_id, before.grant_id, "a fresh pair, as Notion mints since 2026-06-08");
  assert.equal((await admin.grants(id)).data.at(-1).origin, "reauthorization");

  await rejectsWith(app.createReconnectSession(id), 403, "forbidden");
  await rejectsWith(
    admin.createReconnectSession(id, { return_to: "https://elsewhere.example/steal" }),
    400,
    "return_to_not_allowed",
  );
});

test("importConnections records rows of an existing store, and a dry run writes nothing", { timeout: 20_000 }, async () => {
  const row = {
    bot_id: "bot-imported-by-the-client",
    access_token: "ntn_imported000000000000000000000000000000000000000000",
    refresh_token: "nrt_imported000000000000000000000000000000000000000000",
    workspace_id: "ws-imported",
    end_user_id: "imported-user",
  };
  const dry = await admin.importConnections({ connections: [row], dry_run: true });
  assert.equal(dry.results.length, 1);
  assert.equal(dry.results[0].row, 1);
  assert.equal(dry.results[0].result, "imported");
  assert.equal(dry.summary.dry_run, true);
  assert.equal((await app.listConnections({ end_user_id: "imported-user" })).data.length, 0, "a dry run writes nothing");

  const done = await admin.importConnections({ connections: [row, { bot_id: "no-token" }] });
  assert.deepEqual(done.results.map((r) => r.result), ["imported", "invalid"]);
  assert.equal(done.summary.imported_connections, 1);
  assert.equal(done.summary.rows, 2);
  assert.equal(done.summary.rows_invalid, 1);
  assert.equal(done.summary.access_tokens_live, undefined, "no verification counts without verify");
  const id = done.results[0].connection_id;
  const imported = await app.getConnection(id);
  assert.equal(imported.end_user_id, "imported-user");
  assert.equal((await admin.grants(id)).data[0].origin, "import");

  const again = await admin.importConnections({ connections: [row] });
  assert.equal(again.results[0].result, "already_imported");
  await rejectsWith(app.importConnections({ connections: [row] }), 403, "forbidden");
});

test("revoke answers what Notion confirmed; the connection then refuses its token", { timeout: 20_000 }, async () => {
  const { id } = await connectNewUser();
  const { bot_id } = await app.getConnection(id);
  await rejectsWith(app.revoke(id), 403, "forbidden");

  const revocation = await admin.revoke(id);
  assert.equal(revocation.connection.id, id);
  assert.equal(revocation.connection.status, "revoked");
  assert.equal(revocation.upstream_revoked, true);
  assert.ok(revocation.tokens_revoked >= 2, `the access and the refresh token (${revocation.tokens_revoked})`);
  assert.equal(revocation.tokens_pending, 0);
  assert.equal(revocation.tokens_failed, 0);
  const bot = (await sim.get("/bots")).bots.find((b) => b.bot_id === bot_id);
  assert.deepEqual(bot.live_access_token_fingerprints, [], "Notion holds no live access token of it");

  const error = await rejectsWith(app.accessToken(id), 410, "connection_revoked");
  assert.equal(error.connection_id, id);
  await rejectsWith(app.refresh(id), 410, "connection_revoked");
});

test("a connection whose user removed the bot is needs_reauth, with a reconnect URL and a diagnosis", { timeout: 20_000 }, async () => {
  const { id } = await connectNewUser();
  const { bot_id, grant_id } = await app.getConnection(id);
  await sim.post(`/bots/${bot_id}/revoke`);

  const refused = await rejectsWith(app.refresh(id, { if_grant: grant_id }), 424, "needs_reauth");
  assert.equal(refused.connection_id, id);
  assert.ok(refused.reconnect_url.startsWith(`${server.url}/connect/`), refused.reconnect_url);
  assert.ok(Date.parse(refused.reconnect_url_expires_at) > Date.now());
  assert.equal(refused.diagnosis.reason, "refresh_rejected");
  assert.equal(refused.diagnosis.grant_id, grant_id);
  assert.equal(refused.body.code, "needs_reauth");

  const read = await rejectsWith(app.accessToken(id), 424, "needs_reauth");
  assert.equal(read.reconnect_url, refused.reconnect_url, "the same link until it is used");
  assert.equal((await app.getConnection(id)).status, "needs_reauth");
  const stuck = [];
  for await (const c of app.iterateConnections({ status: "needs_reauth" })) stuck.push(c.id);
  assert.ok(stuck.includes(id));

  // The user follows the link and is back.
  const landed = await followLink(read.reconnect_url);
  assert.equal(landed.status, "reconnected");
  assert.equal(landed.connection_id, id);
  assert.equal((await app.getConnection(id)).status, "active");
});

test("errors are typed and never carry the API key", { timeout: 20_000 }, async () => {
  const missing = await rejectsWith(app.getConnection(`con_${"0".repeat(32)}`), 404, "not_found");
  assert.match(missing.message, /^GET \/v1\/connections\/con_0+: 404 not_found: /);
  await rejectsWith(app.getConnection("not-an-id"), 400, "invalid_request");
  await rejectsWith(app.createConnectSession({ end_user_id: "x", return_to: `${server.url}/` }), 403, "forbidden");
  await rejectsWith(
    admin.createConnectSession({ end_user_id: "x", return_to: "https://elsewhere.example/" }),
    400,
    "return_to_not_allowed",
  );

  const wrongKey = "a-wrong-key-that-must-not-leak-0123456789";
  const stranger = new Tokenkeeper({ url: server.url, apiKey: wrongKey });
  const refused = await rejectsWith(stranger.listConnections(), 401, "unauthorized");
  const unreachable = await rejectsWith(
    new Tokenkeeper({ url: "http://127.0.0.1:1", apiKey: wrongKey }).health(),
    0,
    "unreachable",
  );
  for (const shown of [refused, unreachable, stranger].flatMap((e) => [
    inspect(e, { depth: Infinity, showHidden: true }),
    String(e),
    JSON.stringify(e),
    e.stack ?? "",
  ])) {
    assert.ok(!shown.includes(wrongKey), `the key leaked: ${shown}`);
    assert.ok(!shown.includes(ADMIN_KEY) && !shown.includes(TOKENS_KEY));
  }
});
