"""Fuzz cases for every public route of the replica and the router, and the harness that runs them.

Shared by tests/security/test_fuzz.py (a quick seeded run for CI) and loadtests/fuzz_routes.py
(thousands of cases per route). Cases are drawn with hypothesis (seeded, no example database) and
sent by a raw HTTP/1.1 client, so a malformed request reaches the server exactly as written. Most
bodies are valid requests with one field mutated (they get past the JSON parser and reach the
handlers); the rest are noise: broken JSON, wrong top-level types, invalid UTF-8, deep nesting.
Generation requests keep `max_tokens` small unless a mutation picks that very field.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import re
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

MODEL = "tiny-llama"
REPLICA_KEY = "sk-fuzz-replica-key"
CLIENT_KEY = "sk-fuzz-client-key"
ADMIN_KEY = "sk-fuzz-admin-key"
MAIN_ID = "main"
DECOY_ID = "decoy"  # the same replica under a second id: drain cases may drain it, never `main`
VOCAB = 512
MAX_MODEL_LEN = 256
HUGE = 200_000  # about the largest prompt or string a case sends, in characters
MAX_BODY = 320_000  # bytes: bodies are cut here (a cut body is just one more broken one)
ROOT = Path(__file__).resolve().parents[2]


# -- routes


@dataclass(frozen=True)
class Route:
    """One public route: where it lives, its method, and which body it takes (None: no body)."""

    target: str  # "replica" or "router"
    method: str
    path: str
    body: str | None = None  # "completions", "chat", "tokenize" or "detokenize"

    @property
    def name(self) -> str:
        return f"{self.target} {self.method} {self.path}"

    @property
    def key(self) -> str:
        if self.path.startswith("/admin/"):
            return ADMIN_KEY
        return REPLICA_KEY if self.target == "replica" else CLIENT_KEY

    @property
    def generation(self) -> bool:
        return self.body in ("completions", "chat")


OPENAI_POSTS = [
    ("/v1/completions", "completions"),
    ("/v1/chat/completions", "chat"),
    ("/tokenize", "tokenize"),
    ("/detokenize", "detokenize"),
]
REPLICA_ROUTES = [
    *(Route("replica", "POST", path, body) for path, body in OPENAI_POSTS),
    *(
        Route("replica", "GET", path)
        for path in (
            "/v1/models",
            "/v1/models/{id}",
            "/health",
            "/load",
            "/metrics",
            "/version",
            "/openapi.json",
        )
    ),
]
ROUTER_ROUTES = [
    *(Route("router", "POST", path, body) for path, body in OPENAI_POSTS),
    Route("router", "ANY", "/replicas/{id}/{path}"),
    Route("router", "GET", "/admin/replicas"),
    Route("router", "POST", "/admin/replicas/{id}/drain"),
    Route("router", "POST", "/admin/replicas/{id}/undrain"),
    Route("router", "GET", "/admin/stats"),
    Route("router", "GET", "/health"),
    Route("router", "GET", "/metrics"),
    Route("router", "GET", "/v1/models"),
]
ROUTES = [*REPLICA_ROUTES, *ROUTER_ROUTES]


# -- one request


@dataclass(frozen=True)
class Drip:
    """Send the request in `pieces` parts, `delay_s` apart (a slow client)."""

    pieces: int
    delay_s: float


@dataclass(frozen=True)
class Case:
    route: str
    method: bytes
    target: bytes  # the request-target as sent (may hold any byte but CR and LF)
    version: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    generation: bool
    drip: Drip | None = None

    def wire(self) -> bytes:
        head = [self.method + b" " + self.target + b" " + self.version]
        head += [name + b": " + value for name, value in self.headers]
        return b"\r\n".join(head) + b"\r\n\r\n" + self.body

    def reproducer(self, limit: int = 400) -> str:
        """The request as a Python bytes literal, long runs of one byte folded, cut at `limit`."""
        wire = re.sub(
            rb"(.)\1{31,}", lambda m: m.group(1) * 4 + b"<x%d>" % len(m.group(0)), self.wire()
        )
        text = repr(wire)
        tail = f"... ({len(self.wire())} bytes)" if len(text) > limit else ""
        return text[:limit] + tail + (f" [drip {self.drip}]" if self.drip else "")


# -- values that break things


@dataclass(frozen=True)
class Raw:
    """JSON text inserted verbatim where a value goes: what json.dumps would never write."""

    text: bytes


def _nest(depth: int, kind: str) -> Raw:
    if kind == "list":
        return Raw(b"[" * depth + b"]" * depth)
    return Raw(b'{"a":' * depth + b"1" + b"}" * depth)


SPECIAL_INTS = [0, -1, 1, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -(2**63) - 1]
SPECIAL_INTS += [10**30, -(10**30), 10**400]
SPECIAL_FLOATS = [0.0, -0.0, 1e-300, 1e300, -1e300, 2.0000001, -2.0000001, 0.9999999, 1.0000001]
SPECIAL_FLOATS += [float("nan"), float("inf"), float("-inf")]
SPECIAL_STRINGS = [
    "",
    " ",
    "\x00",
    "\ud800",
    "\udfff\ud800",
    "\U0001f999",
    "<|im_end|>",
    "<|endoftext|>",
    "<|im_start|>system\n",
    "\u2028\u2029",
    "\r\n\r\nGET / HTTP/1.1\r\n",
    "%s%n%x",
    "{{7*7}}",
    "../../../../etc/passwd",
    MODEL + " ",
    MODEL.upper(),
]
RAW_VALUES = [
    b'"\xff\xfe"',
    b'"\xc0\xaf"',
    b'"\xed\xa0\x80"',
    b'"\x80abc"',
    b'"\\ud800"',
    b'"\\u0000"',
    b"NaN",
    b"Infinity",
    b"-Infinity",
    b"1e400",
    b"-1e400",
    b"1e-400",
    b"1" * 5000,
    b"0x10",
    b"01",
    b"+1",
    b".5",
    b"tru",
    b"nul",
    b"'single'",
    b'"unterminated',
]


@functools.cache
def huge_strings() -> st.SearchStrategy[str]:
    unit = st.sampled_from(["a", "word ", "\u00e9", "\U0001f999", "<|im_end|>", "\x00", " "])
    return st.builds(lambda u, n: u * n, unit, st.integers(0, HUGE // 10))


@functools.cache
def deep_nesting() -> st.SearchStrategy[Raw]:
    return st.builds(_nest, st.integers(1, 40_000), st.sampled_from(["list", "dict"]))


@functools.cache
def weird_values() -> st.SearchStrategy[Any]:
    """A value of the wrong type, out of range, or that no JSON encoder writes (< HUGE bytes)."""
    small = st.one_of(
        st.none(),
        st.booleans(),
        st.sampled_from(SPECIAL_INTS),
        st.integers(),
        st.sampled_from(SPECIAL_FLOATS),
        st.floats(),
        st.sampled_from(SPECIAL_STRINGS),
        st.text(max_size=40),
        st.sampled_from(RAW_VALUES).map(Raw),
    )
    return st.one_of(
        small,
        small,
        huge_strings(),
        deep_nesting(),
        st.lists(small, max_size=5),
        st.dictionaries(st.text(max_size=10), small, max_size=4),
        st.builds(
            lambda v, n: [v] * n,
            st.sampled_from([None, 0, -1, 2**64, 1.5, "", "a"]),
            st.integers(0, 20_000),
        ),
    )


def encode(value: Any, ascii_only: bool = True) -> bytes:
    """JSON bytes, NaN and Infinity allowed, lone surrogates kept, Raw values inserted as is."""
    raws: list[bytes] = []

    def swap(v: Any) -> Any:
        if isinstance(v, Raw):
            raws.append(v.text)
            return f"\x01RAW{len(raws) - 1}\x01"
        if isinstance(v, dict):
            return {k: swap(x) for k, x in v.items()}
        if isinstance(v, list):
            return [swap(x) for x in v]
        return v

    text = json.dumps(swap(value), allow_nan=True, ensure_ascii=ascii_only)
    out = text.encode("utf-8", "surrogatepass")
    for i, raw in enumerate(raws):
        marker = json.dumps(f"\x01RAW{i}\x01", ensure_ascii=ascii_only).encode()
        out = out.replace(marker, raw, 1)
    return out


# -- valid bodies, small and fast


@functools.cache
def _texts(max_size: int = 40) -> st.SearchStrategy[str]:
    return st.text(max_size=max_size)


@functools.cache
def _token_ids(max_size: int = 20) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=max_size)


SAMPLING = {
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0, 1),
    "n": st.integers(1, 2),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
    "stop": st.one_of(_texts(5), st.lists(_texts(5), max_size=4)),
    "seed": st.integers(0, 2**31),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "user": _texts(10),
    "top_k": st.integers(-1, 50),
    "min_p": st.floats(0, 1),
    "repetition_penalty": st.floats(0.5, 2),
    "ignore_eos": st.booleans(),
    "min_tokens": st.integers(0, 2),
    "stop_token_ids": st.lists(st.integers(0, VOCAB - 1), max_size=3),
    "logit_bias": st.dictionaries(
        st.integers(0, VOCAB - 1).map(str), st.floats(-100, 100), max_size=3
    ),
    "skip_special_tokens": st.booleans(),
}


@functools.cache
def _messages() -> st.SearchStrategy[list[dict]]:
    content = st.one_of(
        _texts(),
        st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": _texts()}), max_size=2),
    )
    message = st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant", "developer"]), "content": content},
        optional={"name": _texts(8)},
    )
    return st.lists(message, min_size=1, max_size=3)


@functools.cache
def _prompt() -> st.SearchStrategy[Any]:
    return st.one_of(
        _texts(),
        st.lists(_texts(20), min_size=1, max_size=3),
        _token_ids(),
        st.lists(_token_ids(10), min_size=1, max_size=2),
    )


@functools.cache
def valid_body(kind: str) -> st.SearchStrategy[dict]:
    """A request the server should accept (or refuse only for a documented combination)."""
    model = st.just(MODEL)
    if kind == "completions":
        extra = {**SAMPLING, "logprobs": st.integers(0, 5), "echo": st.booleans()}
        required = {"model": model, "prompt": _prompt(), "max_tokens": st.integers(1, 4)}
        return st.fixed_dictionaries(required, optional=extra)
    if kind == "chat":
        limit = st.sampled_from(["max_tokens", "max_completion_tokens"])
        extra = {
            **SAMPLING,
            "logprobs": st.booleans(),
            "top_logprobs": st.integers(0, 5),
            "response_format": st.just({"type": "text"}),
        }
        body = st.fixed_dictionaries({"model": model, "messages": _messages()}, optional=extra)
        return st.builds(lambda b, name, n: {**b, name: n}, body, limit, st.integers(1, 4))
    if kind == "tokenize":
        extra = {"add_special_tokens": st.booleans(), "add_generation_prompt": st.booleans()}
        return st.one_of(
            st.fixed_dictionaries({"model": model, "prompt": _texts()}, optional=extra),
            st.fixed_dictionaries({"model": model, "messages": _messages()}, optional=extra),
        )
    return st.fixed_dictionaries({"model": model, "tokens": _token_ids()})


FIELDS = {
    "completions": ["model", "prompt", "max_tokens", "logprobs", "echo", "suffix", "best_of"],
    "chat": [
        "model",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "logprobs",
        "top_logprobs",
        "response_format",
        "tools",
        "tool_choice",
        "continue_final_message",
        "add_generation_prompt",
        "chat_template_kwargs",
    ],
    "tokenize": ["model", "prompt", "messages", "add_special_tokens", "add_generation_prompt"],
    "detokenize": ["model", "tokens"],
}


@st.composite
def mutated(draw: st.DrawFn, kind: str) -> dict:
    """A valid body with one field set to a weird value, dropped, or nested wrongly."""
    body = draw(valid_body(kind))
    fields = sorted(
        set(body)
        | set(FIELDS[kind])
        | (set(SAMPLING) if kind in ("completions", "chat") else set())
    )
    op = draw(st.sampled_from(["set", "set", "set", "drop", "unknown", "inner", "size"]))
    name = draw(st.sampled_from(fields))
    if op == "size":
        _resize(body, draw(st.sampled_from(["", "a", "word " * 300, "word " * 40_000])))
    elif op == "drop":
        body.pop(name, None)
    elif op == "unknown":
        body[draw(st.text(max_size=12))] = draw(weird_values())
    elif op == "inner" and isinstance(body.get("messages"), list):
        message = dict(draw(st.sampled_from(body["messages"])))
        message[draw(st.sampled_from(["role", "content", "name", "type", "text"]))] = draw(
            weird_values()
        )
        body["messages"] = [*body["messages"], message]
    elif op == "inner" and isinstance(body.get("prompt"), list):
        body["prompt"] = [*body["prompt"], draw(weird_values())]
    else:
        body[name] = draw(weird_values())
    return body


def _resize(body: dict, text: str) -> None:
    """Make the prompt (or every message) `text`: the empty and the enormous prompt."""
    if "messages" in body:
        body["messages"] = [{**m, "content": text} for m in body["messages"]]
    elif "tokens" in body:
        body["tokens"] = [1] * (len(text) // 5)
    else:
        body["prompt"] = text


@st.composite
def noise(draw: st.DrawFn, kind: str) -> bytes:
    """Bytes that are not the JSON object the route wants."""
    good = encode(draw(valid_body(kind)))
    choice = draw(st.integers(0, 8))
    if choice == 0:
        return draw(st.binary(max_size=600))
    if choice == 1:
        return good[: draw(st.integers(0, max(len(good) - 1, 0)))]
    if choice == 2:
        at = draw(st.integers(0, len(good)))
        return good[:at] + draw(st.binary(min_size=1, max_size=8)) + good[at + 1 :]
    if choice == 3:
        return encode(
            draw(st.one_of(weird_values(), st.lists(st.just(json.loads(good)), max_size=2)))
        )
    if choice == 4:
        return draw(st.sampled_from([b"\xef\xbb\xbf", b"\xff\xfe", b" \t\n"])) + good
    if choice == 5:
        return good.decode().encode(draw(st.sampled_from(["utf-16", "utf-32", "utf-16-be"])))
    if choice == 6:
        return good[:-1] + b',"model":' + encode(draw(weird_values())) + b"}"
    if choice == 7:
        return encode(draw(deep_nesting()))
    return b""


@functools.cache
def json_body(kind: str) -> st.SearchStrategy[bytes]:
    ascii_only = st.booleans()
    return st.one_of(
        st.builds(encode, mutated(kind), ascii_only),
        st.builds(encode, mutated(kind), ascii_only),
        st.builds(encode, valid_body(kind), ascii_only),
        noise(kind),
    ).map(lambda body: body[:MAX_BODY])


# -- the request around the body

ODD_METHODS = [b"PATCH", b"TRACE", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"CONNECT", b"FOO",
               b"get", b"post", b"PROPFIND", b"BREW", b"X" * 300, b"GET", b"POST"]  # fmt: skip
ODD_VERSIONS = [b"HTTP/1.0", b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1.2", b"HTTP/9.9", b"http/1.1"]


@st.composite
def odd_path(draw: st.DrawFn, path: str) -> bytes:
    """`path`, usually as is, else percent-encoded, dot-segmented, doubled, long or junk-queried."""
    p = path.encode()
    choice = draw(st.integers(-15, 14))
    if choice <= 4:
        return p
    if choice == 5:
        return (
            p
            + b"?"
            + draw(st.binary(max_size=60))
            .replace(b"\r", b"")
            .replace(b"\n", b"")
            .replace(b" ", b"+")
        )
    if choice == 6:
        return draw(
            st.sampled_from([p + b"/", b"/" + p, p.replace(b"/", b"//"), p + b"//", p + b"/."])
        )
    if choice == 7:
        return draw(
            st.sampled_from(
                [b"/x/.." + p, b"/." + p, p + b"/..", b"/v1/../" + p.lstrip(b"/"), b"/%2e%2e" + p]
            )
        )
    if choice == 8:
        at = draw(st.integers(1, max(len(p) - 1, 1)))
        return p[:at] + b"%%%02X" % p[at] + p[at + 1 :] if at < len(p) else p
    if choice == 9:
        return p.replace(b"/", b"%2F")
    if choice == 10:
        return p + b"/" + b"a" * draw(st.integers(100, 30_000))
    if choice == 11:
        return p + draw(
            st.sampled_from(
                [b"%ff%fe", b"%c0%af", b"%00", b"%", b"%zz", b"\xff", b"\xc3\xa9", b"#frag"]
            )
        )
    if choice == 12:
        return draw(
            st.sampled_from(
                [b"*", b"http://127.0.0.1" + p, b"http://evil.example" + p, p.lstrip(b"/"), b""]
            )
        )
    if choice == 13:
        return p.upper()
    return p + b"?" + b"&".join([b"a=" + b"b" * 1000] * draw(st.integers(1, 30)))


BAD_AUTH = [b"", b"Bearer", b"Bearer ", b"Basic dXNlcjpwYXNz", b"Bearer \xff\xfe", b"Bearer " + b"k" * 8000,
            b"Bearer sk-wrong", b"Token x", b"Bearer  " + b"x", b"Bearer\tx", b"\x00"]  # fmt: skip
EXTRA_HEADERS = [
    (b"X-Session-Id", b"\xff\xfe"),
    (b"X-Session-Id", b"s" * 5000),
    (b"Expect", b"100-continue"),
    (b"Expect", b"nothing-you-know"),
    (b"Connection", b"close"),
    (b"Connection", b"keep-alive, Upgrade"),
    (b"Upgrade", b"websocket"),
    (b"Upgrade", b"h2c"),
    (b"Transfer-Encoding", b"gzip"),
    (b"Transfer-Encoding", b"identity"),
    (b"Content-Encoding", b"gzip"),
    (b"Accept", b"text/event-stream"),
    (b"Accept-Encoding", b"br, gzip, zstd"),
    (b"Content-Type", b"text/plain"),
    (b"X-Forwarded-For", b"127.0.0.1, 10.0.0.1"),
    (b"X Bad Name", b"1"),
    (b"\xff", b"1"),
    (b"Host", b"second.example"),
    (b"Content-Length", b"-1"),
    (b"Content-Length", b"abc"),
    (b"Content-Length", b"0x10"),
    (b"Content-Length", b"+0"),
]


@dataclass(frozen=True)
class Framing:
    """How the body is delimited: `length` (honest), `chunked`, `none`, `short` (too small)."""

    kind: str
    cut: int = 0
    chunk: int = 1


def frame(body: bytes, framing: Framing) -> tuple[list[tuple[bytes, bytes]], bytes]:
    if framing.kind == "chunked":
        size = max(framing.chunk, 1)
        parts = [body[i : i + size] for i in range(0, len(body), size)]
        coded = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
        return [(b"Transfer-Encoding", b"chunked")], coded
    if framing.kind == "none":
        return [], body
    if framing.kind == "short":
        return [(b"Content-Length", b"%d" % min(framing.cut, len(body)))], body
    return [(b"Content-Length", b"%d" % len(body))], body


@st.composite
def request(
    draw: st.DrawFn, route: Route, method: bytes, path: str, kind: str | None, key: str
) -> Case:
    """The whole request: usually well-formed around `path`; sometimes one odd part."""
    if draw(st.integers(0, 9)) == 0:
        method = draw(st.sampled_from(ODD_METHODS))
    if kind is not None:
        body = draw(json_body(kind))
    else:
        body = draw(st.one_of(st.just(b""), st.just(b""), st.just(b""), st.binary(max_size=200)))
    framing = draw(
        st.one_of(
            st.just(Framing("length")),
            st.just(Framing("length")),
            st.just(Framing("length")),
            st.builds(Framing, st.just("chunked"), st.just(0), st.integers(1, 4096)),
            st.builds(Framing, st.sampled_from(["none", "short"]), st.integers(0, 64)),
        )
    )
    auth = b"Bearer " + key.encode()
    if draw(st.integers(0, 7)) == 0:
        auth = draw(st.sampled_from([None, *BAD_AUTH, b"bearer " + key.encode(), key.encode()]))
    headers: list[tuple[bytes, bytes]] = []
    if draw(st.integers(0, 15)):
        headers.append((b"Host", b"127.0.0.1"))
    if auth is not None:
        headers.append((b"Authorization", auth))
    if body and draw(st.integers(0, 7)):
        headers.append((b"Content-Type", b"application/json"))
    if body or framing.kind != "length" or method == b"POST":
        framed, body = frame(body, framing)
        headers += framed
    headers += (
        draw(st.lists(st.sampled_from(EXTRA_HEADERS), max_size=2))
        if draw(st.integers(0, 5)) == 0
        else []
    )
    version = b"HTTP/1.1" if draw(st.integers(0, 19)) else draw(st.sampled_from(ODD_VERSIONS))
    drip = None
    if draw(st.integers(0, 24)) == 0 and len(body) < 20_000:
        drip = Drip(draw(st.integers(2, 12)), draw(st.sampled_from([0.01, 0.05, 0.15])))
    return Case(route.name, method, draw(odd_path(path)), version, tuple(headers), body,
                route.generation or kind in ("completions", "chat"), drip)  # fmt: skip


@functools.cache
def _segment() -> st.SearchStrategy[str]:
    return st.one_of(
        st.text(st.characters(codec="utf-8", exclude_characters="\r\n /?#"), max_size=30),
        st.sampled_from(
            ["..", ".", "%2e%2e", "%2F", "%00", "%ff", "a" * 3000, MODEL, MODEL + "%20"]
        ),
    )


def cases_for(route: Route) -> st.SearchStrategy[Case]:
    """Every case of one route (pinned routes fuzz any replica route through the router)."""
    method = route.method.encode()
    if route.path == "/replicas/{id}/{path}":
        inner = st.sampled_from(REPLICA_ROUTES)
        pinned_id = st.one_of(
            st.just(MAIN_ID),
            st.just(MAIN_ID),
            st.just(MAIN_ID),
            _segment().filter(lambda s: s != DECOY_ID),
        )
        return st.tuples(inner, pinned_id).flatmap(
            lambda pair: request(route, pair[0].method.encode(),
                                 f"/replicas/{pair[1]}" + _concrete(pair[0].path, MODEL),
                                 pair[0].body, route.key).map(lambda c: _as_generation(c, pair[0]))
        )  # fmt: skip
    if "{id}" in route.path:
        good = DECOY_ID if route.path.startswith("/admin/") else MODEL
        ids = st.one_of(st.just(good), st.just(good), _segment().filter(lambda s: s != MAIN_ID))
        return ids.flatmap(
            lambda i: request(route, method, route.path.replace("{id}", i), route.body, route.key)
        )
    return request(route, method, route.path, route.body, route.key)


def _concrete(path: str, model: str) -> str:
    return path.replace("{id}", model)


def _as_generation(case: Case, inner: Route) -> Case:
    return Case(case.route, case.method, case.target, case.version, case.headers, case.body,
                inner.generation, case.drip)  # fmt: skip


def draw_cases(route: Route, count: int, base_seed: int = 0) -> list[Case]:
    """`count` cases for `route`, the same ones for the same seed (no example database)."""
    cases: list[Case] = []

    @seed(base_seed + zlib.crc32(route.name.encode()))
    @settings(
        max_examples=count,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(cases_for(route))
    def collect(case: Case) -> None:
        cases.append(case)

    collect()
    return cases


# -- sending one case and judging the answer

ERROR_KEYS = {"message", "type", "param", "code"}
FAILURES = ("5xx", "hang", "drop", "crash", "malformed")


@dataclass
class Answer:
    status: int
    headers: dict[bytes, bytes]
    body: bytes


@dataclass
class Result:
    case: Case
    outcome: str  # "2xx", "3xx", "4xx", "5xx", "hang", "drop", "crash" or "malformed" (not HTTP)
    status: int | None = None
    bad_body: str | None = None  # why a non-2xx body is not OpenAI error JSON
    excerpt: bytes = b""
    elapsed_s: float = 0.0

    @property
    def failed(self) -> bool:
        return self.outcome in FAILURES or self.bad_body is not None

    def signature(self) -> tuple:
        """What makes two failures the same finding: where, how, and the message's shape."""
        words = re.sub(rb"[0-9]+|'[^']*'|\"[^\"]*\"", b"#", self.excerpt[:120])
        problem = (self.bad_body or "").split(" (")[0]
        return (self.case.route, self.outcome, self.status, problem, words)


class Malformed(Exception):
    """The server's answer is not valid HTTP/1.1."""


def parse_answer(data: bytes, closed: bool, head_only: bool) -> Answer | None:
    """The first final answer in `data`, or None while it is incomplete (raises Malformed)."""
    start = 0
    while True:
        end = data.find(b"\r\n\r\n", start)
        if end < 0:
            return None
        status, headers = _parse_head(data[start:end])
        start = end + 4
        if status >= 200 or status == 101:
            break
    rest = data[start:]
    if head_only or status in (101, 204, 304):
        return Answer(status, headers, b"")
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        body = _dechunk(rest)
        return None if body is None else Answer(status, headers, body)
    if b"content-length" in headers:
        size = int(headers[b"content-length"])
        return Answer(status, headers, rest[:size]) if len(rest) >= size else None
    return Answer(status, headers, rest) if closed else None


def _parse_head(head: bytes) -> tuple[int, dict[bytes, bytes]]:
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise Malformed(f"bad status line {lines[0][:80]!r}")
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            raise Malformed(f"bad header line {line[:80]!r}")
        headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


def _dechunk(data: bytes) -> bytes | None:
    body, at = bytearray(), 0
    while True:
        eol = data.find(b"\r\n", at)
        if eol < 0:
            return None
        size = int(data[at:eol].split(b";")[0], 16)
        if size == 0:
            return bytes(body) if data.find(b"\r\n\r\n", eol) >= 0 else None
        if len(data) < eol + 2 + size + 2:
            return None
        body += data[eol + 2 : eol + 2 + size]
        at = eol + 2 + size + 2


def _final_head_arrived(data: bytes) -> bool:
    """Whether the server began its final answer (a `100 Continue` asks for the rest)."""
    while len(data) >= 10 and data.startswith(b"HTTP/1.") and data[9:10] == b"1":
        end = data.find(b"\r\n\r\n")
        if end < 0:
            return False
        data = data[end + 4 :]
    if len(data) >= 10:
        return True
    probe = data[:7] + b"1" + data[8:] if len(data) > 7 else data
    return not b"HTTP/1.1 1".startswith(probe)


class Collector(asyncio.Protocol):
    """Keeps every byte the server sends, even when the connection ends in a reset."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False
        self.changed = asyncio.Event()

    def data_received(self, data: bytes) -> None:
        self.data += data
        self.changed.set()

    def eof_received(self) -> None:
        self.closed = True
        self.changed.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.changed.set()


async def send(port: int, case: Case, timeout_s: float) -> Answer | str:
    """The server's first answer to `case`, or why there was none ("hang" or "drop")."""
    loop = asyncio.get_running_loop()
    try:
        transport, got = await asyncio.wait_for(
            loop.create_connection(Collector, "127.0.0.1", port), 5
        )
    except (OSError, asyncio.TimeoutError):
        return "drop"
    try:
        await _write(transport, got, case)
        return await asyncio.wait_for(_answer(got, case.method == b"HEAD"), timeout_s)
    except asyncio.TimeoutError:
        return "hang"
    except (Malformed, ValueError):
        return "malformed"
    finally:
        transport.abort()


async def _answer(got: Collector, head_only: bool) -> Answer | str:
    while True:
        got.changed.clear()
        answer = parse_answer(bytes(got.data), got.closed, head_only)
        if answer is not None:
            return answer
        if got.closed:
            return "drop"
        await got.changed.wait()


async def _write(transport: asyncio.Transport, got: Collector, case: Case) -> None:
    """Send the request (in pieces when dripping; stop once the server has answered or left)."""
    wire = case.wire()
    step = -(-len(wire) // case.drip.pieces) if case.drip else len(wire)
    for i in range(0, len(wire), step):
        if got.closed or _final_head_arrived(bytes(got.data)):
            return
        transport.write(wire[i : i + step])
        if case.drip:
            await asyncio.sleep(case.drip.delay_s)


def error_body_problem(answer: Answer) -> str | None:
    """None when the body is `{"error": {"message", "type", "param", "code"}}` as OpenAI sends."""
    try:
        body = json.loads(answer.body)
    except ValueError:
        return "not JSON"
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict) or not set(error) >= ERROR_KEYS:
        return "no error object with message, type, param, code"
    if not isinstance(error["message"], str) or not isinstance(error["type"], str):
        return "message or type not a string"
    if not all(error[k] is None or isinstance(error[k], str) for k in ("param", "code")):
        return "param or code neither string nor null"
    return None


def judge(case: Case, answer: Answer | str) -> Result:
    """Every non-2xx answer must be OpenAI error JSON (a HEAD answer has no body to check).
    Redirects count too: OpenAI answers an unknown path with a 404 body, and a redirect's
    Location is built from the client's Host header."""
    if isinstance(answer, str):
        return Result(case, answer)
    outcome = f"{answer.status // 100}xx" if 200 <= answer.status < 600 else "5xx"
    bad = None
    if answer.status >= 300 and case.method != b"HEAD":
        bad = error_body_problem(answer)
        location = answer.headers.get(b"location")
        bad = f"{bad} (a redirect to {location!r:.80})" if bad and location else bad
    return Result(case, outcome, answer.status, bad, answer.body[:300])


# -- the servers under test


@dataclass
class Server:
    """One server process (`python -m replica` or `python -m router`) on a loopback port."""

    name: str
    port: int
    args: list[str]
    log: Path
    process: subprocess.Popen | None = None
    restarts: int = 0

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", *self.args, "--port", str(self.port)],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    async def answers(self, path: str = "/health", timeout_s: float = 5.0) -> bytes | None:
        """The body of GET `path` if the server answers it at all (any status), else None."""
        case = Case(self.name, b"GET", path.encode(), b"HTTP/1.1",
                    ((b"Host", b"127.0.0.1"), (b"Authorization", b"Bearer " + ADMIN_KEY.encode())),
                    b"", False)  # fmt: skip
        answer = await send(self.port, case, timeout_s)
        return answer.body if isinstance(answer, Answer) else None


def _is_ready(health: dict) -> bool:
    return health["status"] == "ready"


def _routes_to_main(replicas: dict) -> bool:
    return any(r["id"] == MAIN_ID and r["routable"] for r in replicas["data"])


@dataclass
class Fleet:
    """A replica on a tiny real model and a router in front of it (static keys, two replica ids)."""

    replica: Server
    router: Server
    dead: list[str] = field(default_factory=list)  # "<server>: exit code N" or "<server>: wedged"
    unroutable: str | None = None  # why the router never routed to `main`, if it did not

    def port(self, route: str) -> int:
        return (self.replica if route.startswith("replica") else self.router).port

    async def ready(self, timeout_s: float = 180.0, routing_s: float = 30.0) -> None:
        """Wait for the replica to load and the router to route to `main` (`decoy` may be
        drained by then). A router that never routes is noted in `unroutable`, not raised:
        the replica's routes can still be fuzzed."""
        deadline = time.monotonic() + timeout_s
        await self._wait(self.replica, "/health", _is_ready, deadline)
        await self._wait(self.router, "/health", lambda health: True, deadline)
        try:
            await self._wait(
                self.router, "/admin/replicas", _routes_to_main, time.monotonic() + routing_s
            )
            self.unroutable = None
        except TimeoutError:
            listed = await self.router.answers("/admin/replicas")
            self.unroutable = f"the router does not route to the replica: {listed!r:.600}"

    @staticmethod
    async def _wait(server: Server, path: str, ok: Callable[[Any], bool], deadline: float) -> None:
        while time.monotonic() < deadline:
            if server.process is not None and server.process.poll() is not None:
                raise RuntimeError(f"{server.name} exited: see {server.log}")
            body = await server.answers(path, 2)
            with contextlib.suppress(ValueError, TypeError, KeyError, AttributeError):
                if body and ok(json.loads(body)):
                    return
            await asyncio.sleep(0.2)
        raise TimeoutError(f"{server.name} not ready ({path}): see {server.log}")

    async def check(self) -> list[str]:
        """Restart any server that died or stopped answering /health; say which and how."""
        found = []
        for server in (self.replica, self.router):
            code = server.process.poll() if server.process else None
            if code is None and await server.answers() is not None:
                continue
            found.append(
                f"{server.name}: " + (f"exit code {code}" if code is not None else "wedged")
            )
            server.stop()
            server.restarts += 1
            server.start()
        if found:
            self.dead += found
            await self.ready()
        return found

    def stop(self) -> None:
        self.router.stop()
        self.replica.stop()


def servers(model_dir: Path, workdir: Path, replica_key: bool = True) -> Fleet:
    """The replica and the router in front of it, under ids `main` and `decoy`. Without
    `replica_key` the replica is open (a trusted network's setup; its auth goes unfuzzed)."""
    from fleet.embedded_redis import free_port

    replica_port, router_port = free_port(), free_port()
    replica_url = f"http://127.0.0.1:{replica_port}"
    replica = Server("replica", replica_port, [
        "replica", "--model", str(model_dir), "--served-model-name", MODEL, "--device", "cpu",
        "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-tokens", "16384",
        "--max-num-seqs", "32", "--drain-grace", "2", "--log-level", "warning",
        *(["--api-key", REPLICA_KEY] if replica_key else []),
    ], workdir / "replica.log")  # fmt: skip
    router = Server("router", router_port, [
        "router", "--replica", f"{MAIN_ID}={replica_url}", "--replica", f"{DECOY_ID}={replica_url}",
        "--api-key", CLIENT_KEY, "--admin-key", ADMIN_KEY, "--upstream-api-key", REPLICA_KEY,
        "--probe-interval", "0.5", "--load-interval", "0.5", "--ttfb-timeout", "300",
        "--log-level", "warning",
    ], workdir / "router.log")  # fmt: skip
    return Fleet(replica, router)


@contextlib.contextmanager
def fleet(running: Fleet) -> Iterator[Fleet]:
    """Start both as real processes (the command lines users run); kill them at the end."""
    try:
        running.replica.start()
        running.router.start()
        asyncio.run(running.ready())
        yield running
    finally:
        running.stop()


# -- running many cases


def timeout_for(case: Case) -> float:
    """A hang is no answer in this long. A valid generation may decode up to 256 sequences
    (prompts x n) to the end of the context: tens of seconds on 2 CPU cores."""
    return 120.0 if case.generation else 10.0


async def run_cases(running: Fleet, cases: list[Case], concurrency: int) -> list[Result]:
    """Every case, `concurrency` at a time; a drop or hang makes us check the servers are alive."""
    queue = list(reversed(cases))
    results: list[Result] = []
    checking = asyncio.Lock()

    async def check() -> list[str]:
        async with checking:
            return await running.check()

    async def worker() -> None:
        while queue:
            case = queue.pop()
            started = time.monotonic()
            result = judge(case, await send(running.port(case.route), case, timeout_for(case)))
            result.elapsed_s = time.monotonic() - started
            if result.outcome in ("hang", "drop") and await check():
                result.outcome = "crash"
            results.append(result)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    if await check():
        results.append(Result(cases[-1], "crash"))
    return results


@dataclass
class Tally:
    route: str
    cases: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    bad_bodies: int = 0
    elapsed_s: float = 0.0
    findings: dict[tuple, Result] = field(default_factory=dict)  # the smallest case per finding

    def add(self, result: Result) -> None:
        self.cases += 1
        self.counts[result.outcome] = self.counts.get(result.outcome, 0) + 1
        self.bad_bodies += result.bad_body is not None or result.outcome == "malformed"
        if result.failed:
            key = result.signature()
            best = self.findings.get(key)
            if best is None or len(result.case.wire()) < len(best.case.wire()):
                self.findings[key] = result

    @property
    def failed(self) -> bool:
        return bool(self.findings)

    def describe(self) -> list[str]:
        return [
            f"{r.case.route}: {r.outcome} {r.status or ''} {r.bad_body or ''}\n"
            f"  request: {r.case.reproducer()}\n  answer: {r.excerpt[:200]!r}"
            for r in self.findings.values()
        ]
