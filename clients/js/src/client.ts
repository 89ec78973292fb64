/**
 * {@link Client}: a connection to a Reach gateway, kept alive and re-established by itself,
 * with the hosted Conversations JS SDK's names.
 *
 * Data flow: the client opens one connection at a time (`connection.ts`); every frame it
 * receives is applied to the users' state (`state.ts`) in the order the server sent it, and
 * only then are events emitted. Requests (`getUser`, `updateToken`, ...) get a fresh id and are
 * answered by id; while there is no connection they wait, and requests that were in flight
 * when a connection was lost are sent again on the next one. The client pings at the interval
 * `welcome` announces, counts a silent server as gone, reconnects with exponential backoff and
 * full jitter (or after a draining gateway's `retry_after_ms`), resubscribes, and reports only
 * what changed meanwhile. A refused token (close 4001) leaves it `denied` until
 * {@link Client.updateToken} hands over a new one.
 */

import { type ReconnectOptions, type ReconnectPolicy, delayMs, reconnectPolicy } from "./backoff.js";
import {
  type Connection,
  type WebSocketConstructor,
  type Welcome,
  openConnection,
} from "./connection.js";
import { Emitter } from "./emitter.js";
import {
  AccessDeniedError,
  ClientShutdownError,
  ConnectionError,
  ReachError,
  RequestTimeoutError,
} from "./errors.js";
import {
  type ClientFrame,
  CloseCode,
  type Encoding,
  ErrorCode,
  type IdentityError,
  type PushType,
  type ServerFrame,
} from "./protocol.js";
import { type PresenceEvent, PresenceState } from "./state.js";
import type { User, UserOwner, UserUpdatedEvent } from "./user.js";

/** The version this package reports in `hello`. */
export const VERSION = "0.1.0";

/** The client's connection state, with the hosted SDK's names. */
export type ConnectionState = "connecting" | "connected" | "disconnecting" | "disconnected" | "denied";

/** How a {@link Client} connects. */
export interface ClientOptions {
  /** The gateway's WebSocket URL, `ws://HOST:PORT/v1/ws` or `wss://…` (the path may be left out). */
  url: string;
  /** Wire encoding: `"json"` (the default) or `"msgpack"`. */
  encoding?: Encoding;
  /**
   * The `WebSocket` implementation: the global one by default (browsers, Node 22); on Node 20
   * pass the `ws` package's default export.
   */
  WebSocket?: WebSocketConstructor;
  /** Bounds of the delays between reconnect attempts. */
  reconnect?: ReconnectOptions;
  /** How long a request may wait for its answer, connection included (default 10000 ms). */
  requestTimeoutMs?: number;
  /** How long opening one connection may take, `welcome` included (default 10000 ms). */
  connectTimeoutMs?: number;
  /** The `client` field of `hello` (default `reach-client-js/<version>`). */
  clientName?: string;
}

/** The payload of `connectionError`. */
export interface ConnectionErrorEvent {
  /** `true` when the client will not reconnect by itself. */
  terminal: boolean;
  message: string;
  /** The protocol's error code, when the gateway gave one. */
  errorCode: number | null;
}

/** How the last connection ended ({@link Client.lastDisconnect}). */
export interface Disconnect {
  /** The WebSocket close code, if there was a close frame. */
  code: number | null;
  /** The close reason, the error the gateway sent before closing, or what the client saw. */
  reason: string;
  /** The delay a draining gateway asked for in `goodbye`. */
  retryAfterMs: number | null;
  /** When the client noticed (`Date.now()`). */
  at: number;
}

/** The events of a {@link Client}. */
export interface ClientEvents {
  /** The first connection was welcomed: the client's state is ready. */
  initialized: Client;
  /** The first connection failed (e.g. the token was refused); the client stopped. */
  initFailed: { error: ReachError };
  /** A subscribed user (or the own user) changed. */
  userUpdated: UserUpdatedEvent;
  /** A user was subscribed. */
  userSubscribed: User;
  /** A user was unsubscribed (by the application, or because it no longer exists). */
  userUnsubscribed: User;
  /** The connection state changed. */
  connectionStateChanged: ConnectionState;
  /** A connection failed or was lost. */
  connectionError: ConnectionErrorEvent;
  /** The token expires soon (unix seconds of its expiry): hand a new one to `updateToken`. */
  tokenAboutToExpire: number;
  /** The token expired: the client is `denied` until `updateToken`. */
  tokenExpired: undefined;
  /** The service's reachability switch changed. */
  reachabilityEnabledChanged: boolean;
}

/** Silence from the server for this many heartbeat intervals counts as a dead server. */
const DEAD_AFTER_INTERVALS = 2.5;
/** Longest wait for the gateway's close after `bye`. */
const CLOSE_WAIT_MS = 2000;
/** Identities per `subscribe` frame when resubscribing. */
const SUBSCRIBE_CHUNK = 500;

/** A request waiting for a connection or for its answer. */
interface Request {
  frame(id: number): ClientFrame;
  /** Applies the answer (in frame order) and settles the caller's promise. */
  answer(frame: ServerFrame): void;
  fail(error: ReachError): void;
  /** `update_token` is the one request a denied client still sends. */
  token?: string;
  timer: ReturnType<typeof setTimeout>;
  /** The id it was last sent with. */
  id?: number;
}

/** A waiting period that events (the browser coming back online) may cut short. */
interface Wait {
  promise: Promise<void>;
  wake(): void;
}

function wait(ms: number): Wait {
  let wake = () => {};
  let timer: ReturnType<typeof setTimeout>;
  const promise = new Promise<void>((resolve) => {
    timer = setTimeout(resolve, ms);
    wake = () => {
      clearTimeout(timer);
      resolve();
    };
  });
  return { promise, wake };
}

/** `ws://host:port` gets the path `/v1/ws`; anything but `ws://` and `wss://` is refused. */
function normalizeUrl(url: string): string {
  let parsed: URL;
  try {
    parsed = new URL(url.trim());
  } catch {
    throw new ReachError(`not a URL: ${JSON.stringify(url)}`, ErrorCode.InvalidParameter);
  }
  if (parsed.protocol !== "ws:" && parsed.protocol !== "wss:") {
    throw new ReachError(`the URL must start with ws:// or wss://, got ${JSON.stringify(url)}`, ErrorCode.InvalidParameter);
  }
  if (parsed.pathname === "" || parsed.pathname === "/") {
    parsed.pathname = "/v1/ws";
  }
  return parsed.toString();
}

function defaultWebSocket(): WebSocketConstructor {
  const global = (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
  if (global === undefined) {
    throw new ReachError(
      "no WebSocket implementation: pass options.WebSocket (on Node 20, the `ws` package's default export)",
    );
  }
  return global;
}

/** A client of a Reach gateway; see the module doc. */
export class Client extends Emitter<ClientEvents> implements UserOwner {
  private readonly url: string;
  private readonly WebSocket: WebSocketConstructor;
  private readonly encoding: Encoding;
  private readonly policy: ReconnectPolicy;
  private readonly requestTimeoutMs: number;
  private readonly connectTimeoutMs: number;
  private readonly clientName: string;

  private state: ConnectionState = "connecting";
  private presence: PresenceState | null = null;
  private token: string;
  private welcome: Welcome | null = null;
  private enabled = false;
  private expiresAt = 0;
  private connection: Connection | null = null;
  private last: Disconnect | null = null;

  private nextId = 0;
  /** Requests waiting for a connection, in arrival order. */
  private queued: Request[] = [];
  /** Requests sent on the current connection, by id. */
  private pending = new Map<number, Request>();
  /** Ids of this connection's resubscription frames. */
  private resubscribing = new Set<number>();

  private heartbeat: ReturnType<typeof setInterval> | null = null;
  private heartbeatId: number | null = null;
  private lastHeard = 0;
  private lastError: { code: number; message: string } | null = null;
  private goodbyeMs: number | null = null;
  private reconnecting = false;
  private waiting: Wait | null = null;
  private closing: Promise<void> | null = null;
  private readonly detachWindow: () => void;

  /**
   * Connects at once. Listen for `initialized` (or `initFailed`), or use
   * {@link Client.create}, which waits for it. Throws on a malformed URL or when no
   * `WebSocket` implementation is available.
   */
  constructor(token: string, options: ClientOptions) {
    super();
    this.url = normalizeUrl(options.url);
    this.WebSocket = options.WebSocket ?? defaultWebSocket();
    this.encoding = options.encoding ?? "json";
    this.policy = reconnectPolicy(options.reconnect);
    this.requestTimeoutMs = options.requestTimeoutMs ?? 10_000;
    this.connectTimeoutMs = options.connectTimeoutMs ?? 10_000;
    this.clientName = options.clientName ?? `reach-client-js/${VERSION}`;
    this.token = token;
    this.detachWindow = this.watchWindow();
    void this.start();
  }

  /** Connects and resolves with the client once initialized; rejects if the token is refused or the gateway cannot be reached. */
  static create(token: string, options: ClientOptions): Promise<Client> {
    return new Promise((resolve, reject) => {
      const client = new Client(token, options);
      client.once("initialized", resolve);
      client.once("initFailed", ({ error }) => reject(error));
    });
  }

  /** The connection state. */
  get connectionState(): ConnectionState {
    return this.state;
  }

  /** The service's reachability switch, as last reported by the gateway. */
  get reachabilityEnabled(): boolean {
    return this.enabled;
  }

  /** The client's own user (always subscribed). Available once initialized. */
  get user(): User {
    if (this.presence === null) {
      throw new ReachError("the client is not initialized yet: wait for `initialized` or use Client.create");
    }
    return this.presence.own;
  }

  /** The current connection's id (`CN…`), or the last one's. */
  get connectionId(): string | null {
    return this.welcome?.connectionId ?? null;
  }

  /** The service SID the token names. */
  get serviceSid(): string | null {
    return this.welcome?.serviceSid ?? null;
  }

  /** When the current token expires (unix seconds). */
  get tokenExpiresAt(): number {
    return this.expiresAt;
  }

  /** How the last connection ended, if one did. */
  get lastDisconnect(): Disconnect | null {
    return this.last;
  }

  /**
   * Subscribes to a user and resolves with it (at once for a user already subscribed).
   * Rejects with a {@link ReachError}: code 20404 for an identity the service does not have,
   * 20429 past the gateway's subscription limit.
   */
  async getUser(identity: string): Promise<User> {
    const known = this.presence?.get(identity);
    if (known !== undefined && known.isSubscribed) {
      return known;
    }
    const reply = await this.request<{ users: User[]; errors: IdentityError[] }>(
      (id) => ({ type: "subscribe", id, identities: [identity] }),
      (frame) => {
        if (frame.type !== "subscribed") throw this.unexpected("subscribe", frame);
        const { users, events } = this.presenceState().subscribe(frame.users);
        this.emitAll(events);
        return { users, errors: frame.errors };
      },
    );
    const user = reply.users.find((u) => u.identity === identity);
    if (user !== undefined) {
      return user;
    }
    const error = reply.errors.find((e) => e.identity === identity) ?? reply.errors[0];
    throw new ReachError(error?.message ?? `user ${identity} was not subscribed`, error?.code ?? null);
  }

  /** The subscribed users, the own user not included. */
  async getSubscribedUsers(): Promise<User[]> {
    return this.presence?.subscribed() ?? [];
  }

  /** @internal Unsubscribes one user ({@link User.unsubscribe}). */
  async unsubscribeUser(identity: string): Promise<void> {
    const user = this.presence?.get(identity);
    if (user === undefined || !user.isSubscribed || user === this.presence?.own) {
      return;
    }
    await this.request(
      (id) => ({ type: "unsubscribe", id, identities: [identity] }),
      (frame) => {
        if (frame.type !== "unsubscribed") throw this.unexpected("unsubscribe", frame);
        this.emitAll(this.presenceState().unsubscribe([identity]));
      },
    );
  }

  /**
   * Hands over a new access token (for the same identity and service). On a connected
   * client the gateway checks it at once; on a `denied` one the client reconnects with it.
   * Rejects with the gateway's error (20403 for another identity, 2010x for a bad token).
   */
  async updateToken(token: string): Promise<void> {
    if (this.state === "denied") {
      this.token = token;
      this.setState("connecting");
      void this.reconnect(0);
    } else if (this.connection === null) {
      // The next hello presents it; the update_token sent after it confirms it.
      this.token = token;
    }
    await this.request(
      (id) => ({ type: "update_token", id, token }),
      (frame) => {
        if (frame.type !== "token_updated") throw this.unexpected("update_token", frame);
        this.token = token;
        this.expiresAt = frame.token_expires_at;
      },
      token,
    );
  }

  /**
   * Registers this device for push notifications, which makes the own user notifiable.
   * Registering the same address again is harmless.
   */
  async setPushRegistrationId(type: PushType, address: string): Promise<void> {
    await this.request(
      (id) => ({ type: "register_push", id, binding_type: type, address }),
      (frame) => {
        if (frame.type !== "push_registered") throw this.unexpected("register_push", frame);
      },
    );
  }

  /** Removes a push registration made with {@link Client.setPushRegistrationId}. */
  async unsetPushRegistrationId(type: PushType, address: string): Promise<void> {
    await this.request(
      (id) => ({ type: "unregister_push", id, binding_type: type, address }),
      (frame) => {
        if (frame.type !== "push_unregistered") throw this.unexpected("unregister_push", frame);
      },
    );
  }

  /**
   * Says `bye` (the own user goes offline at once, without the gateway's grace) and closes.
   * Requests still waiting fail with {@link ClientShutdownError}. Safe to call twice.
   */
  shutdown(): Promise<void> {
    this.closing ??= this.close();
    return this.closing;
  }

  // -------------------------------------------------------------------------------------
  // Sessions

  private async start(): Promise<void> {
    let connection: Connection;
    try {
      connection = await this.open();
    } catch (error) {
      const e = error instanceof ReachError ? error : new ConnectionError(String(error));
      this.stopped(e, e instanceof AccessDeniedError ? "denied" : "disconnected");
      this.emit("initFailed", { error: e });
      return;
    }
    if (this.closing !== null) {
      connection.abandon();
      return;
    }
    this.begin(connection);
  }

  private open(): Promise<Connection> {
    return openConnection(this.url, this.token, {
      WebSocket: this.WebSocket,
      encoding: this.encoding,
      timeoutMs: this.connectTimeoutMs,
      clientName: this.clientName,
    });
  }

  /**
   * A welcomed connection becomes the current one. The first one initializes the client (also
   * when it comes after a refused first token and `updateToken`); later ones resubscribe.
   */
  private begin(connection: Connection): void {
    const w = connection.welcome;
    const reconnected = this.presence !== null;
    this.presence ??= new PresenceState(w.user, this);
    this.welcome = w;
    this.connection = connection;
    this.expiresAt = w.tokenExpiresAt;
    this.lastError = null;
    this.goodbyeMs = null;
    this.lastHeard = Date.now();
    const events: PresenceEvent[] = reconnected ? this.presenceState().welcome(w.user) : [];
    const switched = reconnected && w.reachabilityEnabled !== this.enabled;
    this.enabled = w.reachabilityEnabled;
    connection.attach({
      frame: (frame) => this.onFrame(frame),
      closed: (code, reason) => this.onClosed(code, reason),
    });
    this.setState("connected");
    if (switched) this.emit("reachabilityEnabledChanged", this.enabled);
    this.emitAll(events);
    this.startHeartbeat(w.heartbeatIntervalMs);
    if (reconnected) {
      const identities = this.presenceState().identities();
      for (let i = 0; i < identities.length; i += SUBSCRIBE_CHUNK) {
        const id = this.id();
        this.resubscribing.add(id);
        connection.send({ type: "subscribe", id, identities: identities.slice(i, i + SUBSCRIBE_CHUNK) });
      }
    }
    const queued = this.queued;
    this.queued = [];
    for (const request of queued) {
      this.send(request);
    }
    if (!reconnected) this.emit("initialized", this);
  }

  private onFrame(frame: ServerFrame): void {
    this.lastHeard = Date.now();
    switch (frame.type) {
      case "subscribed":
        if (this.resubscribing.delete(frame.id)) {
          this.emitAll(this.presenceState().resubscribe(frame.users, frame.errors));
          return;
        }
        this.answer(frame.id, frame);
        return;
      case "unsubscribed":
      case "token_updated":
      case "push_registered":
      case "push_unregistered":
        this.answer(frame.id, frame);
        return;
      case "pong":
        if (frame.id !== this.heartbeatId) this.answer(frame.id, frame);
        return;
      case "user_updated":
        this.emitAll(this.presenceState().update(frame.user, frame.reasons));
        return;
      case "service_updated": {
        const changed = frame.reachability_enabled !== this.enabled;
        this.enabled = frame.reachability_enabled;
        if (changed) this.emit("reachabilityEnabledChanged", this.enabled);
        if (!this.enabled) this.emitAll(this.presenceState().reachabilityDisabled());
        return;
      }
      case "token_about_to_expire":
        this.expiresAt = frame.expires_at;
        this.emit("tokenAboutToExpire", frame.expires_at);
        return;
      case "goodbye":
        this.goodbyeMs = frame.retry_after_ms;
        return;
      case "error":
        if (frame.id !== undefined && frame.id !== null) {
          if (this.resubscribing.delete(frame.id)) return;
          const request = this.pending.get(frame.id);
          if (request !== undefined) {
            this.pending.delete(frame.id);
            clearTimeout(request.timer);
            request.fail(new ReachError(frame.message, frame.code));
          }
          return;
        }
        this.lastError = { code: frame.code, message: frame.message };
        return;
      case "welcome":
        return;
    }
  }

  /** The connection ended; decides what follows from how. */
  private onClosed(code: number | null, reason: string): void {
    this.dropConnection();
    if (this.closing !== null) {
      return;
    }
    const error = this.lastError;
    const why = error !== null ? `error ${error.code}: ${error.message}` : reason || "closed by the gateway";
    if (code === CloseCode.Unauthorized) {
      this.record(code, why, null);
      if (error?.code === ErrorCode.TokenExpired) this.emit("tokenExpired", undefined);
      this.denied(new AccessDeniedError(error?.message ?? "the access token was refused", error?.code ?? ErrorCode.InvalidAccessToken));
      return;
    }
    if (code === CloseCode.Forbidden) {
      this.record(code, why, null);
      this.stopped(new ConnectionError("the service or the user no longer exists", code, error?.code ?? null), "disconnected");
      return;
    }
    const retryAfter = code === CloseCode.GoingAway ? this.goodbyeMs : null;
    this.record(code, why, retryAfter);
    if (retryAfter === null) {
      this.emit("connectionError", { terminal: false, message: why, errorCode: error?.code ?? null });
    }
    this.lost(retryAfter);
  }

  /** Requests in flight go back to the queue, and the client reconnects. */
  private lost(retryAfterMs: number | null): void {
    const inFlight = [...this.pending.entries()].sort(([a], [b]) => a - b).map(([, r]) => r);
    this.pending.clear();
    this.queued = [...inFlight, ...this.queued];
    this.setState("connecting");
    void this.reconnect(retryAfterMs ?? delayMs(this.policy, 0));
  }

  private async reconnect(firstDelayMs: number): Promise<void> {
    if (this.reconnecting) {
      this.waiting?.wake();
      return;
    }
    this.reconnecting = true;
    try {
      let attempt = 0;
      let delay = firstDelayMs;
      for (;;) {
        this.waiting = wait(delay);
        await this.waiting.promise;
        this.waiting = null;
        if (this.closing !== null || this.state === "denied") return;
        let connection: Connection;
        try {
          connection = await this.open();
        } catch (error) {
          if (this.closing !== null) return;
          if (error instanceof AccessDeniedError) {
            this.record(CloseCode.Unauthorized, `error ${error.code}: ${error.message}`, null);
            this.denied(error);
            return;
          }
          attempt += 1;
          const message = error instanceof Error ? error.message : String(error);
          if (attempt >= this.policy.maxAttempts) {
            this.stopped(new ConnectionError(`gave up reconnecting: ${message}`), "disconnected");
            return;
          }
          delay = delayMs(this.policy, attempt);
          continue;
        }
        if (this.closing !== null) {
          connection.abandon();
          return;
        }
        this.begin(connection);
        return;
      }
    } finally {
      this.reconnecting = false;
    }
  }

  /** The token was refused: every request but token updates fails; `denied` until `updateToken`. */
  private denied(error: AccessDeniedError): void {
    const tokens = [...this.pending.values(), ...this.queued].filter((r) => r.token !== undefined);
    for (const request of [...this.pending.values(), ...this.queued]) {
      if (request.token === undefined) {
        clearTimeout(request.timer);
        request.fail(error);
      }
    }
    this.pending.clear();
    this.queued = tokens;
    this.setState("denied");
    this.emit("connectionError", { terminal: true, message: error.message, errorCode: error.code });
    if (tokens.length > 0) {
      // An update_token in flight when the old token was refused: reconnect with it.
      this.token = tokens[tokens.length - 1]?.token ?? this.token;
      this.setState("connecting");
      void this.reconnect(0);
    }
  }

  /** The client will not reconnect: every request fails with `error`. */
  private stopped(error: ReachError, state: ConnectionState): void {
    this.failAll(error);
    this.stopHeartbeat();
    this.setState(state);
    this.emit("connectionError", { terminal: true, message: error.message, errorCode: error.code });
    if (state === "disconnected") this.detachWindow();
  }

  private async close(): Promise<void> {
    this.setState("disconnecting");
    this.detachWindow();
    this.waiting?.wake();
    const connection = this.connection;
    this.stopHeartbeat();
    if (connection !== null) {
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, CLOSE_WAIT_MS);
        connection.attach({
          frame: () => {},
          closed: () => {
            clearTimeout(timer);
            resolve();
          },
        });
        if (!connection.send({ type: "bye" })) {
          clearTimeout(timer);
          resolve();
        }
      });
      connection.abandon();
      this.record(CloseCode.Normal, "closed by the client", null);
    }
    this.connection = null;
    this.failAll(new ClientShutdownError("the client was shut down"));
    this.setState("disconnected");
  }

  // -------------------------------------------------------------------------------------
  // Heartbeats and the browser's own signals

  private startHeartbeat(intervalMs: number): void {
    this.stopHeartbeat();
    const interval = Math.max(100, intervalMs);
    this.heartbeat = setInterval(() => this.beat(interval), interval);
  }

  /** Pings the gateway; a gateway silent for too long counts as gone. */
  private beat(intervalMs: number): void {
    const connection = this.connection;
    if (connection === null) return;
    if (Date.now() - this.lastHeard >= intervalMs * DEAD_AFTER_INTERVALS) {
      const why = `nothing heard from the gateway for ${Math.round(intervalMs * DEAD_AFTER_INTERVALS)} ms`;
      this.dropConnection();
      this.record(null, why, null);
      this.emit("connectionError", { terminal: false, message: why, errorCode: null });
      this.lost(null);
      return;
    }
    this.heartbeatId = this.id();
    connection.send({ type: "ping", id: this.heartbeatId });
  }

  private stopHeartbeat(): void {
    if (this.heartbeat !== null) clearInterval(this.heartbeat);
    this.heartbeat = null;
    this.heartbeatId = null;
  }

  private dropConnection(): void {
    this.stopHeartbeat();
    this.connection?.abandon();
    this.connection = null;
    this.resubscribing.clear();
  }

  /**
   * In a browser: coming back online, or a tab coming back to the foreground, reconnects at
   * once instead of waiting out the backoff (and checks a live connection with a ping).
   * Returns the function that stops listening.
   */
  private watchWindow(): () => void {
    const target = globalThis as {
      addEventListener?: (event: string, listener: () => void) => void;
      removeEventListener?: (event: string, listener: () => void) => void;
      document?: { visibilityState?: string };
    };
    if (typeof target.addEventListener !== "function" || typeof target.removeEventListener !== "function") {
      return () => {};
    }
    const now = () => {
      if (target.document?.visibilityState === "hidden") return;
      if (this.waiting !== null) {
        this.waiting.wake();
      } else if (this.connection !== null) {
        this.heartbeatId = this.id();
        this.connection.send({ type: "ping", id: this.heartbeatId });
      }
    };
    target.addEventListener("online", now);
    target.addEventListener("visibilitychange", now);
    let attached = true;
    return () => {
      if (!attached) return;
      attached = false;
      target.removeEventListener?.("online", now);
      target.removeEventListener?.("visibilitychange", now);
    };
  }

  // -------------------------------------------------------------------------------------
  // Requests

  private id(): number {
    this.nextId += 1;
    return this.nextId;
  }

  private request<T>(frame: (id: number) => ClientFrame, answer: (frame: ServerFrame) => T, token?: string): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      if (this.closing !== null) {
        reject(new ClientShutdownError("the client was shut down"));
        return;
      }
      if (this.state === "disconnected") {
        reject(new ConnectionError("the client is disconnected"));
        return;
      }
      if (this.state === "denied" && token === undefined) {
        reject(new AccessDeniedError("the access token was refused: hand a new one to updateToken", this.lastError?.code ?? null));
        return;
      }
      const request: Request = {
        frame,
        answer: (reply) => {
          try {
            resolve(answer(reply));
          } catch (error) {
            reject(error);
          }
        },
        fail: reject,
        timer: setTimeout(() => {
          this.queued = this.queued.filter((r) => r !== request);
          if (request.id !== undefined) this.pending.delete(request.id);
          reject(new RequestTimeoutError(`no answer within ${this.requestTimeoutMs} ms`));
        }, this.requestTimeoutMs),
      };
      if (token !== undefined) request.token = token;
      if (this.connection !== null && this.state === "connected") {
        this.send(request);
      } else {
        this.queued.push(request);
      }
    });
  }

  private send(request: Request): void {
    const id = this.id();
    request.id = id;
    this.pending.set(id, request);
    this.connection?.send(request.frame(id));
  }

  private answer(id: number, frame: ServerFrame): void {
    const request = this.pending.get(id);
    if (request === undefined) return;
    this.pending.delete(id);
    clearTimeout(request.timer);
    request.answer(frame);
  }

  private failAll(error: ReachError): void {
    for (const request of [...this.pending.values(), ...this.queued]) {
      clearTimeout(request.timer);
      request.fail(error);
    }
    this.pending.clear();
    this.queued = [];
  }

  private unexpected(request: string, frame: ServerFrame): ReachError {
    return new ReachError(`unexpected ${frame.type} in answer to ${request}`);
  }

  // -------------------------------------------------------------------------------------
  // State and events

  private presenceState(): PresenceState {
    if (this.presence === null) throw new ReachError("the client is not initialized yet");
    return this.presence;
  }

  private setState(state: ConnectionState): void {
    if (this.state === state) return;
    this.state = state;
    this.emit("connectionStateChanged", state);
  }

  private record(code: number | null, reason: string, retryAfterMs: number | null): void {
    this.last = { code, reason, retryAfterMs, at: Date.now() };
  }

  private emitAll(events: PresenceEvent[]): void {
    for (const event of events) {
      switch (event.kind) {
        case "userSubscribed":
          this.emit("userSubscribed", event.user);
          break;
        case "userUnsubscribed":
          this.emit("userUnsubscribed", event.user);
          break;
        case "userUpdated":
          event.user._emitUpdated(event.updateReasons);
          this.emit("userUpdated", { user: event.user, updateReasons: event.updateReasons });
          break;
      }
    }
  }
}
