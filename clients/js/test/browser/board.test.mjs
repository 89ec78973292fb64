// The presence board and dist/reach.js in headless Chromium (Debian's package, driven by
// playwright-core; no browser download), against a real reachd: two pages, alice and bob.

import assert from "node:assert/strict";
import { existsSync, mkdirSync } from "node:fs";
import { dirname, join } from "node:path";
import { after, before, test } from "node:test";
import { fileURLToPath } from "node:url";

import { chromium } from "playwright-core";

import { serve } from "../../scripts/serve.mjs";
import { Reachd, mintToken } from "../helpers/reachd.mjs";

const here = dirname(fileURLToPath(import.meta.url));
const results = join(here, "../../test-results");
const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";

let reachd;
let server;
let browser;
let service;

before(async () => {
  if (!existsSync(CHROMIUM)) {
    throw new Error(`Chromium not found at ${CHROMIUM}: install Debian's package (apt-get install chromium) or set CHROMIUM`);
  }
  if (!existsSync(join(here, "../../dist/reach.js"))) {
    throw new Error("dist/reach.js is missing: run `npm run build` first");
  }
  reachd = await Reachd.start();
  service = await reachd.service();
  await reachd.createUser(service, "alice", { FriendlyName: "Alice" });
  server = await serve(0);
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
});

after(async () => {
  await browser?.close();
  server?.close();
  await reachd?.dispose();
});

function boardUrl(token, more = "") {
  const params = new URLSearchParams({ url: reachd.wsUrl, token });
  return `http://127.0.0.1:${server.address().port}/examples/presence-board/#${params}${more}`;
}

/** The state of `identity`'s dot on `page`, once it is `want` (waits for it). */
async function dot(page, identity, want) {
  const selector = `#users [data-identity="${identity}"] .dot[data-state="${want}"]`;
  await page.waitForSelector(selector, { timeout: 10_000 });
  return want;
}

test("bob's board shows alice come online and go offline, live", async () => {
  const bob = await browser.newPage({ viewport: { width: 900, height: 560 } });
  const errors = [];
  bob.on("pageerror", (e) => errors.push(e.message));
  await bob.goto(boardUrl(mintToken(service, "bob"), "&watch=alice"));
  await bob.waitForSelector('#state[data-state="connected"]');
  await bob.waitForSelector('#own [data-identity="bob"] .dot[data-state="online"]');
  assert.equal(await dot(bob, "alice", "unknown"), "unknown", "never online since reachability was enabled");

  const alice = await browser.newPage();
  await alice.goto(boardUrl(mintToken(service, "alice"), "&encoding=msgpack"));
  await alice.waitForSelector('#state[data-state="connected"]');
  assert.equal(await dot(bob, "alice", "online"), "online");
  const reasons = await bob.textContent('#users [data-identity="alice"] .reasons');
  assert.match(reasons, /reachabilityOnline/);

  mkdirSync(results, { recursive: true });
  await bob.screenshot({ path: join(results, "presence-board.png") });

  // A watched user added from the board's own box.
  await bob.fill('#add input[name="identity"]', "bob-too");
  await bob.click('#add button');
  await bob.waitForSelector(".message:has-text('20404')");

  // alice's tab says bye (the Disconnect button): offline at once.
  await alice.click("#disconnect");
  await alice.waitForSelector('#state[data-state="disconnected"]');
  assert.equal(await dot(bob, "alice", "offline"), "offline");

  // alice comes back, then closes her tab without bye: offline after the gateway's grace.
  await alice.close();
  const again = await browser.newPage();
  await again.goto(boardUrl(mintToken(service, "alice")));
  await dot(bob, "alice", "online");
  await again.close();
  await dot(bob, "alice", "offline");
  assert.deepEqual(errors, []);
  await bob.close();
});

test("dist/reach.js is a self-contained module a page imports directly", async () => {
  const page = await browser.newPage();
  await page.goto(`http://127.0.0.1:${server.address().port}/examples/presence-board/`);
  const result = await page.evaluate(
    async ([url, token]) => {
      const { Client, UPDATE_REASONS } = await import("/dist/reach.js");
      const client = await Client.create(token, { url, encoding: "msgpack" });
      const alice = await client.getUser("alice");
      const seen = { identity: client.user.identity, state: client.connectionState, alice: alice.friendlyName, reasons: UPDATE_REASONS };
      await client.shutdown();
      return { ...seen, after: client.connectionState };
    },
    [reachd.wsUrl, mintToken(service, "carol")],
  );
  assert.deepEqual(result, {
    identity: "carol",
    state: "connected",
    alice: "Alice",
    reasons: ["friendlyName", "attributes", "reachabilityOnline", "reachabilityNotifiable"],
    after: "disconnected",
  });
  await page.close();
});

test("a refused token shows on the board as denied, with the gateway's error code", async () => {
  const page = await browser.newPage();
  await page.goto(boardUrl(mintToken(service, "bob", { secret: "wrong" })));
  await page.waitForSelector('#state[data-state="denied"]');
  assert.match(await page.textContent("#message"), /20107/);
  await page.close();
});

test("coming back online or to the foreground reconnects at once, not after the backoff", async () => {
  const page = await browser.newPage();
  await page.goto(`http://127.0.0.1:${server.address().port}/examples/presence-board/`);
  await page.evaluate(
    async ([url, token]) => {
      const { Client } = await import("/dist/reach.js");
      // Every backoff delay at its ceiling: a minute, far longer than the test waits.
      Math.random = () => 0.999999;
      window.reachTest = await Client.create(token, {
        url,
        reconnect: { minDelayMs: 60_000, maxDelayMs: 60_000 },
      });
    },
    [reachd.wsUrl, mintToken(service, "dave")],
  );
  const state = () => page.evaluate(() => window.reachTest.connectionState);
  const waitFor = (want) =>
    page.waitForFunction((s) => window.reachTest.connectionState === s, want, { timeout: 10_000 });
  for (const signal of ["online", "visibilitychange"]) {
    await reachd.kill();
    await waitFor("connecting");
    await reachd.spawn();
    assert.equal(await state(), "connecting", "waiting out a minute of backoff");
    await page.evaluate((name) => {
      if (name === "online") window.dispatchEvent(new Event("online"));
      else document.dispatchEvent(new Event("visibilitychange", { bubbles: true }));
    }, signal);
    await waitFor("connected");
  }
  await page.evaluate(() => window.reachTest.shutdown());
  await page.close();
});
