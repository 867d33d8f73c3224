import { Client } from "@notionhq/client";

import { errorFromAnswer } from "./errors.js";
import type { TokenCache } from "./tokens.js";

/** `@notionhq/client`'s constructor options. */
export type NotionClientOptions = NonNullable<ConstructorParameters<typeof Client>[0]>;
type NotionFetch = NonNullable<NotionClientOptions["fetch"]>;
type NotionInit = NonNullable<Parameters<NotionFetch>[1]>;

export interface NotionOptions {
  /**
   * `direct` (the default): the app calls Notion with the connection's access token, and on a
   * 401 asks tokenkeeper for one refresh (`if_grant`) and sends the call once more.
   * `proxy`: every call goes through tokenkeeper's proxy (`<url>/v1/proxy/<id>`), which adds
   * the token and does the same on the server, and also waits out Notion's throttling within
   * its budget. README.md says when to use which.
   */
  mode?: "direct" | "proxy";
  /** Options for the `Client` itself (`notionVersion`, `timeoutMs`, `retry`, `logLevel`, …). */
  client?: Omit<NotionClientOptions, "auth" | "baseUrl" | "fetch">;
}

export interface NotionClientParts {
  connectionId: string;
  options: NotionOptions;
  tokenkeeperUrl: string;
  apiKey: string;
  notionBaseUrl: string;
  fetch: typeof fetch;
  tokens: TokenCache;
}

export function notionClient(parts: NotionClientParts): Client {
  const { connectionId, options, fetch: send } = parts;
  if (!connectionId) throw new TypeError("notion(): a connection id is required");
  const mode = options.mode ?? "direct";
  if (mode === "proxy") {
    return new Client({
      ...options.client,
      // The proxy takes tokenkeeper's API key where Notion would take a token.
      auth: parts.apiKey,
      baseUrl: `${parts.tokenkeeperUrl}/v1/proxy/${encodeURIComponent(connectionId)}`,
      fetch: proxyFetch(send),
    });
  }
  if (mode !== "direct") throw new TypeError(`notion(): unknown mode ${String(mode)}`);
  return new Client({
    ...options.client,
    baseUrl: parts.notionBaseUrl,
    fetch: directFetch(connectionId, send, parts.tokens),
  });
}

/**
 * Sends each of the Client's requests to Notion with the connection's current access token.
 * A 401 means Notion refused that token: the token is replaced through `TokenCache.replace`
 * (one refresh with `if_grant` = the refused grant, shared by every call that failed with it)
 * and the request is sent once more; a second 401 goes back to the Client as Notion's answer.
 */
function directFetch(connectionId: string, send: typeof fetch, tokens: TokenCache): NotionFetch {
  return async (url, init = {}) => {
    const headers: Record<string, string> = { ...init.headers };
    const authorization = Object.keys(headers).find((name) => name.toLowerCase() === "authorization");
    if (authorization !== undefined) {
      // The Client's OAuth calls (`oauth.token`, …) carry the integration's own client
      // credentials; they are not the connection's to replace.
      if (/^basic /i.test(headers[authorization] ?? "")) return send(url, init as RequestInit);
      delete headers[authorization];
    }
    const attempt = (token: string) =>
      send(url, { ...(init as RequestInit), headers: { ...headers, authorization: `Bearer ${token}` } });

    const token = await tokens.current(connectionId);
    const first = await attempt(token.access_token);
    if (first.status !== 401) return first;
    // Read the refusal to its end so the connection can be reused; its body says nothing the
    // retry's answer will not.
    await first.arrayBuffer().catch(() => undefined);
    const fresh = await tokens.replace(connectionId, token.grant_id);
    return attempt(fresh.access_token);
  };
}

/**
 * Sends the Client's requests to tokenkeeper's proxy, and turns the proxy's own errors (marked
 * `Tokenkeeper-Error`: `needs_reauth`, an unknown connection, a bad key, Notion unreachable…)
 * into `TokenkeeperError`s; Notion's answers pass through to the Client untouched.
 */
function proxyFetch(send: typeof fetch): NotionFetch {
  return async (url, init: NotionInit = {}) => {
    const response = await send(url, init as RequestInit);
    if (response.headers.get("tokenkeeper-error") === null) return response;
    const call = `${(init.method ?? "GET").toUpperCase()} ${new URL(url).pathname}`;
    throw errorFromAnswer(call, response, await response.text());
  };
}
