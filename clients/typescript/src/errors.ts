import type { ConnectionId, Diagnosis, ErrorBody, ErrorCode } from "./types.js";

/**
 * The codes a `TokenkeeperError` can carry: tokenkeeper's own (docs/API.md lists each with its
 * status), and two of the client's for when there is no envelope to read:
 * `unreachable` (no answer: refused, reset, or none within `timeoutMs`; `status` is 0) and
 * `unexpected_answer` (an answer that is not tokenkeeper's error envelope).
 */
export type TokenkeeperErrorCode = ErrorCode | "unreachable" | "unexpected_answer";

/**
 * A call to tokenkeeper that did not succeed, with the fields of its error envelope
 * (`{"error":{"code","message",…}}`) under their own names.
 *
 * Its message names the call (method and path, never a query, a header or a body) and repeats
 * tokenkeeper's message, which never contains a token or a key; nothing else is attached, so
 * logging the error whole leaks no secret.
 */
export class TokenkeeperError extends Error {
  override readonly name = "TokenkeeperError";
  /** The HTTP status; 0 when no answer came (`unreachable`). */
  readonly status: number;
  readonly code: TokenkeeperErrorCode;
  /** The connection concerned (`needs_reauth`, `connection_revoked`). */
  readonly connection_id: ConnectionId | null;
  /** `needs_reauth`: the link to send the user to, the same for every 424 until it is used or expires. */
  readonly reconnect_url: string | null;
  readonly reconnect_url_expires_at: string | null;
  /** `needs_reauth`: why the user must reconnect, when it is known. */
  readonly diagnosis: Diagnosis | null;
  /** `provider_rejected`: Notion's error code. */
  readonly provider_code: string | null;
  /** `token_rejected_after_refresh`: what Notion's introspection said (`active`, `unknown`). */
  readonly introspection: string | null;
  /** `Retry-After`, in seconds, when the answer had one (429, 503). */
  readonly retry_after: number | null;
  /** The envelope's `error` object as tokenkeeper sent it, for fields this client does not know yet. */
  readonly body: ErrorBody | null;

  constructor(
    call: string,
    status: number,
    body: ErrorBody | null,
    { code, message, retryAfter }: { code?: TokenkeeperErrorCode; message?: string; retryAfter?: number | null } = {},
  ) {
    const theCode = code ?? body?.code ?? "unexpected_answer";
    const words = message ?? body?.message ?? `answered ${status}`;
    super(`${call}: ${status === 0 ? "" : `${status} `}${theCode}: ${words}`);
    this.status = status;
    this.code = theCode;
    this.body = body;
    this.connection_id = body?.connection_id ?? null;
    this.reconnect_url = body?.reconnect_url ?? null;
    this.reconnect_url_expires_at = body?.reconnect_url_expires_at ?? null;
    this.diagnosis = body?.diagnosis ?? null;
    this.provider_code = body?.provider_code ?? null;
    this.introspection = body?.introspection ?? null;
    this.retry_after = retryAfter ?? null;
  }

  /** Whether `error` is a `TokenkeeperError`, from this copy of the package or another. */
  static isTokenkeeperError(error: unknown): error is TokenkeeperError {
    return error instanceof TokenkeeperError || (error instanceof Error && error.name === "TokenkeeperError");
  }
}

/** `{"error":{…}}`'s inside, if `value` has the envelope's shape. */
export function envelopeBody(value: unknown): ErrorBody | null {
  if (typeof value !== "object" || value === null || !("error" in value)) return null;
  const inner = (value as { error: unknown }).error;
  if (typeof inner !== "object" || inner === null) return null;
  const { code, message } = inner as { code?: unknown; message?: unknown };
  if (typeof code !== "string" || typeof message !== "string") return null;
  return inner as ErrorBody;
}

/** Seconds of a `Retry-After` header given in seconds (tokenkeeper's form), else null. */
export function retryAfter(headers: Headers): number | null {
  const value = headers.get("retry-after");
  if (value === null || !/^\d+$/.test(value.trim())) return null;
  return Number(value.trim());
}

/** A `TokenkeeperError` for a non-2xx answer whose body (text or parsed JSON) is `payload`. */
export function errorFromAnswer(call: string, response: Response, payload: unknown): TokenkeeperError {
  let parsed = payload;
  if (typeof payload === "string") {
    try {
      parsed = JSON.parse(payload);
    } catch {
      parsed = undefined;
    }
  }
  const body = envelopeBody(parsed);
  const headerCode = response.headers.get("tokenkeeper-error");
  return new TokenkeeperError(call, response.status, body, {
    code: body ? undefined : ((headerCode as TokenkeeperErrorCode | null) ?? "unexpected_answer"),
    message: body
      ? undefined
      : headerCode
        ? `the proxy passed Notion's ${response.status} on, marked Tokenkeeper-Error: ${headerCode}`
        : `answered ${response.status} without tokenkeeper's error envelope`,
    retryAfter: retryAfter(response.headers),
  });
}

/** A `TokenkeeperError` for a call that got no answer at all. */
export function unreachable(call: string, base: string, error: unknown, timeoutMs: number): TokenkeeperError {
  const timedOut = error instanceof Error && (error.name === "TimeoutError" || error.name === "AbortError");
  const why = timedOut
    ? `no answer within ${timeoutMs} ms`
    : // Node's fetch puts the reason (ECONNREFUSED, …) in `cause`; it names hosts, never headers.
      `could not reach ${base} (${describe(error)})`;
  return new TokenkeeperError(call, 0, null, { code: "unreachable", message: why });
}

function describe(error: unknown): string {
  if (!(error instanceof Error)) return String(error);
  const cause = (error as { cause?: unknown }).cause;
  if (cause && typeof cause === "object") {
    if ("code" in cause && typeof cause.code === "string") return cause.code;
    if (cause instanceof Error) return cause.message;
  }
  return error.message;
}
