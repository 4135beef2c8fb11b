"""Routes around generation: models, health, version, load, metrics, tokenize, detokenize."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from starlette.requests import Request
from starlette.responses import Response

from fleet.control.errors import APIError
from replica.server.body import json_response, read_body, runtime_of
from replica.server.metrics import CONTENT_TYPE
from replica.server.prompts import chat_token_ids, encode
from replica.server.protocol import (
    DetokenizeRequest,
    TokenizeRequest,
    parse_body,
    plain_messages,
)

try:
    VERSION = version("fleetserve")
except PackageNotFoundError:  # running from a source tree that was never installed
    VERSION = "0.0.0"


async def health(request: Request) -> Response:
    """200 while taking new work; 503 while loading or draining (probes and routers read this)."""
    state = runtime_of(request).state
    return json_response({"status": state}, 200 if state == "ready" else 503)


async def version_route(request: Request) -> Response:
    return json_response({"version": VERSION})


def check_info_access(request: Request) -> None:
    """Operators may keep the replica's internals private (`--protect-info-routes`)."""
    runtime = runtime_of(request)
    if runtime.settings.protect_info_routes:
        runtime.auth.check_operator(request)


async def load(request: Request) -> Response:
    """Everything a router weighs in one cheap call."""
    check_info_access(request)
    runtime = runtime_of(request)
    return json_response(
        {
            "model": runtime.settings.served_model_name,
            "status": runtime.state,
            "in_flight": runtime.inflight,
            **(runtime.load() or {}),
        }
    )


async def metrics(request: Request) -> Response:
    check_info_access(request)
    return Response(runtime_of(request).metrics.render(), media_type=CONTENT_TYPE)


def _model_card(request: Request) -> dict:
    runtime = runtime_of(request)
    return {
        "id": runtime.settings.served_model_name,
        "object": "model",
        "created": runtime.started_at,
        "owned_by": "fleetserve",
        "root": runtime.settings.model,
        "max_model_len": runtime.engine.max_model_len,
    }


async def list_models(request: Request) -> Response:
    await runtime_of(request).auth.authenticate(request)
    return json_response({"object": "list", "data": [_model_card(request)]})


async def get_model(request: Request) -> Response:
    runtime = runtime_of(request)
    await runtime.auth.authenticate(request)
    runtime.check_model(request.path_params["model"])
    return json_response(_model_card(request))


async def tokenize(request: Request) -> Response:
    runtime = runtime_of(request)
    await runtime.auth.authenticate(request)
    body = parse_body(TokenizeRequest, await read_body(request))
    runtime.check_model(body.model)
    tokenizer, limits = runtime.engine.tokenizer, runtime.limits
    messages = body.messages
    if messages is not None:
        tokens = await runtime.prompts.run(
            lambda: chat_token_ids(
                tokenizer,
                limits,
                plain_messages(messages),
                body.add_generation_prompt,
                template_kwargs=body.chat_template_kwargs,
                chat_template=runtime.chat_template,
            ),
            "messages",
        )
    else:
        text = body.prompt or ""
        tokens = await runtime.prompts.run(
            lambda: encode(tokenizer, text, limits, body.add_special_tokens), "prompt"
        )
    return json_response(
        {"tokens": tokens, "count": len(tokens), "max_model_len": runtime.engine.max_model_len}
    )


async def detokenize(request: Request) -> Response:
    runtime = runtime_of(request)
    await runtime.auth.authenticate(request)
    body = parse_body(DetokenizeRequest, await read_body(request))
    runtime.check_model(body.model)
    vocab = len(runtime.engine.tokenizer)
    if any(t >= vocab for t in body.tokens):
        raise APIError(400, f"token ids must be below the vocabulary size {vocab}", "tokens")
    return json_response({"prompt": runtime.engine.tokenizer.decode(body.tokens)})
