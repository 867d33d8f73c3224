// Regenerates src/schema.ts from the OpenAPI document of the built tokenkeeper binary
// ($TOKENKEEPER_BIN, else target/debug/tokenkeeper of this checkout).
//
//   npm run generate

import { writeFile } from "node:fs/promises";
import { fileURLToPath } from "node:url";

import { schemaFromBinary } from "./schema.mjs";

const target = fileURLToPath(new URL("../src/schema.ts", import.meta.url));
await writeFile(target, await schemaFromBinary());
console.log(`wrote ${target}`);
