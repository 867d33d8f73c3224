import createClient, { type Client as ApiClient } from "openapi-fetch";
import { Client as NotionClient } from "@notionhq/client";

import { TokenkeeperError, errorFromAnswer, unreachable } from "./errors.js";
import { notionClient, type NotionOptions } from "./notion.js";
import type { paths } from "./schema.js";
import { TokenCache } from "./tokens.js";
import type {
  Connection,
  ConnectionList,
  CreateReconnect,
  CreateSession,
  Delivery,
  DeliveryList,
  EventList,
  GrantList,
  Health,
  ImportAnswer,
  ImportBody,
  ListConnectionsQuery,
  ListDeliveriesQuery,
  Ready,
  RefreshAnswer,
  Revocation,
  SessionCreated,
  TokenAnswer,
  TokenQuery,
} from "./types.js";

export interface TokenkeeperOptions {
  /** tokenkeeper's base URL, e.g. `http://127.0.0.1:8080` or `https://tokens.example.com`. */
  url: string;
  /** An API key of `TOKENKEEPER_API_KEYS`: `tokens` scope for app servers, `admin` for the backend that makes links. */
  apiKey: string;
  /** Notion's API, for `notion()` in direct mode (default `https://api.notion.com`). */
  notionBaseUrl?: string;
  /**
   * How long one call to tokenkeeper may take, in milliseconds (default 60000). A refresh can
   * wait up to tokenkeeper's `TOKENKEEPER_REFRESH_BUDGET` (30 s by default) for Notion.
   */
  timeoutMs?: number;
  /** How many connections' access tokens `notion()` keeps in memory (default 1000). */
  maxCachedTokens?: number;
  /** The fetch to use for every call, to tokenkeeper and to Notion (default `globalThis.fetch`). */
  fetch?: typeof fetch;
}

/** The query of `access-token` and `refresh`, and `refresh`'s body. */
export interface RefreshOptions extends TokenQuery {
  /** The grant whose token Notion just refused: if it was already replaced, no refresh is made. */
  if_grant?: string | null;
}

/**
 * tokenkeeper's HTTP API, typed from its OpenAPI document. Every method answers the API's own
 * JSON (snake_case names, as docs/API.md gives them) or throws a `TokenkeeperError`.
 *
 * ```ts
 * const tk = new Tokenkeeper({ url: "http://127.0.0.1:8080", apiKey: process.env.TOKENKEEPER_API_KEY! });
 * const notion = tk.notion(connectionId);
 * ```
 */
export class Tokenkeeper {
  // Private fields, so that neither the key nor a token shows when the object is logged.
  readonly #api: ApiClient<paths>;
  readonly #apiKey: string;
  readonly #url: string;
  readonly #notionBaseUrl: string;
  readonly #timeoutMs: number;
  readonly #fetch: typeof fetch;
  readonly #tokens: TokenCache;

  constructor(options: TokenkeeperOptions) {
    if (!options?.url) throw new TypeError("Tokenkeeper: `url` is required");
    if (!options.apiKey) throw new TypeError("Tokenkeeper: `apiKey` is required");
    this.#url = options.url.replace(/\/+$/, "");
    this.#apiKey = options.apiKey;
    this.#notionBaseUrl = (options.notionBaseUrl ?? "https://api.notion.com").replace(/\/+$/, "");
    this.#timeoutMs = options.timeoutMs ?? 60_000;
    const theFetch = options.fetch ?? globalThis.fetch.bind(globalThis);
    this.#fetch = theFetch;
    this.#api = createClient<paths>({
      baseUrl: this.#url,
      headers: { authorization: `Bearer ${options.apiKey}` },
      fetch: (request) => theFetch(request),
    });
    this.#tokens = new TokenCache(
      options.maxCachedTokens ?? 1000,
      (id) => this.accessToken(id),
      (id, grant) => this.refresh(id, { if_grant: grant }),
    );
  }

  /** tokenkeeper's base URL, as given (without a trailing slash). */
  get url(): string {
    return this.#url;
  }

  // --- connect ---

  /** `POST /v1/connect-sessions` (admin): a one-time link to send the user's own browser to. */
  createConnectSession(
    body: Omit<CreateSession, "provider"> & Partial<Pick<CreateSession, "provider">>,
  ): Promise<SessionCreated> {
    const session = { provider: "notion" as const, ...body };
    return this.#call("POST /v1/connect-sessions", () =>
      this.#api.POST("/v1/connect-sessions", { body: session as CreateSession, ...this.#init() }),
    );
  }

  /** `POST /v1/connections/{id}/reconnect-sessions` (admin): a link that re-authorizes this connection. */
  createReconnectSession(id: string, body: CreateReconnect = {}): Promise<SessionCreated> {
    return this.#call(`POST /v1/connections/${id}/reconnect-sessions`, () =>
      this.#api.POST("/v1/connections/{id}/reconnect-sessions", {
        params: { path: { id } },
        body,
        ...this.#init(),
      }),
    );
  }

  // --- connections ---

  /** `GET /v1/connections`: one page; pass its `next_after` as `after` for the next. */
  listConnections(query: ListConnectionsQuery = {}): Promise<ConnectionList> {
    return this.#call("GET /v1/connections", () =>
      this.#api.GET("/v1/connections", { params: { query }, ...this.#init() }),
    );
  }

  /**
   * Every connection that matches `query`, page after page (`limit` per page):
   * `for await (const connection of tk.iterateConnections({ status: "needs_reauth" }))`.
   */
  async *iterateConnections(query: ListConnectionsQuery = {}): AsyncGenerator<Connection, void, undefined> {
    let after = query.after;
    for (;;) {
      const page = await this.listConnections({ ...query, after });
      yield* page.data;
      if (!page.next_after) return;
      after = page.next_after;
    }
  }

  /** `GET /v1/connections/{id}`. */
  getConnection(id: string): Promise<Connection> {
    return this.#call(`GET /v1/connections/${id}`, () =>
      this.#api.GET("/v1/connections/{id}", { params: { path: { id } }, ...this.#init() }),
    );
  }

  /**
   * `DELETE /v1/connections/{id}` (admin): revokes every live token at Notion, marks the
   * connection revoked and keeps its history; says how many tokens were revoked, are pending
   * or failed.
   */
  async revoke(id: string): Promise<Revocation> {
    const answer = await this.#call<Revocation>(`DELETE /v1/connections/${id}`, () =>
      this.#api.DELETE("/v1/connections/{id}", { params: { path: { id } }, ...this.#init() }),
    );
    this.#tokens.forget(id);
    return answer;
  }

  /** `GET /v1/connections/{id}/grants` (admin): the ledger, with fingerprints, never tokens. */
  grants(id: string): Promise<GrantList> {
    return this.#call(`GET /v1/connections/${id}/grants`, () =>
      this.#api.GET("/v1/connections/{id}/grants", { params: { path: { id } }, ...this.#init() }),
    );
  }

  /** `GET /v1/connections/{id}/events` (admin): the audit trail. */
  events(id: string): Promise<EventList> {
    return this.#call(`GET /v1/connections/${id}/events`, () =>
      this.#api.GET("/v1/connections/{id}/events", { params: { path: { id } }, ...this.#init() }),
    );
  }

  /** `POST /v1/connections/import` (admin): rows of an existing token store, at most 1,000 a call. */
  importConnections(body: ImportBody): Promise<ImportAnswer> {
    return this.#call("POST /v1/connections/import", () =>
      this.#api.POST("/v1/connections/import", { body, ...this.#init() }),
    );
  }

  // --- tokens ---

  /**
   * `GET /v1/connections/{id}/access-token`: the current token, without calling Notion.
   * A connection whose user must reconnect throws `needs_reauth` (424) with `reconnect_url`.
   */
  accessToken(id: string, query: TokenQuery = {}): Promise<TokenAnswer> {
    return this.#call(`GET /v1/connections/${id}/access-token`, () =>
      this.#api.GET("/v1/connections/{id}/access-token", { params: { path: { id }, query }, ...this.#init() }),
    );
  }

  /**
   * `POST /v1/connections/{id}/refresh` with `{"if_grant": …}`: call it with the grant whose
   * token Notion just refused. One refresh is in flight per connection across every process;
   * if the grant was already replaced, the current one comes back (`refreshed: false`) at once.
   */
  refresh(id: string, { if_grant, ...query }: RefreshOptions = {}): Promise<RefreshAnswer> {
    return this.#call(`POST /v1/connections/${id}/refresh`, () =>
      this.#api.POST("/v1/connections/{id}/refresh", {
        params: { path: { id }, query },
        body: if_grant ? { if_grant } : {},
        ...this.#init(),
      }),
    );
  }

  // --- Notion ---

  /**
   * An `@notionhq/client` `Client` that calls Notion for this connection.
   *
   * Direct mode (the default) calls Notion itself with the connection's access token; when
   * Notion answers 401 it asks tokenkeeper for a refresh with `if_grant` (one per connection,
   * however many calls failed together) and sends the call once more. Proxy mode sends every
   * call through tokenkeeper's proxy, which does the same on the server. Either way a
   * connection whose user must reconnect throws a `TokenkeeperError` `needs_reauth`.
   */
  notion(connectionId: string, options: NotionOptions = {}): NotionClient {
    return notionClient({
      connectionId,
      options,
      tokenkeeperUrl: this.#url,
      apiKey: this.#apiKey,
      notionBaseUrl: this.#notionBaseUrl,
      fetch: this.#fetch,
      tokens: this.#tokens,
    });
  }

  // --- webhooks ---

  /** `GET /v1/webhook-deliveries` (admin): one page, newest first; `next_before` asks for the next. */
  listWebhookDeliveries(query: ListDeliveriesQuery = {}): Promise<DeliveryList> {
    return this.#call("GET /v1/webhook-deliveries", () =>
      this.#api.GET("/v1/webhook-deliveries", { params: { query }, ...this.#init() }),
    );
  }

  /** Every delivery that matches `query`, newest first, page after page. */
  async *iterateWebhookDeliveries(query: ListDeliveriesQuery = {}): AsyncGenerator<Delivery, void, undefined> {
    let before = query.before;
    for (;;) {
      const page = await this.listWebhookDeliveries({ ...query, before });
      yield* page.data;
      if (!page.next_before) return;
      before = page.next_before;
    }
  }

  /** `POST /v1/webhook-deliveries/{id}/retry` (admin): due again now, with the same `webhook-id`. */
  retryWebhookDelivery(id: string): Promise<Delivery> {
    return this.#call(`POST /v1/webhook-deliveries/${id}/retry`, () =>
      this.#api.POST("/v1/webhook-deliveries/{id}/retry", { params: { path: { id } }, ...this.#init() }),
    );
  }

  // --- health ---

  /** `GET /healthz`: the process is alive. */
  health(): Promise<Health> {
    return this.#call("GET /healthz", () => this.#api.GET("/healthz", this.#init()));
  }

  /** `GET /readyz`: the database answers and its schema is current; `not_ready` (503) otherwise. */
  ready(): Promise<Ready> {
    return this.#call("GET /readyz", () => this.#api.GET("/readyz", this.#init()));
  }

  /** `GET /metrics`: Prometheus's text format. */
  metrics(): Promise<string> {
    return this.#call("GET /metrics", () => this.#api.GET("/metrics", { parseAs: "text", ...this.#init() }));
  }

  /** `GET /openapi.json`: the OpenAPI 3.1 document this client's types were generated from. */
  openapi(): Promise<Record<string, unknown>> {
    return this.#call("GET /openapi.json", () => this.#api.GET("/openapi.json", this.#init())) as Promise<
      Record<string, unknown>
    >;
  }

  // --- plumbing ---

  #init(): { signal: AbortSignal } {
    return { signal: AbortSignal.timeout(this.#timeoutMs) };
  }

  /** Runs one openapi-fetch call and turns anything but a 2xx into a `TokenkeeperError`. */
  async #call<T>(
    call: string,
    send: () => Promise<{ data?: T; error?: unknown; response: Response }>,
  ): Promise<T> {
    let result;
    try {
      result = await send();
    } catch (error) {
      if (error instanceof SyntaxError) {
        throw new TokenkeeperError(call, 0, null, {
          code: "unexpected_answer",
          message: "answered a body that is not JSON",
        });
      }
      throw unreachable(call, this.#url, error, this.#timeoutMs);
    }
    if (!result.response.ok) throw errorFromAnswer(call, result.response, result.error);
    return result.data as T;
  }
}

export { TokenkeeperError };
