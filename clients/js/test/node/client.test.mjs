// The client on Node against a real reachd (started per test on free ports, temp data, short
// timings), over real sockets through the `ws` package.

import assert from "node:assert/strict";
import { createServer } from "node:net";
import { after, test } from "node:test";

import WebSocket from "ws";

import { AccessDeniedError, Client, ReachError } from "../../dist/index.js";
import { Reachd, mintToken, next, record, until } from "../helpers/reachd.mjs";

const started = [];
after(async () => {
  for (const { clients, reachd } of started) {
    await Promise.allSettled(clients.map((c) => c.shutdown()));
    await reachd.dispose();
  }
});

/** A reachd with an enabled service; `connect(identity)` opens a client for it. */
async function fixture({ encoding = "json", extra = "" } = {}) {
  const reachd = await Reachd.start(extra);
  const service = await reachd.service();
  const clients = [];
  started.push({ clients, reachd });
  const options = (more = {}) => ({
    url: reachd.wsUrl,
    encoding,
    WebSocket,
    reconnect: { minDelayMs: 50, maxDelayMs: 400 },
    ...more,
  });
  const connect = async (identity, more = {}) => {
    const client = await Client.create(more.token ?? mintToken(service, identity), options(more));
    clients.push(client);
    return client;
  };
  return { reachd, service, connect, options, clients };
}

for (const encoding of ["json", "msgpack"]) {
  test(`subscribe and presence updates with reasons (${encoding})`, async () => {
    const { reachd, service, connect } = await fixture({ encoding });
    await reachd.createUser(service, "alice", { FriendlyName: "Alice", Attributes: '{"team":"blue"}' });
    const bob = await connect("bob");
    assert.equal(bob.connectionState, "connected");
    assert.equal(bob.reachabilityEnabled, true);
    assert.equal(bob.user.identity, "bob");
    assert.equal(bob.user.isOnline, true);
    assert.match(bob.connectionId, /^CN[0-9a-f]{32}$/);

    const alice = await bob.getUser("alice");
    assert.equal(alice.friendlyName, "Alice");
    assert.deepEqual(alice.attributes, { team: "blue" });
    assert.equal(alice.isOnline, null, "never online since reachability was enabled");
    assert.equal(alice.isNotifiable, null);
    assert.equal(alice.lastSeenAt, null, "null as isOnline is");
    assert.equal(alice.isSubscribed, true);
    assert.equal(await bob.getUser("alice"), alice, "the same object again");
    assert.deepEqual(await bob.getSubscribedUsers(), [alice]);

    const online = next(alice, "updated");
    const clientEvent = next(bob, "userUpdated");
    const aliceClient = await connect("alice");
    assert.deepEqual((await online).updateReasons, ["reachabilityOnline"]);
    const { user, updateReasons } = await clientEvent;
    assert.equal(user, alice);
    assert.deepEqual(updateReasons, ["reachabilityOnline"]);
    assert.equal(alice.isOnline, true);
    assert.ok(Math.abs(alice.lastSeenAt.getTime() - Date.now()) < 5000, "online: seen now");

    // bye: offline at once, without the gateway's grace.
    const offline = next(alice, "updated");
    await aliceClient.shutdown();
    assert.equal(aliceClient.connectionState, "disconnected");
    assert.deepEqual((await offline).updateReasons, ["reachabilityOnline"]);
    assert.equal(alice.isOnline, false);
    const left = alice.lastSeenAt;
    assert.ok(left instanceof Date && Math.abs(left.getTime() - Date.now()) < 5000, "when she left");

    await assert.rejects(bob.getUser("nobody"), (e) => e instanceof ReachError && e.code === 20404);
    const gone = next(bob, "userUnsubscribed");
    await alice.unsubscribe();
    assert.equal(await gone, alice);
    assert.equal(alice.isSubscribed, false);
    assert.deepEqual(await bob.getSubscribedUsers(), []);
  });
}

test("the own user's profile and push registration flip isNotifiable for watchers", async () => {
  const { reachd, service, connect } = await fixture({ encoding: "msgpack" });
  const bob = await connect("bob");
  const carol = await connect("carol");
  const bobSeenByCarol = await carol.getUser("bob");
  assert.equal(bobSeenByCarol.isNotifiable, null, "never had a binding");
  const own = record(bob, ["userUpdated"]);
  const watcher = next(bobSeenByCarol, "updated", (e) => e.updateReasons.includes("reachabilityNotifiable"));
  await bob.setPushRegistrationId("fcm", "device-token-1");
  assert.equal(bob.user.isNotifiable, true, "the own update came before the reply");
  assert.deepEqual(own.map(([, e]) => e.updateReasons), [["reachabilityNotifiable"]]);
  await watcher;
  assert.equal(bobSeenByCarol.isNotifiable, true);

  const off = next(bobSeenByCarol, "updated");
  await bob.unsetPushRegistrationId("fcm", "device-token-1");
  await off;
  assert.equal(bobSeenByCarol.isNotifiable, false);
  await assert.rejects(bob.unsetPushRegistrationId("fcm", "device-token-1"), (e) => e.code === 20404);

  const renamed = next(bob.user, "updated");
  const r = await reachd.rest("POST", `/Services/${service}/Users/bob`, { FriendlyName: "Bob" });
  assert.equal(r.status, 200);
  assert.deepEqual((await renamed).updateReasons, ["friendlyName"]);
  assert.equal(bob.user.friendlyName, "Bob");
});

test("disabling reachability nulls the flags; enabling brings online users back", async () => {
  const { reachd, service, connect } = await fixture();
  await connect("alice");
  const bob = await connect("bob");
  const alice = await bob.getUser("alice");
  assert.equal(alice.isOnline, true);
  const off = next(bob, "reachabilityEnabledChanged");
  const nulled = next(alice, "updated");
  await reachd.setReachability(service, false);
  assert.equal(await off, false);
  assert.deepEqual((await nulled).updateReasons, ["reachabilityOnline"]);
  assert.equal(bob.reachabilityEnabled, false);
  assert.equal(alice.isOnline, null);
  assert.equal(bob.user.isOnline, null);

  const on = next(bob, "reachabilityEnabledChanged");
  const back = next(alice, "updated");
  await reachd.setReachability(service, true);
  assert.equal(await on, true);
  await back;
  assert.equal(alice.isOnline, true);
});

test("a token about to expire is replaced with updateToken; one that expires denies", async () => {
  const { service, connect } = await fixture();
  const bob = await connect("bob", { token: mintToken(service, "bob", { ttl: 4 }) });
  const oldExpiry = bob.tokenExpiresAt;
  await next(bob, "tokenAboutToExpire", () => true, 5000);
  await bob.updateToken(mintToken(service, "bob", { ttl: 3600 }));
  assert.ok(bob.tokenExpiresAt > oldExpiry + 3000);
  const expired = record(bob, ["tokenExpired", "connectionStateChanged"]);
  await until(() => Date.now() / 1000 > oldExpiry + 1.5, "the old token's expiry");
  assert.equal(bob.connectionState, "connected");
  assert.deepEqual(expired, []);
  await assert.rejects(bob.updateToken(mintToken(service, "alice")), (e) => e.code === 20403);

  const carol = await connect("carol", { token: mintToken(service, "carol", { ttl: 3 }) });
  const denied = next(carol, "tokenExpired", () => true, 6000);
  const terminal = next(carol, "connectionError");
  await denied;
  assert.equal(carol.connectionState, "denied");
  assert.deepEqual(await terminal, { terminal: true, message: "the access token has expired", errorCode: 20104 });
  await assert.rejects(carol.getUser("bob"), AccessDeniedError);
  await carol.updateToken(mintToken(service, "carol"));
  assert.equal(carol.connectionState, "connected");
  assert.equal((await carol.getUser("bob")).isOnline, true);
});

test("a refused token rejects create and leaves the client denied, without retrying", async () => {
  const { reachd, service, options, clients } = await fixture();
  const bad = mintToken(service, "bob", { secret: "not-the-secret" });
  await assert.rejects(Client.create(bad, options()), (e) => e instanceof AccessDeniedError && e.code === 20107);
  const client = new Client(bad, options());
  clients.push(client);
  const failed = await next(client, "initFailed");
  assert.ok(failed.error instanceof AccessDeniedError);
  assert.equal(client.connectionState, "denied");
  const states = record(client, ["connectionStateChanged"]);
  const metrics = await fetch(`http://127.0.0.1:${reachd.admin}/metrics`).then((r) => r.text());
  const refusals = Number(/reach_auth_failures_total\{reason="signature"\} (\d+)/.exec(metrics)?.[1]);
  assert.equal(refusals, 2, "one attempt per client, no retry loop");
  const initialized = next(client, "initialized");
  await client.updateToken(mintToken(service, "bob"));
  await initialized;
  assert.equal(client.user.identity, "bob");
  assert.deepEqual(states.map(([, s]) => s), ["connecting", "connected"]);
});

test("after kill -9 and a restart the client reconnects and reports only real changes", async () => {
  const { reachd, service, connect } = await fixture({ encoding: "msgpack" });
  await reachd.createUser(service, "carol");
  await connect("alice");
  const bob = await connect("bob");
  const alice = await bob.getUser("alice");
  const carol = await bob.getUser("carol");
  assert.equal(alice.isOnline, true);
  const firstConnection = bob.connectionId;
  const seen = record(bob, ["userUpdated", "userSubscribed", "userUnsubscribed", "connectionStateChanged"]);

  const lost = next(bob, "connectionStateChanged", (s) => s === "connecting");
  await reachd.kill();
  await lost;
  await reachd.spawn();
  await next(bob, "connectionStateChanged", (s) => s === "connected", 15_000);
  assert.notEqual(bob.connectionId, firstConnection);
  const renamed = next(carol, "updated");
  await reachd.rest("POST", `/Services/${service}/Users/carol`, { FriendlyName: "Carol" });
  await renamed;
  await until(() => alice.isOnline === true, "alice back online");
  assert.ok(alice.isSubscribed && carol.isSubscribed);

  const updates = seen.filter(([name]) => name === "userUpdated").map(([, e]) => [e.user.identity, e.updateReasons]);
  assert.ok(
    seen.every(([name]) => name === "userUpdated" || name === "connectionStateChanged"),
    `no (un)subscriptions: ${JSON.stringify(seen.map(([n]) => n))}`,
  );
  assert.deepEqual(updates.filter(([who]) => who === "carol"), [["carol", ["friendlyName"]]]);
  const aliceUpdates = updates.filter(([who]) => who === "alice");
  assert.ok(aliceUpdates.length <= 2, "alice at most offline then online");
  assert.ok(aliceUpdates.every(([, r]) => r.join() === "reachabilityOnline"));
  assert.ok(updates.every(([who]) => who !== "bob"), "nothing about bob's own user");
});

test("a draining gateway's goodbye is honoured: the client comes back after retry_after_ms", async () => {
  const { reachd, connect } = await fixture();
  const bob = await connect("bob");
  const errors = record(bob, ["connectionError"]);
  const stopping = reachd.stop();
  await next(bob, "connectionStateChanged", (s) => s === "connecting");
  await stopping;
  const { code, retryAfterMs, at } = bob.lastDisconnect;
  assert.equal(code, 1001);
  assert.ok(retryAfterMs >= 0 && retryAfterMs <= 1500, `${retryAfterMs}`);
  // Meanwhile a listener on the gateway's port notes when the client tries again.
  const attempts = [];
  const trap = createServer((socket) => {
    attempts.push(Date.now());
    socket.destroy();
  });
  await new Promise((listening) => trap.listen(reachd.port, "127.0.0.1", listening));
  await until(() => attempts.length > 0, "a reconnect attempt", 5000);
  await new Promise((closed) => trap.close(closed));
  assert.ok(attempts[0] >= at + retryAfterMs, `attempt ${attempts[0] - at} ms after the close, retry_after ${retryAfterMs}`);
  await reachd.spawn();
  await next(bob, "connectionStateChanged", (s) => s === "connected", 15_000);
  assert.deepEqual(errors, [], "a drain is not an error");
});

test("a gateway that goes silent is left after the dead-server deadline, and rejoined", async () => {
  const { reachd, connect } = await fixture();
  const bob = await connect("bob");
  const lost = next(bob, "connectionError");
  reachd.child.kill("SIGSTOP");
  try {
    const error = await lost;
    assert.equal(error.terminal, false);
    assert.match(error.message, /nothing heard from the gateway/);
    assert.equal(bob.connectionState, "connecting");
  } finally {
    reachd.child.kill("SIGCONT");
  }
  await next(bob, "connectionStateChanged", (s) => s === "connected", 15_000);
  assert.equal((await bob.getUser("bob")).isOnline, true);
});
