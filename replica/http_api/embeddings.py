"""POST /v1/embeddings on a replica started with `--task embed`: one or several inputs (text or
token ids, as OpenAI accepts), each pooled by the engine into a normalised vector; `dimensions`
truncates and renormalises, `encoding_format: base64` packs little-endian float32 (what the openai
SDK asks for by default, then decodes).

The inputs run as separate engine requests that the engine batches under its step budget; the
request's input count is bounded like a completion's prompts x n (`--max-seqs-per-request`), and
they count against the replica's queue limit like sequences, so a huge list is a 400 or a 503,
never a pile of work. A client that leaves aborts every input still running.
"""

from __future__ import annotations

import asyncio
import base64
import struct
import time
import uuid
from collections.abc import AsyncGenerator

from starlette.requests import Request
from starlette.responses import Response

from fleet.control.errors import APIError
from replica.engine.outputs import PoolingOutput
from replica.engine.pooling import truncate
from replica.http_api.body import json_response, read_body, runtime_of
from replica.http_api.disconnect import until_disconnect
from replica.http_api.generation import RequestScope
from replica.http_api.prompts import encode
from replica.http_api.protocol import EmbeddingRequest, parse_body


async def create_embedding(request: Request) -> Response:
    arrival = time.time()
    runtime = runtime_of(request)
    record = await runtime.auth.authenticate(request)
    engine = runtime.accept("embed")
    body = parse_body(EmbeddingRequest, await read_body(request), runtime.body_bounds)
    model = runtime.check_model(body.model)
    check_dimensions(body.dimensions, engine.core.model_config.hidden_size)
    inputs = body.inputs
    runtime.check_fanout(len(inputs), "input")
    tokenizer, limits = engine.tokenizer, runtime.limits
    token_ids = await runtime.prompts.run(
        lambda: [
            encode(tokenizer, i, limits, param="input") if isinstance(i, str) else i for i in inputs
        ],
        "input",
    )
    request_id = f"embd-{uuid.uuid4().hex}"
    streams = [engine.embed(f"{request_id}-{i}", ids) for i, ids in enumerate(token_ids)]
    runtime.check_queue(len(streams))
    prompt_tokens = sum(len(ids) for ids in token_ids)
    admission = await runtime.auth.admit(record, body.model or model, prompt_tokens)
    scope = RequestScope(runtime, admission, arrival, prompt_tokens, len(streams))
    try:
        outputs = await until_disconnect(request, _pool_all(streams))
        await scope.settle(prompt_tokens, 0)
    finally:
        await scope.close()
    runtime.metrics.prompt_tokens.inc(prompt_tokens)
    runtime.metrics.e2e.observe(time.time() - arrival)
    data = [
        {"object": "embedding", "index": i, "embedding": encoded(out.embedding, body)}
        for i, out in enumerate(outputs)
    ]
    usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
    return json_response({"object": "list", "data": data, "model": model, "usage": usage})


def check_dimensions(dimensions: int | None, hidden_size: int) -> None:
    if dimensions is not None and dimensions > hidden_size:
        raise APIError(
            400,
            f"'dimensions' {dimensions} is larger than this model's embedding size {hidden_size}",
            "dimensions",
        )


def encoded(embedding: list[float], body: EmbeddingRequest) -> list[float] | str:
    if body.dimensions is not None and body.dimensions < len(embedding):
        embedding = truncate(embedding, body.dimensions)
    if body.encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(embedding)}f", *embedding)).decode("ascii")
    return embedding


async def _pool_all(streams: list[AsyncGenerator[PoolingOutput, None]]) -> list[PoolingOutput]:
    """Every input's embedding, in input order. Cancelled (the client left) or failed on one
    input, it aborts the inputs still running (each stream's own cleanup)."""
    tasks = [asyncio.ensure_future(_first(stream)) for stream in streams]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _first(stream: AsyncGenerator[PoolingOutput, None]) -> PoolingOutput:
    try:
        async for out in stream:
            return out
        raise APIError(500, "the engine ended an embedding request without a result")
    finally:
        await stream.aclose()
