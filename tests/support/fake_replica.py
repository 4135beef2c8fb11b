"""A fake replica: the HTTP surface of a fleetserve replica with no model behind it.

It answers `/v1/completions` and `/v1/chat/completions` (streaming or not, with
`stream_options.include_usage`), `/v1/models`, `/health`, `/load`, `/tokenize`, `/detokenize` and
`/metrics`, instantly or after configured delays, so the router can be tested and benchmarked with
real sockets and processes but without the cost of an engine. A simulated prefix cache (chained
hashes of 4-character "tokens" in blocks, LRU-bounded by `--kv-cache-tokens`) makes `/load` report
prefix-cache hits the way a real replica would, and `--prefill-us-per-token` turns cache misses
into time to first token.

`--engine vllm` or `--engine sglang` speaks that engine's dialect instead: no `/load`, load only
in its own Prometheus names on `/metrics`; SGLang's also answers `/server_info` and `/model_info`
(and their older `/get_` names), what SGLang's model gateway reads from a worker. Both dialects
also answer `/v1/embeddings` (a deterministic unit vector of `--embedding-size` per input, float or
base64, `dimensions` honoured), as an embedding model's vLLM or SGLang server would, so routers
can be tested against external embedders registered with no task.
`--served-model-name a b` answers to several names, the first reported in answers (as vLLM).

Tests steer it at run time: `POST /fake/config` with any of `delay`, `chunk_delay`, `chunks`,
`status` (answer generation requests with this HTTP error), `fail_after_chunks` (drop the
connection after that many frames), `healthy`, `hang` (accept but never answer), `waiting`
(requests it reports queued beyond its own), `kv_usage` (the KV usage it reports),
`max_running` (answer that many at a time, the rest wait in arrival order, as an engine's
`max_num_seqs`; 0: no limit) and `max_waiting` (503 beyond that many waiting, as a replica's
`--max-waiting`; null: no limit); `GET /fake/stats`
reports counters (requests, active, completed, aborted, per-path counts, last request body);
`POST /fake/reset` restores the command-line behaviour and zeroes the counters and the cache.

    python tests/support/fake_replica.py --port 8101 --model tiny --chunks 64
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import math
import struct
import time
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson

CHARS_PER_TOKEN = 4


@dataclass
class Behaviour:
    """What the fake does now; every field can be changed with `POST /fake/config`."""

    delay: float = 0.0
    chunk_delay: float = 0.0
    chunks: int = 8
    status: int = 0
    fail_after_chunks: int = -1
    healthy: bool = True
    hang: bool = False
    prefill_us_per_token: float = 0.0
    waiting: int = 0
    kv_usage: float | None = None  # None: the simulated prefix cache's usage
    max_running: int = 0
    max_waiting: int | None = None


@dataclass
class Stats:
    requests: int = 0
    active: int = 0  # running or waiting for a slot (`max_running`)
    waiting: int = 0
    completed: int = 0
    aborted: int = 0
    generation_tokens: int = 0
    by_path: dict[str, int] = field(default_factory=dict)
    last_body: Any = None


class PrefixCache:
    """Blocks of `block_size` fake tokens keyed by chained hashes, LRU-evicted at capacity."""

    def __init__(self, capacity_tokens: int, block_size: int) -> None:
        self.block_size = block_size
        self.capacity_blocks = max(capacity_tokens // block_size, 0)
        self.blocks: OrderedDict[int, None] = OrderedDict()
        self.queries = 0
        self.hits = 0

    def lookup_and_insert(self, text: str) -> int:
        """Cached tokens for this prompt; then the prompt's blocks become the most recent."""
        num_tokens = len(text) // CHARS_PER_TOKEN
        self.queries += num_tokens
        if not self.capacity_blocks:
            return 0
        width = self.block_size * CHARS_PER_TOKEN
        chain, hashes = 0, []
        for start in range(0, len(text) - width + 1, width):
            chain = hash((chain, text[start : start + width]))
            hashes.append(chain)
        cached = 0
        for h in hashes:
            if h not in self.blocks:
                break
            cached += 1
        for h in reversed(hashes):
            self.blocks[h] = None
            self.blocks.move_to_end(h)
        while len(self.blocks) > self.capacity_blocks:
            self.blocks.popitem(last=False)
        hit_tokens = cached * self.block_size
        self.hits += hit_tokens
        return hit_tokens

    @property
    def used_blocks(self) -> int:
        return len(self.blocks)


def render_chat(messages: list[dict]) -> str:
    parts = []
    for message in messages:
        content = message.get("content") or ""
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        parts.append(f"<|im_start|>{message.get('role', '')}\n{content}<|im_end|>\n")
    return "".join(parts) + "<|im_start|>assistant\n"


def prompt_text(body: dict, chat: bool) -> str:
    if chat:
        return render_chat(body.get("messages") or [])
    prompt = body.get("prompt", "")
    if isinstance(prompt, list):
        if prompt and isinstance(prompt[0], int):
            return "".join(f"{t:04d}"[-4:] for t in prompt)
        return "".join(p if isinstance(p, str) else "" for p in prompt)
    return str(prompt)


class FakeReplica:
    """The ASGI app. One instance per process; state is plain attributes."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.names = list(dict.fromkeys(args.served_model_name or [args.model]))
        self.model = self.names[0]
        self.replica_id = args.id or f"fake-{args.port}"
        self.max_model_len = args.max_model_len
        self.engine = args.engine
        self.args = args
        self.behaviour = self._initial_behaviour()
        self.stats = Stats()
        self.cache = PrefixCache(args.kv_cache_tokens, args.block_size)
        self.kv_cache_tokens = args.kv_cache_tokens
        self.block_size = args.block_size
        self.counter = 0
        self.running = 0
        self.slots: deque[asyncio.Future] = deque()  # waiting for a `max_running` slot, in order
        self.routes = {
            ("POST", "/v1/completions"): self.generate,
            ("POST", "/v1/chat/completions"): self.generate,
            ("GET", "/v1/models"): self.models,
            ("GET", "/health"): self.health,
            ("GET", "/load"): self.load,
            ("POST", "/tokenize"): self.tokenize,
            ("POST", "/detokenize"): self.detokenize,
            ("GET", "/metrics"): self.metrics,
            ("GET", "/fake/stats"): self.get_stats,
            ("POST", "/fake/config"): self.set_config,
            ("POST", "/fake/reset"): self.reset,
        }
        if self.engine != "fleetserve":
            del self.routes[("GET", "/load")]
            self.routes[("POST", "/v1/embeddings")] = self.embeddings
        if self.engine == "sglang":
            for path in ("/server_info", "/get_server_info"):
                self.routes[("GET", path)] = self.server_info
            for path in ("/model_info", "/get_model_info"):
                self.routes[("GET", path)] = self.model_info

    def _initial_behaviour(self) -> Behaviour:
        args = self.args
        return Behaviour(
            delay=args.delay,
            chunk_delay=args.chunk_delay,
            chunks=args.chunks,
            prefill_us_per_token=args.prefill_us_per_token,
        )

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        path = scope["path"]
        self.stats.by_path[path] = self.stats.by_path.get(path, 0) + 1
        handler = self.routes.get((scope["method"], path))
        if handler is None:
            await respond(send, 404, error_body(f"no route {path}", "not_found_error"))
            return
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        await handler(scope, receive, send, body)

    async def health(self, scope: dict, receive: Any, send: Any, body: bytes) -> None:
        status = 200 if self.behaviour.healthy else 503
        await respond(send, status, b'{"status":"ok"}' if status == 200 else b'{"status":"down"}')

    async def models(self, scope: dict, receive: Any, send: Any, body: bytes) -> None:
        cards = [
            {
                "id": name,
                "object": "model",
                "created": 0,
                "owned_by": self.engine,
                "root": self.args.model,
                "max_model_len": self.max_model_len,
            }
            for name in self.names
        ]
        await respond(send, 200, orjson.dumps({"object": "list", "data": cards}))

    async def server_info(self, scope: dict, receive: Any, send: Any, body: bytes) -> None:
        """The fields of SGLang's `/server_info` that its model gateway reads."""
        info = {
            "model_path": self.args.model,
            "served_model_name": self.model,
            "tp_size": 1,
            "dp_size": 1,
            "version": "0.0.0-fake",
            "max_total_tokens": self.kv_cache_tokens,
            "max_running_requests": 256,
        }
        await respond(send, 200, orjson.dumps(info))

    async def model_info(self, scope: dict, receive: Any, send: Any, body: bytes) -> None:
        info = {
            "model_path": self.args.model,
            "tokenizer_path": self.args.model,
            "is_generation": True,
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
        }
        await respond(send, 200, orjson.dumps(info))

    def kv_usage(self) -> float:
        if self.behaviour.kv_usage is not None:
            return float(self.behaviour.kv_usage)
        num_blocks = self.kv_cache_tokens // self.block_size if self.kv_cache_tokens else 0
        return self.cache.used_blocks / num_blocks if num_blocks else 0.0

    async def load(self, scope: dict, receive: Any, send: Any, body: bytes) -> None:
        num_blocks = self.kv_cache_tokens // self.block_size if self.kv_cache_tokens else 0
        used = self.cache.used_blocks
        report = {
            "running": self.stats.active - self.stats.waiting,
            "waiting": self.behaviour.waiting + self.stats.waiting,
            "kv_usage": self.kv_usage(),
            "num_blocks": num_blocks,
            "free_blocks": num_blocks - used,
            "block_size": self.block_size,
            "prefix_cache_queries": self.cache.queries,
            "prefix_cache_hits": self.cache.hits,
            "generation_tokens": self.stats.generation_tokens,
        }
        await respond(send, 200, orjson.dumps(report))

    async def metrics(self, scope: dict, receive: Any, send: Any, body: bytes) -> None:
        lines = self._sglang_metrics() if self.engine == "sglang" else self._vllm_metrics()
        await respond(send, 200, ("\n".join(lines) + "\n").encode(), b"text/plain; version=0.0.4")

    def _vllm_metrics(self) -> list[str]:
        label = f'{{model_name="{self.model}"}}'
        return [
            "# TYPE vllm:num_requests_running gauge",
            f"vllm:num_requests_running{label} {float(self.stats.active)}",
            "# TYPE vllm:num_requests_waiting gauge",
            f"vllm:num_requests_waiting{label} {float(self.behaviour.waiting)}",
            "# TYPE vllm:kv_cache_usage_perc gauge",
            f"vllm:kv_cache_usage_perc{label} {self.kv_usage()}",
            "# TYPE vllm:prefix_cache_queries_total counter",
            f"vllm:prefix_cache_queries_total{label} {float(self.cache.queries)}",
            "# TYPE vllm:prefix_cache_hits_total counter",
            f"vllm:prefix_cache_hits_total{label} {float(self.cache.hits)}",
            "# TYPE vllm:generation_tokens_total counter",
            f"vllm:generation_tokens_total{label} {float(self.stats.generation_tokens)}",
        ]

    def _sglang_metrics(self) -> list[str]:
        """SGLang's names and labels (`--enable-metrics`), for one data-parallel rank."""
        label = f'{{model_name="{self.model}",engine_type="unified",tp_rank="0",pp_rank="0"}}'
        cached = label[:-1] + ',cache_source="device"}'
        return [
            "# TYPE sglang:num_running_reqs gauge",
            f"sglang:num_running_reqs{label} {float(self.stats.active)}",
            "# TYPE sglang:num_queue_reqs gauge",
            f"sglang:num_queue_reqs{label} {float(self.behaviour.waiting)}",
            "# TYPE sglang:token_usage gauge",
            f"sglang:token_usage{label} {self.kv_usage()}",
            "# TYPE sglang:prompt_tokens_total counter",
            f"sglang:prompt_tokens_total{label} {float(self.cache.queries)}",
            "# TYPE sglang:cached_tokens_total counter",
            f"sglang:cached_tokens_total{cached} {float(self.cache.hits)}",
        ]

    async def tokenize(self, scope: dict, receive: Any, send: Any, body: bytes) -> None:
        request = orjson.loads(body or b"{}")
        text = prompt_text(request, "messages" in request)
        tokens = [ord(c) % 1000 for c in text[::CHARS_PER_TOKEN]]
        reply = {"count": len(tokens), "max_model_len": self.max_model_len, "tokens": tokens}
        await respond(send, 200, orjson.dumps(reply))

    async def detokenize(self, scope: dict, receive: Any, send: Any, body: bytes) -> None:
        request = orjson.loads(body or b"{}")
        text = "".join(chr(32 + t % 90) for t in request.get("tokens", []))
        await respond(send, 200, orjson.dumps({"prompt": text}))

    async def get_stats(self, scope: dict, receive: Any, send: Any, body: bytes) -> None:
        await respond(send, 200, orjson.dumps(asdict(self.stats)))

    async def set_config(self, scope: dict, receive: Any, send: Any, body: bytes) -> None:
        changes = orjson.loads(body or b"{}")
        for name, value in changes.items():
            if not hasattr(self.behaviour, name):
                await respond(send, 400, error_body(f"unknown setting {name}", "invalid_request"))
                return
            setattr(self.behaviour, name, value)
        await respond(send, 200, orjson.dumps(asdict(self.behaviour)))

    async def reset(self, scope: dict, receive: Any, send: Any, body: bytes) -> None:
        self.behaviour = self._initial_behaviour()
        self.stats = Stats()
        self.cache = PrefixCache(self.kv_cache_tokens, self.block_size)
        await respond(send, 200, b"{}")

    async def generate(self, scope: dict, receive: Any, send: Any, body: bytes) -> None:
        """One generation request; a disconnect watcher counts aborts the way an engine would."""
        self.stats.requests += 1
        try:
            request = orjson.loads(body)
        except orjson.JSONDecodeError:
            await respond(send, 400, error_body("body is not JSON", "invalid_request_error"))
            return
        self.stats.last_body = request
        behaviour = self.behaviour
        if request.get("model") not in self.names:
            message = f"The model `{request.get('model')}` does not exist."
            await respond(send, 404, error_body(message, "not_found_error"))
            return
        if behaviour.status:
            await respond(send, behaviour.status, error_body("injected failure", "api_error"))
            return
        if self._waiting_full():
            await respond(send, 503, error_body("too many requests waiting", "api_error"))
            return
        self.stats.active += 1
        task = asyncio.current_task()
        finished = False
        slot = False

        async def watch() -> None:
            message = await receive()
            if message["type"] == "http.disconnect" and not finished and task is not None:
                task.cancel()

        watcher = asyncio.get_running_loop().create_task(watch())
        try:
            await self._take_slot()
            slot = True
            if behaviour.hang:
                await asyncio.Event().wait()
            await self._answer(scope["path"] == "/v1/chat/completions", request, send)
            finished = True
            self.stats.completed += 1
        except asyncio.CancelledError:
            self.stats.aborted += 1
        except ConnectionDroppedError:
            pass
        finally:
            self.stats.active -= 1
            if slot:
                self._free_slot()
            if not watcher.done():
                watcher.cancel()

    def _waiting_full(self) -> bool:
        limit, cap = self.behaviour.max_waiting, self.behaviour.max_running
        return (
            bool(cap) and limit is not None and self.running >= cap and self.stats.waiting >= limit
        )

    async def _take_slot(self) -> None:
        """One of `max_running` slots, in arrival order; a freed slot is handed over as is."""
        cap = self.behaviour.max_running
        if not cap or self.running < cap:
            self.running += 1
            return
        turn = asyncio.get_running_loop().create_future()
        self.slots.append(turn)
        self.stats.waiting += 1
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self._free_slot()  # handed over just as the client left: pass it on
            raise
        finally:
            self.stats.waiting -= 1

    def _free_slot(self) -> None:
        while self.slots:
            turn = self.slots.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self.running -= 1

    async def embeddings(self, scope: dict, receive: Any, send: Any, body: bytes) -> None:
        """One embedding per input, counted like a generation request."""
        self.stats.requests += 1
        request = orjson.loads(body or b"{}")
        self.stats.last_body = request
        if request.get("model") not in self.names:
            message = f"The model `{request.get('model')}` does not exist."
            await respond(send, 404, error_body(message, "not_found_error"))
            return
        if self.behaviour.status:
            await respond(send, self.behaviour.status, error_body("injected failure", "api_error"))
            return
        inputs = request.get("input")
        if isinstance(inputs, str) or (inputs and isinstance(inputs[0], int)):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs:
            await respond(send, 400, error_body("'input' is required", "invalid_request_error"))
            return
        size = request.get("dimensions") or self.args.embedding_size
        data, prompt_tokens = [], 0
        for index, item in enumerate(inputs):
            text = item if isinstance(item, str) else prompt_text({"prompt": item}, False)
            prompt_tokens += max(len(text) // CHARS_PER_TOKEN, 1)
            vector = fake_embedding(text, int(size))
            if request.get("encoding_format") == "base64":
                packed = struct.pack(f"<{len(vector)}f", *vector)
                data.append({"object": "embedding", "index": index,
                             "embedding": base64.b64encode(packed).decode()})  # fmt: skip
            else:
                data.append({"object": "embedding", "index": index, "embedding": vector})
        self.stats.completed += 1
        usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
        answer = {"object": "list", "data": data, "model": self.model, "usage": usage}
        await respond(send, 200, orjson.dumps(answer))

    async def _answer(self, chat: bool, request: dict, send: Any) -> None:
        behaviour = self.behaviour
        text = prompt_text(request, chat)
        prompt_tokens = len(text) // CHARS_PER_TOKEN
        cached = self.cache.lookup_and_insert(text)
        prefill = (prompt_tokens - cached) * behaviour.prefill_us_per_token / 1e6
        if behaviour.delay or prefill:
            await asyncio.sleep(behaviour.delay + prefill)
        self.counter += 1
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{self.replica_id}-{self.counter}"
        max_tokens = request.get("max_completion_tokens") or request.get("max_tokens")
        count = behaviour.chunks if max_tokens is None else min(behaviour.chunks, int(max_tokens))
        pieces = [f"t{i} " for i in range(count)]
        self.stats.generation_tokens += count
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": count,
            "total_tokens": prompt_tokens + count,
            "prompt_tokens_details": {"cached_tokens": cached},
        }
        finish = "length" if max_tokens is not None and count == int(max_tokens) else "stop"
        if not request.get("stream"):
            await respond(
                send,
                200,
                orjson.dumps(full_response(chat, ident, self.model, pieces, finish, usage)),
            )
            return
        options = request.get("stream_options") or {}
        include_usage = bool(options.get("include_usage"))
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream"),
                    (b"cache-control", b"no-cache"),
                ],
            }
        )
        frames = stream_frames(
            chat, ident, self.model, pieces, finish, usage if include_usage else None
        )
        for i, frame in enumerate(frames):
            if i and behaviour.chunk_delay:
                await asyncio.sleep(behaviour.chunk_delay)
            if i == behaviour.fail_after_chunks:
                raise ConnectionDroppedError
            await send({"type": "http.response.body", "body": frame, "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})


def fake_embedding(text: str, size: int) -> list[float]:
    """A unit vector that depends only on the text."""
    digest = hashlib.sha256(text.encode()).digest()
    raw = [digest[i % len(digest)] - 127.5 for i in range(size)]
    norm = math.sqrt(sum(v * v for v in raw)) or 1.0
    return [v / norm for v in raw]


class ConnectionDroppedError(Exception):
    """Raised to abandon a stream mid-way: uvicorn then closes the connection without a last chunk."""


def full_response(
    chat: bool, ident: str, model: str, pieces: list[str], finish: str, usage: dict
) -> dict:
    text = "".join(pieces)
    if chat:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text, "refusal": None},
            "logprobs": None,
            "finish_reason": finish,
        }
        kind = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        kind = "text_completion"
    return {
        "id": ident,
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": usage,
    }


def stream_frames(
    chat: bool, ident: str, model: str, pieces: list[str], finish: str, usage: dict | None
) -> list[bytes]:
    created = int(time.time())
    kind = "chat.completion.chunk" if chat else "text_completion"
    head = {"id": ident, "object": kind, "created": created, "model": model}
    frames = []

    def frame(choices: list, with_usage: dict | None = None) -> bytes:
        chunk = {**head, "choices": choices}
        if usage is not None:
            chunk["usage"] = with_usage
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    if chat:
        frames.append(
            frame(
                [
                    {
                        "index": 0,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ]
            )
        )
    last = len(pieces) - 1
    for i, piece in enumerate(pieces):
        done = finish if i == last else None
        if chat:
            choice = {
                "index": 0,
                "delta": {"content": piece},
                "logprobs": None,
                "finish_reason": done,
            }
        else:
            choice = {"index": 0, "text": piece, "logprobs": None, "finish_reason": done}
        frames.append(frame([choice]))
    if not pieces:
        frames.append(frame([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish}]))
    if usage is not None:
        frames.append(frame([], usage))
    return frames


def error_body(message: str, kind: str) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": kind, "param": None, "code": None}})


async def respond(
    send: Any, status: int, body: bytes, content_type: bytes = b"application/json"
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", content_type)],
        }
    )
    await send({"type": "http.response.body", "body": body})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", default="fake-model")
    parser.add_argument(
        "--served-model-name", nargs="+", help="names it answers to (default: --model)"
    )
    parser.add_argument("--id", default="", help="replica id reported in response ids")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before the first chunk")
    parser.add_argument("--chunk-delay", type=float, default=0.0, help="seconds between chunks")
    parser.add_argument("--chunks", type=int, default=8, help="content chunks per response")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument(
        "--kv-cache-tokens", type=int, default=0, help="simulated prefix cache size"
    )
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument(
        "--embedding-size", type=int, default=8, help="vllm, sglang: /v1/embeddings"
    )
    parser.add_argument("--prefill-us-per-token", type=float, default=0.0)
    parser.add_argument(
        "--engine",
        choices=["fleetserve", "vllm", "sglang"],
        default="fleetserve",
        help="vllm, sglang: no /load, so routers must read that engine's /metrics",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    args = parse_args(argv)
    uvicorn.run(
        FakeReplica(args),
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
        lifespan="on",
    )


if __name__ == "__main__":
    main()
