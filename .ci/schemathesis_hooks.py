"""schemathesis hooks of .ci/schemathesis: values for the formats docs/openapi.yaml defines.

`json-text` (the Attributes parameter) is JSON text, which no JSON Schema pattern can
describe; positive cases get real JSON documents, negative ones break the other constraints.
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
