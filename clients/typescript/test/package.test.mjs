// The package as npm would ship it: both entry points (ESM and CommonJS) export the same
// names, and the tarball holds the builds, the types, the README and the LICENSE, no tests.

import { test } from "node:test";
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { createRequire } from "node:module";
import { promisify } from "node:util";

import * as esm from "@tokenkeeper/client";

const require = createRequire(import.meta.url);

test("import and require give the same client", () => {
  const cjs = require("@tokenkeeper/client");
  assert.deepEqual(Object.keys(cjs).sort(), Object.keys(esm).sort());
  for (const name of ["Tokenkeeper", "TokenkeeperError", "verifyWebhook", "WebhookVerificationError"]) {
    assert.equal(typeof esm[name], "function", name);
    assert.equal(typeof cjs[name], "function", name);
  }
  // An error from one build is recognised by the other's check.
  const error = new cjs.TokenkeeperError("GET /healthz", 503, { code: "not_ready", message: "not yet" });
  assert.ok(esm.TokenkeeperError.isTokenkeeperError(error));
  assert.equal(error.code, "not_ready");
});

test("npm pack ships the builds, their types, the README and the LICENSE, and no tests", { timeout: 30_000 }, async () => {
  const { stdout } = await promisify(execFile)("npm", ["pack", "--dry-run", "--json", "--ignore-scripts"], {
    cwd: new URL("..", import.meta.url),
  });
  const files = JSON.parse(stdout)[0].files.map((f) => f.path);
  for (const file of [
    "package.json",
    "README.md",
    "LICENSE",
    "dist/esm/index.js",
    "dist/esm/index.d.ts",
    "dist/cjs/index.js",
    "dist/cjs/index.d.ts",
    "dist/cjs/package.json",
    "src/schema.ts",
  ]) {
    assert.ok(files.includes(file), `${file} is shipped`);
  }
  assert.ok(!files.some((f) => f.startsWith("test/") || f.startsWith("node_modules/")), files.join(", "));
});
