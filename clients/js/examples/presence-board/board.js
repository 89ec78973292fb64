// The presence board: one page, the built module (dist/reach.js), no framework. The gateway
// URL, the token and the watched identities come from the form or from the URL fragment:
//   index.html#url=ws://127.0.0.1:8080/v1/ws&token=<jwt>&watch=alice,bob
// The client reconnects by itself; the board only draws what it reports.

import { Client } from "../../dist/reach.js";

const $ = (selector) => document.querySelector(selector);
const form = $("#connect");
const state = $("#state");
const message = $("#message");

let client = null;
/** identity -> the last update reasons shown for it. */
const reasons = new Map();

function fragment() {
  return new URLSearchParams(location.hash.slice(1));
}

function saveWatched() {
  const params = fragment();
  const watched = client === null ? [] : [...document.querySelectorAll("#users [data-identity]")].map((li) => li.dataset.identity);
  if (watched.length > 0) params.set("watch", watched.join(","));
  else params.delete("watch");
  history.replaceState(null, "", `#${params}`);
}

function flag(value) {
  return value === null ? "unknown" : value ? "online" : "offline";
}

/** One user's row: dot, name and identity, notifiable badge, last reasons. */
function row(user, removable) {
  const li = document.createElement("li");
  li.className = "user";
  li.dataset.identity = user.identity;
  const dot = document.createElement("span");
  dot.className = "dot";
  dot.dataset.state = flag(user.isOnline);
  dot.title = dot.dataset.state;
  const who = document.createElement("div");
  who.innerHTML = `<div class="name"></div><div class="identity"></div><div class="reasons"></div>`;
  who.querySelector(".name").textContent = user.friendlyName ?? user.identity;
  who.querySelector(".identity").textContent = `${user.identity} · ${dot.dataset.state}`;
  const last = reasons.get(user.identity);
  who.querySelector(".reasons").textContent = last ? `last update: ${last.join(", ")}` : "";
  const badge = document.createElement("span");
  badge.className = "badge";
  badge.dataset.notifiable = String(user.isNotifiable);
  badge.textContent =
    user.isNotifiable === null ? "push: unknown" : user.isNotifiable ? "push: notifiable" : "push: not notifiable";
  li.append(dot, who, badge);
  if (removable) {
    const remove = document.createElement("button");
    remove.className = "remove";
    remove.title = `stop watching ${user.identity}`;
    remove.textContent = "✕";
    remove.addEventListener("click", async () => {
      await user.unsubscribe().catch((e) => show(e));
    });
    li.append(remove);
  } else {
    li.append(document.createElement("span"));
  }
  return li;
}

async function draw() {
  if (client === null) return;
  let own;
  try {
    own = client.user;
  } catch {
    return;
  }
  $("#me").hidden = false;
  $("#watching").hidden = false;
  $("#own").replaceChildren(row(own, false));
  const users = await client.getSubscribedUsers();
  users.sort((a, b) => a.identity.localeCompare(b.identity));
  $("#users").replaceChildren(...users.map((u) => row(u, true)));
  saveWatched();
}

function show(error) {
  message.textContent = error ? `${error.message}${error.code ? ` (error ${error.code})` : ""}` : "";
}

function setState(value) {
  state.textContent = value;
  state.dataset.state = value;
  $("#disconnect").disabled = client === null || value === "disconnected";
}

async function watch(identity) {
  try {
    await client.getUser(identity.trim());
    show(null);
  } catch (error) {
    show(error);
  }
  await draw();
}

async function connect(url, token, encoding, watched) {
  if (client !== null) await client.shutdown();
  reasons.clear();
  show(null);
  client = new Client(token, { url, encoding });
  setState(client.connectionState);
  client.on("connectionStateChanged", (s) => {
    setState(s);
    void draw();
  });
  client.on("connectionError", ({ message: text, errorCode, terminal }) => {
    message.textContent = `${terminal ? "" : "reconnecting: "}${text}${errorCode ? ` (error ${errorCode})` : ""}`;
  });
  client.on("userUpdated", ({ user, updateReasons }) => {
    reasons.set(user.identity, updateReasons);
    void draw();
  });
  client.on("userSubscribed", () => void draw());
  client.on("userUnsubscribed", () => void draw());
  client.on("reachabilityEnabledChanged", () => void draw());
  client.on("initFailed", ({ error }) => show(error));
  client.on("initialized", async () => {
    for (const identity of watched) await watch(identity);
    await draw();
  });
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  const data = new FormData(form);
  const params = fragment();
  params.set("url", data.get("url"));
  params.set("token", data.get("token"));
  history.replaceState(null, "", `#${params}`);
  void connect(data.get("url"), data.get("token"), data.get("encoding"), (params.get("watch") ?? "").split(",").filter(Boolean));
});

$("#disconnect").addEventListener("click", async () => {
  await client?.shutdown();
});

$("#add").addEventListener("submit", async (event) => {
  event.preventDefault();
  const input = event.target.elements.identity;
  const identity = input.value;
  input.value = "";
  if (client !== null && identity.trim()) await watch(identity);
});

// Filled from the fragment: connect at once.
const initial = fragment();
if (initial.get("url")) form.elements.url.value = initial.get("url");
if (initial.get("encoding")) form.elements.encoding.value = initial.get("encoding");
if (initial.get("token")) {
  form.elements.token.value = initial.get("token");
  form.requestSubmit();
}
