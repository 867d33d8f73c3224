// `verifyWebhook` on deliveries that the real binary signed and sent to a receiver of this
// test (`TOKENKEEPER_WEBHOOK_URLS`), and the webhook-delivery methods against the same process.

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { createServer } from "node:http";
import { inspect } from "node:util";

import { Tokenkeeper, WebhookVerificationError, verifyWebhook } from "@tokenkeeper/client";

import { ADMIN_KEY, followLink, startSim, startTokenkeeper, withTimeout } from "./harness.mjs";

const SECRET = `whsec_${randomBytes(32).toString("base64")}`;

let sim;
let server;
let admin;
let receiver;

/**
 * An HTTP endpoint on loopback that keeps every delivery (headers and the body as received)
 * and answers 200, or 500 once to the first delivery that `state.failOnce` accepts.
 */
async function startReceiver() {
  const deliveries = [];
  const waiters = [];
  const state = { failOnce: null };
  const http = createServer((request, response) => {
    const chunks = [];
    request.on("data", (chunk) => chunks.push(chunk));
    request.on("end", () => {
      const delivery = { headers: request.headers, raw: Buffer.concat(chunks) };
      delivery.body = delivery.raw.toString("utf8");
      delivery.failed = state.failOnce !== null && state.failOnce(JSON.parse(delivery.body));
      if (delivery.failed) state.failOnce = null;
      deliveries.push(delivery);
      response.writeHead(delivery.failed ? 500 : 200).end();
      for (const waiter of [...waiters]) waiter();
    });
  });
  await new Promise((resolve) => http.listen(0, "127.0.0.1", resolve));
  return {
    url: `http://127.0.0.1:${http.address().port}/hooks/tokenkeeper`,
    deliveries,
    state,
    /** The first delivery (since `from`) that `match` accepts, waiting up to 10 s for it. */
    next(match, from = 0) {
      const find = () => deliveries.slice(from).find(match);
      return withTimeout(
        new Promise((resolve) => {
          const check = () => {
            const found = find();
            if (found) {
              waiters.splice(waiters.indexOf(check), 1);
              resolve(found);
            }
          };
          waiters.push(check);
          check();
        }),
        10_000,
        "a webhook delivery",
      );
    },
    close: () => new Promise((resolve) => http.close(resolve)),
  };
}

const ofType = (type) => (d) => JSON.parse(d.body).type === type;

before(async () => {
  receiver = await startReceiver();
  sim = await startSim();
  server = await startTokenkeeper({
    sim,
    env: { TOKENKEEPER_WEBHOOK_URLS: receiver.url, TOKENKEEPER_WEBHOOK_SECRET: SECRET },
  });
  admin = new Tokenkeeper({ url: server.url, apiKey: ADMIN_KEY, notionBaseUrl: sim.url });
});

after(async () => {
  await server?.stop();
  await sim?.stop();
  await receiver?.close();
});

let users = 0;
async function connectNewUser() {
  users += 1;
  await sim.post("/next-authorization", { workspace_id: `ws-hook-${users}`, user_id: `u-hook-${users}` });
  const session = await admin.createConnectSession({ end_user_id: `hook-user-${users}`, return_to: `${server.url}/done` });
  const landed = await followLink(session.url);
  assert.equal(landed.status, "connected");
  return landed.connection_id;
}

test("verifyWebhook accepts a real delivery and answers its typed event", { timeout: 20_000 }, async () => {
  const from = receiver.deliveries.length;
  const id = await connectNewUser();
  const delivery = await receiver.next((d) => ofType("connection.created")(d) && JSON.parse(d.body).data.connection.id === id, from);

  // Node's request headers and the body as text…
  const event = verifyWebhook(SECRET, delivery.body, delivery.headers);
  assert.equal(event.type, "connection.created");
  assert.equal(event.data.connection.id, id);
  assert.equal(event.data.connection.status, "active");
  assert.ok(!Number.isNaN(Date.parse(event.timestamp)));
  // …the raw bytes, and the fetch API's Headers, work the same.
  const headers = new Headers(Object.entries(delivery.headers));
  assert.deepEqual(verifyWebhook(SECRET, delivery.raw, headers), event);
  assert.deepEqual(verifyWebhook(SECRET, new Uint8Array(delivery.raw), headers), event);
  assert.doesNotMatch(delivery.body, /ntn_|nrt_/, "never a token in an event");
});

test("verifyWebhook refuses a tampered body, another secret, a replayed old delivery and missing headers", { timeout: 20_000 }, async () => {
  const delivery = await receiver.next(ofType("connection.created"));
  const refused = (body, headers, secret = SECRET) =>
    assert.throws(() => verifyWebhook(secret, body, headers), (error) => {
      assert.ok(error instanceof WebhookVerificationError, `a WebhookVerificationError, got ${inspect(error)}`);
      return true;
    });

  const tampered = delivery.body.replace(/"status":"active"/, '"status":"revoked"');
  assert.notEqual(tampered, delivery.body);
  refused(tampered, delivery.headers);
  refused(`${delivery.body} `, delivery.headers);
  refused(delivery.body, delivery.headers, `whsec_${randomBytes(32).toString("base64")}`);
  refused(delivery.body, { ...delivery.headers, "webhook-id": "msg_another" });
  const old = Number(delivery.headers["webhook-timestamp"]) - 3600;
  refused(delivery.body, { ...delivery.headers, "webhook-timestamp": String(old) });
  const { ["webhook-signature"]: _, ...unsigned } = delivery.headers;
  refused(delivery.body, unsigned);
});

test("a needs_reauth event carries the diagnosis and a reconnect URL that works", { timeout: 20_000 }, async () => {
  const id = await connectNewUser();
  const { bot_id, grant_id } = await admin.getConnection(id);
  const from = receiver.deliveries.length;
  await sim.post(`/bots/${bot_id}/revoke`);
  await assert.rejects(admin.refresh(id, { if_grant: grant_id }), (e) => e.code === "needs_reauth");

  const delivery = await receiver.next(ofType("connection.needs_reauth"), from);
  const event = verifyWebhook(SECRET, delivery.body, delivery.headers);
  assert.equal(event.type, "connection.needs_reauth");
  assert.equal(event.data.connection.id, id);
  assert.equal(event.data.connection.status, "needs_reauth");
  assert.equal(event.data.diagnosis.reason, "refresh_rejected");
  assert.equal(event.data.diagnosis.grant_id, grant_id);
  assert.ok(event.data.reconnect_url.startsWith(`${server.url}/connect/`), event.data.reconnect_url);

  const back = receiver.deliveries.length;
  const landed = await followLink(event.data.reconnect_url);
  assert.equal(landed.status, "reconnected");
  const recovery = await receiver.next(ofType("connection.recovered"), back);
  const recovered = verifyWebhook(SECRET, recovery.body, recovery.headers);
  assert.equal(recovered.type, "connection.recovered");
  assert.equal(recovered.data.connection.status, "active");
});

test("webhook deliveries: listed by status, page by page, and a delivery retried keeps its webhook-id", { timeout: 30_000 }, async () => {
  // The next user's connection.created fails once (earlier tests' events may still be arriving).
  const endUser = `hook-user-${users + 1}`;
  receiver.state.failOnce = (event) => event.type === "connection.created" && event.data.connection.end_user_id === endUser;
  const from = receiver.deliveries.length;
  const id = await connectNewUser();
  const failed = await receiver.next((d) => d.failed, from);
  const webhookId = failed.headers["webhook-id"];

  // The failure is recorded before the answer's next attempt is due.
  let delivery;
  for (let i = 0; i < 200 && !delivery; i++) {
    const { data } = await admin.listWebhookDeliveries({ status: "pending" });
    delivery = data.find((d) => d.webhook_id === webhookId && d.last_error);
    if (!delivery) await new Promise((resolve) => setTimeout(resolve, 25));
  }
  assert.ok(delivery, "the failed attempt is listed as pending");
  assert.equal(delivery.type, "connection.created");
  assert.equal(delivery.connection_id, id);
  assert.equal(delivery.endpoint, receiver.url);
  assert.match(delivery.last_error, /500/);

  const retried = await admin.retryWebhookDelivery(delivery.id);
  assert.equal(retried.id, delivery.id);
  assert.equal(retried.status, "pending");
  assert.ok(Date.parse(retried.next_attempt_at) <= Date.now() + 1_000, "due now");

  const again = await receiver.next((d) => !d.failed && d.headers["webhook-id"] === webhookId, from);
  assert.equal(verifyWebhook(SECRET, again.body, again.headers).data.connection.id, id);

  let delivered;
  for (let i = 0; i < 200 && !delivered; i++) {
    const { data } = await admin.listWebhookDeliveries({ status: "delivered" });
    delivered = data.find((d) => d.id === delivery.id);
    if (!delivered) await new Promise((resolve) => setTimeout(resolve, 25));
  }
  assert.ok(delivered, "delivered at last");
  assert.ok(delivered.attempts >= 2);

  const walked = [];
  for await (const d of admin.iterateWebhookDeliveries({ limit: 1 })) walked.push(d.id);
  const all = (await admin.listWebhookDeliveries({ limit: 1000 })).data.map((d) => d.id);
  assert.deepEqual(walked, all, "one page at a time, newest first, each once");
  assert.ok(walked.length >= 3);

  await assert.rejects(admin.retryWebhookDelivery("job_00000000000000000000000000000000"), (e) => e.status === 404 && e.code === "not_found");
});
