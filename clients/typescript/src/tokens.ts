import type { TokenAnswer } from "./types.js";

/** How much earlier than `expires_at` a cached token is read again from tokenkeeper. */
const EXPIRY_MARGIN_MS = 30_000;

interface Entry {
  /** The newest token this process knows for the connection. */
  token?: TokenAnswer;
  /** A read of `access-token` in flight, shared by every caller that needs one meanwhile. */
  reading?: Promise<TokenAnswer>;
  /** A refresh in flight, and the grant it replaces: shared by every caller whose grant that is. */
  refreshing?: { grant: string; answer: Promise<TokenAnswer> };
}

/**
 * The access tokens of the connections this process calls Notion for, with at most one read
 * and one refresh in flight per connection.
 *
 * Written by hand because its one rule is tokenkeeper's own: a refresh names the grant that
 * failed (`if_grant`), and every caller that failed with that grant waits for the same refresh.
 * Across processes the server keeps the rule (a refresh whose `if_grant` was already replaced
 * is answered the current grant without calling Notion), so this cache only saves calls.
 *
 * It holds at most `capacity` connections; beyond, the one least recently stored is forgotten
 * (and read again when next needed).
 */
export class TokenCache {
  readonly #entries = new Map<string, Entry>();
  readonly #capacity: number;
  readonly #read: (connection: string) => Promise<TokenAnswer>;
  readonly #refresh: (connection: string, ifGrant: string) => Promise<TokenAnswer>;
  readonly #now: () => number;

  constructor(
    capacity: number,
    read: (connection: string) => Promise<TokenAnswer>,
    refresh: (connection: string, ifGrant: string) => Promise<TokenAnswer>,
    now: () => number = Date.now,
  ) {
    this.#capacity = Math.max(1, capacity);
    this.#read = read;
    this.#refresh = refresh;
    this.#now = now;
  }

  /** A token to call Notion with: cached, the refresh in flight, or read from tokenkeeper. */
  current(connection: string): Promise<TokenAnswer> {
    const entry = this.#entry(connection);
    if (entry.refreshing) return entry.refreshing.answer;
    if (entry.token && !this.#expiring(entry.token)) return Promise.resolve(entry.token);
    if (entry.reading) return entry.reading;
    const reading = this.#read(connection).then(
      (token) => {
        this.#store(connection, token);
        return token;
      },
    );
    entry.reading = reading;
    const clear = () => {
      if (entry.reading === reading) entry.reading = undefined;
    };
    reading.then(clear, clear);
    return reading;
  }

  /**
   * A token to use instead of `grant`'s, which Notion just refused: a newer one this process
   * already has, else the answer of the one refresh of `grant` (started here if none is in
   * flight). Rejects with the refresh's error (424 `needs_reauth`, …), after which the
   * connection's token is read afresh on next use.
   */
  replace(connection: string, grant: string): Promise<TokenAnswer> {
    const entry = this.#entry(connection);
    // A refresh in flight replaces `grant`, or a grant that replaced it: either way its answer
    // is newer than `grant`.
    if (entry.refreshing) return entry.refreshing.answer;
    if (entry.token && entry.token.grant_id !== grant) return Promise.resolve(entry.token);
    const answer = this.#refresh(connection, grant).then(
      (token) => {
        this.#store(connection, token);
        return token;
      },
      (error: unknown) => {
        const now = this.#entries.get(connection);
        if (now?.token?.grant_id === grant) now.token = undefined;
        throw error;
      },
    );
    const refreshing = { grant, answer };
    entry.refreshing = refreshing;
    const clear = () => {
      if (entry.refreshing === refreshing) entry.refreshing = undefined;
    };
    answer.then(clear, clear);
    return answer;
  }

  /** Forgets a connection's token (after a revocation, say). */
  forget(connection: string): void {
    this.#entries.delete(connection);
  }

  #expiring(token: TokenAnswer): boolean {
    if (!token.expires_at) return false;
    return Date.parse(token.expires_at) - EXPIRY_MARGIN_MS <= this.#now();
  }

  #entry(connection: string): Entry {
    let entry = this.#entries.get(connection);
    if (!entry) {
      entry = {};
      this.#entries.set(connection, entry);
      this.#evict();
    }
    return entry;
  }

  #store(connection: string, token: TokenAnswer): void {
    const entry = this.#entries.get(connection) ?? {};
    // A slow read must not put back a grant older than one a refresh already stored.
    if (entry.token && entry.token.grant_id !== token.grant_id && Date.parse(entry.token.obtained_at) > Date.parse(token.obtained_at)) {
      return;
    }
    entry.token = token;
    // Re-inserting keeps the map in order of last storage, which is what eviction goes by.
    this.#entries.delete(connection);
    this.#entries.set(connection, entry);
    this.#evict();
  }

  #evict(): void {
    while (this.#entries.size > this.#capacity) {
      const oldest = this.#entries.keys().next().value;
      if (oldest === undefined) return;
      this.#entries.delete(oldest);
    }
  }
}
