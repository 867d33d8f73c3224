// @tokenkeeper/client: tokenkeeper's HTTP API typed from its OpenAPI document, an
// @notionhq/client Client that refreshes through tokenkeeper, and webhook verification.

export { Tokenkeeper, type TokenkeeperOptions, type RefreshOptions } from "./client.js";
export { TokenkeeperError, type TokenkeeperErrorCode } from "./errors.js";
export type { NotionOptions, NotionClientOptions } from "./notion.js";
export {
  verifyWebhook,
  WebhookVerificationError,
  type WebhookEvent,
  type WebhookEventType,
  type WebhookHeaders,
} from "./webhooks.js";
export type * from "./types.js";
export type { paths, components, operations } from "./schema.js";
