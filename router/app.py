"""The router application: what each request path means, and the accounting around a request.

The data path (`/v1/chat/completions`, `/v1/completions`, `/tokenize`, `/detokenize`, and
per-replica pinning `/replicas/{id}/...`) is dispatched by path straight to its handlers on the
router's own HTTP server (router.http_server), with no framework objects: every microsecond there
is paid per request. Everything else (`/v1/models`, `/health`, `/metrics`, `/admin/...`) is an
ordinary Starlette app behind an ASGI bridge.

Per generation request: read the body, authenticate (cached), parse it once with orjson, check
the model, take the key's limits, then hand it to an Exchange (router.proxy) that picks a replica
and proxies; when it ends, count it and settle the key's usage from the upstream's own `usage`
(streams ask the replica for `include_usage`; see sse.py). With static keys (or none) nothing
here waits, so the whole request runs on callbacks; a fleet key may wait on Redis, so its
requests run as a task.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as StarletteRequest
from starlette.responses import Response
from starlette.routing import Route

from fleet.control.errors import APIError
from fleet.control.keys import KeyRecord, KeyStore, Ticket, bearer_token, is_admin_key
from fleet.control.membership import MembershipWatcher
from fleet.web_errors import error_response
from router import admin
from router.auth import Gate
from router.config import RouterConfig
from router.dashboard import Dashboard
from router.http_server import Connection, Request, asgi_bridge
from router.metrics import RouterMetrics
from router.paths import PINNED_PREFIX, canonical, needs_canonical, pinned_target
from router.policies import RouteRequest, make_policy
from router.pool import ReplicaPool
from router.prompt_key import chat_units, completion_units
from router.proxy import Exchange, Proxy, status_text
from router.replica import Replica
from router.retry_budget import RetryBudget
from router.sse import UsageTap
from router.tokens import TokenEstimator
from router.usage import usage_of_answer

log = logging.getLogger("router")

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
GENERATION_ROUTES = {CHAT_PATH: "chat", COMPLETIONS_PATH: "completions"}
GENERATION_KINDS = frozenset(GENERATION_ROUTES.values())
PLAIN_ROUTES = frozenset({"/tokenize", "/detokenize"})
PINNED_BODYLESS = frozenset({"models", "health"})  # GET routes: no body goes upstream
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


class RouterApp:
    def __init__(
        self,
        config: RouterConfig,
        *,
        key_store: KeyStore | None = None,
        watcher: MembershipWatcher | None = None,
    ) -> None:
        self.config = config
        self.started_at = time.time()
        if config.redis_url:
            if config.fleet_keys:
                key_store = key_store or KeyStore(config.redis_url, prefix=config.redis_prefix)
            watcher = watcher or MembershipWatcher(config.redis_url, prefix=config.redis_prefix)
        self.key_store = key_store
        self.policy = make_policy(config.policy, queue_weight=config.prefix_queue_weight)
        self.metrics = RouterMetrics(lambda: self.pool.gauges())
        self.pool = ReplicaPool(
            config.replicas,
            config.pool,
            watcher,
            on_eject=lambda replica: self.metrics.ejected(replica.id),
            on_leave=lambda replica: self.policy.forget(replica.id),
            internal_secret=config.internal_secret,
            static_key=config.upstream_api_key,
        )
        self.gate = Gate(key_store, config.api_keys)
        self.tokens = TokenEstimator()
        self.proxy = Proxy(
            self.pool,
            self.policy,
            self.metrics,
            connect_timeout_s=config.connect_timeout_s,
            ttfb_timeout_s=config.ttfb_timeout_s,
            idle_timeout_s=config.idle_timeout_s,
            max_attempts=config.max_attempts,
            budget=RetryBudget(config.retry_budget_ratio, config.retry_budget_min_per_s),
            max_answer_bytes=config.max_answer_bytes,
        )
        self.dashboard = Dashboard(self)
        self.web = Starlette(
            routes=[
                Route("/health", self.health),
                Route("/metrics", self.prometheus),
                Route("/v1/models", self.models),
                Route("/v1/models/{model:path}", self.model),
                *admin.routes(self),
                *self.dashboard.routes(),
            ],
            exception_handlers={APIError: _api_error, HTTPException: _http_error},
        )
        self.web.router.redirect_slashes = False  # a 404 body, not a redirect built from Host

    # -- lifecycle

    async def start(self) -> None:
        if self.key_store is not None:
            await self.key_store.start()
        await self.pool.start()
        self.proxy.watchdog.start()
        self.dashboard.start()
        log.info(
            "router up: policy=%s, %d replicas, auth=%s",
            self.policy.name,
            len(self.pool.replicas),
            "open" if self.gate.open else ("keystore" if self.key_store else "static keys"),
        )

    async def stop(self) -> None:
        await self.dashboard.stop()
        await self.proxy.close()
        await self.pool.close()
        if self.key_store is not None:
            await self.key_store.close()

    # -- dispatch

    def handle(self, request: Request, conn: Connection) -> Awaitable[None] | None:
        """Proxied paths are answered from callbacks (router.proxy); the rest runs as a task."""
        path = request.path
        route = GENERATION_ROUTES.get(path)
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

    def _pinned(self, request: Request, conn: Connection) -> Awaitable[None] | None:
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
        elif target.kind in GENERATION_KINDS and replica.draining:
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
        conn: Connection,
        route: str,
        path: str,
        pinned: Replica | None,
        refusal: APIError | None,
        method: str = "POST",
    ) -> Awaitable[None] | None:
        """Check, plan and start one proxied request. Static keys (or none) are checked here and
        now; a fleet key may need Redis, so that path is a coroutine."""
        ex = self.proxy.exchange(route, path, conn, self._ended)
        authorization, session_id = request_headers(incoming.headers)
        try:
            if not self.gate.check_static(authorization):
                return self._proxied_with_key(
                    ex, incoming, pinned, refusal, authorization, session_id, method
                )
            if refusal is not None:
                raise refusal
            request, body, _ = self._plan(ex, incoming, pinned, None, session_id)
        except APIError as err:
            ex.refuse(err)
            return None
        ex.start(request, body, method, pinned)
        return None

    async def _proxied_with_key(
        self,
        ex: Exchange,
        incoming: Request,
        pinned: Replica | None,
        refusal: APIError | None,
        authorization: str | None,
        session_id: str | None,
        method: str,
    ) -> None:
        """The fleet-key path: authenticate (cached), take the key's limits (one Redis round
        trip when it has any), proxy, then settle what the replica reports it used."""
        try:
            record = await self.gate.authenticate(authorization, None)
            if refusal is not None:
                raise refusal
            request, body, reserve = self._plan(ex, incoming, pinned, record, session_id)
            ex.ticket = await self.gate.admit(record, reserve)
        except APIError as err:
            ex.refuse(err)
            return
        ex.start(request, body, method, pinned)
        await ex.wait_end()
        if ex.ticket is not None:
            await self._settle(ex, ex.ticket)

    def _plan(
        self,
        ex: Exchange,
        incoming: Request,
        pinned: Replica | None,
        record: KeyRecord | None,
        session_id: str | None,
    ) -> tuple[RouteRequest, bytes, int]:
        """What to route and send: (the routing facts, the body for the replica, the tokens to
        reserve against the key's limits)."""
        body = incoming.body
        if ex.route not in GENERATION_KINDS:
            if pinned is None:
                model = self._model_for(parse_object(body))
            else:
                model = pinned.model or ""
                if ex.route in PINNED_BODYLESS:
                    body = b""
            if record is not None:
                record.check_model(model)
            ex.model = model
            return RouteRequest(model, "", 0), body, 0
        request = parse_object(body)
        if pinned is not None:
            model = pinned.model or ""  # the key's models are checked against what it serves
            replicas = [pinned]
        else:
            model = request.get("model")
            if not isinstance(model, str) or not model:
                raise APIError(400, "You must provide a model parameter.", param="model")
            replicas = self.pool.by_model.get(model)
            if replicas is None:
                raise model_not_found(model)
        ex.model = model
        if record is not None:
            record.check_model(model)
        units = (
            chat_units(request.get("messages"))
            if ex.route == "chat"
            else completion_units(request.get("prompt"))
        )
        ex.units = units
        prompt_tokens = self.tokens.estimate(model, units, record.id if record else None)
        sample = self.tokens.wants_sample(model)
        ex.learn = sample and record is None
        if request.get("stream") is True:
            ex.stream = True
            if sample or record is not None:
                body = self._ask_for_usage(ex, request, body)
        reserve = 0
        if record is not None:  # only a fleet key's limits need the reservation
            max_model_len = replicas[0].max_model_len
            reserve = prompt_tokens + completion_budget(
                request, ex.route, prompt_tokens, max_model_len
            )
        route_request = RouteRequest(
            model, units, prompt_tokens, self.tokens.ratio(model), session_id
        )
        return route_request, body, reserve

    def _ended(self, ex: Exchange) -> None:
        """Every exchange's last word: learn the token ratio from sampled answers, count it."""
        if ex.learn and ex.status == 200:
            self._learn(ex, self._usage_of(ex))
        model = ex.model if ex.model in self.pool.by_model else "unknown"
        self.metrics.request_done(
            ex.route,
            model,
            ex.replica_id or "none",
            status_text(ex.status),
            time.perf_counter() - ex.started,
        )

    def _ask_for_usage(self, ex: Exchange, request: dict, body: bytes) -> bytes:
        """Usage settles a fleet key (and teaches the token estimator): ask the replica for it,
        strip it from the stream if the client did not ask."""
        options = request.get("stream_options")
        if options is not None and not isinstance(options, dict):
            return body
        wants = bool(options and options.get("include_usage") is True)
        ex.tap = UsageTap(strip=not wants)
        if wants:
            return body
        request["stream_options"] = {**(options or {}), "include_usage": True}
        return orjson.dumps(request)

    def _usage_of(self, ex: Exchange) -> dict | None:
        if ex.stream:
            return ex.tap.usage if ex.tap is not None else None
        if ex.status != 200 or not ex.body_out:
            return None
        return usage_of_answer(ex.body_out)

    def _learn(self, ex: Exchange, usage: dict | None, key: str | None = None) -> None:
        if usage is not None and isinstance(usage.get("prompt_tokens"), int):
            self.tokens.observe(ex.model, ex.units, usage["prompt_tokens"], key)

    async def _settle(self, ex: Exchange, ticket: Ticket) -> None:
        """Charge what the replica reports it used. A stream cut short (by the client, a stalled
        reader or the replica) has no report: charge the prompt's estimate and the chunks that
        reached the client. Nothing is charged when no answer reached the client."""
        if (
            not ex.delivered
            or ex.route not in GENERATION_KINDS
            or (ex.status != 200 and not ex.streamed)
        ):
            await self.gate.release(ticket)
            return
        usage = self._usage_of(ex)
        if usage is not None:
            self._learn(ex, usage, ticket.key_id)
            prompt = int(usage.get("prompt_tokens") or 0)
            completion = int(usage.get("completion_tokens") or 0)
        else:
            prompt = self.tokens.estimate(ex.model, ex.units, ticket.key_id)
            completion = ex.tap.frames if ex.tap is not None else 0
        await self.gate.settle(ticket, prompt, completion)

    def _model_for(self, request: dict) -> str:
        model = request.get("model")
        if model is None and self.pool.only_model() is not None:
            return self.pool.only_model()
        if not isinstance(model, str) or not model:
            raise APIError(400, "You must provide a model parameter.", param="model")
        if model not in self.pool.by_model:
            raise model_not_found(model)
        return model

    # -- local routes

    async def health(self, request: StarletteRequest) -> Response:
        now = time.monotonic()
        routable = sum(r.routable(now) for r in self.pool.replicas.values())
        body = {"status": "ok", "replicas": len(self.pool.replicas), "routable": routable}
        return Response(orjson.dumps(body), media_type="application/json")

    async def prometheus(self, request: StarletteRequest) -> Response:
        """Open unless the operator set a metrics key (Prometheus sends it as a bearer token)."""
        expected = self.config.metrics_key
        if expected is not None:
            presented = bearer_token(request.headers.get("authorization"))
            admin = self.config.admin_key
            if not (is_admin_key(presented, expected) or is_admin_key(presented, admin)):
                raise APIError(401, "/metrics needs the metrics key.", code="invalid_api_key")
        return Response(self.metrics.exposition(), media_type="text/plain; version=0.0.4")

    async def models(self, request: StarletteRequest) -> Response:
        """Each name the fleet answers to, once, with the replicas behind it (the key's names only)."""
        record = await self.gate.authenticate(request.headers.get("authorization"), None)
        cards = [
            self._model_card(name, max_model_len)
            for name, max_model_len in sorted(self.pool.models().items())
            if record is None or record.allows_model(name)
        ]
        return Response(
            orjson.dumps({"object": "list", "data": cards}), media_type="application/json"
        )

    async def model(self, request: StarletteRequest) -> Response:
        """`GET /v1/models/{id}` (the SDK's `models.retrieve`; ids may hold '/'). A name the key
        may not use is answered as OpenAI answers a model you cannot see: 404."""
        record = await self.gate.authenticate(request.headers.get("authorization"), None)
        name = request.path_params["model"]
        models = self.pool.models()
        if name not in models or (record is not None and not record.allows_model(name)):
            raise model_not_found(name)
        card = self._model_card(name, models[name])
        return Response(orjson.dumps(card), media_type="application/json")

    def _model_card(self, name: str, max_model_len: int | None) -> dict:
        """OpenAI's model object plus vLLM's `max_model_len` and the replicas serving it: their
        ids and states, which a user may see (pinned routes take the id), never their URLs."""
        now = time.monotonic()
        replicas = self.pool.by_model.get(name, [])
        return {
            "id": name,
            "object": "model",
            "created": int(self.started_at),
            "owned_by": "fleetserve",
            "max_model_len": max_model_len,
            "replicas": [{"id": r.id, "state": replica_state(r, now)} for r in replicas],
        }


def replica_state(replica: Replica, now: float) -> str:
    """What a user may know of a replica: taking work, draining, or out for now (unhealthy or
    ejected by the breaker; which one is the operator's business)."""
    if replica.draining:
        return "draining"
    return "ready" if replica.routable(now) else "unavailable"


def completion_budget(
    request: dict, route: str, prompt_tokens: int, max_model_len: int | None
) -> int:
    """Tokens the answers may take, to reserve against the key's tpm before dispatch: every
    prompt of a completions batch times `n` choices each."""
    n = request.get("n")
    sequences = (n if isinstance(n, int) and n > 0 else 1) * prompt_count(request, route)
    limit = request.get("max_completion_tokens") if route == "chat" else None
    limit = limit or request.get("max_tokens")
    if isinstance(limit, int) and limit > 0:
        return limit * sequences
    if route != "chat":
        return COMPLETIONS_DEFAULT_MAX_TOKENS * sequences
    return max((max_model_len or 0) - prompt_tokens, 0) * sequences


def prompt_count(request: dict, route: str) -> int:
    """Prompts in one request: a completions `prompt` may be a list of texts or of id lists."""
    prompt = request.get("prompt") if route == "completions" else None
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        return len(prompt)
    return 1


def request_headers(headers: list[tuple[bytes, bytes]]) -> tuple[str | None, str | None]:
    """(Authorization, X-Session-Id): one dict built in C beats a Python loop over the headers."""
    by_name = dict(headers)
    authorization = by_name.get(b"authorization")
    session = by_name.get(b"x-session-id")
    return (
        authorization.decode("latin-1") if authorization is not None else None,
        session.decode("latin-1") if session is not None else None,
    )


def parse_object(body: bytes) -> dict:
    try:
        request = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise APIError(400, "We could not parse the JSON body of your request.") from None
    if not isinstance(request, dict):
        raise APIError(400, "The request body must be a JSON object.")
    return request


def model_not_found(model: str) -> APIError:
    return APIError(
        404,
        f"The model '{model}' does not exist or has no replica.",
        param="model",
        code="model_not_found",
    )


async def _api_error(request: StarletteRequest, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return error_response(exc)


async def _http_error(request: StarletteRequest, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = "Not found." if exc.status_code == 404 else str(exc.detail)
    return error_response(
        APIError(exc.status_code, f"{message} ({request.method} {request.url.path})")
    )
