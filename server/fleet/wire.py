"""Messages between a fleet's servers: pickled records, signed with the fleet's shared secret.

The records are the ones the HTTP process already sends its schedulers (SGLang pickles its control messages), so a
relayed chunk is the same bytes a local one is. Pickle runs code when it loads, so nothing is unpickled before its
HMAC-SHA256 (over a purpose, a time stamp and the payload) checks against the secret: only a holder of the secret
can make a server load a message, a signed message cannot be used for another purpose (a reply as a request), and
one older than :data:`MAX_AGE_S` is refused. The secret never travels.
"""

from __future__ import annotations

import hashlib
import hmac
import pickle
import struct
import time

MAGIC = b"sglang-mezo-fleet/1\n"
MAX_AGE_S = 600.0
"""How old a signed message may be (and how far the servers' clocks may differ)."""
CONTENT_TYPE = "application/x-sglang-mezo-fleet"
_STAMP = struct.Struct(">d")
_MAC_BYTES = hashlib.sha256().digest_size


class Unsigned(ValueError):
    """A message that is not signed with this fleet's secret for this purpose, or too old: it is not loaded."""


def seal(purpose: str, record: object, secret: bytes) -> bytes:
    """``record`` pickled and signed for ``purpose``."""
    payload = pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL)
    stamp = _STAMP.pack(time.time())
    return MAGIC + _mac(purpose, stamp, payload, secret) + stamp + payload


def unseal(purpose: str, data: bytes, secret: bytes, *, max_age_s: float = MAX_AGE_S) -> object:
    """The record ``data`` holds, if it was sealed for ``purpose`` with ``secret`` less than ``max_age_s`` ago."""
    head = len(MAGIC) + _MAC_BYTES + _STAMP.size
    if len(data) < head or not data.startswith(MAGIC):
        raise Unsigned("not a signed fleet message")
    mac = data[len(MAGIC): len(MAGIC) + _MAC_BYTES]
    stamp = data[len(MAGIC) + _MAC_BYTES: head]
    payload = data[head:]
    if not hmac.compare_digest(mac, _mac(purpose, stamp, payload, secret)):
        raise Unsigned(f"the {purpose} message is not signed with this fleet's secret")
    age = time.time() - _STAMP.unpack(stamp)[0]
    if abs(age) > max_age_s:
        raise Unsigned(f"the {purpose} message was signed {age:.0f} s ago (at most {max_age_s:.0f} s is accepted)")
    return pickle.loads(payload)  # noqa: S301 - signed by a holder of the fleet's secret (above)


def _mac(purpose: str, stamp: bytes, payload: bytes, secret: bytes) -> bytes:
    return hmac.new(secret, purpose.encode() + b"\0" + stamp + payload, hashlib.sha256).digest()
