"""Every request's X-Request-Id, at the router and at the replica: the client's own when it is sane,
else a new uuid4 in hex.

The id is returned on every answer, sent on to the replica and written in the log lines about the
request, so one id finds a request on both sides (nginx's and Envoy's `x-request-id`). A client's
id is kept only if it is 1-128 visible ASCII characters: anything else could forge log lines or
bloat them. New ids come from `random.getrandbits` (seeded from the OS, reseeded after a fork),
shaped as uuid4: an id needs to be unique, not secret, and `uuid.uuid4()` costs a system call
and an object per request.
"""

from __future__ import annotations

from random import getrandbits

MAX_LENGTH = 128
_VISIBLE = bytes(range(0x21, 0x7F))
_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))  # uuid's version nibble and variant bits
_SET = (0x4000 << 64) | (0x8000 << 48)  # version 4, RFC 4122 variant


def new_request_id() -> bytes:
    return b"%032x" % (getrandbits(128) & _CLEAR | _SET)


def request_id_for(given: bytes | None) -> bytes:
    """The client's X-Request-Id if it is sane, else a new one."""
    if given and len(given) <= MAX_LENGTH and not given.translate(None, _VISIBLE):
        return given
    return new_request_id()
