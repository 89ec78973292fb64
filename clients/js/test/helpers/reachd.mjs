// Test fixture: starts the real `reachd` binary on free ports with a temporary SQLite file and
// short timings, and talks to it over real sockets (REST with fetch, WebSocket with `ws`).
// The binary is $REACHD, else ../../target/debug/reachd (built by `cargo build` or `cargo test`).

import { spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import { existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));

// Test fixture credentials, not secrets: they exist only in these tests.
export const ACCOUNT_SID = "AC33333333333333333333333333333333";
export const AUTH_TOKEN = "js-test-fixture-auth-token";
export const KEY_SID = "SK33333333333333333333333333333333";
export const KEY_SECRET = "js-test-fixture-key-secret";

/** The reachd binary the tests run; throws a clear message when it is missing. */
export function reachdBinary() {
  const path = process.env.REACHD ?? resolve(here, "../../../../target/debug/reachd");
  if (!existsSync(path)) {
    throw new Error(
      `reachd not found at ${path}: build it first (cargo build -p reach-gateway) or set REACHD`,
    );
  }
  return path;
}

/** A free TCP port on 127.0.0.1 (so that a restarted reachd can listen on the same one). */
export function freePort() {
  return new Promise((resolvePort, reject) => {
    const server = createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolvePort(port));
    });
  });
}

function config({ dir, port, admin, extra }) {
  return `
[server]
listen = "127.0.0.1:${port}"
admin_listen = "127.0.0.1:${admin}"
drain_grace_ms = 2000
drain_retry_max_ms = 1500

[storage]
sqlite_path = "${join(dir, "reach.db")}"

[presence]
heartbeat_interval_ms = 400
heartbeat_timeout_ms = 2000
offline_grace_ms = 300
token_warning_s = 2

[log]
format = "json"
filter = "warn,reachd=info"

[[accounts]]
sid = "${ACCOUNT_SID}"
auth_token = "${AUTH_TOKEN}"

[[api_keys]]
sid = "${KEY_SID}"
secret = "${KEY_SECRET}"
account_sid = "${ACCOUNT_SID}"
${extra}
`;
}

/** A running reachd; `start()` it, `stop()` it (SIGTERM, drains), `kill()` it (SIGKILL). */
export class Reachd {
  static async start(extra = "") {
    const dir = mkdtempSync(join(tmpdir(), "reach-js-test-"));
    const r = new Reachd(dir, await freePort(), await freePort(), extra);
    await r.spawn();
    return r;
  }

  constructor(dir, port, admin, extra) {
    this.dir = dir;
    this.port = port;
    this.admin = admin;
    this.extra = extra;
    this.child = null;
  }

  get wsUrl() {
    return `ws://127.0.0.1:${this.port}/v1/ws`;
  }

  get httpUrl() {
    return `http://127.0.0.1:${this.port}`;
  }

  /** Starts (or restarts, on the same ports and data) the process; resolves when ready. */
  async spawn() {
    const path = join(this.dir, "reachd.toml");
    writeFileSync(path, config(this));
    const env = { ...process.env };
    delete env.RUST_LOG;
    const child = spawn(reachdBinary(), ["--config", path], { stdio: ["ignore", "ignore", "pipe"], env });
    this.child = child;
    this.exited = new Promise((done) => child.once("exit", done));
    await new Promise((ready, fail) => {
      let buffer = "";
      const timer = setTimeout(() => fail(new Error("reachd did not become ready in 20 s")), 20_000);
      child.once("exit", (code) => {
        clearTimeout(timer);
        fail(new Error(`reachd exited with ${code} before it was ready`));
      });
      child.stderr.on("data", (chunk) => {
        buffer += chunk;
        if (process.env.REACH_TEST_LOGS) process.stderr.write(`reachd: ${chunk}`);
        if (buffer.includes('"reachd ready"')) {
          clearTimeout(timer);
          ready();
        }
      });
    });
  }

  /** SIGTERM: reachd drains (goodbye, close 1001) and exits. */
  async stop() {
    if (this.child === null) return;
    this.child.kill("SIGTERM");
    await this.exited;
    this.child = null;
  }

  /** SIGKILL: the process vanishes without closing anything. */
  async kill() {
    if (this.child === null) return;
    this.child.kill("SIGKILL");
    await this.exited;
    this.child = null;
  }

  async dispose() {
    await this.kill();
    rmSync(this.dir, { recursive: true, force: true });
  }

  /** A REST call with the fixture account; resolves with `{ status, body }`. */
  async rest(method, path, form) {
    const init = {
      method,
      headers: { Authorization: `Basic ${Buffer.from(`${ACCOUNT_SID}:${AUTH_TOKEN}`).toString("base64")}` },
    };
    if (form !== undefined) {
      init.headers["Content-Type"] = "application/x-www-form-urlencoded";
      init.body = new URLSearchParams(form).toString();
    }
    const response = await fetch(`${this.httpUrl}/v1${path}`, init);
    const text = await response.text();
    return { status: response.status, body: text ? JSON.parse(text) : null };
  }

  /** Creates a service with reachability enabled; resolves with its SID. */
  async service({ reachability = true } = {}) {
    const { status, body } = await this.rest("POST", "/Services", { FriendlyName: "js tests" });
    if (status !== 201) throw new Error(`create service: ${status} ${JSON.stringify(body)}`);
    if (reachability) await this.setReachability(body.sid, true);
    return body.sid;
  }

  async setReachability(service, enabled) {
    const { status } = await this.rest("POST", `/Services/${service}/Configuration`, {
      ReachabilityEnabled: String(enabled),
    });
    if (status !== 200) throw new Error(`configuration: ${status}`);
  }

  async createUser(service, identity, extra = {}) {
    const { status, body } = await this.rest("POST", `/Services/${service}/Users`, { Identity: identity, ...extra });
    if (status !== 201) throw new Error(`create user: ${status} ${JSON.stringify(body)}`);
    return body;
  }
}

function base64url(value) {
  return Buffer.from(value).toString("base64url");
}

/** An access token in the helper libraries' format, signed with the fixture key. */
export function mintToken(service, identity, { ttl = 3600, secret = KEY_SECRET } = {}) {
  const now = Math.floor(Date.now() / 1000);
  const header = base64url(JSON.stringify({ typ: "JWT", alg: "HS256", cty: "twilio-fpa;v=1" }));
  const claims = base64url(
    JSON.stringify({
      jti: `${KEY_SID}-${now}`,
      iss: KEY_SID,
      sub: ACCOUNT_SID,
      exp: now + ttl,
      grants: { identity, chat: { service_sid: service } },
    }),
  );
  const signature = createHmac("sha256", secret).update(`${header}.${claims}`).digest("base64url");
  return `${header}.${claims}.${signature}`;
}

/** Resolves with the next `event` of `emitter` that `accept`s, or rejects after `ms`. */
export function next(emitter, event, accept = () => true, ms = 10_000) {
  return new Promise((resolveEvent, reject) => {
    const timer = setTimeout(() => {
      emitter.off(event, listener);
      reject(new Error(`no ${event} within ${ms} ms`));
    }, ms);
    const listener = (payload) => {
      if (!accept(payload)) return;
      clearTimeout(timer);
      emitter.off(event, listener);
      resolveEvent(payload);
    };
    emitter.on(event, listener);
  });
}

/** Waits until `condition()` holds, polling every 20 ms, at most `ms`. */
export async function until(condition, what, ms = 10_000) {
  const deadline = Date.now() + ms;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** Collects every event of the given names, in order, as `[name, payload]`. */
export function record(emitter, names) {
  const seen = [];
  for (const name of names) emitter.on(name, (payload) => seen.push([name, payload]));
  return seen;
}
