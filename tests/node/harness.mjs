// Spawning and cleaning up tokenkeeper processes for Node tests.
//
// `startSim` runs `tokenkeeper notion-sim` on a free port; `spawnUntilLine` is the general
// helper (a later proxy test uses it for `tokenkeeper serve` too). Every child is killed when
// the test process exits, and every wait is bounded.

import { spawn } from "node:child_process";
import { createInterface } from "node:readline";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));

/** The tokenkeeper binary: `$TOKENKEEPER_BIN`, else the debug build of this checkout. */
export const TOKENKEEPER_BIN =
  process.env.TOKENKEEPER_BIN ?? path.resolve(here, "../../target/debug/tokenkeeper");

export const CLIENT_ID = "tokenkeeper-dev";
export const CLIENT_SECRET = "dev-secret-not-for-production";
export const REDIRECT_URI = "http://localhost:3000/oauth/callback";

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

/**
 * Spawns `bin args` and resolves once a stdout line matches `pattern`, with the match.
 * Output after that line is drained (and kept in `output` for failure messages).
 */
export async function spawnUntilLine(bin, args, { pattern, env = {}, timeoutMs = 10_000 } = {}) {
  const child = spawn(bin, args, {
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
      reject(new Error(`${bin} ${args.join(" ")} exited (${code ?? signal}) before printing ${pattern}:\n${output.join("")}`)),
    );
  });
  try {
    const match = await withTimeout(found, timeoutMs, `${path.basename(bin)} ${args[0]} start-up`);
    return { child, match, output, stop: () => stopProcess(child) };
  } catch (error) {
    child.kill("SIGKILL");
    throw error;
  }
}

/** SIGTERM, then SIGKILL if the process has not exited within `graceMs`. */
export async function stopProcess(child, graceMs = 3_000) {
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

/**
 * Starts `tokenkeeper notion-sim --listen 127.0.0.1:0 --auto-approve …` and returns its base
 * URL, with helpers for the control API and for authorizing. With `autoApprove: false` the
 * simulator shows its consent page instead.
 */
export async function startSim(extraArgs = [], { autoApprove = true } = {}) {
  const proc = await spawnUntilLine(
    TOKENKEEPER_BIN,
    ["notion-sim", "--listen", "127.0.0.1:0", ...(autoApprove ? ["--auto-approve"] : []), ...extraArgs],
    { pattern: /^notion-sim listening on (http:\/\/\S+)$/ },
  );
  const url = proc.match[1];
  const control = async (method, route, body) => {
    const response = await fetch(`${url}/_sim${route}`, {
      method,
      headers: body === undefined ? {} : { "content-type": "application/json" },
      body: body === undefined ? undefined : JSON.stringify(body),
      signal: AbortSignal.timeout(5_000),
    });
    const json = await response.json();
    if (!response.ok) throw new Error(`${method} /_sim${route}: ${response.status} ${JSON.stringify(json)}`);
    return json;
  };
  return {
    url,
    child: proc.child,
    stop: proc.stop,
    get: (route) => control("GET", route),
    post: (route, body = {}) => control("POST", route, body),
    /** Runs the browser leg of the OAuth flow; resolves to the authorization code. */
    async authorize({ state = "node-test", redirectUri = REDIRECT_URI } = {}) {
      const query = new URLSearchParams({
        client_id: CLIENT_ID,
        redirect_uri: redirectUri,
        response_type: "code",
        owner: "user",
        state,
      });
      const response = await fetch(`${url}/v1/oauth/authorize?${query}`, {
        redirect: "manual",
        signal: AbortSignal.timeout(5_000),
      });
      if (response.status !== 302) throw new Error(`authorize answered ${response.status}`);
      const location = new URL(response.headers.get("location"));
      const code = location.searchParams.get("code");
      if (!code) throw new Error(`no code in ${location}`);
      if (location.searchParams.get("state") !== state) throw new Error(`state lost in ${location}`);
      return code;
    },
  };
}
