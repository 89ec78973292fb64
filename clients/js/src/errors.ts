/**
 * Errors of the client. Every one is a {@link ReachError}; `code` is the protocol's error
 * code (docs/protocol.md, "Error codes") when the gateway gave one.
 */

/** An error of the Reach client; `code` is the protocol's error code, if any. */
export class ReachError extends Error {
  /** The protocol's error code (e.g. 20404), or `null`. */
  readonly code: number | null;

  constructor(message: string, code: number | null = null) {
    super(message);
    this.name = new.target.name;
    this.code = code;
  }
}

/** The gateway refused the access token (close 4001): the client stays `denied`. */
export class AccessDeniedError extends ReachError {}

/** A request got no answer within the request timeout. */
export class RequestTimeoutError extends ReachError {}

/**
 * The connection could not be opened, or was lost for good (the service or user was
 * deleted, reconnecting was given up). `closeCode` is the WebSocket close code, if any.
 */
export class ConnectionError extends ReachError {
  readonly closeCode: number | null;

  constructor(message: string, closeCode: number | null = null, code: number | null = null) {
    super(message, code);
    this.closeCode = closeCode;
  }
}

/** The client was shut down before the request was answered. */
export class ClientShutdownError extends ReachError {}
