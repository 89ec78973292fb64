// The state logic without a socket: which frames become which events (only real changes).

import assert from "node:assert/strict";
import { test } from "node:test";

import { PresenceState } from "../../dist/state.js";
import { reasonsBetween } from "../../dist/user.js";

const owner = { unsubscribeUser: async () => {} };

function user(identity, online, extra = {}) {
  return { identity, friendly_name: null, attributes: "{}", is_online: online, is_notifiable: null, ...extra };
}

function summary(events) {
  return events.map((e) => [e.kind, e.user.identity, ...(e.updateReasons ?? [])]);
}

test("reasons are listed in the protocol's order", () => {
  const before = user("a", false);
  const after = user("a", true, { friendly_name: "A", attributes: '{"x":1}', is_notifiable: true });
  assert.deepEqual(reasonsBetween(before, after), [
    "friendlyName",
    "attributes",
    "reachabilityOnline",
    "reachabilityNotifiable",
  ]);
  assert.deepEqual(reasonsBetween(before, user("a", false)), []);
});

test("last seen is a Date, null with isOnline, and alone it is no update", () => {
  const state = new PresenceState(user("me", true), owner);
  const { users } = state.subscribe([user("alice", true, { last_seen_at: 1_795_639_384 })]);
  assert.equal(users[0].lastSeenAt.getTime(), 1_795_639_384_000);
  // The same state, seen later: the time moves, nothing is reported.
  assert.deepEqual(state.subscribe([user("alice", true, { last_seen_at: 1_795_639_400 })]).events, []);
  assert.equal(users[0].lastSeenAt.getTime(), 1_795_639_400_000);
  assert.equal(state.subscribe([user("bob", null)]).users[0].lastSeenAt, null, "absent: null");
  state.reachabilityDisabled();
  assert.equal(users[0].lastSeenAt, null, "disabled: null, as isOnline");
});

test("a reply that repeats a user's state reports nothing", () => {
  const state = new PresenceState(user("me", true), owner);
  const first = state.subscribe([user("alice", true)]);
  assert.deepEqual(summary(first.events), [["userSubscribed", "alice"]]);
  assert.equal(first.users[0].isOnline, true);
  assert.deepEqual(state.subscribe([user("alice", true)]).events, []);
  const renamed = state.subscribe([user("alice", true, { friendly_name: "Alice" })]);
  assert.deepEqual(summary(renamed.events), [["userUpdated", "alice", "friendlyName"]]);
  assert.equal(renamed.users[0], first.users[0], "the same object for the same identity");
});

test("the resubscription reports only what changed while away", () => {
  const state = new PresenceState(user("me", true), owner);
  const { users } = state.subscribe([user("alice", true), user("bob", true), user("carol", null)]);
  const events = state.resubscribe(
    [user("alice", true), user("bob", false)],
    [{ identity: "carol", code: 20404, message: "gone" }],
  );
  assert.deepEqual(summary(events), [
    ["userUpdated", "bob", "reachabilityOnline"],
    ["userUnsubscribed", "carol"],
  ]);
  assert.equal(users[1].isOnline, false);
  assert.equal(users[2].isSubscribed, false);
  state.subscribe([user("carol", true)]);
  assert.equal(users[2].isSubscribed, true, "a new subscribe revives the same object");
  assert.equal(users[2].isOnline, true);
});

test("a push without reasons reports what changed, and one for nobody is dropped", () => {
  const state = new PresenceState(user("me", true), owner);
  state.subscribe([user("alice", false)]);
  assert.deepEqual(summary(state.update(user("alice", true), [])), [["userUpdated", "alice", "reachabilityOnline"]]);
  assert.deepEqual(state.update(user("alice", true), []), []);
  assert.deepEqual(state.update(user("dave", true), ["reachabilityOnline"]), []);
  state.unsubscribe(["alice"]);
  assert.deepEqual(state.update(user("alice", false), []), []);
  assert.deepEqual(state.unsubscribe(["me"]), [], "the own user stays subscribed");
});

test("disabling reachability nulls every flag, the own user's included", () => {
  const state = new PresenceState(user("me", true), owner);
  state.subscribe([user("alice", false, { is_notifiable: true }), user("bob", null)]);
  assert.deepEqual(summary(state.reachabilityDisabled()), [
    ["userUpdated", "me", "reachabilityOnline"],
    ["userUpdated", "alice", "reachabilityOnline", "reachabilityNotifiable"],
  ]);
  assert.equal(state.get("alice").isNotifiable, null);
});

test("attributes are parsed from their JSON text and follow updates", () => {
  const state = new PresenceState(user("me", true), owner);
  const [alice] = state.subscribe([user("alice", true, { attributes: '{"team":"blue"}' })]).users;
  assert.deepEqual(alice.attributes, { team: "blue" });
  state.update(user("alice", true, { attributes: '{"team":"red"}' }), ["attributes"]);
  assert.deepEqual(alice.attributes, { team: "red" });
  state.update(user("alice", true, { attributes: "not json" }), ["attributes"]);
  assert.deepEqual(alice.attributes, {});
});
