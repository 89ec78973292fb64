// The small parts: backoff, codec, emitter.

import assert from "node:assert/strict";
import { test } from "node:test";

import { encode } from "@msgpack/msgpack";

import { ceilingMs, delayMs, reconnectPolicy } from "../../dist/backoff.js";
import { decodeFrame, encodeFrame } from "../../dist/codec.js";
import { Emitter } from "../../dist/emitter.js";

test("backoff ceilings double up to the cap and delays use the whole range", () => {
  const p = reconnectPolicy({ minDelayMs: 100, maxDelayMs: 1000 });
  assert.deepEqual([0, 1, 2, 3, 4, 10].map((a) => ceilingMs(p, a)), [100, 200, 400, 800, 1000, 1000]);
  assert.equal(delayMs(p, 3, () => 0), 0);
  assert.equal(delayMs(p, 3, () => 0.999999), 800);
  assert.equal(reconnectPolicy().maxAttempts, Infinity);
  assert.equal(reconnectPolicy({ minDelayMs: 5000, maxDelayMs: 10 }).maxDelayMs, 5000);
});

test("frames round-trip in both encodings, the message kind choosing the codec", () => {
  const hello = { type: "hello", token: "t", client: undefined };
  assert.equal(encodeFrame(hello, "json"), '{"type":"hello","token":"t"}');
  const packed = encodeFrame({ type: "ping", id: 7 }, "msgpack");
  assert.ok(packed instanceof Uint8Array);
  const pong = encode({ type: "pong", id: 7 });
  assert.deepEqual(decodeFrame(pong.buffer.slice(pong.byteOffset, pong.byteOffset + pong.byteLength)), { type: "pong", id: 7 });
  assert.deepEqual(decodeFrame(Buffer.from(pong)), { type: "pong", id: 7 });
  assert.deepEqual(decodeFrame('{"type":"pong","id":1}'), { type: "pong", id: 1 });
  assert.throws(() => decodeFrame("[1,2]"));
  assert.throws(() => decodeFrame("{not json"));
  assert.throws(() => decodeFrame(42));
});

test("the emitter calls listeners in order, a once listener once, and off removes", () => {
  class E extends Emitter {
    fire(v) {
      this.emit("x", v);
    }
  }
  const e = new E();
  const seen = [];
  const a = (v) => seen.push(`a${v}`);
  e.on("x", a);
  e.once("x", (v) => seen.push(`b${v}`));
  e.on("x", (v) => seen.push(`c${v}`));
  e.fire(1);
  e.fire(2);
  e.off("x", a);
  e.fire(3);
  assert.deepEqual(seen, ["a1", "b1", "c1", "a2", "c2", "c3"]);
});
