/**
 * Frames to and from WebSocket messages: `reach.v1.json` is one JSON object per text message,
 * `reach.v1.msgpack` one MessagePack map (named fields) per binary message.
 */

import { decode as msgpackDecode, encode as msgpackEncode } from "@msgpack/msgpack";

import type { ClientFrame, Encoding, ServerFrame } from "./protocol.js";

/** The message data that carries `frame` in `encoding`. */
export function encodeFrame(frame: ClientFrame, encoding: Encoding): string | Uint8Array {
  return encoding === "json"
    ? JSON.stringify(frame)
    : msgpackEncode(frame, { ignoreUndefined: true });
}

/**
 * The frame in a message's data. The kind of message decides the encoding: text is JSON,
 * binary is MessagePack. Throws on data that is not a frame.
 */
export function decodeFrame(data: unknown): ServerFrame {
  let value: unknown;
  if (typeof data === "string") {
    value = JSON.parse(data);
  } else if (data instanceof ArrayBuffer) {
    value = msgpackDecode(new Uint8Array(data));
  } else if (ArrayBuffer.isView(data)) {
    value = msgpackDecode(new Uint8Array(data.buffer, data.byteOffset, data.byteLength));
  } else {
    throw new TypeError("a message must be text or binary");
  }
  if (typeof value !== "object" || value === null || typeof (value as { type?: unknown }).type !== "string") {
    throw new TypeError("a frame must be an object with a string `type`");
  }
  return value as ServerFrame;
}
