// The drift check: src/schema.ts must be exactly what openapi-typescript generates from the
// OpenAPI document of the binary under test, and from the document's committed snapshot. When
// the API changes, this fails until `npm run generate` is run and the client's code is made to
// fit the new types (tsc says where).

import { test } from "node:test";
import assert from "node:assert/strict";
import { readFile } from "node:fs/promises";

import { schemaFromBinary, schemaSource } from "../scripts/schema.mjs";

const committed = () => readFile(new URL("../src/schema.ts", import.meta.url), "utf8");
const snapshot = new URL("../../../crates/tokenkeeper/tests/it/snapshots/it__openapi__openapi.json.snap", import.meta.url);

function assertSame(fresh, current, source) {
  if (fresh === current) return;
  const a = fresh.split("\n");
  const b = current.split("\n");
  const at = a.findIndex((line, i) => line !== b[i]);
  assert.fail(
    `src/schema.ts differs from what ${source} generates, first at line ${at + 1}:\n` +
      `  generated: ${a[at]}\n  committed: ${b[at]}\n` +
      "Run `npm run generate` in clients/typescript (after building tokenkeeper), then `npm run build`.",
  );
}

test("src/schema.ts is what the binary's GET /openapi.json generates", { timeout: 30_000 }, async () => {
  assertSame(await schemaFromBinary(), await committed(), "the binary's /openapi.json");
});

test("src/schema.ts is what the committed OpenAPI snapshot generates", { timeout: 30_000 }, async () => {
  // An insta snapshot: a YAML header between `---` lines, then the document.
  const text = await readFile(snapshot, "utf8");
  const document = JSON.parse(text.slice(text.indexOf("\n---\n") + 5));
  assertSame(await schemaSource(document), await committed(), "the snapshot");
});
