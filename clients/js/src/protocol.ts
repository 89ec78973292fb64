/**
 * Reach protocol v1 on the wire: the frames, the user object, the encodings, and the close
 * and error codes (docs/protocol.md in the Reach repository).
 *
 * @packageDocumentation
 */

/** How frames are encoded: JSON text messages or MessagePack binary messages. */
export type Encoding = "json" | "msgpack";

/** The WebSocket subprotocol of each encoding. */
export const SUBPROTOCOLS: Readonly<Record<Encoding, string>> = {
  json: "reach.v1.json",
  msgpack: "reach.v1.msgpack",
};

/** Why a user's state changed, with the hosted SDKs' names. */
export type UpdateReason =
  | "friendlyName"
  | "attributes"
  | "reachabilityOnline"
  | "reachabilityNotifiable";

/** Every update reason, in the order the server lists them. */
export const UPDATE_REASONS: readonly UpdateReason[] = [
  "friendlyName",
  "attributes",
  "reachabilityOnline",
  "reachabilityNotifiable",
];

/** A user as the server sends it (the same values REST returns). */
export interface WireUser {
  identity: string;
  friendly_name: string | null;
  /** JSON text, `"{}"` when unset. */
  attributes: string;
  is_online: boolean | null;
  is_notifiable: boolean | null;
  /**
   * When the user was last seen, in unix seconds: the time of this state while online, else
   * when the user went offline; `null` whenever `is_online` is. Absent from servers that
   * predate it (read as `null`).
   */
  last_seen_at?: number | null;
}

/** A per-identity failure in a `subscribed` reply. */
export interface IdentityError {
  identity: string;
  code: number;
  message: string;
}

/** The push services a device registration can name. */
export type PushType = "apn" | "gcm" | "fcm";

/** Frames a client sends. */
export type ClientFrame =
  | { type: "hello"; token: string; client?: string }
  | { type: "subscribe"; id: number; identities: string[] }
  | { type: "unsubscribe"; id: number; identities: string[] }
  | { type: "ping"; id: number }
  | { type: "update_token"; id: number; token: string }
  | { type: "register_push"; id: number; binding_type: PushType; address: string }
  | { type: "unregister_push"; id: number; binding_type: PushType; address: string }
  | { type: "bye" };

/** Frames the server sends. */
export type ServerFrame =
  | {
      type: "welcome";
      connection_id: string;
      identity: string;
      service_sid: string;
      reachability_enabled: boolean;
      heartbeat_interval_ms: number;
      token_expires_at: number;
      user: WireUser;
    }
  | { type: "subscribed"; id: number; users: WireUser[]; errors: IdentityError[] }
  | { type: "unsubscribed"; id: number }
  | { type: "pong"; id: number }
  | { type: "token_updated"; id: number; token_expires_at: number }
  | { type: "push_registered"; id: number; binding_sid: string }
  | { type: "push_unregistered"; id: number }
  | { type: "user_updated"; user: WireUser; reasons: UpdateReason[] }
  | { type: "service_updated"; reachability_enabled: boolean }
  | { type: "token_about_to_expire"; expires_at: number }
  | { type: "goodbye"; reason: string; retry_after_ms: number }
  | { type: "error"; id?: number | null; code: number; message: string };

/** WebSocket close codes of protocol v1. */
export const CloseCode = {
  /** The client said `bye`. */
  Normal: 1000,
  /** The gateway is draining (a `goodbye` came first). */
  GoingAway: 1001,
  /** A frame exceeded the gateway's `max_frame_bytes`. */
  TooBig: 1009,
  /** The gateway failed; the client may retry. */
  InternalError: 1011,
  /** Bad, expired or foreign token; no `hello` in time. */
  Unauthorized: 4001,
  /** Malformed frame, unknown type, frame before `hello`. */
  ProtocolError: 4002,
  /** The service or the user was deleted. */
  Forbidden: 4003,
  /** The gateway heard nothing for its heartbeat timeout. */
  HeartbeatTimeout: 4008,
  /** The client did not read its frames fast enough. */
  SlowConsumer: 4009,
  /** Too many connections. */
  RateLimited: 4029,
} as const;

/** Error codes of `error` frames and per-identity errors that the client acts on. */
export const ErrorCode = {
  InvalidParameter: 20001,
  InvalidAccessToken: 20101,
  TokenExpired: 20104,
  Forbidden: 20403,
  NotFound: 20404,
  Timeout: 20408,
  TooMany: 20429,
  Internal: 20500,
} as const;
