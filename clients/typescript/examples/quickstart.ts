// The README's examples, type-checked by `npm test` (tsconfig.examples.json) against the built
// package, so that they stay true as the API's types change. Not run.

import { createServer } from "node:http";

import { Tokenkeeper, TokenkeeperError, verifyWebhook, type Connection } from "@tokenkeeper/client";

declare const user: { id: string };
declare const connectionId: string;

export async function fiveLines() {
  const tk = new Tokenkeeper({ url: process.env.TOKENKEEPER_URL!, apiKey: process.env.TOKENKEEPER_API_KEY! });
  const { url } = await tk.createConnectSession({ end_user_id: user.id, return_to: "https://app.example.com/notion/done" });
  const notion = tk.notion(connectionId);
  const me = await notion.users.me({});
  return { url, me };
}

export async function reconnect(tk: Tokenkeeper) {
  try {
    return await tk.notion(connectionId).search({ query: "Roadmap" });
  } catch (error) {
    if (error instanceof TokenkeeperError && error.code === "needs_reauth") {
      // Show the user error.reconnect_url; error.diagnosis says why.
      return { reconnect: error.reconnect_url, why: error.diagnosis?.message };
    }
    throw error;
  }
}

export async function needingTheirUsers(tk: Tokenkeeper): Promise<Connection[]> {
  const stuck: Connection[] = [];
  for await (const connection of tk.iterateConnections({ status: "needs_reauth" })) stuck.push(connection);
  return stuck;
}

export async function proxied(tk: Tokenkeeper) {
  const notion = tk.notion(connectionId, { mode: "proxy", client: { notionVersion: "2026-03-11" } });
  return notion.users.me({});
}

export function webhookReceiver(secret: string) {
  return createServer((request, response) => {
    const chunks: Buffer[] = [];
    request.on("data", (chunk: Buffer) => chunks.push(chunk));
    request.on("end", () => {
      let event;
      try {
        event = verifyWebhook(secret, Buffer.concat(chunks), request.headers);
      } catch {
        response.writeHead(400).end();
        return;
      }
      switch (event.type) {
        case "connection.needs_reauth":
          console.log(event.data.connection.end_user_id, "must reconnect:", event.data.reconnect_url);
          break;
        case "connection.revoked":
          console.log(event.data.connection.id, "is revoked");
          break;
        default:
          break;
      }
      response.writeHead(204).end();
    });
  });
}

export async function importRows(tk: Tokenkeeper, rows: { bot_id: string; access_token: string; refresh_token: string }[]) {
  const { results, summary } = await tk.importConnections({ connections: rows, dry_run: true });
  const imported: number = summary.imported_connections;
  const live: number | undefined = summary.access_tokens_live; // only with verify: true
  return { imported, live, invalid: results.filter((r) => r.result === "invalid").map((r) => r.row) };
}
