// The official Notion JavaScript client through tokenkeeper's proxy: `baseUrl` set to
// `<tokenkeeper>/v1/proxy/<connection id>` and `auth` set to a tokenkeeper API key is all an app
// changes. Runs `tokenkeeper serve` (SQLite in a temp dir) against `tokenkeeper notion-sim`,
// connects a workspace over HTTP as a browser would, then calls Notion through the proxy.

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { mkdtemp, rm } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { APIResponseError, Client, LogLevel } from "@notionhq/client";

import { CLIENT_ID, CLIENT_SECRET, TOKENKEEPER_BIN, spawnUntilLine, startSim } from "./harness.mjs";

const API_KEY = "node-proxy-test-admin-key-0123456789abcdef";

let sim;
let tokenkeeper;
let dir;
let connectionId;

before(async () => {
  sim = await startSim();
  dir = await mkdtemp(path.join(os.tmpdir(), "tokenkeeper-proxy-"));
  const proc = await spawnUntilLine(TOKENKEEPER_BIN, ["serve"], {
    pattern: /^tokenkeeper \S+ listening on (http:\/\/\S+)$/,
    timeoutMs: 20_000,
    env: {
      TOKENKEEPER_LISTEN: "127.0.0.1:0",
      TOKENKEEPER_DATABASE_URL: `sqlite://${path.join(dir, "tk.db")}`,
      TOKENKEEPER_API_KEYS: `admin:${API_KEY}`,
      TOKENKEEPER_NOTION_CLIENT_ID: CLIENT_ID,
      TOKENKEEPER_NOTION_CLIENT_SECRET: CLIENT_SECRET,
      TOKENKEEPER_NOTION_BASE_URL: sim.url,
      TOKENKEEPER_LOG: "warn",
    },
  });
  tokenkeeper = { url: proc.match[1], stop: proc.stop };
  connectionId = await connect("node-user-1");
});

after(async () => {
  await tokenkeeper?.stop();
  await sim?.stop();
  if (dir) await rm(dir, { recursive: true, force: true });
});

/** A call to tokenkeeper's own API with the admin key. */
async function api(method, route, body) {
  const response = await fetch(`${tokenkeeper.url}${route}`, {
    method,
    headers: {
      authorization: `Bearer ${API_KEY}`,
      ...(body === undefined ? {} : { "content-type": "application/json" }),
    },
    body: body === undefined ? undefined : JSON.stringify(body),
    redirect: "manual",
    signal: AbortSignal.timeout(10_000),
  });
  return { status: response.status, json: await response.json() };
}

/**
 * GETs `url` as a browser would and returns where it redirects to. `jar` holds the cookies set
 * so far (name → value) and is sent along: tokenkeeper binds a connect attempt to the browser
 * that followed the link, with a cookie the callback checks.
 */
async function hop(url, jar = new Map()) {
  const cookie = [...jar].map(([name, value]) => `${name}=${value}`).join("; ");
  const response = await fetch(url, {
    redirect: "manual",
    headers: cookie ? { cookie } : {},
    signal: AbortSignal.timeout(10_000),
  });
  assert.ok([302, 303, 307].includes(response.status), `a redirect from ${url}, got ${response.status}`);
  for (const set of response.headers.getSetCookie()) {
    const [pair] = set.split(";");
    const at = pair.indexOf("=");
    jar.set(pair.slice(0, at).trim(), pair.slice(at + 1).trim());
  }
  return new URL(response.headers.get("location"), url).toString();
}

/** The connect flow: tokenkeeper link → Notion consent (auto-approved) → callback → return_to. */
async function connect(endUserId) {
  const session = await api("POST", "/v1/connect-sessions", {
    provider: "notion",
    end_user_id: endUserId,
    return_to: `${tokenkeeper.url}/done`,
  });
  assert.equal(session.status, 201, JSON.stringify(session.json));
  const jar = new Map();
  const toNotion = await hop(session.json.url, jar);
  assert.ok(toNotion.startsWith(`${sim.url}/v1/oauth/authorize`), toNotion);
  const toCallback = await hop(toNotion);
  assert.ok(toCallback.startsWith(`${tokenkeeper.url}/oauth/callback`), toCallback);
  const landing = new URL(await hop(toCallback, jar));
  assert.equal(landing.pathname, "/done");
  assert.equal(landing.searchParams.get("status"), "connected");
  const id = landing.searchParams.get("connection_id");
  assert.match(id, /^con_/);
  return id;
}

/** The official client, pointed at the proxy; Notion's own retries are left on unless asked. */
function notion({ retry } = {}) {
  return new Client({
    auth: API_KEY,
    baseUrl: `${tokenkeeper.url}/v1/proxy/${connectionId}`,
    timeoutMs: 20_000,
    // The 429s below are expected; keep the client's warnings out of the test output.
    logLevel: LogLevel.ERROR,
    ...(retry === undefined ? {} : { retry }),
  });
}

async function expectApiError(promise, code, status) {
  let caught;
  await assert.rejects(promise, (error) => {
    assert.ok(APIResponseError.isAPIResponseError(error), `an APIResponseError, got ${error}`);
    assert.equal(error.code, code);
    assert.equal(error.status, status);
    caught = error;
    return true;
  });
  return caught;
}

async function connection() {
  const { status, json } = await api("GET", `/v1/connections/${connectionId}`);
  assert.equal(status, 200);
  return json;
}

test("users.me, search, pages.retrieve and pages.create work through the proxy", { timeout: 30_000 }, async () => {
  const client = notion();
  const me = await client.users.me({});
  assert.equal(me.object, "user");
  assert.equal(me.type, "bot");
  assert.equal(me.id, (await connection()).bot_id, "the connection's own bot answered");

  const found = await client.search({ query: "" });
  assert.equal(found.object, "list");
  const page = found.results.find((r) => r.object === "page");
  assert.ok(page, "the user shared at least one page");

  const retrieved = await client.pages.retrieve({ page_id: page.id });
  assert.equal(retrieved.id, page.id);

  const created = await client.pages.create({
    parent: { page_id: page.id },
    properties: { title: [{ text: { content: "Written through tokenkeeper" } }] },
  });
  assert.equal(created.object, "page");
  assert.equal(created.parent.page_id, page.id);
  assert.equal(created.properties.title.title[0].plain_text, "Written through tokenkeeper");
  const again = await client.pages.retrieve({ page_id: created.id });
  assert.equal(again.id, created.id);
});

test("a page not shared with the connection is the client's object_not_found", { timeout: 30_000 }, async () => {
  const { workspaces } = await sim.get("/workspaces");
  const [unshared] = workspaces[0].unshared_page_ids;
  assert.ok(unshared, "the workspace keeps an unshared page");
  await expectApiError(notion().pages.retrieve({ page_id: unshared }), "object_not_found", 404);
  const after = await connection();
  assert.equal(after.status, "active", "a 404 is not a token problem");
});

test("a rate limit reaches the client as rate_limited once the proxy's budget is spent, and auth is untouched", { timeout: 60_000 }, async () => {
  const before = await connection();
  const refreshesBefore = (await sim.get("/stats")).token_requests.total.refresh_token ?? 0;

  // Three 429s with Retry-After 1: the proxy waits out two (its default budget), then hands
  // the third to the client, which is told not to retry on its own.
  await sim.post("/faults", { endpoint: "users.me", kind: "status", status: 429, count: 3, retry_after: 1 });
  const countBefore = (await sim.get("/stats")).requests["users.me"];
  const started = Date.now();
  const error = await expectApiError(notion({ retry: false }).users.me({}), "rate_limited", 429);
  assert.ok(Date.now() - started >= 2_000, "the proxy retried after Retry-After before giving up");
  assert.equal((await sim.get("/stats")).requests["users.me"], countBefore + 3);
  assert.ok(error.headers, "Notion's headers come with the error");

  // The sim's real per-connection limit: its Retry-After (the rest of a 60 s window) is beyond
  // the budget, so the 429 comes back at once.
  // (The window may already hold this test's earlier calls, so the first or the second call is
  // the one limited.)
  await sim.post("/config", { rate_limit_per_connection: 1, rate_limit_window: "60s" });
  try {
    let limited;
    for (let i = 0; i < 2 && !limited; i++) {
      const started = Date.now();
      try {
        await notion({ retry: false }).users.me({});
      } catch (error) {
        limited = { error, ms: Date.now() - started };
      }
    }
    assert.ok(limited, "the sim's rate limit was hit");
    assert.ok(APIResponseError.isAPIResponseError(limited.error), `an APIResponseError, got ${limited.error}`);
    assert.equal(limited.error.code, "rate_limited");
    assert.equal(limited.error.status, 429);
    assert.ok(limited.ms < 10_000, `not waited for (${limited.ms} ms)`);
  } finally {
    await sim.post("/config", { rate_limit_per_connection: 0 });
  }

  const after = await connection();
  assert.equal(after.status, "active");
  assert.equal(after.grant_id, before.grant_id, "throttling never changes the grant");
  const refreshesAfter = (await sim.get("/stats")).token_requests.total.refresh_token ?? 0;
  assert.equal(refreshesAfter, refreshesBefore, "no refresh for a 429");

  // Notion said to wait for the rest of its window: until then the proxy holds this
  // connection's calls and answers them itself (the shared throttle), without calling Notion.
  const sentBefore = (await sim.get("/stats")).requests["users.me"];
  const held = await fetch(`${tokenkeeper.url}/v1/proxy/${connectionId}/v1/users/me`, {
    headers: { authorization: `Bearer ${API_KEY}`, "notion-version": "2026-03-11" },
    signal: AbortSignal.timeout(10_000),
  });
  assert.equal(held.status, 429);
  assert.equal(held.headers.get("tokenkeeper-error"), "notion_throttled");
  assert.ok(Number(held.headers.get("retry-after")) > 0, "Retry-After says how long");
  assert.equal((await sim.get("/stats")).requests["users.me"], sentBefore, "Notion was not called");

  // And the connection's token still works at Notion.
  const { status, json } = await api("GET", `/v1/connections/${connectionId}/access-token`);
  assert.equal(status, 200);
  const direct = await fetch(`${sim.url}/v1/users/me`, {
    headers: { authorization: `Bearer ${json.access_token}`, "notion-version": "2026-03-11" },
    signal: AbortSignal.timeout(10_000),
  });
  assert.equal(direct.status, 200, "the token works at Notion");
});
