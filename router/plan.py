"""Planning: everything the router decides about a proxied request before it sends a byte.

A request's plan is worked out from the request alone (its route, body and pinned replica), in
one step that touches no connection and no replica: it returns a `Plan` or raises the APIError
the client is answered with. Whether the caller's key may use the plan's model, and its limits,
are the handler's next step (router.app). The exchange (router.exchange) then
carries the plan out, and accounting (router.accounting) reads it back when the exchange ends, so
no later step writes into what an earlier one decided.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from fleet.control.errors import APIError
from fleet.json_body import decode_json
from router.backends.backend import Replica
from router.backends.pool import ReplicaPool
from router.routing.policies import RouteRequest
from router.routing.prompt_key import chat_units, completion_units
from router.routing.tokens import TokenEstimator
from router.stream_resume import resumable
from router.usage_tap import UsageTap

GENERATION_KINDS = frozenset({"chat", "completions"})
EMBEDDINGS = "embeddings"
# Routes a replica's engine works on: planned with a token estimate, charged to fleet keys, and
# sent only to replicas of the route's task (an embedder never generates; see Replica.serves).
TASK_OF_ROUTE = {"chat": "generate", "completions": "generate", EMBEDDINGS: "embed"}
INFERENCE_KINDS = frozenset(TASK_OF_ROUTE)
PINNED_BODYLESS = frozenset({"models", "health"})  # GET routes: no body goes upstream
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


@dataclass(slots=True, eq=False)
class Plan:
    """One proxied request as planned; read-only once built.

    Not `frozen=True`: a frozen dataclass sets each field through `object.__setattr__`, which
    made building one cost ~17k instructions under callgrind, several times a plain slots
    dataclass, and a plan is built for every request (the router's per-request CPU is measured).
    """

    route: str  # chat, completions, embeddings, tokenize, detokenize, models, health
    path: str  # on the replica, below its base path
    method: str
    model: str
    body: bytes  # as the replica gets it (with include_usage added where the router needs it)
    routing: RouteRequest  # what the policy weighs
    pinned: Replica | None  # `/replicas/{id}/...`: exactly this replica, no retries
    stream: bool
    tap: UsageTap | None  # picks the usage out of a stream (and strips it if not asked for)
    learn: bool  # sample this answer's usage to learn the model's token ratio
    reserve: int  # tokens to reserve against a fleet key's limits
    resumable: bool = False  # a stream another replica may carry on (router.stream_resume)


class Planner:
    """Turns a request into its plan; holds only what planning reads (the pool's models, the
    token estimator)."""

    def __init__(self, pool: ReplicaPool, tokens: TokenEstimator) -> None:
        self.pool = pool
        self.tokens = tokens

    def plan(
        self,
        route: str,
        path: str,
        method: str,
        body: bytes,
        pinned: Replica | None,
        key_id: str | None,
        session_id: str | None,
    ) -> Plan:
        """The plan, or APIError 400 (unreadable body, no model) / 404 (no such model).
        `key_id`: the caller's fleet key (None for static keys or none), whose limits need a
        reservation and whose own token ratio estimates its prompts."""
        if route not in INFERENCE_KINDS:
            return self._plain(route, path, method, body, pinned)
        request = parse_object(body)
        if pinned is not None:
            model = pinned.model or ""  # the key's models are checked against what it serves
            max_model_len = pinned.max_model_len
        else:
            named = request.get("model")
            if not isinstance(named, str) or not named:
                raise APIError(400, "You must provide a model parameter.", param="model")
            model = named
            replicas = self.pool.by_model.get(model)
            if replicas is None:
                raise model_not_found(model)
            if model not in self.pool.by_task[TASK_OF_ROUTE[route]]:
                raise wrong_task(model, TASK_OF_ROUTE[route])
            max_model_len = replicas[0].max_model_len
        if route == EMBEDDINGS:
            return self._embeddings(route, path, method, body, request, model, pinned, key_id)
        units = (
            chat_units(request.get("messages"), request.get("tools"))
            if route == "chat"
            else completion_units(request.get("prompt"))
        )
        prompt_tokens = self.tokens.estimate(model, units, key_id)
        sample = self.tokens.wants_sample(model)
        stream = request.get("stream") is True
        tap = None
        if stream and (sample or key_id is not None):
            tap, body = ask_for_usage(request, body)
        reserve = 0
        if key_id is not None:  # only a fleet key's limits need the reservation
            reserve = prompt_tokens + completion_budget(
                request, route, prompt_tokens, max_model_len
            )
        routing = RouteRequest(model, units, prompt_tokens, self.tokens.ratio(model), session_id)
        return Plan(
            route, path, method, model, body, routing, pinned, stream, tap,
            sample and key_id is None, reserve,
            stream and pinned is None and resumable(request, route),
        )  # fmt: skip

    def _embeddings(
        self,
        route: str,
        path: str,
        method: str,
        body: bytes,
        request: dict[str, object],
        model: str,
        pinned: Replica | None,
        key_id: str | None,
    ) -> Plan:
        """`input` takes a completions prompt's shapes, so it is estimated like one; there is no
        completion to reserve for and no stream. Routed by load alone (router.exchange): an
        embedding keeps no cache worth returning to."""
        units = completion_units(request.get("input"))
        prompt_tokens = self.tokens.estimate(model, units, key_id)
        sample = self.tokens.wants_sample(model)
        routing = RouteRequest(model, units, prompt_tokens, self.tokens.ratio(model))
        reserve = prompt_tokens if key_id is not None else 0
        return Plan(
            route, path, method, model, body, routing, pinned, False, None,
            sample and key_id is None, reserve,
        )  # fmt: skip

    def _plain(
        self,
        route: str,
        path: str,
        method: str,
        body: bytes,
        pinned: Replica | None,
    ) -> Plan:
        """tokenize / detokenize, and a pinned replica's GET routes: routed by model alone."""
        if pinned is None:
            model = self._model_of(parse_object(body))
        else:
            model = pinned.model or ""
            if route in PINNED_BODYLESS:
                body = b""
        routing = RouteRequest(model, "", 0)
        return Plan(route, path, method, model, body, routing, pinned, False, None, False, 0)

    def _model_of(self, request: dict[str, object]) -> str:
        """The request's model; it may be left out when the fleet serves only one."""
        model = request.get("model")
        if model is None:
            only = self.pool.only_model()
            if only is not None:
                return only
        if not isinstance(model, str) or not model:
            raise APIError(400, "You must provide a model parameter.", param="model")
        if model not in self.pool.by_model:
            raise model_not_found(model)
        return model


def ask_for_usage(request: dict[str, object], body: bytes) -> tuple[UsageTap | None, bytes]:
    """Usage settles a fleet key (and teaches the token estimator): ask the replica for it, and
    tap the stream to strip it again if the client did not ask. Returns (tap, body to send)."""
    options = request.get("stream_options")
    if options is not None and not isinstance(options, dict):
        return None, body
    wants = bool(options and options.get("include_usage") is True)
    tap = UsageTap(strip=not wants)
    if wants:
        return tap, body
    request["stream_options"] = {**(options or {}), "include_usage": True}
    return tap, orjson.dumps(request)


def completion_budget(
    request: dict[str, object], route: str, prompt_tokens: int, max_model_len: int | None
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


def prompt_count(request: dict[str, object], route: str) -> int:
    """Prompts in one request: a completions `prompt` may be a list of texts or of id lists."""
    prompt = request.get("prompt") if route == "completions" else None
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        return len(prompt)
    return 1


def parse_object(body: bytes) -> dict[str, object]:
    """A client's JSON object, unchecked: readers check each member's type."""
    try:
        request = decode_json(body)
    except orjson.JSONDecodeError:
        raise APIError(400, "We could not parse the JSON body of your request.") from None
    if not isinstance(request, dict):
        raise APIError(400, "The request body must be a JSON object.")
    return request


def wrong_task(model: str, task: str) -> APIError:
    what = "embeddings (--task embed)" if task == "embed" else "generation (--task generate)"
    return APIError(
        400,
        f"The model '{model}' has no replica serving {what}.",
        param="model",
        code="wrong_task",
    )


def model_not_found(model: str) -> APIError:
    return APIError(
        404,
        f"The model '{model}' does not exist or has no replica.",
        param="model",
        code="model_not_found",
    )
