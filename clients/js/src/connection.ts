/**
 * One WebSocket connection to a gateway: open it with the chosen subprotocol, say `hello`,
 * wait for `welcome`. A refused token comes back as an {@link AccessDeniedError}; anything else
 * that ends the attempt as a {@link ConnectionError}. Once welcomed, the connection hands its
 * frames and its close to the handlers the client attaches.
 */

import { decodeFrame, encodeFrame } from "./codec.js";
import { AccessDeniedError, ConnectionError, ReachError } from "./errors.js";
import {
  type ClientFrame,
  CloseCode,
  type Encoding,
  ErrorCode,
  type ServerFrame,
  SUBPROTOCOLS,
  type WireUser,
} from "./protocol.js";

/** The part of the WHATWG `WebSocket` interface the client uses (browsers, the `ws` package). */
export interface WebSocketLike {
  readonly readyState: number;
  binaryType: string;
  send(data: string | ArrayBufferLike | ArrayBufferView): void;
  close(code?: number, reason?: string): void;
  onopen: ((event: unknown) => void) | null;
  onmessage: ((event: { data: unknown }) => void) | null;
  onclose: ((event: { code: number; reason: string }) => void) | null;
  onerror: ((event: unknown) => void) | null;
}

/** A `WebSocket` constructor: the browser's, or `ws`'s default export on Node. */
export type WebSocketConstructor = new (url: string, protocols?: string | string[]) => WebSocketLike;

/** What `welcome` told the client. */
export interface Welcome {
  connectionId: string;
  identity: string;
  serviceSid: string;
  reachabilityEnabled: boolean;
  heartbeatIntervalMs: number;
  tokenExpiresAt: number;
  user: WireUser;
}

/** What a welcomed connection reports to its client. */
export interface ConnectionHandlers {
  frame(frame: ServerFrame): void;
  closed(code: number | null, reason: string): void;
}

/** How to open a connection. */
export interface OpenOptions {
  WebSocket: WebSocketConstructor;
  encoding: Encoding;
  timeoutMs: number;
  clientName: string;
}

/** The readyState of an open WebSocket. */
const OPEN = 1;

/** An open, welcomed connection. */
export class Connection {
  readonly welcome: Welcome;
  readonly encoding: Encoding;
  private readonly ws: WebSocketLike;
  private handlers: ConnectionHandlers | null = null;
  /** Frames (and the close) that arrived before the client attached its handlers. */
  private early: Array<ServerFrame | { closed: [number | null, string] }> = [];
  private ended = false;

  /** @internal */
  constructor(ws: WebSocketLike, encoding: Encoding, welcome: Welcome) {
    this.ws = ws;
    this.encoding = encoding;
    this.welcome = welcome;
  }

  /** Starts delivering frames to `handlers`, those that came meanwhile first. */
  attach(handlers: ConnectionHandlers): void {
    this.handlers = handlers;
    const early = this.early;
    this.early = [];
    for (const item of early) {
      if ("closed" in item) {
        handlers.closed(...item.closed);
      } else {
        handlers.frame(item);
      }
    }
  }

  /** Sends a frame; `false` when the socket is not open any more. */
  send(frame: ClientFrame): boolean {
    if (this.ended || this.ws.readyState !== OPEN) {
      return false;
    }
    try {
      this.ws.send(encodeFrame(frame, this.encoding));
      return true;
    } catch {
      return false;
    }
  }

  /**
   * Closes the socket and reports nothing more: the client has already decided how the
   * connection ended (a dead server, a shutdown).
   */
  abandon(): void {
    this.ended = true;
    this.handlers = null;
    try {
      this.ws.close(CloseCode.Normal);
    } catch {
      // Already closed.
    }
  }

  /** @internal */
  _deliver(data: unknown): void {
    if (this.ended) return;
    let frame: ServerFrame;
    try {
      frame = decodeFrame(data);
    } catch {
      return;
    }
    if (this.handlers === null) {
      this.early.push(frame);
    } else {
      this.handlers.frame(frame);
    }
  }

  /** @internal */
  _closed(code: number | null, reason: string): void {
    if (this.ended) return;
    this.ended = true;
    if (this.handlers === null) {
      this.early.push({ closed: [code, reason] });
    } else {
      this.handlers.closed(code, reason);
    }
  }
}

/** Opens a connection and waits for `welcome`; see the module doc. */
export function openConnection(url: string, token: string, options: OpenOptions): Promise<Connection> {
  return new Promise((resolve, reject) => {
    let ws: WebSocketLike;
    try {
      ws = new options.WebSocket(url, [SUBPROTOCOLS[options.encoding]]);
    } catch (error) {
      reject(new ConnectionError(`cannot open ${url}: ${String(error)}`));
      return;
    }
    ws.binaryType = "arraybuffer";
    let connection: Connection | null = null;
    let settled = false;
    let lastError: { code: number; message: string } | null = null;
    const fail = (error: ReachError) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      reject(error);
    };
    const timer = setTimeout(() => {
      fail(new ConnectionError(`no welcome from ${url} within ${options.timeoutMs} ms`));
      try {
        ws.close(CloseCode.Normal);
      } catch {
        // Never opened.
      }
    }, options.timeoutMs);
    ws.onopen = () => {
      ws.send(encodeFrame({ type: "hello", token, client: options.clientName }, options.encoding));
    };
    ws.onmessage = (event) => {
      if (connection !== null) {
        connection._deliver(event.data);
        return;
      }
      let frame: ServerFrame;
      try {
        frame = decodeFrame(event.data);
      } catch {
        return;
      }
      if (frame.type === "error") {
        lastError = { code: frame.code, message: frame.message };
      } else if (frame.type === "welcome" && !settled) {
        settled = true;
        clearTimeout(timer);
        connection = new Connection(ws, options.encoding, {
          connectionId: frame.connection_id,
          identity: frame.identity,
          serviceSid: frame.service_sid,
          reachabilityEnabled: frame.reachability_enabled,
          heartbeatIntervalMs: frame.heartbeat_interval_ms,
          tokenExpiresAt: frame.token_expires_at,
          user: frame.user,
        });
        resolve(connection);
      }
    };
    ws.onclose = (event) => {
      if (connection !== null) {
        connection._closed(event.code, event.reason);
        return;
      }
      const error = lastError as { code: number; message: string } | null;
      if (event.code === CloseCode.Unauthorized) {
        fail(
          new AccessDeniedError(
            error?.message ?? "the access token was refused",
            error?.code ?? ErrorCode.InvalidAccessToken,
          ),
        );
      } else if (error !== null) {
        fail(new ConnectionError(`error ${error.code}: ${error.message}`, event.code, error.code));
      } else {
        const reason = event.reason ? `: ${event.reason}` : "";
        fail(new ConnectionError(`${url} closed the connection before welcome (${event.code}${reason})`, event.code));
      }
    };
    ws.onerror = () => {
      // A close event follows with the details.
    };
  });
}
