/**
 * The Reach client for browsers and Node: connect with an access token, subscribe to users,
 * and follow their presence (`isOnline`, `isNotifiable`), profile and the service's
 * reachability switch as they change, with the hosted Conversations JS SDK's names.
 *
 * ```ts
 * import { Client } from "reach-client";
 *
 * const client = await Client.create(token, { url: "ws://127.0.0.1:8080/v1/ws" });
 * const alice = await client.getUser("alice");
 * alice.on("updated", ({ user, updateReasons }) => console.log(user.isOnline, updateReasons));
 * ```
 *
 * @packageDocumentation
 */

export {
  Client,
  type ClientEvents,
  type ClientOptions,
  type ConnectionErrorEvent,
  type ConnectionState,
  type Disconnect,
  VERSION,
} from "./client.js";
export type { WebSocketConstructor, WebSocketLike } from "./connection.js";
export type { ReconnectOptions } from "./backoff.js";
export {
  AccessDeniedError,
  ClientShutdownError,
  ConnectionError,
  ReachError,
  RequestTimeoutError,
} from "./errors.js";
export {
  CloseCode,
  type Encoding,
  ErrorCode,
  type IdentityError,
  type PushType,
  type UpdateReason,
  UPDATE_REASONS,
  type WireUser,
} from "./protocol.js";
export { User, type UserEvents, type UserUpdatedEvent, reasonsBetween } from "./user.js";
