// Real processes for the client's tests: `tokenkeeper notion-sim` and `tokenkeeper serve` from
// the built binary (`$TOKENKEEPER_BIN`, else this checkout's debug build), on loopback ports
// the kernel picks, in a temporary directory. Every child is killed when the test process
// exits, and every wait is bounded.
//
// tests/node/harness.mjs does the same for the repository's other Node tests; this one stands
// apart so that the package's tests run from its own directory with its own dependencies.

import { spawn } from "node:child_process";
import { mkdtemp, rm } from "node:fs/promises";
import { createInterface } from "node:readline";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));

export const TOKENKEEPER_BIN =
  process.env.TOKENKEEPER_BIN ?? path.resolve(here, "../../../target/debug/tokenkeeper");

// notion-sim's default OAuth client.
export const CLIENT_ID = "tokenkeeper-dev";
export const CLIENT_SECRET = "dev-secret-not-for-production";

export const ADMIN_KEY = "admin-key-of-the-client-tests-0123456789";
export const TOKENS_KEY = "tokens-key-of-the-client-tests-0123456789";

const children = new Set();
process.on("exit", () => {
  for (const child of children) child.kill("SIGKILL");
});

/** Rejects if `promise` has not settled within `ms`. */
export function withTimeout(promise, ms, what = "operation") {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} did not finish within ${ms} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** Spawns `bin args` and resolves once a stdout line matches `pattern`, with the match. */
async function spawnUntilLine(bin, args, { pattern, env = {}, cwd, onFailure, timeoutMs = 20_000 }) {
  const child = spawn(bin, args, {
    cwd,
    env: { ...process.env, ...env },
    stdio: ["ignore", "pipe", "pipe"],
  });
  children.add(child);
  child.on("exit", () => children.delete(child));
  const output = [];
  child.stderr.on("data", (chunk) => output.push(chunk.toString()));
  const lines = createInterface({ input: child.stdout });
  const found = new Promise((resolve, reject) => {
    lines.on("line", (line) => {
      output.push(line + "\n");
      const match = line.match(pattern);
      if (match) resolve(match);
    });
    child.on("error", reject);
    child.on("exit", (code, signal) =>
      reject(new Error(`${bin} ${args[0]} exited (${code ?? signal}) before printing ${pattern}:\n${output.join("")}`)),
    );
  });
  try {
    const match = await withTimeout(found, timeoutMs, `${path.basename(bin)} ${args[0]} start-up`);
    return { child, match, output, stop: () => stopProcess(child) };
  } catch (error) {
    child.kill("SIGKILL");
    await onFailure?.();
    throw error;
  }
}

/** SIGTERM, then SIGKILL if the process has not exited within `graceMs`. */
async function stopProcess(child, graceMs = 3_000) {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise((resolve) => child.once("exit", resolve));
  child.kill("SIGTERM");
  try {
    await withTimeout(exited, graceMs, "graceful exit");
  } catch {
    child.kill("SIGKILL");
    await exited;
  }
}

async function json(response, what) {
  const text = await response.text();
  if (!response.ok) throw new Error(`${what}: ${response.status} ${text}`);
  return text ? JSON.parse(text) : undefined;
}

/**
 * `tokenkeeper notion-sim` on a manual clock (so a test makes tokens expire by moving it, never
 * by sleeping), approving every authorization at once, with its control API as methods.
 */
export async function startSim() {
  const proc = await spawnUntilLine(
    TOKENKEEPER_BIN,
    ["notion-sim", "--listen", "127.0.0.1:0", "--auto-approve", "--manual-clock"],
    { pattern: /^notion-sim listening on (http:\/\/\S+)$/ },
  );
  const url = proc.match[1];
  const control = async (method, route, body) =>
    json(
      await fetch(`${url}/_sim${route}`, {
        method,
        headers: body === undefined ? {} : { "content-type": "application/json" },
        body: body === undefined ? undefined : JSON.stringify(body),
        signal: AbortSignal.timeout(70_000),
      }),
      `${method} /_sim${route}`,
    );
  return {
    url,
    stop: proc.stop,
    get: (route) => control("GET", route),
    post: (route, body = {}) => control("POST", route, body),
    delete: (route) => control("DELETE", route),
    /** Refreshes Notion has answered so far (across every bot). */
    async refreshes() {
      return (await control("GET", "/stats")).token_requests.total.refresh_token ?? 0;
    },
    /** Requests that reached one endpoint (`users.me`, …), whatever they were answered. */
    async requests(endpoint) {
      return (await control("GET", "/stats")).requests[endpoint] ?? 0;
    },
  };
}

/**
 * `tokenkeeper serve` on SQLite in a fresh temporary directory, with an admin and a tokens key,
 * against `sim` (or, without one, the built-in simulator), the health check off. `env` adds or
 * overrides settings.
 */
export async function startTokenkeeper({ sim, env = {} } = {}) {
  const dir = await mkdtemp(path.join(os.tmpdir(), "tokenkeeper-client-"));
  const notion = sim
    ? {
        TOKENKEEPER_NOTION_CLIENT_ID: CLIENT_ID,
        TOKENKEEPER_NOTION_CLIENT_SECRET: CLIENT_SECRET,
        TOKENKEEPER_NOTION_BASE_URL: sim.url,
      }
    : {};
  const proc = await spawnUntilLine(TOKENKEEPER_BIN, ["serve"], {
    cwd: dir,
    onFailure: () => rm(dir, { recursive: true, force: true }),
    pattern: /^tokenkeeper \S+ listening on (http:\/\/\S+)$/,
    env: {
      TOKENKEEPER_LISTEN: "127.0.0.1:0",
      TOKENKEEPER_DATABASE_URL: `sqlite://${path.join(dir, "tk.db")}`,
      TOKENKEEPER_API_KEYS: `admin:${ADMIN_KEY},tokens:${TOKENS_KEY}`,
      TOKENKEEPER_HEALTH_CHECK_INTERVAL: "0",
      TOKENKEEPER_LOG: "warn",
      ...notion,
      ...env,
    },
  });
  return {
    url: proc.match[1],
    dir,
    output: proc.output,
    async stop() {
      await proc.stop();
      await rm(dir, { recursive: true, force: true });
    },
  };
}

/**
 * GETs `url` as a browser would and returns where it redirects to. `jar` keeps the cookies set
 * so far: tokenkeeper binds a connect attempt to the browser that followed the link.
 */
async function hop(url, jar) {
  const cookie = [...jar].map(([name, value]) => `${name}=${value}`).join("; ");
  const response = await fetch(url, {
    redirect: "manual",
    headers: cookie ? { cookie } : {},
    signal: AbortSignal.timeout(10_000),
  });
  if (![302, 303, 307].includes(response.status)) {
    throw new Error(`expected a redirect from ${url}, got ${response.status}: ${await response.text()}`);
  }
  for (const set of response.headers.getSetCookie()) {
    const [pair] = set.split(";");
    const at = pair.indexOf("=");
    jar.set(pair.slice(0, at).trim(), pair.slice(at + 1).trim());
  }
  return new URL(response.headers.get("location"), url).toString();
}

/**
 * What a user's browser does with a connect or reconnect link: tokenkeeper → Notion's consent
 * (approved at once by the simulator) → tokenkeeper's callback → the app's `return_to`.
 * Resolves to the query the app receives there (`connection_id`, `status`, …).
 */
export async function followLink(link) {
  const jar = new Map();
  const toNotion = await hop(link, jar);
  const toCallback = await hop(toNotion, jar);
  const landing = new URL(await hop(toCallback, jar));
  return Object.fromEntries(landing.searchParams);
}
