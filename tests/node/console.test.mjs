// The admin console in a real browser: Debian's Chromium, driven by playwright-core, against the
// built `tokenkeeper serve` and `tokenkeeper notion-sim` (showing its consent page). It fails,
// never skips, when Chromium cannot run (`TOKENKEEPER_CHROMIUM`, default /usr/bin/chromium).
//
// With TOKENKEEPER_SCREENSHOTS=<dir> it also saves the screenshots shown in the README
// (`scripts/screenshots` writes them to docs/screenshots).

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { randomBytes } from "node:crypto";
import { mkdtemp, mkdir, rm } from "node:fs/promises";
import { createServer } from "node:http";
import os from "node:os";
import path from "node:path";
import { promisify } from "node:util";
import { chromium } from "playwright-core";

import { CLIENT_ID, CLIENT_SECRET, TOKENKEEPER_BIN, spawnUntilLine, startSim, withTimeout } from "./harness.mjs";

const ADMIN_KEY = "console-test-admin-key-0123456789abcdef";
const TOKENS_KEY = "console-test-tokens-key-0123456789abcdef";
const WEBHOOK_SECRET = `whsec_${randomBytes(32).toString("base64")}`;
const CHROMIUM = process.env.TOKENKEEPER_CHROMIUM ?? "/usr/bin/chromium";
const PYTHON = process.env.TOKENKEEPER_TEST_PYTHON ?? "python3";
const SHOTS = process.env.TOKENKEEPER_SCREENSHOTS;

let sim;
let tokenkeeper;
let dir;
let browser;
let context;
let page;
let receiver;
/** Every token tokenkeeper handed out in this run, read as each connection was made. */
const secrets = [ADMIN_KEY, TOKENS_KEY, CLIENT_SECRET, WEBHOOK_SECRET];
const people = {};

/** A webhook endpoint that fails until told otherwise, and notes what it was sent. */
function startReceiver() {
  const state = { failing: true, received: [] };
  const server = createServer((req, res) => {
    req.resume();
    req.on("end", () => {
      state.received.push({ id: req.headers["webhook-id"], ok: !state.failing });
      res.writeHead(state.failing ? 500 : 204).end();
    });
  });
  return new Promise((resolve) =>
    server.listen(0, "127.0.0.1", () =>
      resolve({ state, url: `http://127.0.0.1:${server.address().port}/hooks`, close: () => server.close() }),
    ),
  );
}

async function api(method, route, body) {
  const response = await fetch(`${tokenkeeper.url}${route}`, {
    method,
    headers: {
      authorization: `Bearer ${ADMIN_KEY}`,
      ...(body === undefined ? {} : { "content-type": "application/json" }),
    },
    body: body === undefined ? undefined : JSON.stringify(body),
    signal: AbortSignal.timeout(10_000),
  });
  return { status: response.status, json: await response.json() };
}

/** Waits (bounded) until `check` answers something truthy. */
async function eventually(what, check, ms = 10_000) {
  const deadline = Date.now() + ms;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`${what}: not within ${ms} ms`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

async function shot(name) {
  if (!SHOTS) return;
  await mkdir(SHOTS, { recursive: true });
  await page.screenshot({ path: path.join(SHOTS, `${name}.png`) });
}

/** Notes the tokens of a connection's current grant (access and refresh). */
async function noteTokens(id) {
  const { status, json } = await api("GET", `/v1/connections/${id}/access-token?include_refresh_token=true`);
  assert.equal(status, 200, JSON.stringify(json));
  secrets.push(json.access_token);
  if (json.refresh_token) secrets.push(json.refresh_token);
}

/**
 * Connects `endUser` over plain HTTP, as a browser would, picking a new simulated Notion user in
 * a new workspace on the consent page (its form posted directly).
 */
async function connectOverHttp(endUser) {
  const session = await api("POST", "/v1/connect-sessions", { provider: "notion", end_user_id: endUser });
  assert.equal(session.status, 201, JSON.stringify(session.json));
  const follow = await fetch(session.json.url, { redirect: "manual", signal: AbortSignal.timeout(5_000) });
  const attempt = follow.headers.getSetCookie().map((c) => c.split(";")[0]).join("; ");
  const authorize = new URL(follow.headers.get("location"));
  const form = new URLSearchParams(authorize.searchParams);
  form.set("identity", "new");
  form.set("decision", "allow");
  const consent = await fetch(`${sim.url}/v1/oauth/authorize`, {
    method: "POST",
    body: form,
    redirect: "manual",
    signal: AbortSignal.timeout(5_000),
  });
  assert.equal(consent.status, 302);
  const callback = await fetch(consent.headers.get("location"), {
    redirect: "manual",
    headers: { cookie: attempt },
    signal: AbortSignal.timeout(5_000),
  });
  const landing = new URL(callback.headers.get("location"));
  assert.equal(landing.pathname, "/connect/done");
  assert.equal(landing.searchParams.get("status"), "connected");
  const id = landing.searchParams.get("connection_id");
  await noteTokens(id);
  return id;
}

/** A statement on tokenkeeper's SQLite file, by Python's sqlite3 (Node 20 has none). */
async function sqlite(statement, ...params) {
  const script = "import sqlite3,sys,json\nc=sqlite3.connect(sys.argv[1],timeout=5)\nc.execute(sys.argv[2],json.loads(sys.argv[3]))\nc.commit()";
  await promisify(execFile)(PYTHON, ["-c", script, path.join(dir, "tk.db"), statement, JSON.stringify(params)], {
    timeout: 10_000,
  });
}

before(async () => {
  // First of all, the browser: without one this file fails at once.
  browser = await withTimeout(chromium.launch({ executablePath: CHROMIUM }), 20_000, "launching Chromium");
  context = await browser.newContext({ viewport: { width: 1100, height: 760 } });
  context.setDefaultTimeout(5_000);
  page = await context.newPage();

  receiver = await startReceiver();
  sim = await startSim([], { autoApprove: false });
  dir = await mkdtemp(path.join(os.tmpdir(), "tokenkeeper-console-"));
  const proc = await spawnUntilLine(TOKENKEEPER_BIN, ["serve"], {
    pattern: /^tokenkeeper \S+ listening on (http:\/\/\S+)$/,
    timeoutMs: 20_000,
    env: {
      TOKENKEEPER_LISTEN: "127.0.0.1:0",
      TOKENKEEPER_DATABASE_URL: `sqlite://${path.join(dir, "tk.db")}`,
      TOKENKEEPER_API_KEYS: `admin:${ADMIN_KEY},tokens:${TOKENS_KEY}`,
      TOKENKEEPER_NOTION_CLIENT_ID: CLIENT_ID,
      TOKENKEEPER_NOTION_CLIENT_SECRET: CLIENT_SECRET,
      TOKENKEEPER_NOTION_BASE_URL: sim.url,
      TOKENKEEPER_WEBHOOK_URLS: receiver.url,
      TOKENKEEPER_WEBHOOK_SECRET: WEBHOOK_SECRET,
      TOKENKEEPER_WEBHOOK_TIMEOUT: "2s",
      TOKENKEEPER_HEALTH_CHECK_INTERVAL: "24h",
      TOKENKEEPER_LOG: "info",
    },
  });
  tokenkeeper = { url: proc.match[1], stop: proc.stop, output: proc.output };
  await context.grantPermissions(["clipboard-read", "clipboard-write"], { origin: tokenkeeper.url });
});

after(async () => {
  await browser?.close();
  await tokenkeeper?.stop();
  await sim?.stop();
  receiver?.close();
  if (dir) await rm(dir, { recursive: true, force: true });
});

test("a person connects through the consent page and lands on the connected page", { timeout: 30_000 }, async () => {
  const session = await api("POST", "/v1/connect-sessions", { provider: "notion", end_user_id: "alice" });
  assert.equal(session.status, 201);
  await page.goto(session.json.url);
  assert.ok(page.url().startsWith(`${sim.url}/v1/oauth/authorize`), page.url());
  await page.getByText("Connect as").waitFor();
  await shot("consent");
  await page.getByRole("button", { name: "Allow access" }).click();
  await page.waitForURL(`${tokenkeeper.url}/connect/done?**`);
  assert.equal(await page.locator("h1").textContent(), "Connected");
  assert.match(await page.textContent("main"), /You can close this tab/);
  people.alice = new URL(page.url()).searchParams.get("connection_id");
  await noteTokens(people.alice);
  for (const name of ["bob", "carol", "dave"]) people[name] = await connectOverHttp(name);
  // Bob uninstalls the connection at Notion; the next refresh finds out.
  const bob = (await api("GET", `/v1/connections/${people.bob}`)).json;
  const uninstalled = await fetch(`${sim.url}/_sim/bots/${bob.bot_id}/revoke`, { method: "POST" });
  assert.equal(uninstalled.status, 200);
  const refresh = await api("POST", `/v1/connections/${people.bob}/refresh`, { if_grant: bob.grant_id });
  assert.equal(refresh.status, 424, JSON.stringify(refresh.json));
  people.bobLink = refresh.json.error.reconnect_url;
});

test("a tokens key cannot sign in, and says why", { timeout: 20_000 }, async () => {
  await page.goto(`${tokenkeeper.url}/admin`);
  await shot("sign-in");
  await page.getByLabel("Admin API key").fill(TOKENS_KEY);
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.getByText("That is a tokens key").waitFor();
  assert.equal(new URL(page.url()).pathname, "/admin/sign-in");
  const cookies = await context.cookies();
  assert.ok(!cookies.some((c) => c.name === "tokenkeeper_admin"), JSON.stringify(cookies));
  // Logged, without the key.
  const log = tokenkeeper.output.join("");
  assert.match(log, /admin_sign_in.*tokens_key|tokens_key.*admin_sign_in/);
  assert.ok(!log.includes(TOKENS_KEY) && !log.includes(ADMIN_KEY));
});

test("an admin key signs in; the connections are counted by status", { timeout: 20_000 }, async () => {
  await page.getByLabel("Admin API key").fill(ADMIN_KEY);
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.waitForURL(`${tokenkeeper.url}/admin/connections`);
  const cookie = (await context.cookies()).find((c) => c.name === "tokenkeeper_admin");
  assert.ok(cookie?.httpOnly && cookie.sameSite === "Strict", JSON.stringify(cookie));
  const counts = await page.locator(".count").allTextContents();
  assert.ok(counts.some((c) => /^\s*4\s*All/.test(c)), counts.join("|"));
  assert.ok(counts.some((c) => /1\s*Needs reconnect/.test(c)), counts.join("|"));
  await shot("connections");
});

test("filters and the search box narrow the table", { timeout: 20_000 }, async () => {
  const rows = () => page.locator("tbody tr").allTextContents();
  await page.getByLabel("Status").selectOption("needs_reauth");
  await page.getByRole("button", { name: "Filter" }).click();
  await page.waitForURL(/status=needs_reauth/);
  let shown = await rows();
  assert.equal(shown.length, 1);
  assert.match(shown[0], /bob/);
  await page.getByLabel("Status").selectOption("");
  await page.getByLabel(/^Search/).fill("carol");
  await page.getByRole("button", { name: "Filter" }).click();
  await page.waitForURL(/q=carol/);
  shown = await rows();
  assert.equal(shown.length, 1);
  assert.match(shown[0], /carol/);
  await page.getByRole("link", { name: "Clear" }).click();
  await page.getByLabel("End user", { exact: true }).fill("dave");
  await page.getByRole("button", { name: "Filter" }).click();
  shown = await rows();
  assert.equal(shown.length, 1);
  assert.match(shown[0], /dave/);
});

test("a needs_reauth connection says why, and its reconnect link copies", { timeout: 20_000 }, async () => {
  await page.goto(`${tokenkeeper.url}/admin/connections?status=needs_reauth`);
  await page.locator("tbody tr a").first().click();
  await page.waitForURL(`${tokenkeeper.url}/admin/connections/${people.bob}`);
  const text = await page.textContent("main");
  assert.match(text, /Needs reconnect/);
  assert.match(text, /Notion refused to refresh the connection's token/);
  assert.match(text, /invalid_grant/);
  const field = page.locator("#reconnect-url");
  assert.equal(await field.inputValue(), people.bobLink, "the link of 424 answers");
  await page.getByRole("button", { name: "Copy" }).click();
  await page.getByRole("button", { name: "Copied" }).waitFor();
  assert.equal(await page.evaluate(() => navigator.clipboard.readText()), people.bobLink);
  await shot("needs-reauth");
});

test("revoking asks for confirmation, then revokes", { timeout: 30_000 }, async () => {
  await page.goto(`${tokenkeeper.url}/admin/connections/${people.carol}`);
  await page.getByRole("link", { name: "Revoke…" }).click();
  await page.getByText("Revoke this connection?").waitFor();
  assert.equal((await api("GET", `/v1/connections/${people.carol}`)).json.status, "active", "not before confirming");
  await page.getByRole("button", { name: "Revoke the connection" }).click();
  await page.waitForURL(/done=revoked/);
  assert.match(await page.textContent("main"), /The connection is revoked/);
  assert.equal((await api("GET", `/v1/connections/${people.carol}`)).json.status, "revoked");
});

test("a form without its CSRF token is refused", { timeout: 20_000 }, async () => {
  await page.goto(`${tokenkeeper.url}/admin/connections/${people.dave}/revoke`);
  await page.evaluate(() => document.querySelector("main form input[name=csrf]").remove());
  const [answer] = await Promise.all([
    page.waitForResponse((r) => r.request().method() === "POST"),
    page.getByRole("button", { name: "Revoke the connection" }).click(),
  ]);
  assert.equal(answer.status(), 403);
  await page.getByText("Form refused").waitFor();
  assert.equal((await api("GET", `/v1/connections/${people.dave}`)).json.status, "active");
});

test("a failed webhook delivery is sent again from the console", { timeout: 40_000 }, async () => {
  // Three days of failures cannot pass in a test: one delivery is aged in the database as three
  // days of retries would leave it, and made due; the job worker itself then gives up on it
  // (the endpoint still fails), exactly as it would on the third day.
  const { json } = await api("GET", "/v1/webhook-deliveries?status=pending");
  const victim = json.data.find((d) => d.connection_id === people.dave);
  assert.ok(victim, JSON.stringify(json));
  const stamp = (ms) => new Date(ms).toISOString().replace(/\.(\d{3})Z$/, ".$1000Z");
  await sqlite("UPDATE jobs SET created_at = ?, next_attempt_at = ? WHERE id = ?", stamp(Date.now() - 4 * 86400_000), stamp(Date.now()), victim.id);
  await eventually("the delivery to fail", async () => {
    const failed = await api("GET", "/v1/webhook-deliveries?status=failed");
    return failed.json.data.some((d) => d.id === victim.id);
  }, 15_000);

  receiver.state.failing = false;
  await page.goto(`${tokenkeeper.url}/admin/webhook-deliveries`);
  const row = page.locator(`#delivery-${victim.id}`);
  assert.match(await row.textContent(), /failed/);
  await shot("deliveries");
  await row.getByRole("button", { name: "Retry now" }).click();
  await page.waitForURL(/done=retried/);
  await eventually("the endpoint to get it", () => receiver.state.received.some((r) => r.id === victim.webhook_id && r.ok), 15_000);
  await eventually("the delivery to be delivered", async () => {
    const delivered = await api("GET", "/v1/webhook-deliveries?status=delivered");
    return delivered.json.data.some((d) => d.id === victim.id);
  });
});

test("the health page shows the database, the keys in use and the outbox", { timeout: 20_000 }, async () => {
  await page.goto(`${tokenkeeper.url}/admin/health`);
  const text = await page.textContent("main");
  assert.match(text, /sqlite/);
  assert.match(text, /up/);
  assert.match(text, /Keys sealing grants\s*k\d{8}-[0-9a-f]{8}/);
  assert.match(text, /once every 1day/);
  assert.match(text, /webhook/);
  await shot("health");
});

test("no page shows a token, a key or a secret", { timeout: 30_000 }, async () => {
  assert.ok(secrets.length >= 12, `${secrets.length} secrets collected`);
  const paths = [
    "/",
    "/admin/connections",
    "/admin/connections?status=needs_reauth",
    ...Object.entries(people)
      .filter(([name]) => name !== "bobLink")
      .map(([, id]) => `/admin/connections/${id}`),
    `/admin/connections/${people.dave}/revoke`,
    "/admin/webhook-deliveries?status=failed",
    "/admin/webhook-deliveries?status=pending",
    "/admin/webhook-deliveries?status=delivered",
    "/admin/health",
    "/connect/done?status=connected",
  ];
  for (const route of paths) {
    await page.goto(`${tokenkeeper.url}${route}`);
    const html = await page.content();
    for (const secret of secrets) assert.ok(!html.includes(secret), `a secret on ${route}`);
  }
});
