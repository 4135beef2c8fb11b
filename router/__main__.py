"""`python -m router` (and `fleet router`): run one router process in the foreground."""

from __future__ import annotations

import argparse
import logging
import os

import typer

from fleet.commands import server_flags as flags
from fleet.commands.preflight import FlagError, check_port, check_redis_url, usage_errors
from fleet.control.internal import INTERNAL_SECRET_ENV, exit_on_placeholders
from fleet.control.keys import ADMIN_KEY_ENV
from fleet.json_body import DEFAULT_MAX_BODY_BYTES
from fleet.web_security import cors_from_args, tls_from_args
from router.backends.pool import PoolSettings
from router.config import RouterConfig
from router.queueing.request_queue import QueueSettings
from router.routing.policies import PolicyName

PROG = "fleet router"
UPSTREAM_KEY_ENV = "FLEET_UPSTREAM_API_KEY"
METRICS_KEY_ENV = "FLEET_METRICS_KEY"
LIMITS, UPSTREAM, QUEUE = "Limits and timeouts", "Replicas", "Queue"


def _model_paths(specs: list[str]) -> list[str]:
    for spec in specs:
        if "=" not in spec.strip("="):
            raise typer.BadParameter(f"{spec!r}: expected MODEL=PATH")
    return specs


app = flags.server_app("One OpenAI-compatible endpoint in front of the fleet's replicas.")


@app.command()
def router(
    ctx: typer.Context,
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8000, min=0, max=65535, help="Port to listen on."),
    redis_url: str = flags.REDIS_URL,
    redis_prefix: str = flags.REDIS_PREFIX,
    policy: PolicyName = typer.Option("prefix", help="How a request picks its replica."),
    replica: list[str] = typer.Option(
        [],
        metavar="[ID=]URL",
        rich_help_panel=UPSTREAM,
        help="A static replica (repeatable); works with or without --redis-url.",
    ),
    admin_key: str = typer.Option(
        None, envvar=ADMIN_KEY_ENV, help="Key for /admin/...; the admin API is off without one."
    ),
    api_key: list[str] = typer.Option(
        [],
        metavar="KEY",
        help="A static client key (repeatable), for routers without Redis; with neither this nor "
        "--redis-url the router is open.",
    ),
    fleet_keys: bool = typer.Option(
        True,
        "--fleet-keys/--no-fleet-keys",
        rich_help_panel=flags.FLEET,
        help="Check the fleet's API keys in Redis; --no-fleet-keys only on a trusted network "
        "(--api-key still applies).",
    ),
    upstream_api_key: str = typer.Option(
        None,
        envvar=UPSTREAM_KEY_ENV,
        rich_help_panel=UPSTREAM,
        help=f"Bearer key the router presents to --replica URLs (the fleet's own replicas get "
        f"one key each, from env {INTERNAL_SECRET_ENV}).",
    ),
    metrics_key: str = typer.Option(
        None,
        envvar=METRICS_KEY_ENV,
        help="Bearer key /metrics requires (the admin key also works); without one it is open.",
    ),
    max_body_bytes: int = typer.Option(
        DEFAULT_MAX_BODY_BYTES,
        min=1,
        rich_help_panel=LIMITS,
        help="Largest request body (413 beyond, at once from Content-Length); also bounds the "
        "pipelined requests one connection may hold.",
    ),
    max_answer_bytes: int = typer.Option(
        64 * 1024 * 1024,
        min=1,
        rich_help_panel=LIMITS,
        help="Largest whole (not streamed) answer the router holds for a client (502 beyond).",
    ),
    connect_timeout: float = typer.Option(
        3.0, min=0, rich_help_panel=LIMITS, help="Seconds to connect to a replica."
    ),
    ttfb_timeout: float = typer.Option(
        300.0,
        min=0,
        rich_help_panel=LIMITS,
        help="Seconds to the first byte (the whole answer when not streaming).",
    ),
    idle_timeout: float = typer.Option(
        60.0, min=0, rich_help_panel=LIMITS, help="Seconds between two chunks of a stream."
    ),
    max_attempts: int = typer.Option(
        3, min=1, rich_help_panel=LIMITS, help="Tries per request, each on a different replica."
    ),
    retry_budget: float = typer.Option(
        0.2, min=0, rich_help_panel=LIMITS, help="Retries allowed, as a fraction of requests."
    ),
    prefix_queue_weight: float = typer.Option(
        64.0, min=0, help="Prefix policy: prompt tokens one queued request is worth."
    ),
    kv_events: bool = typer.Option(
        True,
        "--kv-events/--no-kv-events",
        help="Prefix policy: exact affinity from the KV-cache events replicas publish in Redis "
        "(tokenizes prompts with the replica's tokenizer); off: estimate for every replica.",
    ),
    tokenizer: list[str] = typer.Option(
        [],
        metavar="MODEL=PATH",
        callback=_model_paths,
        help="Tokenizer folder or Hub id for a model's exact affinity, instead of the path its "
        "replicas publish (repeatable).",
    ),
    probe_interval: float = typer.Option(
        1.0, min=0, rich_help_panel=UPSTREAM, help="Seconds between /health probes."
    ),
    load_interval: float = typer.Option(
        1.0, min=0, rich_help_panel=UPSTREAM, help="Seconds between /load polls."
    ),
    queue_size: int = typer.Option(
        1024,
        min=0,
        rich_help_panel=QUEUE,
        help="Requests that may wait for a replica when none can take them now (429 beyond); "
        "0 answers those with a 503 at once.",
    ),
    queue_timeout: float = typer.Option(
        30.0,
        min=0,
        rich_help_panel=QUEUE,
        help="Seconds a request may wait in the queue (then 503 with Retry-After).",
    ),
    queue_per_key: int = typer.Option(
        0,
        min=0,
        rich_help_panel=QUEUE,
        help="Queued requests one API key may have (429 beyond); 0: only --queue-size bounds it.",
    ),
    replica_max_in_flight: int = typer.Option(
        0,
        min=0,
        rich_help_panel=QUEUE,
        help="Requests this router sends one replica at a time; more wait in the queue "
        "(e.g. the replicas' --max-num-seqs divided by the number of routers). 0: no cap.",
    ),
    workers: int = typer.Option(
        1,
        min=1,
        max=64,
        help="Router processes on the one port (SO_REUSEPORT: the kernel spreads connections); "
        "1 runs the router in this process.",
    ),
    log_level: flags.LogLevel = flags.LOG_LEVEL,
    otlp_endpoint: str = flags.OTLP_ENDPOINT,
    max_connections: int = typer.Option(
        10_000,
        min=1,
        rich_help_panel=LIMITS,
        help="Open client connections; more get a 503 and are closed.",
    ),
    upstream_ca_certs: str = typer.Option(
        None,
        rich_help_panel=UPSTREAM,
        help="CA bundle trusted for https:// replicas (default: the system's).",
    ),
    ssl_keyfile: str = flags.SSL_KEYFILE,
    ssl_certfile: str = flags.SSL_CERTFILE,
    ssl_ca_certs: str = flags.SSL_CA_CERTS,
    ssl_cert_reqs: int = flags.SSL_CERT_REQS,
    allowed_origins: object = flags.ALLOWED_ORIGINS,
    allowed_methods: object = flags.ALLOWED_METHODS,
    allowed_headers: object = flags.ALLOWED_HEADERS,
    allow_credentials: bool = flags.ALLOW_CREDENTIALS,
) -> object:
    """One OpenAI-compatible endpoint in front of the fleet's replicas."""
    return flags.hand_over(ctx, locals())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags as `main` reads them (tests and deploy-file checks use this)."""
    return flags.parse(app, PROG, argv)


def config_from_args(args: argparse.Namespace) -> RouterConfig:
    return RouterConfig(
        host=args.host,
        port=args.port,
        redis_url=args.redis_url,
        redis_prefix=args.redis_prefix,
        policy=args.policy,
        replicas=args.replica,
        admin_key=args.admin_key,
        api_keys=args.api_key,
        upstream_api_key=args.upstream_api_key,
        internal_secret=os.environ.get(INTERNAL_SECRET_ENV) or None,
        fleet_keys=args.fleet_keys,
        metrics_key=args.metrics_key,
        max_answer_bytes=args.max_answer_bytes,
        max_body_bytes=args.max_body_bytes,
        connect_timeout_s=args.connect_timeout,
        ttfb_timeout_s=args.ttfb_timeout,
        idle_timeout_s=args.idle_timeout,
        max_attempts=args.max_attempts,
        retry_budget_ratio=args.retry_budget,
        prefix_queue_weight=args.prefix_queue_weight,
        kv_events=args.kv_events,
        tokenizers=dict(spec.split("=", 1) for spec in args.tokenizer),
        pool=PoolSettings(
            probe_interval_s=args.probe_interval,
            load_interval_s=args.load_interval,
            ca_certs=args.upstream_ca_certs,
        ),
        queue=QueueSettings(
            size=args.queue_size,
            timeout_s=args.queue_timeout,
            per_key=args.queue_per_key,
            replica_max_in_flight=args.replica_max_in_flight,
        ),
        max_connections=args.max_connections,
        tls=tls_from_args(args),
        cors=cors_from_args(args),
        otlp_endpoint=args.otlp_endpoint,
    )


def checked_config(args: argparse.Namespace) -> RouterConfig:
    """The config, or one line naming the flag and exit status 2, before anything starts."""
    exit_on_placeholders(
        PROG, FLEET_ADMIN_KEY=args.admin_key, FLEET_REDIS_URL=args.redis_url,
        FLEET_UPSTREAM_API_KEY=args.upstream_api_key,
        FLEET_INTERNAL_SECRET=os.environ.get(INTERNAL_SECRET_ENV),
    )  # fmt: skip
    with usage_errors(PROG):
        if not args.replica and not args.redis_url:
            raise FlagError("give --replica URL (repeatable) and/or --redis-url")
        check_redis_url(args.redis_url)
        config = config_from_args(args)
        check_port(args.host, args.port)
    return config


def serve(args: argparse.Namespace) -> int:
    config = checked_config(args)
    from router.serve import GRACE_S, LOG_FORMAT, serve

    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
    if args.workers > 1:
        from fleet.embedded_redis import free_port
        from router.workers.supervisor import run_workers

        if config.port == 0:  # every worker must bind the same port: choose it here
            config.port = free_port(config.host)
        return run_workers(config, args.workers, PROG, GRACE_S)
    serve(config)
    return 0


def main(argv: list[str] | None = None) -> None:
    flags.run(app, PROG, argv, serve)


if __name__ == "__main__":
    main()
