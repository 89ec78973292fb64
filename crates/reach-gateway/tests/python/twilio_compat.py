"""The official Twilio helper library against reachd, with only the base URL changed.

Run by tests/cli.rs with REACH_BASE, REACH_ACCOUNT_SID, REACH_AUTH_TOKEN, REACH_KEY_SID and
REACH_KEY_SECRET set (test fixture credentials). Prints OK when every check passed.

Also the service's webhook, configured through the library, and a receiver that checks each
request with the library's RequestValidator, as a backend would.
"""

import asyncio
import json
import os
import queue
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import websockets
from twilio.http.http_client import TwilioHttpClient
from twilio.jwt.access_token import AccessToken
from twilio.jwt.access_token.grants import ChatGrant
from twilio.request_validator import RequestValidator
from twilio.rest import Client

BASE = os.environ["REACH_BASE"]
ACCOUNT = os.environ["REACH_ACCOUNT_SID"]


class ReachHttpClient(TwilioHttpClient):
    """Sends the helper library's requests to reachd instead of the hosted API."""

    def request(self, method, url, *args, **kwargs):
        url = url.replace("https://conversations.twilio.com", BASE)
        return super().request(method, url, *args, **kwargs)


client = Client(ACCOUNT, os.environ["REACH_AUTH_TOKEN"], http_client=ReachHttpClient())
conv = client.conversations.v1

service = conv.services.create(friendly_name="helper library")
assert service.sid.startswith("IS"), service.sid
assert service.friendly_name == "helper library"
cfg = conv.services(service.sid).configuration().update(reachability_enabled=True)
assert cfg.reachability_enabled is True
users = conv.services(service.sid).users
for i in range(7):
    users.create(identity=f"user{i}", friendly_name=f"User {i}", attributes=json.dumps({"n": i}))
listed = users.list(page_size=3)
assert [u.identity for u in listed] == [f"user{i}" for i in range(7)], listed
alice = users.create(identity="alice")
fetched = users("alice").fetch()
assert fetched.sid == alice.sid and fetched.is_online is None and fetched.is_notifiable is None
updated = users(alice.sid).update(friendly_name="Alice")
assert updated.friendly_name == "Alice"

# A token minted by the helper library opens a socket.
token = AccessToken(ACCOUNT, os.environ["REACH_KEY_SID"], os.environ["REACH_KEY_SECRET"], identity="alice", ttl=600)
token.add_grant(ChatGrant(service_sid=service.sid))
jwt = token.to_jwt()


def token_of(identity):
    token = AccessToken(
        ACCOUNT, os.environ["REACH_KEY_SID"], os.environ["REACH_KEY_SECRET"], identity=identity, ttl=600
    )
    token.add_grant(ChatGrant(service_sid=service.sid))
    return token.to_jwt()


async def hello(identity="alice", jwt=jwt):
    url = BASE.replace("http://", "ws://") + "/v1/ws"
    async with websockets.connect(url, subprotocols=["reach.v1.json"]) as ws:
        await ws.send(json.dumps({"type": "hello", "token": jwt}))
        welcome = json.loads(await ws.recv())
        assert welcome["type"] == "welcome", welcome
        assert welcome["identity"] == identity and welcome["user"]["is_online"] is True, welcome
        # While connected, REST through the helper library reports the user online.
        assert users(identity).fetch().is_online is True
        await ws.send(json.dumps({"type": "bye"}))


asyncio.run(hello())
assert users("alice").fetch().is_online is False

# The webhook: a receiver that validates every request with the library's RequestValidator.
AUTH_TOKEN = os.environ["REACH_AUTH_TOKEN"]
received = queue.Queue()


class Receiver(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
        params = dict(urllib.parse.parse_qsl(body, keep_blank_values=True))
        url = f"http://{self.headers['Host']}{self.path}"
        signature = self.headers.get("X-Twilio-Signature", "")
        valid = RequestValidator(AUTH_TOKEN).validate(url, params, signature)
        forged = RequestValidator("not-the-auth-token").validate(url, params, signature)
        token = self.headers.get("I-Twilio-Idempotency-Token")
        received.put((valid and not forged, params, token))
        self.send_response(200 if valid else 403)
        self.end_headers()

    def log_message(self, *args):
        pass


receiver = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
threading.Thread(target=receiver.serve_forever, daemon=True).start()
hook_url = f"http://127.0.0.1:{receiver.server_port}/reach/hook"
webhooks = conv.services(service.sid).configuration.webhooks()
hook = webhooks.update(
    post_webhook_url=hook_url,
    filters=["onUserAdded", "onUserUpdated", "onUserRemoved"],
    method="POST",
)
assert hook.post_webhook_url == hook_url, hook.post_webhook_url
assert hook.filters == ["onUserAdded", "onUserUpdated", "onUserRemoved"], hook.filters
assert hook.method == "POST" and hook.chat_service_sid == service.sid
assert webhooks.fetch().post_webhook_url == hook_url
assert conv.services(service.sid).configuration().fetch().links["webhooks"].endswith(
    f"/v1/Services/{service.sid}/Configuration/Webhooks"
)


def next_event():
    """The next event, but alice's: her presence changes just before the webhook was set may
    still be recorded after it (they are written in batches, 50 ms apart)."""
    while True:
        valid, params, token = received.get(timeout=20)
        assert valid, f"signature refused: {params}"
        assert token and token.startswith("EV"), token
        if params["Identity"] != "alice":
            return params


# REST writes fire with X-Twilio-Webhook-Enabled: true, as in the hosted API.
users.create(identity="quiet")
users.create(identity="hooked", friendly_name="Hooked", x_twilio_webhook_enabled="true")
added = next_event()
assert (added["EventType"], added["Identity"], added["Source"]) == ("onUserAdded", "hooked", "API"), added
assert added["FriendlyName"] == "Hooked" and added["IsOnline"] == "", added
users("hooked").update(attributes=json.dumps({"x": 1}), x_twilio_webhook_enabled="true")
updated = next_event()
assert (updated["EventType"], updated["UpdateReasons"]) == ("onUserUpdated", "attributes"), updated

# A first hello creates carol (SDK); presence from her socket: online, then offline at bye.
asyncio.run(hello("carol", token_of("carol")))
created = next_event()
assert (created["EventType"], created["Identity"], created["Source"]) == ("onUserAdded", "carol", "SDK")
online = next_event()
assert (online["Identity"], online["IsOnline"], online["Source"]) == ("carol", "true", "SDK"), online
offline = next_event()
assert (offline["IsOnline"], offline["UpdateReasons"]) == ("false", "reachabilityOnline"), offline
assert offline["DateLastSeen"], offline
# (twilio 9.13's generated UserContext.delete drops its x_twilio_webhook_enabled header, so
# the delete goes through the client's own request method, with the header.)
response = client.request(
    "DELETE",
    f"https://conversations.twilio.com/v1/Services/{service.sid}/Users/hooked",
    headers={"X-Twilio-Webhook-Enabled": "true"},
)
assert response.status_code == 204, response.status_code
removed = next_event()
assert (removed["EventType"], removed["Identity"]) == ("onUserRemoved", "hooked"), removed
while not received.empty():
    assert received.get()[1]["Identity"] == "alice"

users("user0").delete()
conv.services(service.sid).delete()
receiver.shutdown()
print("OK")
