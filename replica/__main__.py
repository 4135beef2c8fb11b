"""`python -m replica` (also `fleet replica`): serve one model over the OpenAI API.

SIGTERM (or a first Ctrl-C) drains: new requests get 503, in-flight ones finish within
`--drain-grace` seconds, the replica leaves the fleet's membership, and the process exits 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

import typer

from fleet.commands import server_flags as flags
from fleet.commands.preflight import check_model, check_port, check_redis_url, usage_errors
from fleet.control.internal import INTERNAL_SECRET_ENV, exit_on_placeholders, replica_key
from fleet.control.membership import new_replica_id
from fleet.json_body import DEFAULT_MAX_BODY_BYTES
from fleet.web_security import cors_from_args, tls_from_args
from replica.engine.config import EngineArgs
from replica.http_api.tool_calls.registry import ParserName

PROG = "fleet replica"
API_KEY_ENV = "FLEET_REPLICA_API_KEY"
SERVED_NAME_FLAG = "--served-model-name"


ENGINE, SERVING = "Engine", "Serving"

app = flags.server_app(__doc__.split("\n\n")[0])


@app.command()
def replica(
    ctx: typer.Context,
    model: str = typer.Option(..., help="Model folder, or Hugging Face Hub id."),
    served_model_name: list[str] = typer.Option(
        None,
        metavar="NAME...",
        help="Names clients use, the first reported in answers (default: --model as given); "
        "several: --served-model-name a b, as vLLM.",
    ),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8001, min=0, max=65535, help="Port to listen on."),
    device: str = typer.Option("auto", rich_help_panel=ENGINE, help="auto, cpu, cuda or cuda:N."),
    dtype: str = typer.Option(
        "auto", rich_help_panel=ENGINE, help="auto, float32, float16 or bfloat16."
    ),
    max_model_len: int = typer.Option(None, min=1, rich_help_panel=ENGINE, help="Context length."),
    max_num_seqs: int = typer.Option(
        256, min=1, rich_help_panel=ENGINE, help="Sequences decoded together."
    ),
    max_num_batched_tokens: int = typer.Option(
        None, min=1, rich_help_panel=ENGINE, help="Token budget of one engine step."
    ),
    block_size: int = typer.Option(
        16, min=1, rich_help_panel=ENGINE, help="KV cache block, tokens."
    ),
    kv_cache_tokens: int = typer.Option(
        None, min=1, rich_help_panel=ENGINE, help="KV cache size in tokens (exact)."
    ),
    kv_cache_memory: int = typer.Option(
        None, min=1, rich_help_panel=ENGINE, help="KV cache budget in bytes (CPU)."
    ),
    gpu_memory_utilization: float = typer.Option(
        0.9, min=0, max=1, rich_help_panel=ENGINE, help="Share of GPU memory the engine may use."
    ),
    enable_prefix_caching: bool = typer.Option(
        True, rich_help_panel=ENGINE, help="Reuse the KV cache of shared prompt prefixes."
    ),
    kernel_backend: str = typer.Option(
        "auto", rich_help_panel=ENGINE, help="auto, torch or triton."
    ),
    seed: int = typer.Option(0, rich_help_panel=ENGINE, help="Sampling seed."),
    task: str = typer.Option(
        "generate",
        rich_help_panel=ENGINE,
        help="generate (completions, chat) or embed (/v1/embeddings from pooled hidden states).",
    ),
    pooling: str = typer.Option(
        "last", rich_help_panel=ENGINE, help="With --task embed: last (token) or mean pooling."
    ),
    api_key: str = typer.Option(
        None, envvar=API_KEY_ENV, rich_help_panel=flags.FLEET, help="Static client key."
    ),
    redis_url: str = flags.REDIS_URL,
    redis_prefix: str = flags.REDIS_PREFIX,
    fleet_keys: bool = typer.Option(
        True,
        "--fleet-keys/--no-fleet-keys",
        rich_help_panel=flags.FLEET,
        help="Check the fleet's API keys in Redis; --no-fleet-keys only on a trusted network.",
    ),
    advertise_url: str = typer.Option(
        None, rich_help_panel=flags.FLEET, help="URL routers use to reach this replica."
    ),
    kv_events: bool = typer.Option(
        True,
        "--kv-events/--no-kv-events",
        rich_help_panel=flags.FLEET,
        help="Publish the prefix cache's stored and evicted blocks to Redis, for routers' exact "
        "prefix affinity (needs --redis-url and prefix caching).",
    ),
    replica_id: str = typer.Option(
        None, rich_help_panel=flags.FLEET, help="Membership id (default: random)."
    ),
    max_waiting: int = typer.Option(
        1024,
        min=0,
        rich_help_panel=SERVING,
        help="503 new requests while this many sequences (prompts x n) are queued; 0: no limit.",
    ),
    max_seqs_per_request: int = typer.Option(
        256, min=1, rich_help_panel=SERVING, help="Most prompts x n in one request."
    ),
    chat_template: str = typer.Option(
        None,
        rich_help_panel=SERVING,
        help="Jinja template file that replaces the tokenizer's chat template.",
    ),
    tool_call_parser: ParserName = typer.Option(
        "auto",
        rich_help_panel=SERVING,
        help="How tool calls are read from answers: hermes (Qwen, Hermes), llama3_json, mistral; "
        "auto: from the chat template; none: no tool calls.",
    ),
    prompt_timeout: float = typer.Option(
        5.0,
        min=0,
        rich_help_panel=SERVING,
        help="Seconds to render and tokenize a request's prompt before refusing it (400).",
    ),
    drain_grace: float = typer.Option(
        30.0, min=0, rich_help_panel=SERVING, help="Seconds in-flight requests get on SIGTERM."
    ),
    max_body_bytes: int = typer.Option(
        DEFAULT_MAX_BODY_BYTES, min=1, rich_help_panel=SERVING, help="Largest request body."
    ),
    protect_info_routes: bool = typer.Option(
        False,
        rich_help_panel=SERVING,
        help="/load, /metrics and /openapi.json need --api-key or the routers' key (Prometheus "
        "then sends --api-key as its bearer token); /health and /version stay open.",
    ),
    log_level: flags.LogLevel = flags.LOG_LEVEL,
    otlp_endpoint: str = flags.OTLP_ENDPOINT,
    ssl_keyfile: str = flags.SSL_KEYFILE,
    ssl_certfile: str = flags.SSL_CERTFILE,
    ssl_ca_certs: str = flags.SSL_CA_CERTS,
    ssl_cert_reqs: int = flags.SSL_CERT_REQS,
    allowed_origins: object = flags.ALLOWED_ORIGINS,
    allowed_methods: object = flags.ALLOWED_METHODS,
    allowed_headers: object = flags.ALLOWED_HEADERS,
    allow_credentials: bool = flags.ALLOW_CREDENTIALS,
) -> object:
    """Serve one model over the OpenAI API."""
    return flags.hand_over(ctx, locals())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags as `main` reads them (tests and `fleet up`'s launch line checks use this)."""
    return flags.parse(app, PROG, _served_names_as_repeats(argv))


def _served_names_as_repeats(argv: list[str] | None) -> list[str]:
    """vLLM's `--served-model-name a b` as `--served-model-name a --served-model-name b`: an
    option of click takes a fixed number of values."""
    out: list[str] = []
    taking = False  # among the values of a --served-model-name
    for word in sys.argv[1:] if argv is None else argv:
        if taking and not word.startswith("-"):
            if out[-1] != SERVED_NAME_FLAG:  # the first value follows the flag itself
                out.append(SERVED_NAME_FLAG)
            out.append(word)
        else:
            out.append(word)
            taking = word == SERVED_NAME_FLAG
    return out


def engine_args(args: argparse.Namespace) -> EngineArgs:
    """EngineArgs from the flags of the same names, so the two can never drift apart."""
    names = {f.name for f in dataclasses.fields(EngineArgs)}
    values = {k: v for k, v in vars(args).items() if k in names and v is not None}
    values["served_model_name"] = args.served_model_name or args.model
    return EngineArgs(**values)


def main(argv: list[str] | None = None) -> None:
    flags.run(app, PROG, _served_names_as_repeats(argv), serve)


def serve(args: argparse.Namespace) -> int:
    secret = os.environ.get(INTERNAL_SECRET_ENV)
    exit_on_placeholders(
        PROG, FLEET_REPLICA_API_KEY=args.api_key, FLEET_INTERNAL_SECRET=secret,
        FLEET_REDIS_URL=args.redis_url,
    )  # fmt: skip
    with usage_errors(PROG):  # one line and exit 2 before the engine loads, not a traceback after
        check_model(args.model)
        check_redis_url(args.redis_url)
        eargs = engine_args(args)
        tls = tls_from_args(args)
        check_port(args.host, args.port)
    replica_id = args.replica_id or new_replica_id()  # routers key the replica by this id
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # Serving-only imports stay here: `from replica import LLM` must work without them.
    from replica.engine.async_engine import AsyncEngine
    from replica.http_api.app import build_app
    from replica.http_api.runtime import ReplicaSettings
    from replica.http_api.tracing import RequestIdFilter
    from replica.http_api.uvicorn_runner import DrainingServer, add_cors, uvicorn_config

    for handler in logging.getLogger().handlers:  # a request's lines name its X-Request-Id
        handler.addFilter(RequestIdFilter())

    settings = ReplicaSettings(
        model=args.model,
        served_model_name=eargs.served_names()[0],
        served_model_aliases=eargs.served_names()[1:],
        host=args.host,
        port=args.port,
        device=str(eargs.resolve_device()),
        api_key=args.api_key,
        internal_key=replica_key(secret, replica_id) if secret else None,
        redis_url=args.redis_url,
        redis_prefix=args.redis_prefix,
        fleet_keys=args.fleet_keys,
        advertise_url=args.advertise_url,
        kv_events=args.kv_events and args.enable_prefix_caching,
        replica_id=replica_id,
        max_waiting=args.max_waiting or None,
        max_seqs_per_request=args.max_seqs_per_request,
        chat_template=args.chat_template,
        tool_call_parser=args.tool_call_parser,
        prompt_timeout_s=args.prompt_timeout,
        drain_grace_s=args.drain_grace,
        max_body_bytes=args.max_body_bytes,
        protect_info_routes=args.protect_info_routes,
        tls=tls,
        cors=cors_from_args(args),
        otlp_endpoint=args.otlp_endpoint,
    )
    web = build_app(settings, lambda: AsyncEngine(eargs))
    add_cors(web, settings.cors)
    server = DrainingServer(uvicorn_config(web, settings, args.log_level), web.state.runtime)
    server.run()
    return 0 if server.started else 1


if __name__ == "__main__":
    main()
