"""The official Twilio helper library against reachd, with only the base URL changed.

Run by tests/cli.rs with REACH_BASE, REACH_ACCOUNT_SID, REACH_AUTH_TOKEN, REACH_KEY_SID and
REACH_KEY_SECRET set (test fixture credentials). Prints OK when every check passed.
"""

import asyncio
import json
import os

import websockets
from twilio.http.http_client import TwilioHttpClient
from twilio.jwt.access_token import AccessToken
from twilio.jwt.access_token.grants import ChatGrant
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


async def hello():
    url = BASE.replace("http://", "ws://") + "/v1/ws"
    async with websockets.connect(url, subprotocols=["reach.v1.json"]) as ws:
        await ws.send(json.dumps({"type": "hello", "token": jwt}))
        welcome = json.loads(await ws.recv())
        assert welcome["type"] == "welcome", welcome
        assert welcome["identity"] == "alice" and welcome["user"]["is_online"] is True, welcome
        # While connected, REST through the helper library reports her online.
        assert users("alice").fetch().is_online is True
        await ws.send(json.dumps({"type": "bye"}))


asyncio.run(hello())
assert users("alice").fetch().is_online is False
users("user0").delete()
conv.services(service.sid).delete()
print("OK")
