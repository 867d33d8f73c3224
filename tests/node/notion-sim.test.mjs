// The official Notion JavaScript client against notion-sim: the OAuth calls and a slice of the
// REST API work, and errors arrive as the client's own error types with Notion's codes.

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { APIResponseError, Client } from "@notionhq/client";

import { CLIENT_ID, CLIENT_SECRET, REDIRECT_URI, startSim } from "./harness.mjs";

let sim;

before(async () => {
  sim = await startSim();
});

after(async () => {
  await sim?.stop();
});

/** A client for the OAuth endpoints: no retries, short timeout. */
function oauthClient() {
  return new Client({ baseUrl: sim.url, timeoutMs: 5_000, retry: false });
}

/** A client for the REST API with a token; retries stay on, with short delays. */
function apiClient(auth) {
  return new Client({
    auth,
    baseUrl: sim.url,
    timeoutMs: 5_000,
    retry: { maxRetries: 2, initialRetryDelayMs: 10, maxRetryDelayMs: 50 },
  });
}

async function connect() {
  const code = await sim.authorize();
  return oauthClient().oauth.token({
    client_id: CLIENT_ID,
    client_secret: CLIENT_SECRET,
    grant_type: "authorization_code",
    code,
    redirect_uri: REDIRECT_URI,
  });
}

async function expectApiError(promise, code, status) {
  await assert.rejects(promise, (error) => {
    assert.ok(APIResponseError.isAPIResponseError(error), `an APIResponseError, got ${error}`);
    assert.equal(error.code, code);
    assert.equal(error.status, status);
    return true;
  });
}

test("oauth.token exchanges a code and refreshes with rotation", { timeout: 20_000 }, async () => {
  const first = await connect();
  assert.match(first.access_token, /^ntn_/);
  assert.match(first.refresh_token, /^nrt_/);
  assert.equal(first.token_type, "bearer");
  assert.equal(first.owner.type, "user");
  assert.equal(first.expires_in, undefined);

  const refreshed = await oauthClient().oauth.token({
    client_id: CLIENT_ID,
    client_secret: CLIENT_SECRET,
    grant_type: "refresh_token",
    refresh_token: first.refresh_token,
  });
  assert.notEqual(refreshed.access_token, first.access_token);
  assert.notEqual(refreshed.refresh_token, first.refresh_token);
  assert.equal(refreshed.bot_id, first.bot_id);

  // The rotated refresh token is spent; OAuth errors are not APIResponseErrors.
  await assert.rejects(
    oauthClient().oauth.token({
      client_id: CLIENT_ID,
      client_secret: CLIENT_SECRET,
      grant_type: "refresh_token",
      refresh_token: first.refresh_token,
    }),
    (error) => {
      assert.equal(error.status, 400);
      assert.match(error.body, /invalid_grant/);
      return true;
    },
  );
});

test("oauth.introspect and oauth.revoke", { timeout: 20_000 }, async () => {
  const pair = await connect();
  const live = await oauthClient().oauth.introspect({
    client_id: CLIENT_ID,
    client_secret: CLIENT_SECRET,
    token: pair.access_token,
  });
  assert.equal(live.active, true);
  assert.ok(live.iat > 1_000_000_000_000, "iat is in milliseconds");
  assert.match(live.scope, /read_content/);

  await oauthClient().oauth.revoke({
    client_id: CLIENT_ID,
    client_secret: CLIENT_SECRET,
    token: pair.access_token,
  });
  const dead = await oauthClient().oauth.introspect({
    client_id: CLIENT_ID,
    client_secret: CLIENT_SECRET,
    token: pair.access_token,
  });
  assert.equal(dead.active, false);

  // A revoked token is a 401 `unauthorized` for the REST API.
  await expectApiError(apiClient(pair.access_token).users.me({}), "unauthorized", 401);
});

test("users.me and search work with the minted token", { timeout: 20_000 }, async () => {
  const pair = await connect();
  const notion = apiClient(pair.access_token);
  const me = await notion.users.me({});
  assert.equal(me.type, "bot");
  assert.equal(me.id, pair.bot_id);
  const found = await notion.search({ query: "" });
  assert.equal(found.object, "list");
  assert.ok(found.results.length > 0, "the user shared pages");
  assert.ok(found.results.every((page) => page.object === "page"));
});

test("a page not shared with the connection is a 404 object_not_found", { timeout: 20_000 }, async () => {
  const pair = await connect();
  const { workspaces } = await sim.get("/workspaces");
  const workspace = workspaces.find((w) => w.workspace_id === pair.workspace_id);
  const [unshared] = workspace.unshared_page_ids;
  assert.ok(unshared, "every workspace keeps an unshared page");
  await expectApiError(
    apiClient(pair.access_token).pages.retrieve({ page_id: unshared }),
    "object_not_found",
    404,
  );
});

test("the connection budget ends in a 429 rate_limited after the client's retries", { timeout: 20_000 }, async () => {
  // A connection of its own, so that no earlier test has spent its budget.
  await sim.post("/next-authorization", { workspace_id: "ws-rate-limit", user_id: "user-rate-limit" });
  const pair = await connect();
  assert.equal(pair.workspace_id, "ws-rate-limit");
  const notion = apiClient(pair.access_token);
  await sim.post("/config", { rate_limit_per_connection: 1 });
  try {
    await notion.users.me({});
    const before = (await sim.get("/stats")).requests["users.me"];
    await expectApiError(notion.users.me({}), "rate_limited", 429);
    const after = (await sim.get("/stats")).requests["users.me"];
    assert.equal(after - before, 3, "one request and the client's two retries");
  } finally {
    await sim.post("/config", { rate_limit_per_connection: 180 });
  }
});
