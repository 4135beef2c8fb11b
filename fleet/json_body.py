"""Decoding a request's JSON body, shared by the router and the replica.

A body of many small lists or objects creates that many containers, and the garbage collections
their allocation triggers tripled the decoding time (a 32 MB body of one-token prompts: 4.1 s on
the router's event loop, 1.0 s without them). Decoded JSON holds no reference cycles, so nothing
made here can be garbage for the collector to find: it is paused while orjson decodes.
"""

from __future__ import annotations

import gc

import orjson

# Largest request body, by default, for the router and the replica (413 beyond). Decoding is on
# the event loop, so this bounds how long one body can hold it: ~0.3 s for the worst 8 MiB body
# (a million one-token prompts) on this project's 2-core machines. 8 MiB is several times what
# OpenAI's own limits allow one request (2,048 embedding inputs of at most 300k tokens in all).
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024


def decode_json(body: bytes) -> object:
    """`orjson.loads` with the collector paused; raises `orjson.JSONDecodeError`."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return orjson.loads(body)
    finally:
        if enabled:
            gc.enable()
