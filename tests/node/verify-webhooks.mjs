// Verifies webhook deliveries with the official `standardwebhooks` package, not with
// tokenkeeper's own code: the Rust webhook tests write what their receiver got to a JSON file
// and run this script on it; it exits non-zero at the first delivery that does not verify.
//
//   node verify-webhooks.mjs <deliveries.json>
//
// The file holds {"secret":"whsec_…","deliveries":[{"headers":{…},"body":"…"}]}.
import { readFileSync } from "node:fs";
import { Webhook } from "standardwebhooks";

const { secret, deliveries } = JSON.parse(readFileSync(process.argv[2], "utf8"));
// The package's constructor takes the secret without the `whsec_` prefix, base64.
const webhook = new Webhook(secret.replace(/^whsec_/, ""));
let verified = 0;
for (const delivery of deliveries) {
  try {
    const event = webhook.verify(delivery.body, delivery.headers);
    if (typeof event.type !== "string" || !event.data || !event.data.connection) {
      throw new Error("the verified body is not an event");
    }
    verified += 1;
  } catch (error) {
    console.error(`delivery ${delivery.headers["webhook-id"]} does not verify: ${error.message}`);
    process.exit(1);
  }
}
console.log(`verified ${verified} deliveries with standardwebhooks`);
