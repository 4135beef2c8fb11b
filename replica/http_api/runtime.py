"""The replica's life: load the engine, take requests, join the fleet, drain on shutdown.

States: `loading` until the engine is up, `ready`, then `draining` (SIGTERM: new requests get 503,
in-flight ones finish up to a grace period, the membership entry goes "draining" then away).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from fleet.control.errors import APIError
from fleet.control.keys import KeyStore
from fleet.control.kv_events import events_info
from fleet.control.kv_publisher import KVEventPublisher
from fleet.control.membership import MembershipLease, ReplicaInfo, new_replica_id
from fleet.control.redis_conn import DEFAULT_PREFIX, async_client
from fleet.json_body import DEFAULT_MAX_BODY_BYTES
from fleet.web_security import CORSSettings, TLSSettings
from replica.engine.outputs import EngineLoad
from replica.http_api.auth import Auth
from replica.http_api.metrics import ReplicaMetrics
from replica.http_api.prompt_worker import PromptWorker
from replica.http_api.prompts import PromptLimits, template_text
from replica.http_api.protocol import BodyBounds
from replica.http_api.token_text import TokenTexts
from replica.http_api.tool_calls import resolve_parser

if TYPE_CHECKING:
    from replica.engine.async_engine import AsyncEngine

log = logging.getLogger(__name__)

Status = Literal["loading", "ready", "draining", "stopped"]
WRONG_TASK = {
    "embed": "this replica serves embeddings (--task embed): use /v1/embeddings, or a replica "
    "started with --task generate",
    "generate": "this replica generates text (--task generate); embeddings need a replica "
    "started with --task embed",
}


class ReplicaLoad(EngineLoad):
    kv_capacity_tokens: int  # num_blocks x block_size


@dataclass
class ReplicaSettings:
    """What a serving replica needs beyond the engine's own arguments: its names, address, keys,
    fleet membership, limits and drain."""

    model: str
    served_model_name: str  # the primary name, reported in answers
    # Further names requests may use (`--served-model-name a b`, as vLLM), listed on /v1/models
    # and published in the fleet's membership so routers route them here too.
    served_model_aliases: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 8001
    device: str = "cpu"
    api_key: str | None = None
    internal_key: str | None = None  # the routers' key for this replica (fleet.control.internal)
    redis_url: str | None = None
    redis_prefix: str = DEFAULT_PREFIX
    fleet_keys: bool = True
    advertise_url: str | None = None
    # Publish the prefix cache's events to Redis (fleet/control/kv_publisher.py): routers then
    # know exactly which prefixes this replica holds.
    kv_events: bool = True
    replica_id: str | None = None
    # Sequences (prompts x n) allowed to queue beyond the engine's running batch; None: no limit.
    max_waiting: int | None = 1024
    max_seqs_per_request: int = 256  # prompts x n of one request
    drain_grace_s: float = 30.0
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    chat_template: str | None = None  # a template file replacing the tokenizer's (vLLM's flag)
    tool_call_parser: str = "auto"  # tool_calls/registry.py's names; auto: from the chat template
    prompt_timeout_s: float = 5.0  # budget to render and tokenize one request's prompts
    prompt_workers: int = 8  # threads: a few abandoned renders must not stop the others
    # /load, /metrics and /openapi.json need the static or the routers' key (probes keep /health)
    protect_info_routes: bool = False
    tls: TLSSettings | None = None
    cors: CORSSettings | None = None
    otlp_endpoint: str | None = None  # export spans there (replica.http_api.tracing)

    @property
    def served_names(self) -> list[str]:
        """Every name this replica answers to, the primary first."""
        return list(dict.fromkeys([self.served_model_name, *self.served_model_aliases]))

    @property
    def url(self) -> str:
        """Where routers and users reach this replica directly."""
        if self.advertise_url:
            return self.advertise_url.rstrip("/")
        host = self.host if self.host not in ("0.0.0.0", "::", "") else socket.gethostname()
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://{host}:{self.port}"


class ReplicaRuntime:
    """Shared by all handlers through `request.app.state.runtime`."""

    def __init__(
        self, settings: ReplicaSettings, engine_factory: Callable[[], AsyncEngine]
    ) -> None:
        self.settings = settings
        self._engine_factory = engine_factory
        self._engine: AsyncEngine | None = None
        self.status: Status = "loading"
        self.started_at = int(time.time())
        self.metrics = ReplicaMetrics(settings.served_model_name, self.load)
        self.auth = Auth(settings.api_key, None, internal_key=settings.internal_key)
        self.texts: TokenTexts | None = None
        self.lease: MembershipLease | None = None
        self.kv_publisher: KVEventPublisher | None = None
        # A burst as large as the waiting queue may prepare its prompts at once (each job waits
        # for a thread within the prompt budget); only beyond that is the replica too busy.
        self.prompts = PromptWorker(
            settings.prompt_workers,
            settings.prompt_timeout_s,
            max_jobs=max(4 * settings.prompt_workers, settings.max_waiting or 1024),
        )
        self._limits: PromptLimits | None = None
        self.chat_template: str | None = None
        self.tool_parser = "none"  # the resolved --tool-call-parser
        self._inflight = 0
        self._inflight_seqs = 0
        self._idle: asyncio.Event | None = None
        self._register_task: asyncio.Task | None = None

    @property
    def engine(self) -> AsyncEngine:
        """The engine, loaded by `start` (the app's lifespan runs it before any request)."""
        assert self._engine is not None, "the replica has not started"
        return self._engine

    @property
    def limits(self) -> PromptLimits:
        """What bounds a prompt before it is tokenized, read from the tokenizer by `start`."""
        assert self._limits is not None, "the replica has not started"
        return self._limits

    # -- lifecycle

    async def start(self) -> None:
        """Load the engine (in a thread: it takes seconds) and connect to the control plane."""
        self._idle = asyncio.Event()
        self._idle.set()
        engine = self._engine = await asyncio.to_thread(self._engine_factory)
        self.texts = TokenTexts(engine.tokenizer)
        tokenizer, max_len = engine.tokenizer, engine.max_model_len
        self._limits = await asyncio.to_thread(PromptLimits.of, tokenizer, max_len)
        if self.settings.chat_template:
            with open(self.settings.chat_template, encoding="utf-8") as f:
                self.chat_template = f.read()
        template = template_text(tokenizer, self.chat_template)
        self.tool_parser = resolve_parser(self.settings.tool_call_parser, template)
        if self.settings.redis_url:
            if self.settings.fleet_keys:
                keystore = KeyStore(self.settings.redis_url, prefix=self.settings.redis_prefix)
                await keystore.start()
                self.auth = Auth(
                    self.settings.api_key, keystore, internal_key=self.settings.internal_key
                )
            self._register_task = asyncio.create_task(self._register_when_listening())
        self.status = "ready"
        log.info(
            "replica ready: %s at %s (tool-call parser: %s)",
            self.settings.served_model_name, self.settings.url, self.tool_parser,
        )  # fmt: skip

    async def _register_when_listening(self) -> None:
        """Join the fleet once the port accepts connections (the server starts after lifespan)."""
        probe_host = "127.0.0.1" if self.settings.host in ("0.0.0.0", "") else self.settings.host
        probe_host = "::1" if probe_host == "::" else probe_host
        while True:
            try:
                _, writer = await asyncio.open_connection(probe_host, self.settings.port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            break
        load = self.load()
        assert load is not None
        replica_id = self.settings.replica_id or new_replica_id()
        publishes = self._start_kv_events(replica_id)
        info = ReplicaInfo(
            id=replica_id,
            url=self.settings.url,
            model=self.settings.served_model_name,
            aliases=self.settings.served_names[1:],
            device=self.settings.device,
            max_model_len=self.engine.max_model_len,
            block_size=load["block_size"],
            kv_capacity_tokens=load["kv_capacity_tokens"],
            task=self.task,
            kv_events=dict(events_info(load["block_size"])) if publishes else None,
            tokenizer=self._tokenizer_source() if publishes else None,
            chat_template=self._template_path() if publishes else None,
        )
        self.lease = MembershipLease(
            info, self.settings.redis_url, prefix=self.settings.redis_prefix
        )
        await self.lease.register()
        log.info("registered in fleet membership as %s", info.id)

    def _start_kv_events(self, replica_id: str) -> bool:
        """Publish the prefix cache's events, where routers can use them: a generating engine
        with prefix caching, in a fleet."""
        args = self.engine.args
        if not (self.settings.kv_events and self.settings.redis_url):
            return False
        if args.task != "generate" or not args.enable_prefix_caching:
            return False
        engine = self.engine
        publisher = KVEventPublisher(
            async_client(self.settings.redis_url),
            self.settings.redis_prefix,
            replica_id,
            lambda: engine.kv_snapshot(publisher),
        )
        publisher.start()
        self.kv_publisher = publisher
        return True

    def _tokenizer_source(self) -> str:
        """Where routers load this replica's tokenizer: its folder (absolute) or Hub id."""
        source = self.engine.args.tokenizer or self.settings.model
        return os.path.abspath(source) if os.path.exists(source) else source

    def _template_path(self) -> str | None:
        template = self.settings.chat_template
        return os.path.abspath(template) if template else None

    async def drain(self) -> None:
        """Stop taking work, let in-flight requests finish (up to the grace period), leave the fleet."""
        if self.status != "ready":
            return
        self.status = "draining"
        grace = self.settings.drain_grace_s
        log.info("draining: %d request(s) in flight, grace %.0f s", self._inflight, grace)
        if self.lease is not None:
            await self.lease.set_state("draining")
        assert self._idle is not None
        try:
            await asyncio.wait_for(self._idle.wait(), grace)
        except asyncio.TimeoutError:
            log.warning("grace period over: %d request(s) will be aborted", self._inflight)
        await self._leave_fleet()

    async def _leave_fleet(self) -> None:
        if self._register_task is not None:
            self._register_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._register_task
            self._register_task = None
        if self.lease is not None:
            await self.lease.close()
            self.lease = None
        if self.kv_publisher is not None:
            await self.kv_publisher.stop()
            await self.kv_publisher.client.aclose()
            self.kv_publisher = None

    async def stop(self) -> None:
        self.status = "stopped"
        self.prompts.shutdown()
        await self._leave_fleet()
        if self.auth.keystore is not None:
            await self.auth.keystore.close()
        if self._engine is not None:
            await asyncio.to_thread(self._engine.shutdown)

    # -- per request

    @property
    def state(self) -> str:
        """`status`, or "engine_dead" once the engine's step thread has stopped under us."""
        if self.status == "ready" and not self.engine.is_running:
            return "engine_dead"
        return self.status

    def accept(self, task: str = "generate") -> AsyncEngine:
        """The engine, if this replica takes new work of this task now; else 503 with
        Retry-After, or 400 for the other task's route (an embedder does not generate)."""
        state = self.state
        if state != "ready":
            raise APIError(
                503,
                f"replica is {state}; retry on another replica",
                code=f"replica_{state}",
                headers={"Retry-After": "1"},
            )
        served = self.engine.args.task
        if served != task:
            raise APIError(400, WRONG_TASK[served], "model", code="wrong_task")
        return self.engine

    @property
    def task(self) -> str | None:
        """generate or embed (the engine's `--task`); None until the engine is loaded."""
        return self._engine.args.task if self._engine is not None else None

    @property
    def body_bounds(self) -> BodyBounds | None:
        """What a body's lists are held to before their items are validated (protocol.py); none
        until the engine has loaded."""
        if self._engine is None:
            return None
        return BodyBounds(self.settings.max_seqs_per_request, self._engine.max_model_len)

    def check_fanout(self, seqs: int, param: str = "n") -> None:
        """One request's sequences (prompts x n, or inputs) are bounded: each costs a slot and
        KV blocks."""
        limit = self.settings.max_seqs_per_request
        if seqs > limit:
            what = "inputs" if param == "input" else "sequences (prompts x n)"
            raise APIError(400, f"this request asks for {seqs} {what}; the limit is {limit}", param)

    def check_queue(self, seqs: int) -> None:
        """503 while the sequences in flight would queue more than `max_waiting` beyond the engine's
        running batch (counted here, on the event loop, so a burst cannot slip past the engine's
        own count, which lags a step). A request is always taken when nothing is in flight."""
        limit = self.settings.max_waiting
        if limit is None or self._inflight_seqs == 0:
            return
        if self._inflight_seqs + seqs > self.engine.args.max_num_seqs + limit:
            raise APIError(
                503,
                f"replica is overloaded: {limit} or more sequences are waiting; retry shortly",
                code="overloaded",
                headers={"Retry-After": "1"},
            )

    def request_started(self, seqs: int = 1) -> None:
        """Counts generation requests so a drain knows when the last one is done, and their
        sequences for the queue limit."""
        assert self._idle is not None
        self._inflight += 1
        self._inflight_seqs += seqs
        self._idle.clear()

    def request_finished(self, seqs: int = 1) -> None:
        assert self._idle is not None
        self._inflight -= 1
        self._inflight_seqs -= seqs
        if self._inflight == 0:
            self._idle.set()

    @property
    def inflight(self) -> int:
        return self._inflight

    def load(self) -> ReplicaLoad | None:
        """The engine's load, plus its KV capacity in tokens (what prefix-aware routers size by)."""
        if self._engine is None:
            return None
        load = self._engine.load()
        return ReplicaLoad(**load, kv_capacity_tokens=load["num_blocks"] * load["block_size"])

    def check_model(self, model: str | None) -> str:
        """The primary served name for a request's `model` field (any served name, or the model
        path as given); 404 for any other model."""
        names = self.settings.served_names
        if model is None or model in names or model == self.settings.model:
            return names[0]
        served = "', '".join(names)
        raise APIError(
            404,
            f"The model '{model}' does not exist; this replica serves '{served}'.",
            "model",
            code="model_not_found",
        )
