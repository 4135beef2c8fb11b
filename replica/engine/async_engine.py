"""The engine for an asyncio server: steps run in one background thread, off the event loop.

Requests and aborts reach the step thread through a command list; its outputs come back once per
step with a single `call_soon_threadsafe` per event loop, and are fanned out to per-request queues
there. A step's torch work releases the GIL, so the server keeps parsing and streaming meanwhile.

The step thread also builds the engine, so it is the only thread that runs torch. That matters on
CPU: each thread that runs a parallel op gets its own OpenMP team, and once libgomp manages more
threads than there are cores it stops spinning between parallel regions and puts its workers to
sleep after every op. Loading the weights in one thread and stepping in another cost about 15% of
decode throughput on a 2-core machine (67k context switches in a 36 s run against 50).

A server that publishes the prefix cache's changes (`publish_kv_events`) gets them from this
thread after each step, as one dict of net changes handed to its sink, which must only queue them:
the step loop never waits on the network.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncGenerator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol, cast

from replica.engine.config import EngineArgs
from replica.engine.core import EngineCore
from replica.engine.outputs import EngineLoad, PoolingOutput, RequestOutput
from replica.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The step thread is gone (shut down or failed); no request can be served."""


class _Aborted:
    """Queue marker: the request was aborted from outside its generator."""


# What a request's stream receives: an output, the exception that ended it, or _Aborted.
_Output = RequestOutput | PoolingOutput
_Item = _Output | BaseException | _Aborted


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[_Item]


@dataclass
class _Add:
    """Step-thread command: queue a request `generate` (or `embed`) has validated."""

    request_id: str
    prompt: str | None  # its text, when it came as text
    prompt_ids: list[int]
    params: SamplingParams | None  # None: an embedding request
    cache_salt: str | None
    generated_ids: list[int] | None = None  # a resumed stream's output so far


@dataclass
class _Abort:
    """Step-thread command: stop a request and free its KV blocks."""

    request_id: str


class KVEventSink(Protocol):
    """Where the prefix cache's changes go, called from the step thread: queue, never block."""

    def changes(self, events: dict[int, bool]) -> None:
        """Net changes since the last call: 64-bit hash key -> cached now."""

    def snapshot(self, digests: list[bytes]) -> None:
        """Every block hash cached now (whole digests, to be keyed off this thread), after all
        the changes handed over before it."""


@dataclass
class _Snapshot:
    """Step-thread command: start recording cache changes for `sink` if not yet, and hand it a
    snapshot of the whole cache, in order with the changes."""

    sink: KVEventSink


_Command = _Add | _Abort | _Snapshot


class AsyncEngine:
    _load: EngineLoad  # set by the step thread after each step; read from any thread

    def __init__(self, args: EngineArgs | str, **engine_args) -> None:
        """Build the engine in its step thread and return once it is loaded (or raise why not)."""
        if isinstance(args, str):
            args = EngineArgs(model=args, **engine_args)
        self.args = args
        self._streams: dict[str, _Stream] = {}
        self._commands: list[_Command] = []
        self._kv_sink: KVEventSink | None = None  # set and read in the step thread only
        self._wakeup = threading.Condition()
        self._stopped = False
        self.error: BaseException | None = None
        built: Future[EngineCore] = Future()
        self._thread = threading.Thread(
            target=self._build_and_run, args=(built,), name="engine-steps", daemon=True
        )
        self._thread.start()
        self.core = built.result()
        self.tokenizer = self.core.tokenizer
        self.max_model_len = self.core.max_model_len

    # -- event-loop side --------------------------------------------------------------------

    def generate(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        cache_salt: str | None = None,
        generated_ids: list[int] | None = None,
    ) -> AsyncGenerator[RequestOutput, None]:
        """A request's stream of outputs, one per step it advanced; the last has `finished` set.

        The request is checked now, on the caller's thread: SamplingParamsError (a ValueError with
        `.param`) for one the engine cannot serve, so a server refuses it before its response
        starts. It reaches the engine when the stream is first iterated (a stream never iterated
        leaves nothing behind); leaving the iteration early aborts it. `generated_ids` continues
        a stream another replica started (see EngineCore.enqueue).
        """
        prompt_ids = self.core.tokenize(prompt)
        self.core.validate(prompt_ids, params, generated_ids)
        text = prompt if isinstance(prompt, str) else None
        stream = self._stream(_Add(request_id, text, prompt_ids, params, cache_salt, generated_ids))
        return cast(AsyncGenerator[RequestOutput, None], stream)

    def embed(self, request_id: str, prompt_ids: list[int]) -> AsyncGenerator[PoolingOutput, None]:
        """An embedding request's stream: one PoolingOutput (an engine with task "embed").

        Checked now, like `generate` (SamplingParamsError, param `input`); it reaches the engine
        when first iterated, and the engine batches it with others under its step budget;
        leaving the iteration early aborts it."""
        self.core.validate_pooling(prompt_ids)
        stream = self._stream(_Add(request_id, None, prompt_ids, None, None))
        return cast(AsyncGenerator[PoolingOutput, None], stream)

    async def _stream(self, add: _Add) -> AsyncGenerator[_Output, None]:
        request_id = add.request_id
        if self._stopped:
            raise EngineDeadError("the engine is not running") from self.error
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        params = add.params
        if (
            params is not None
            and params.structured is not None
            and not self.core.grammars.cached(params.structured)
        ):
            await asyncio.to_thread(self.compile_grammar, params)  # never in the step thread
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._streams[request_id] = stream
        self._submit(add)
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                if isinstance(item, _Aborted):
                    finished = True
                    return
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if self._streams.get(request_id) is stream:
                del self._streams[request_id]
            if not finished:
                self._submit(_Abort(request_id))

    def compile_grammar(self, params: SamplingParams) -> None:
        """Compile (or find cached) the grammar of a structured request; SamplingParamsError for a
        bad schema. Blocking and thread-safe: call it off the event loop."""
        self.core.compile_grammar(params)

    def abort(self, request_id: str) -> None:
        """Stop a request and free its KV blocks before the next step; safe from any thread."""
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, _Aborted())
        self._submit(_Abort(request_id))

    def kv_snapshot(self, sink: KVEventSink) -> None:
        """Have `sink` receive the prefix cache's changes from now on, and a snapshot of the whole
        cache before the next of them; call again whenever the sink needs a fresh snapshot."""
        self._submit(_Snapshot(sink))

    def load(self) -> EngineLoad:
        """running, waiting, kv_usage, num_blocks, free_blocks, block_size, prefix-cache counters."""
        return self._load.copy()

    @property
    def is_running(self) -> bool:
        return not self._stopped and self._thread.is_alive()

    def shutdown(self) -> None:
        with self._wakeup:
            self._stopped = True
            self._wakeup.notify()
        self._thread.join(timeout=30)

    def _submit(self, command: _Command) -> None:
        with self._wakeup:
            self._commands.append(command)
            self._wakeup.notify()

    @staticmethod
    def _deliver(items: list[tuple[asyncio.Queue[_Item], _Item]]) -> None:
        for queue, item in items:
            queue.put_nowait(item)

    # -- step thread ------------------------------------------------------------------------

    def _build_and_run(self, built: Future[EngineCore]) -> None:
        try:
            core = EngineCore(self.args)
        except BaseException as exc:
            built.set_exception(exc)
            return
        self._load = core.load()
        built.set_result(core)
        self._run(core)

    def _run(self, core: EngineCore) -> None:
        while True:
            with self._wakeup:
                while not (self._commands or core.has_unfinished or self._stopped):
                    self._wakeup.wait()
                if self._stopped:
                    break
                commands, self._commands = self._commands, []
            for command in commands:
                self._apply(command)
            if core.has_unfinished:
                try:
                    outputs = core.step(stream=True)
                except Exception as exc:
                    log.exception("engine step failed; failing the requests in flight")
                    self._fail_all(exc)
                    outputs = []
                self._load = core.load()  # before the outputs, so readers never see it lag
                self._send([(out.request_id, out) for out in outputs])
            else:
                self._load = core.load()
            if self._kv_sink is not None:
                self._hand_kv_events(core)
        self._fail_all(EngineDeadError("the engine shut down"))

    def _hand_kv_events(self, core: EngineCore) -> None:
        assert self._kv_sink is not None
        events = core.blocks.take_events()
        if events:
            self._kv_sink.changes(events)

    def _apply(self, command: _Command) -> None:
        if isinstance(command, _Abort):
            self.core.abort_request(command.request_id)
            return
        if isinstance(command, _Snapshot):
            if self._kv_sink is not None:
                self._hand_kv_events(self.core)
            self._kv_sink = command.sink
            self.core.blocks.record_events()
            command.sink.snapshot(self.core.blocks.cached_digests())
            return
        if command.request_id not in self._streams:  # abandoned before it started
            return
        try:  # validated by `generate` or `embed` already
            if command.params is None:
                self.core.enqueue_pooling(command.request_id, command.prompt_ids)
                return
            self.core.enqueue(
                command.request_id,
                command.prompt,
                command.prompt_ids,
                command.params,
                command.cache_salt,
                command.generated_ids,
            )
        except ValueError as exc:
            self._send([(command.request_id, exc)])

    def _fail_all(self, exc: BaseException) -> None:
        self.error = exc
        for request_id in list(self.core.requests):
            self.core.abort_request(request_id)
        self._send([(request_id, exc) for request_id in list(self._streams)])

    def _send(self, items: list[tuple[str, _Output | BaseException]]) -> None:
        """Hand a step's results to their event loops: one thread-safe call per loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[_Item], _Item]]] = {}
        for request_id, item in items:
            stream = self._streams.get(request_id)
            if stream is not None:
                by_loop.setdefault(stream.loop, []).append((stream.queue, item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(self._deliver, batch)
            except RuntimeError:  # that loop is closed: nobody is listening any more
                for _, undelivered in batch:
                    if isinstance(undelivered, RequestOutput | PoolingOutput):
                        self.core.abort_request(undelivered.request_id)
