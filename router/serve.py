"""Run the router: its own HTTP server (router.http.server) on uvloop, until SIGTERM or SIGINT,
then a graceful stop (no new connections, requests in flight finish, up to 30 s).

Once started, the objects that live as long as the process are moved out of the garbage
collector's view (`gc.freeze`) and young collections run less often: a request's objects die by
reference counting, so frequent collections only rescan the same long-lived state (they were ~3%
of the router's CPU under load).
"""

from __future__ import annotations

import gc
from collections.abc import Callable

import uvloop

from router.app import RouterApp
from router.config import RouterConfig
from router.http.cors import CorsPolicy
from router.http.server import HttpServer, run_until_signalled
from router.workers.metrics import WorkerMetrics

GRACE_S = 30.0
GC_YOUNG_THRESHOLD = 20_000
LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


def http_server(app: RouterApp, config: RouterConfig) -> HttpServer:
    """The client-facing server; TLS and CORS only when configured (none of their work else)."""
    return HttpServer(
        app.handle,
        config.host,
        config.port,
        max_body_bytes=config.max_body_bytes,
        max_connections=config.max_connections,
        tls=config.tls.server_context() if config.tls is not None else None,
        cors=CorsPolicy(config.cors) if config.cors is not None else None,
        reuse_port=config.worker is not None,
    )


def serve(config: RouterConfig, listening: Callable[[], None] = lambda: None) -> None:
    """Serve until signalled; `listening` hears that the port is taken (router.workers)."""
    app = RouterApp(config)
    server = http_server(app, config)
    if isinstance(app.metrics, WorkerMetrics):
        app.metrics.connections = lambda: server.accepted

    async def startup() -> None:
        await app.start()
        gc.collect()
        gc.freeze()
        gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])

    uvloop.run(run_until_signalled(server, startup, app.stop, GRACE_S, listening))
