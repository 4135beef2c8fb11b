"""Routes around generation: models, health, version, load, metrics, tokenize, detokenize."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from starlette.requests import Request
from starlette.responses import Response

from fleet.control.errors import APIError
from replica.http_api.body import json_response, read_body, runtime_of
from replica.http_api.metrics import CONTENT_TYPE
from replica.http_api.prompts import chat_token_ids, encode
from replica.http_api.protocol import (
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
    counter = next(iter(runtime.metrics.generation_tokens.collect()))  # this counter only: ~5 us
    generated = next(s.value for s in counter.samples if s.name.endswith("_total"))
    return json_response(
        {
            "model": runtime.settings.served_model_name,
            "status": runtime.state,
            "in_flight": runtime.inflight,
            "generation_tokens": int(generated or 0),
            "task": runtime.task,
            **(runtime.load() or {}),
        }
    )


async def metrics(request: Request) -> Response:
    check_info_access(request)
    return Response(runtime_of(request).metrics.render(), media_type=CONTENT_TYPE)


def _model_card(request: Request, name: str) -> dict:
    runtime = runtime_of(request)
    return {
        "id": name,
        "object": "model",
        "created": runtime.started_at,
        "owned_by": "fleetserve",
        "root": runtime.settings.model,
        "max_model_len": runtime.engine.max_model_len,
        "task": runtime.task,  # generate or embed: which routes this replica answers
    }


async def list_models(request: Request) -> Response:
    """One card per served name, the primary first (as vLLM lists `--served-model-name a b`)."""
    runtime = runtime_of(request)
    await runtime.auth.authenticate(request)
    cards = [_model_card(request, name) for name in runtime.settings.served_names]
    return json_response({"object": "list", "data": cards})


async def get_model(request: Request) -> Response:
    runtime = runtime_of(request)
    await runtime.auth.authenticate(request)
    name = request.path_params["model"]
    primary = runtime.check_model(name)
    return json_response(
        _model_card(request, name if name in runtime.settings.served_names else primary)
    )


# Hugging Face architecture class of each model type we serve (SGLang's /model_info reports it).
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


async def server_info(request: Request) -> Response:
    """SGLang's `/server_info` (also `/get_server_info`), limited to the fields SGLang's model
    gateway reads when it registers a worker: its model id is `served_model_name`. Nothing of
    the replica's configuration beyond that (no keys, no control-plane address)."""
    runtime = runtime_of(request)
    await runtime.auth.authenticate(request)
    engine = runtime.engine
    load = runtime.load()
    return json_response(
        {
            "model_path": runtime.settings.model,
            "served_model_name": runtime.settings.served_model_name,
            "tp_size": 1,
            "dp_size": 1,
            "version": VERSION,
            "context_length": engine.max_model_len,
            "max_total_tokens": load["kv_capacity_tokens"] if load else None,
            "max_prefill_tokens": engine.core.scheduler.max_num_batched_tokens,
            "max_running_requests": engine.args.max_num_seqs,
        }
    )


async def model_info(request: Request) -> Response:
    """SGLang's `/model_info` (also `/get_model_info`): what the gateway labels a worker with."""
    runtime = runtime_of(request)
    await runtime.auth.authenticate(request)
    engine = runtime.engine
    model_type = engine.core.model_config.model_type
    return json_response(
        {
            "model_path": runtime.settings.model,
            "tokenizer_path": engine.args.tokenizer or runtime.settings.model,
            "is_generation": True,
            "model_type": model_type,
            "architectures": [ARCHITECTURES[model_type]],
        }
    )


async def tokenize(request: Request) -> Response:
    runtime = runtime_of(request)
    await runtime.auth.authenticate(request)
    body = parse_body(TokenizeRequest, await read_body(request), runtime.body_bounds)
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
    body = parse_body(DetokenizeRequest, await read_body(request), runtime.body_bounds)
    runtime.check_model(body.model)
    vocab = len(runtime.engine.tokenizer)
    if any(t >= vocab for t in body.tokens):
        raise APIError(400, f"token ids must be below the vocabulary size {vocab}", "tokens")
    return json_response({"prompt": runtime.engine.tokenizer.decode(body.tokens)})
