// Names for the OpenAPI document's schemas, so that an app writes `Connection` rather than
// `components["schemas"]["Connection"]`. Every one is the generated type itself: when the API
// changes, `npm run generate` changes these too, and `tsc` points at every use that no longer fits.

import type { components, operations } from "./schema.js";

type Schemas = components["schemas"];

export type Connection = Schemas["Connection"];
export type ConnectionId = Schemas["ConnectionId"];
export type ConnectionList = Schemas["ConnectionList"];
export type ConnectionStatus = Schemas["ConnectionStatus"];
export type CheckResult = Schemas["CheckResult"];
export type Diagnosis = Schemas["Diagnosis"];
export type DiagnosisReason = Schemas["DiagnosisReason"];
export type TriedGrant = Schemas["TriedGrant"];
export type InterruptedAttempt = Schemas["InterruptedAttempt"];
export type GrantId = Schemas["GrantId"];
export type GrantList = Schemas["GrantList"];
export type GrantRecord = Schemas["GrantRecord"];
export type GrantOrigin = Schemas["GrantOrigin"];
export type Event = Schemas["Event"];
export type EventKind = Schemas["EventKind"];
export type EventList = Schemas["EventList"];
export type TokenAnswer = Schemas["TokenAnswer"];
export type RefreshAnswer = Schemas["RefreshAnswer"];
export type RefreshBody = Schemas["RefreshBody"];
export type Revocation = Schemas["Revocation"];
export type CreateSession = Schemas["CreateSession"];
export type CreateReconnect = Schemas["CreateReconnect"];
export type SessionCreated = Schemas["SessionCreated"];
export type ImportBody = Schemas["ImportBody"];
export type ImportRow = Schemas["ApiRow"];
export type ImportAnswer = Schemas["ImportAnswer"];
/** The report `tokenkeeper import --json` prints; `ImportAnswer.summary`. */
export type ImportReport = Schemas["ImportReport"];
export type ImportRowOutcome = Schemas["RowOutcome"];
export type Delivery = Schemas["Delivery"];
export type DeliveryList = Schemas["DeliveryList"];
export type DeliveryStatus = Schemas["DeliveryStatus"];
export type Health = Schemas["Health"];
export type Ready = Schemas["Ready"];
export type ErrorBody = Schemas["ErrorBody"];
export type ErrorCode = Schemas["ErrorCode"];

/** The query of `GET /v1/connections`: `provider`, `end_user_id`, `status`, `after`, `limit`. */
export type ListConnectionsQuery = NonNullable<operations["list"]["parameters"]["query"]>;
/** The query of `GET /v1/webhook-deliveries`: `status`, `before`, `limit`. */
export type ListDeliveriesQuery = NonNullable<
  operations["list_webhook_deliveries"]["parameters"]["query"]
>;
/** The query of `GET …/access-token` and `POST …/refresh`: `include_refresh_token` (admin keys). */
export type TokenQuery = NonNullable<operations["access_token"]["parameters"]["query"]>;
