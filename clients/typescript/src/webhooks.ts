import { Webhook, WebhookVerificationError } from "standardwebhooks";

import type { Connection, ConnectionStatus, Diagnosis } from "./types.js";

/** The fields every event has. */
interface EventOf<Type extends string, Data> {
  type: Type;
  /** When the change happened (RFC 3339). */
  timestamp: string;
  /** `connection` is the connection as `GET /v1/connections/{id}` shows it now, never a token. */
  data: { connection: Connection } & Data;
}

/**
 * A webhook event, as docs/API.md ("Webhook events") describes it; switch on `type`.
 * tokenkeeper may add types later: ignore those you do not know.
 */
export type WebhookEvent =
  | EventOf<"connection.created", { /** Present when the connection came from an import. */ imported?: boolean }>
  | EventOf<"connection.reauthorized", Record<never, never>>
  | EventOf<
      "connection.needs_reauth",
      {
        diagnosis: Diagnosis;
        /** A reconnect link made when this delivery was sent; null when none could be made. */
        reconnect_url: string | null;
        reconnect_url_expires_at?: string | null;
      }
    >
  | EventOf<
      "connection.recovered",
      {
        from_status?: ConnectionStatus;
        /** What brought it back: `reauthorization` or `refresh`. */
        by?: string;
      }
    >
  | EventOf<"connection.revoked", Record<never, never>>;

export type WebhookEventType = WebhookEvent["type"];

/** The request headers as Node's `http` (`req.headers`), Express or the fetch API (`Headers`) give them. */
export type WebhookHeaders = Headers | Record<string, string | string[] | undefined>;

/**
 * Checks a webhook delivery's Standard Webhooks signature with the npm `standardwebhooks`
 * package and answers the event it carries.
 *
 * - `secret`: `TOKENKEEPER_WEBHOOK_SECRET` (`whsec_…`).
 * - `body`: the request body exactly as received, as text or bytes (not a re-serialized object).
 * - `headers`: the request's headers; `webhook-id`, `webhook-timestamp` and `webhook-signature` are read.
 *
 * Throws `WebhookVerificationError` for a missing or wrong signature, or a timestamp more than
 * five minutes away from now. The same event may arrive more than once, with the same
 * `webhook-id`: drop the ids you have seen.
 */
export function verifyWebhook(
  secret: string,
  body: string | Uint8Array,
  headers: WebhookHeaders,
): WebhookEvent {
  const text = typeof body === "string" ? body : new TextDecoder().decode(body);
  const event = new Webhook(secret).verify(text, plainHeaders(headers));
  if (!isEvent(event)) throw new WebhookVerificationError("The signed body is not a tokenkeeper event");
  return event;
}

function plainHeaders(headers: WebhookHeaders): Record<string, string> {
  const plain: Record<string, string> = {};
  if (typeof (headers as Headers).forEach === "function" && typeof (headers as Headers).get === "function") {
    (headers as Headers).forEach((value, name) => {
      plain[name.toLowerCase()] = value;
    });
    return plain;
  }
  for (const [name, value] of Object.entries(headers as Record<string, string | string[] | undefined>)) {
    if (value === undefined) continue;
    // Node joins repeated headers into an array; Standard Webhooks separates several
    // signatures with spaces.
    plain[name.toLowerCase()] = Array.isArray(value) ? value.join(" ") : value;
  }
  return plain;
}

function isEvent(value: unknown): value is WebhookEvent {
  if (typeof value !== "object" || value === null) return false;
  const { type, timestamp, data } = value as Record<string, unknown>;
  return (
    typeof type === "string" &&
    typeof timestamp === "string" &&
    typeof data === "object" &&
    data !== null &&
    typeof (data as Record<string, unknown>).connection === "object"
  );
}

export { WebhookVerificationError };
