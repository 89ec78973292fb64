import os, urllib.parse
from http.server import BaseHTTPRequestHandler, HTTPServer
from twilio.request_validator import RequestValidator
validator = RequestValidator(os.environ["AUTH_TOKEN"])
HOOK_URL = os.environ.get("HOOK_URL", "http://127.0.0.1:8000/reach")  # as the webhook resource shows it
seen = set()  # idempotency tokens already handled (keep them on disk in real life)

class Receiver(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"])).decode()
        params = dict(urllib.parse.parse_qsl(body, keep_blank_values=True))
        ok = validator.validate(HOOK_URL, params, self.headers.get("X-Twilio-Signature", ""))
        self.send_response(204 if ok else 403)
        self.end_headers()
        token = self.headers["I-Twilio-Idempotency-Token"]
        if ok and token not in seen:
            seen.add(token)
            print(params["EventType"], params["Identity"], "online:", params["IsOnline"] or "null",
                  "last seen:", params["DateLastSeen"] or "null", flush=True)
HTTPServer(("127.0.0.1", urllib.parse.urlsplit(HOOK_URL).port), Receiver).serve_forever()
