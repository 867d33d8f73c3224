// `notion(connectionId)`: the official @notionhq/client making real Notion-API calls (notion-sim
// plays Notion) with tokens from the real binary. Tokens die the way Notion's do, by moving the
// simulator's clock past their lifetime or by the user removing the bot, never by sleeping;
// refreshes are counted where they happen, at the simulator, and calls to tokenkeeper at the
// client's own fetch.

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { inspect } from "node:util";
import { APIResponseError, LogLevel } from "@notionhq/client";

import { Tokenkeeper, TokenkeeperError } from "@tokenkeeper/client";

import { ADMIN_KEY, TOKENS_KEY, followLink, startSim, startTokenkeeper } from "./harness.mjs";

let sim;
let server;
let admin;

before(async () => {
  sim = await startSim();
  server = await startTokenkeeper({ sim });
  admin = new Tokenkeeper({ url: server.url, apiKey: ADMIN_KEY, notionBaseUrl: sim.url });
});

after(async () => {
  await server?.stop();
  await sim?.stop();
});

/**
 * An app server's client (tokens key) whose fetch counts the calls it makes, by kind: so a test
 * sees how many refreshes the client asked tokenkeeper for, and how often Notion refused it.
 */
function appClient() {
  const calls = { refresh: 0, accessToken: 0, notion401: 0 };
  const counting = async (input, init) => {
    const request = input instanceof Request ? input : new Request(input, init);
    const { pathname } = new URL(request.url);
    if (pathname.endsWith("/refresh")) calls.refresh += 1;
    if (pathname.endsWith("/access-token")) calls.accessToken += 1;
    const response = await fetch(input, init);
    if (request.url.startsWith(sim.url) && response.status === 401) calls.notion401 += 1;
    return response;
  };
  const tk = new Tokenkeeper({ url: server.url, apiKey: TOKENS_KEY, notionBaseUrl: sim.url, fetch: counting });
  return { tk, calls };
}

/** Quiet, and without the Notion client's own retries, so counts are the client's alone. */
const CLIENT = { logLevel: LogLevel.ERROR, retry: false };

let users = 0;
async function connectNewUser() {
  users += 1;
  await sim.post("/next-authorization", { workspace_id: `ws-notion-${users}`, user_id: `u-notion-${users}` });
  const session = await admin.createConnectSession({ end_user_id: `notion-user-${users}`, return_to: `${server.url}/done` });
  const landed = await followLink(session.url);
  assert.equal(landed.status, "connected");
  const connection = await admin.getConnection(landed.connection_id);
  return { id: connection.id, botId: connection.bot_id };
}

async function notionCalls(endpoint) {
  return (await sim.get("/requests?limit=10000")).requests.filter((r) => r.endpoint === endpoint);
}

/** Kills every access token minted so far: lifetimes of one hour, and the clock moved past it. */
async function expireAccessTokens() {
  await sim.post("/config", { access_token_ttl: "1h" });
  await sim.post("/clock/advance", { ms: 3_600_000 + 1_000 });
}

test("direct mode: users.me, search, pages.create and pages.retrieve go to Notion with the connection's token", { timeout: 20_000 }, async () => {
  const { id, botId } = await connectNewUser();
  const { tk, calls } = appClient();
  const notion = tk.notion(id, { client: CLIENT });

  const me = await notion.users.me({});
  assert.equal(me.type, "bot");
  assert.equal(me.id, botId, "the connection's own bot answered");
  const found = await notion.search({ query: "" });
  const page = found.results.find((r) => r.object === "page");
  assert.ok(page, "the user shared a page");
  const created = await notion.pages.create({
    parent: { page_id: page.id },
    properties: { title: [{ text: { content: "Written with @tokenkeeper/client" } }] },
  });
  assert.equal((await notion.pages.retrieve({ page_id: created.id })).id, created.id);

  // Straight to Notion with the current grant's token, read from tokenkeeper once.
  const grants = await admin.grants(id);
  const current = grants.data.find((g) => g.id === grants.current_grant_id);
  const mine = (await notionCalls("users.me")).filter((r) => r.bot_id === botId);
  assert.equal(mine.length, 1);
  assert.equal(mine[0].token_fingerprint, current.access_token_fingerprint);
  assert.equal(calls.accessToken, 1, "the token is kept between calls");
  assert.equal(calls.refresh, 0);
});

test("proxy mode: the same calls through tokenkeeper's proxy", { timeout: 20_000 }, async () => {
  const { id, botId } = await connectNewUser();
  const { tk, calls } = appClient();
  const notion = tk.notion(id, { mode: "proxy", client: CLIENT });
  assert.equal((await notion.users.me({})).id, botId);
  const found = await notion.search({ query: "" });
  assert.ok(found.results.some((r) => r.object === "page"));
  assert.equal(calls.accessToken, 0, "the proxy adds the token; the app never reads it");
  const { workspaces } = await sim.get("/workspaces");
  const [unshared] = workspaces.find((w) => w.bot_ids.includes(botId)).unshared_page_ids;
  await assert.rejects(notion.pages.retrieve({ page_id: unshared }), (error) => {
    assert.ok(APIResponseError.isAPIResponseError(error), "Notion's own answers reach the Notion client unchanged");
    assert.equal(error.code, "object_not_found");
    return true;
  });
});

test("N concurrent calls that meet a dead token cause one refresh, and every call is retried and succeeds", { timeout: 30_000 }, async () => {
  const N = 20;
  const { id, botId } = await connectNewUser();
  const { tk, calls } = appClient();
  const notion = tk.notion(id, { client: CLIENT });
  await notion.users.me({}); // the client now holds the token
  const { grant_id: dead } = await admin.accessToken(id);
  await expireAccessTokens();
  try {
    const refreshesBefore = await sim.refreshes();
    const usersMeBefore = await sim.requests("users.me");

    // Every call reaches Notion with the dead token before any 401 goes back, and the refresh
    // is kept in flight at Notion while those 401s arrive at the client.
    const firstAttempts = await sim.post("/holds", { endpoint: "users.me" });
    const refresh = await sim.post("/holds", { endpoint: "oauth.token:refresh_token" });
    const results = Promise.all(Array.from({ length: N }, () => notion.users.me({})));
    await sim.post(`/holds/${firstAttempts.id}/wait`, { arrived: N, timeout_ms: 10_000 });
    await sim.delete(`/holds/${firstAttempts.id}`);
    await sim.post(`/holds/${refresh.id}/wait`, { arrived: 1, timeout_ms: 10_000 });
    await sim.delete(`/holds/${refresh.id}`);

    const answers = await results;
    assert.equal(answers.length, N);
    for (const me of answers) assert.equal(me.id, botId, "every call succeeded after the refresh");
    assert.equal(calls.notion401, N, "every call met the dead token once");
    assert.equal(calls.refresh, 1, "the client asked tokenkeeper for one refresh");
    assert.equal(await sim.refreshes(), refreshesBefore + 1, "Notion saw one refresh");
    assert.equal(await sim.requests("users.me"), usersMeBefore + 2 * N, "one retry per call, no more");
    const grants = await admin.grants(id);
    assert.notEqual(grants.current_grant_id, dead);
    assert.equal(grants.data.find((g) => g.id === grants.current_grant_id).parent_grant_id, dead);
  } finally {
    await sim.post("/config", { access_token_ttl: null });
  }
});

test("two app processes meeting the same dead token make Notion refresh once (the server's if_grant rule)", { timeout: 20_000 }, async () => {
  const { id, botId } = await connectNewUser();
  const a = appClient();
  const b = appClient();
  await a.tk.notion(id, { client: CLIENT }).users.me({});
  await b.tk.notion(id, { client: CLIENT }).users.me({});
  await expireAccessTokens();
  try {
    const refreshesBefore = await sim.refreshes();
    assert.equal((await a.tk.notion(id, { client: CLIENT }).users.me({})).id, botId);
    // b still holds the dead token; its refresh names the grant a already replaced.
    assert.equal((await b.tk.notion(id, { client: CLIENT }).users.me({})).id, botId);
    assert.equal(a.calls.refresh, 1);
    assert.equal(b.calls.refresh, 1);
    assert.equal(await sim.refreshes(), refreshesBefore + 1, "the second refresh was answered without Notion");
  } finally {
    await sim.post("/config", { access_token_ttl: null });
  }
});

test("a 401 that outlives the refresh goes back to the Notion client after one retry", { timeout: 20_000 }, async () => {
  const { id } = await connectNewUser();
  const { tk, calls } = appClient();
  const notion = tk.notion(id, { client: CLIENT });
  await notion.users.me({});
  const refreshesBefore = await sim.refreshes();
  await sim.post("/faults", { endpoint: "users.me", kind: "status", status: 401, count: 2 });
  await assert.rejects(notion.users.me({}), (error) => {
    assert.ok(APIResponseError.isAPIResponseError(error), `Notion's 401, got ${inspect(error)}`);
    assert.equal(error.status, 401);
    assert.equal(error.code, "unauthorized");
    return true;
  });
  assert.equal(calls.notion401, 2, "the call and its one retry");
  assert.equal(calls.refresh, 1);
  assert.equal(await sim.refreshes(), refreshesBefore + 1);
  assert.equal((await notion.users.me({})).object, "user", "the fault is spent; the refreshed token works");
});

test("needs_reauth surfaces as a TokenkeeperError with the reconnect URL, in both modes, and a reconnect heals the client", { timeout: 30_000 }, async () => {
  const { id, botId } = await connectNewUser();
  const { tk, calls } = appClient();
  const direct = tk.notion(id, { client: CLIENT });
  const proxied = tk.notion(id, { mode: "proxy", client: CLIENT });
  await direct.users.me({});
  const secrets = await admin.accessToken(id, { include_refresh_token: true });
  await sim.post(`/bots/${botId}/revoke`); // the user removed the connection in Notion

  let reconnectUrl;
  await assert.rejects(direct.users.me({}), (error) => {
    assert.ok(error instanceof TokenkeeperError, `a TokenkeeperError, got ${inspect(error)}`);
    assert.equal(error.status, 424);
    assert.equal(error.code, "needs_reauth");
    assert.equal(error.connection_id, id);
    assert.ok(error.reconnect_url.startsWith(`${server.url}/connect/`), error.reconnect_url);
    assert.equal(error.diagnosis.reason, "refresh_rejected");
    assert.equal(error.diagnosis.grant_id, secrets.grant_id);
    const shown = [inspect(error, { depth: Infinity, showHidden: true }), error.stack, JSON.stringify(error)].join("\n");
    for (const secret of [secrets.access_token, secrets.refresh_token, TOKENS_KEY]) {
      assert.ok(!shown.includes(secret), "no token or key in the error");
    }
    reconnectUrl = error.reconnect_url;
    return true;
  });
  assert.equal(calls.refresh, 1);
  await assert.rejects(direct.users.me({}), (error) => error.code === "needs_reauth" && error.reconnect_url === reconnectUrl);
  await assert.rejects(proxied.users.me({}), (error) => {
    assert.ok(error instanceof TokenkeeperError, `a TokenkeeperError, got ${inspect(error)}`);
    assert.equal(error.status, 424);
    assert.equal(error.code, "needs_reauth");
    assert.equal(error.reconnect_url, reconnectUrl, "one link for every 424 of the connection");
    return true;
  });

  // The user reconnects (Notion installs a new bot after an uninstall); the same client works again.
  const landed = await followLink(reconnectUrl);
  assert.equal(landed.status, "reconnected");
  assert.equal(landed.connection_id, id);
  const me = await direct.users.me({});
  assert.equal(me.id, (await admin.getConnection(id)).bot_id);
  assert.equal((await proxied.users.me({})).id, me.id);
});

test("a revoked connection and an unknown one are TokenkeeperErrors, not Notion errors", { timeout: 20_000 }, async () => {
  const { id } = await connectNewUser();
  const { tk } = appClient();
  const notion = tk.notion(id, { client: CLIENT });
  await notion.users.me({});
  await admin.revoke(id);
  await assert.rejects(notion.users.me({}), (error) => error instanceof TokenkeeperError && error.code === "connection_revoked" && error.status === 410);
  const unknown = `con_${"0".repeat(32)}`;
  for (const mode of ["direct", "proxy"]) {
    await assert.rejects(tk.notion(unknown, { mode, client: CLIENT }).users.me({}), (error) => {
      assert.ok(error instanceof TokenkeeperError, `${mode}: a TokenkeeperError, got ${inspect(error)}`);
      assert.equal(error.code, "not_found");
      return true;
    });
  }
});
