// dist/cjs holds the CommonJS build; this marks it so, since the package itself is "type": "module".
import { writeFile } from "node:fs/promises";

await writeFile(new URL("../dist/cjs/package.json", import.meta.url), '{\n  "type": "commonjs"\n}\n');
