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

from fleet.control.internal import INTERNAL_SECRET_ENV, exit_on_placeholders, replica_key
from fleet.control.membership import new_replica_id
from fleet.control.redis_conn import add_redis_url_argument
from fleet.control.web_security import (
    add_cors_arguments,
    add_tls_arguments,
    cors_from_args,
    tls_from_args,
)
from replica.config import EngineArgs

API_KEY_ENV = "FLEET_REPLICA_API_KEY"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fleet replica", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="Hugging Face folder or hub id")
    p.add_argument(
        "--served-model-name",
        nargs="+",
        help="names clients use, the first reported in answers (default: --model as given)",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    engine = p.add_argument_group("engine")
    engine.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    engine.add_argument("--dtype", default="auto", help="auto, float32, float16, bfloat16")
    engine.add_argument("--max-model-len", type=int)
    engine.add_argument("--max-num-seqs", type=int, default=256)
    engine.add_argument("--max-num-batched-tokens", type=int)
    engine.add_argument("--block-size", type=int, default=16)
    engine.add_argument("--kv-cache-tokens", type=int, help="KV cache size in tokens (exact)")
    engine.add_argument("--kv-cache-memory", type=int, help="KV cache budget in bytes (CPU)")
    engine.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    engine.add_argument(
        "--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True
    )
    engine.add_argument("--kernel-backend", default="auto", help="auto, torch or triton")
    engine.add_argument("--seed", type=int, default=0)
    fleet = p.add_argument_group("fleet")
    fleet.add_argument(
        "--api-key", default=os.environ.get(API_KEY_ENV), help=f"static key (env {API_KEY_ENV})"
    )
    add_redis_url_argument(fleet)
    fleet.add_argument(
        "--no-fleet-keys",
        dest="fleet_keys",
        action="store_false",
        help="do not check the fleet's API keys in Redis (a trusted network only)",
    )
    fleet.add_argument("--advertise-url", help="URL routers use to reach this replica")
    fleet.add_argument("--replica-id", help="membership id (default: random)")
    serving = p.add_argument_group("serving")
    serving.add_argument(
        "--max-waiting",
        type=int,
        default=1024,
        help="503 new requests while this many sequences (prompts x n) are queued; 0: no limit",
    )
    serving.add_argument(
        "--max-seqs-per-request", type=int, default=256, help="most prompts x n in one request"
    )
    serving.add_argument(
        "--chat-template", help="Jinja template file that replaces the tokenizer's chat template"
    )
    serving.add_argument(
        "--prompt-timeout",
        type=float,
        default=5.0,
        help="seconds to render and tokenize a request's prompt before refusing it (400)",
    )
    serving.add_argument(
        "--drain-grace", type=float, default=30.0, help="seconds in-flight requests get on SIGTERM"
    )
    serving.add_argument("--max-body-bytes", type=int, default=32 * 1024 * 1024)
    serving.add_argument(
        "--protect-info-routes",
        action="store_true",
        help="/load, /metrics and /openapi.json need --api-key or the routers' key "
        "(Prometheus then sends --api-key as its bearer token); /health and /version stay open",
    )
    serving.add_argument("--log-level", default="info")
    add_tls_arguments(p.add_argument_group("TLS"))
    add_cors_arguments(p.add_argument_group("CORS"))
    return p.parse_args(argv)


def engine_args(args: argparse.Namespace) -> EngineArgs:
    """EngineArgs from the flags of the same names, so the two can never drift apart."""
    names = {f.name for f in dataclasses.fields(EngineArgs)}
    values = {k: v for k, v in vars(args).items() if k in names and v is not None}
    values["served_model_name"] = args.served_model_name or args.model
    return EngineArgs(**values)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    secret = os.environ.get(INTERNAL_SECRET_ENV)
    exit_on_placeholders(
        "fleet replica", FLEET_REPLICA_API_KEY=args.api_key, FLEET_INTERNAL_SECRET=secret,
        FLEET_REDIS_URL=args.redis_url,
    )  # fmt: skip
    replica_id = args.replica_id or new_replica_id()  # routers key the replica by this id
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        eargs = engine_args(args)
        tls = tls_from_args(args)
    except ValueError as exc:
        print(f"fleet replica: {exc}", file=sys.stderr)
        return 2
    # Server-only imports stay here: `from replica import LLM` must work without them.
    from replica.async_engine import AsyncEngine
    from replica.server.app import build_app
    from replica.server.runtime import ServerSettings
    from replica.server.serve import DrainingServer, add_cors, uvicorn_config

    settings = ServerSettings(
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
        replica_id=replica_id,
        max_waiting=args.max_waiting or None,
        max_seqs_per_request=args.max_seqs_per_request,
        chat_template=args.chat_template,
        prompt_timeout_s=args.prompt_timeout,
        drain_grace_s=args.drain_grace,
        max_body_bytes=args.max_body_bytes,
        protect_info_routes=args.protect_info_routes,
        tls=tls,
        cors=cors_from_args(args),
    )
    app = build_app(settings, lambda: AsyncEngine(eargs))
    add_cors(app, settings.cors)
    server = DrainingServer(uvicorn_config(app, settings, args.log_level), app.state.runtime)
    server.run()
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
