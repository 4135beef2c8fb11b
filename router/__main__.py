"""`python -m router` (and `fleet router`): run one router process in the foreground."""

from __future__ import annotations

import argparse
import logging
import os

from fleet.control.internal import INTERNAL_SECRET_ENV, exit_on_placeholders
from fleet.control.keys import admin_key_from_env
from fleet.control.redis_conn import add_redis_url_argument
from fleet.control.web_security import (
    add_cors_arguments,
    add_tls_arguments,
    cors_from_args,
    tls_from_args,
)
from router.config import RouterConfig
from router.policies import POLICIES
from router.pool import PoolSettings

UPSTREAM_KEY_ENV = "FLEET_UPSTREAM_API_KEY"
METRICS_KEY_ENV = "FLEET_METRICS_KEY"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fleet router",
        description="One OpenAI-compatible endpoint in front of the fleet's replicas.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    add_redis_url_argument(parser)
    parser.add_argument("--policy", choices=list(POLICIES), default="prefix")
    parser.add_argument(
        "--replica",
        action="append",
        default=[],
        metavar="[ID=]URL",
        help="a static replica (repeatable); works with or without --redis-url",
    )
    parser.add_argument(
        "--admin-key",
        default=admin_key_from_env(),
        help="key for /admin/... (env FLEET_ADMIN_KEY); the admin API is off without one",
    )
    parser.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help="a static client key (repeatable), for routers without Redis; "
        "with neither this nor --redis-url the router is open",
    )
    parser.add_argument(
        "--no-fleet-keys",
        dest="fleet_keys",
        action="store_false",
        help="do not check the fleet's API keys in Redis (a trusted network only); "
        "--api-key still applies",
    )
    parser.add_argument(
        "--upstream-api-key",
        default=os.environ.get(UPSTREAM_KEY_ENV),
        help=f"bearer key the router presents to --replica URLs (env {UPSTREAM_KEY_ENV}); "
        f"the fleet's own replicas get one key each, from env {INTERNAL_SECRET_ENV}",
    )
    parser.add_argument(
        "--metrics-key",
        default=os.environ.get(METRICS_KEY_ENV),
        help=f"bearer key /metrics requires (env {METRICS_KEY_ENV}; the admin key also works); "
        "without one /metrics is open",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=32 * 1024 * 1024,
        help="largest request body (413 beyond, at once from Content-Length); also bounds the "
        "pipelined requests one connection may hold",
    )
    parser.add_argument(
        "--max-answer-bytes",
        type=int,
        default=64 * 1024 * 1024,
        help="largest whole (not streamed) answer the router holds for a client (502 beyond)",
    )
    parser.add_argument("--connect-timeout", type=float, default=3.0, help="seconds")
    parser.add_argument(
        "--ttfb-timeout",
        type=float,
        default=300.0,
        help="seconds to the first byte (the whole answer when not streaming)",
    )
    parser.add_argument(
        "--idle-timeout", type=float, default=60.0, help="seconds between two chunks of a stream"
    )
    parser.add_argument(
        "--max-attempts", type=int, default=3, help="tries per request, each on a different replica"
    )
    parser.add_argument(
        "--retry-budget", type=float, default=0.2, help="retries allowed as a fraction of requests"
    )
    parser.add_argument(
        "--prefix-queue-weight",
        type=float,
        default=64.0,
        help="prefix policy: prompt tokens one queued request is worth",
    )
    parser.add_argument(
        "--probe-interval", type=float, default=1.0, help="seconds between /health probes"
    )
    parser.add_argument(
        "--load-interval", type=float, default=1.0, help="seconds between /load polls"
    )
    parser.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=10_000,
        help="open client connections; more get a 503 and are closed",
    )
    parser.add_argument(
        "--upstream-ca-certs", help="CA bundle trusted for https:// replicas (default: system's)"
    )
    add_tls_arguments(parser.add_argument_group("TLS (clients to the router)"))
    add_cors_arguments(parser.add_argument_group("CORS"))
    return parser


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
        pool=PoolSettings(
            probe_interval_s=args.probe_interval,
            load_interval_s=args.load_interval,
            ca_certs=args.upstream_ca_certs,
        ),
        max_connections=args.max_connections,
        tls=tls_from_args(args),
        cors=cors_from_args(args),
    )


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    exit_on_placeholders(
        "fleet router", FLEET_ADMIN_KEY=args.admin_key, FLEET_REDIS_URL=args.redis_url,
        FLEET_UPSTREAM_API_KEY=args.upstream_api_key,
        FLEET_INTERNAL_SECRET=os.environ.get(INTERNAL_SECRET_ENV),
    )  # fmt: skip
    if not args.replica and not args.redis_url:
        build_parser().error("give --replica URL (repeatable) and/or --redis-url")
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    from router.server import serve

    try:
        config = config_from_args(args)
    except ValueError as exc:
        build_parser().error(str(exc))
    serve(config)


if __name__ == "__main__":
    main()
