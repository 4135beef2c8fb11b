"""The router application: the parts of one router, and the handlers each request path reaches.

The data path (`/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`, `/tokenize`,
`/detokenize`, and per-replica pinning `/replicas/{id}/...`) is dispatched by path straight to its
handlers on the router's own HTTP server (router.http.server), with no framework objects: every microsecond there
is paid per request. Everything else (`/v1/models`, `/health`, `/metrics`, `/admin/...`) is an
ordinary Starlette app (router.side_app) behind an ASGI bridge.

A proxied request goes one way: read the headers and check the caller's key (cached), plan it
(router.plan: parse the body once with orjson, the model, the prompt's units and token estimate),
check the key may use the plan's model and take its limits, then hand the plan to the proxy,
whose exchange (router.exchange) picks a replica through the policy and relays the answer; when
it ends, the exchange reports to accounting (router.accounting), which counts it, learns from its
usage and settles a fleet key's ticket from that usage. Nothing here waits: with static keys (or
none) the whole request runs on callbacks, and so does a fleet key's (router.keyed: Redis answers
its admission on a callback), but for the first request of a key this router has not cached.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING

from fleet.control.errors import APIError
from fleet.control.keys import KeyStore
from fleet.control.kv_reader import KVEventReader
from fleet.control.membership import MembershipWatcher
from fleet.control.redis_conn import async_client
from router import admin
from router.accounting import Accounting
from router.auth import Gate
from router.backends.backend import Replica
from router.backends.pool import ReplicaPool
from router.backends.retry_budget import RetryBudget
from router.config import RouterConfig
from router.dashboard import Dashboard
from router.http.asgi import asgi_bridge
from router.http.connection import ClientConnection
from router.http.messages import Request
from router.http.paths import PINNED_PREFIX, canonical, needs_canonical, pinned_target
from router.keyed import KeyedRequest
from router.metrics import RouterMetrics
from router.plan import INFERENCE_KINDS, Plan, Planner
from router.proxy import Proxy
from router.routing.exact import ExactAffinity, Recipe
from router.routing.policies import make_policy
from router.routing.policies.prefix import PrefixPolicy
from router.routing.tokens import TokenEstimator
from router.side_app import InfoRoutes, side_app
from router.workers.metrics import WorkerMetrics
from router.workers.placements import SharedPlacements
from router.workers.sync import WorkerSync

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

    from router.tracing import RequestTrace, RouterTracer

log = logging.getLogger("router")

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
EMBEDDINGS_PATH = "/v1/embeddings"
# The engine routes: planned with a token estimate and limits, sent to a replica of their task.
INFERENCE_ROUTES = {
    CHAT_PATH: "chat",
    COMPLETIONS_PATH: "completions",
    EMBEDDINGS_PATH: "embeddings",
}
PLAIN_ROUTES = frozenset({"/tokenize", "/detokenize"})
EXACT_ROUTES = frozenset({"chat", "completions"})  # prompts exact affinity can hash


class RouterApp:
    def __init__(
        self,
        config: RouterConfig,
        *,
        key_store: KeyStore | None = None,
        watcher: MembershipWatcher | None = None,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        """`tracer_provider`: where spans go (tests pass one); else `config.otlp_endpoint`'s."""
        self.config = config
        self.started_at = time.time()
        if config.redis_url:
            if config.fleet_keys:
                key_store = key_store or KeyStore(config.redis_url, prefix=config.redis_prefix)
            watcher = watcher or MembershipWatcher(config.redis_url, prefix=config.redis_prefix)
        self.key_store = key_store
        placements = None
        if config.worker is not None:  # one of several workers: they share where prefixes went
            placements = SharedPlacements(config.worker.folder)
        self.policy = make_policy(config.policy, config.prefix_queue_weight, placements)
        self.metrics: RouterMetrics
        if config.worker is None:
            self.metrics = RouterMetrics(lambda: self.pool.gauges(), lambda: self.proxy.queue.depth)
        else:  # one of several workers: its metrics answer for all of them
            self.metrics = WorkerMetrics(
                config.worker, lambda: self.pool.gauges(), lambda: self.proxy.queue.depth
            )
        self.pool = ReplicaPool(
            config.replicas,
            config.pool,
            watcher,
            on_eject=lambda replica: self.metrics.ejected(replica.id),
            on_leave=lambda replica: self.policy.forget(replica.id),
            on_change=lambda: self.proxy.queue.wake(),
            internal_secret=config.internal_secret,
            static_key=config.upstream_api_key,
        )
        self.exact: ExactAffinity | None = None
        if (
            config.kv_events
            and config.redis_url
            and watcher is not None
            and isinstance(self.policy, PrefixPolicy)
        ):
            reader = KVEventReader(async_client(config.redis_url), config.redis_prefix)
            self.exact = ExactAffinity(reader, config.tokenizers)
            self.policy.exact = self.exact.index_for
            watcher.add_listener(self.exact.on_membership)
        self.gate = Gate(key_store, config.api_keys)
        self.tokens = TokenEstimator()
        self.planner = Planner(self.pool, self.tokens)
        self.accounting = Accounting(self.pool, self.metrics, self.tokens, self.gate)
        self.proxy = Proxy(
            self.pool,
            self.policy,
            self.metrics,
            self.accounting.ended,
            connect_timeout_s=config.connect_timeout_s,
            ttfb_timeout_s=config.ttfb_timeout_s,
            idle_timeout_s=config.idle_timeout_s,
            max_attempts=config.max_attempts,
            budget=RetryBudget(config.retry_budget_ratio, config.retry_budget_min_per_s),
            max_answer_bytes=config.max_answer_bytes,
            queue=config.queue,
        )
        self.dashboard = Dashboard(self)
        self.sync = None
        if isinstance(self.metrics, WorkerMetrics):  # one of several workers (router.workers)
            self.sync = WorkerSync(self.metrics, self.pool)
        self.tracer = tracer(config, tracer_provider)
        self.web = side_app(
            InfoRoutes(config, self.pool, self.gate, self.metrics, self.started_at),
            admin.routes(
                config.admin_key, self.pool, self.policy, self.tokens, self.proxy.budget,
                self.metrics, self.started_at, self.exact,
            ),
            self.dashboard.routes(),
        )  # fmt: skip

    # -- lifecycle

    async def start(self) -> None:
        if self.key_store is not None:
            await self.key_store.start()
        if self.exact is not None:
            self.exact.start()
        await self.pool.start()
        self.proxy.watchdog.start()
        self.dashboard.start()
        if self.sync is not None:
            self.sync.start()
        log.info(
            "router up: policy=%s, %d replicas, auth=%s",
            self.policy.name,
            len(self.pool.replicas),
            "open" if self.gate.open else ("keystore" if self.key_store else "static keys"),
        )

    async def stop(self) -> None:
        if self.sync is not None:
            await self.sync.stop()
        await self.dashboard.stop()
        await self.proxy.close()
        await self.pool.close()
        if self.exact is not None:
            await self.exact.stop()
            await self.exact.reader.client.aclose()
        if self.key_store is not None:
            await self.key_store.close()
        if self.tracer is not None:
            self.tracer.shutdown()

    # -- dispatch

    def handle(self, request: Request, conn: ClientConnection) -> Awaitable[bool | None] | None:
        """Proxied paths are answered from callbacks (router.exchange); the rest runs as a task."""
        path = request.path
        route = INFERENCE_ROUTES.get(path)
        if route is not None and request.method == "POST":
            return self._proxied(request, conn, route, path, None, None)
        if path in PLAIN_ROUTES and request.method == "POST":
            return self._proxied(request, conn, path[1:], path, None, None)
        if route is not None or path in PLAIN_ROUTES:
            conn.respond_error(
                APIError(
                    405, f"Method {request.method:.16} is not allowed on {path}.",
                    headers={"Allow": "POST"},
                )
            )  # fmt: skip
            return None
        if needs_canonical(path):
            try:
                request.path = canonical(path)
            except APIError as err:
                conn.respond_error(err)
                return None
            if request.path != path:
                return self.handle(request, conn)
        if path.startswith(PINNED_PREFIX):
            return self._pinned(request, conn)
        return asgi_bridge(self.web, request, conn)

    def _pinned(self, request: Request, conn: ClientConnection) -> Awaitable[bool | None] | None:
        """`/replicas/{id}/<path>`: the replica's OpenAI routes, served by exactly that replica
        (no retries), under the same key checks, model allow-list and limits as any request."""
        try:
            target = pinned_target(request.path, request.method)
        except APIError as err:
            conn.respond_error(err)
            return None
        replica = self.pool.replicas.get(target.replica_id)
        refusal = None
        if replica is None:
            refusal = APIError(
                404, f"No replica with id '{target.replica_id:.100}'.", code="replica_not_found"
            )
        elif replica.model is None:
            refusal = APIError(
                503,
                f"Replica '{replica.id}' has not said which model it serves yet; retry shortly.",
                code="replica_not_ready",
                headers={"Retry-After": "1"},
            )
        elif target.kind in INFERENCE_KINDS and replica.draining:
            refusal = APIError(
                503,
                f"Replica '{replica.id}' is draining: it takes no new requests.",
                code="replica_draining",
                headers={"Retry-After": "1"},
            )
        return self._proxied(
            request, conn, target.kind, target.path, replica, refusal, target.method
        )

    # -- the data path

    def _proxied(
        self,
        incoming: Request,
        conn: ClientConnection,
        route: str,
        path: str,
        pinned: Replica | None,
        refusal: APIError | None,
        method: str = "POST",
    ) -> Awaitable[bool | None] | None:
        """Check, plan and start one proxied request. Static keys (or none) are checked here and
        now; a fleet key goes on in router.keyed (a coroutine only to look an uncached key up)."""
        started = time.perf_counter()
        authorization, session_id, traceparent = request_headers(incoming.headers)
        trace = None
        if self.tracer is not None:
            trace = self.tracer.begin(route, incoming.request_id, traceparent)
        try:
            if not self.gate.check_static(authorization):
                return self._proxied_with_key(
                    incoming, conn, route, path, pinned, refusal, method,
                    authorization, session_id, started, traceparent, trace,
                )  # fmt: skip
            if trace is not None:
                trace.authenticated(None)
            if refusal is not None:
                raise refusal
            plan = self.planner.plan(route, path, method, incoming.body, pinned, None, session_id)
        except APIError as err:
            conn.respond_error(err)
            self.accounting.refused(route, "", err.status, started, incoming.request_id, trace)
            return None
        if self.exact is not None and self.exact.active:
            exact = self.exact_recipe(plan)
            if exact is not None:
                return self._proxied_exact(
                    plan, exact, conn, started, incoming.request_id, traceparent, trace,
                    authorization or "",
                )  # fmt: skip
        self.proxy.start(
            plan, conn, started, incoming.request_id, traceparent, trace, authorization or ""
        )
        return None

    def exact_recipe(self, plan: Plan) -> tuple[Recipe, list[Replica]] | None:
        """How to hash this plan's prompt for exact affinity, if it can use it (exact is on)."""
        assert self.exact is not None
        if plan.pinned is not None or plan.routing.session_id or plan.route not in EXACT_ROUTES:
            return None
        replicas = self.pool.by_model.get(plan.model)
        recipe = self.exact.recipe_for(replicas) if replicas else None
        return (recipe, replicas) if recipe is not None and replicas else None

    async def _proxied_exact(
        self,
        plan: Plan,
        exact: tuple[Recipe, list[Replica]],
        conn: ClientConnection,
        started: float,
        request_id: bytes,
        traceparent: bytes | None,
        trace: RequestTrace | None,
        caller: str,
    ) -> bool:
        """A static key's request whose prompt is tokenized first (off the event loop); then
        the exchange answers from callbacks."""
        assert self.exact is not None
        await self.exact.prepare(plan, exact[1], exact[0])
        self.proxy.start(plan, conn, started, request_id, traceparent, trace, caller)
        return True

    def _proxied_with_key(
        self,
        incoming: Request,
        conn: ClientConnection,
        route: str,
        path: str,
        pinned: Replica | None,
        refusal: APIError | None,
        method: str,
        authorization: str | None,
        session_id: str | None,
        started: float,
        traceparent: bytes | None,
        trace: RequestTrace | None,
    ) -> Awaitable[bool] | None:
        """The fleet-key path (router.keyed): a key cached here is checked now (APIError 401)
        and the rest runs on callbacks; an unknown one is looked up in Redis, in a task."""
        keyed = KeyedRequest(
            self, incoming, conn, route, path, pinned, refusal, method, session_id, started,
            traceparent, trace,
        )  # fmt: skip
        record = self.gate.known(authorization)
        if record is None:
            return keyed.look_up(authorization)
        keyed.start(record)
        return None


def request_headers(
    headers: list[tuple[bytes, bytes]],
) -> tuple[str | None, str | None, bytes | None]:
    """(Authorization, X-Session-Id, traceparent): one dict built in C beats a Python loop over
    the headers. The traceparent goes on to the replica as it came (router.tracing)."""
    by_name = dict(headers)
    authorization = by_name.get(b"authorization")
    session = by_name.get(b"x-session-id")
    return (
        authorization.decode("latin-1") if authorization is not None else None,
        session.decode("latin-1") if session is not None else None,
        by_name.get(b"traceparent"),
    )


def tracer(config: RouterConfig, provider: TracerProvider | None) -> RouterTracer | None:
    """Spans only with an endpoint (or a provider given): OpenTelemetry is imported only then."""
    if provider is None and config.otlp_endpoint:
        from fleet.telemetry import otlp_provider

        provider = otlp_provider(config.otlp_endpoint, "fleet-router")
    if provider is None:
        return None
    from router.tracing import RouterTracer

    return RouterTracer(provider)
