"""schemathesis hooks of .ci/schemathesis: values for the formats docs/openapi.yaml defines.

`json-text` (the Attributes parameter) is JSON text, which no JSON Schema pattern can
describe; positive cases get real JSON documents, negative ones break the other constraints.
`webhook-url` (PreWebhookUrl, PostWebhookUrl) is an absolute http(s) URL that a URL parser
accepts (or empty, to clear): positive cases get such URLs with generated paths and queries,
on loopback hosts only (reachd sends events to them during the run: they must go nowhere
else).
"""

import json

import schemathesis
from hypothesis import strategies as st

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53), max_value=2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
_documents = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
schemathesis.openapi.format(
    "json-text",
    _documents.map(json.dumps).filter(lambda text: len(text.encode()) <= 16384),
)

_url_chars = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~/%20",
    max_size=40,
).map(lambda t: t.replace("%", "%25"))
_webhook_urls = st.builds(
    lambda scheme, host, port, path, query: f"{scheme}://{host}{port}/{path}{query}",
    st.sampled_from(["http", "https"]),
    st.sampled_from(["127.0.0.1", "127.0.0.2", "localhost", "[::1]"]),
    st.sampled_from(["", ":8000", ":443", ":65535"]),
    _url_chars,
    st.sampled_from(["", "?tenant=1", "?a=b&c=d"]),
)
schemathesis.openapi.format("webhook-url", st.just("") | _webhook_urls)
