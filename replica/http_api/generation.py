"""What both generation routes share: running prompts on the engine (aborting whatever is left when
the caller stops listening), latency metrics per engine request, and the per-request bookkeeping
(in-flight count for draining, the API key's admission) that must be released exactly once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from starlette.requests import Request
from starlette.responses import Response

from fleet.control.keys import KeyRecord
from replica.engine.async_engine import AsyncEngine
from replica.engine.outputs import RequestOutput
from replica.engine.sampling_params import SamplingParams, SamplingParamsError
from replica.http_api.auth import Admission
from replica.http_api.body import json_response, read_body, runtime_of
from replica.http_api.disconnect import until_disconnect
from replica.http_api.metrics import ReplicaMetrics
from replica.http_api.protocol import SamplingFields, parse_body
from replica.http_api.resume import StreamResume, stream_resume
from replica.http_api.runtime import ReplicaRuntime
from replica.http_api.sse_response import SSEResponse
from replica.http_api.tracing import engine_finished, tag_request

BodyT = TypeVar("BodyT", bound=SamplingFields)


@dataclass
class Opened(Generic[BodyT]):
    """A generation request past the checks both routes make before their own."""

    arrival: float
    runtime: ReplicaRuntime
    record: KeyRecord | None  # the caller's fleet key; None for the static key or no auth
    engine: AsyncEngine
    body: BodyT
    resume: StreamResume
    model: str  # the served name the answer carries

    def parts(self) -> tuple[ReplicaRuntime, AsyncEngine, BodyT, StreamResume, str]:
        return self.runtime, self.engine, self.body, self.resume, self.model


async def open_generation(request: Request, kind: type[BodyT]) -> Opened[BodyT]:
    """Authenticate, take the engine (503 unless ready), validate the body, its resume
    extension and its model, and tag the trace; each refusal is an APIError."""
    arrival = time.time()
    runtime = runtime_of(request)
    record = await runtime.auth.authenticate(request)
    engine = runtime.accept()
    body = parse_body(kind, await read_body(request), runtime.body_bounds)
    resume = stream_resume(request, record, body)
    model = runtime.check_model(body.model)
    tag_request(model, record.id if record is not None else None)
    return Opened(arrival, runtime, record, engine, body, resume, model)


def sampling_params(
    body: SamplingFields,
    max_tokens: int,
    logprobs: int | None = None,
    prompt_logprobs: int | None = None,
) -> SamplingParams:
    """The engine's SamplingParams from validated request fields (OpenAI defaults where unset);
    a SamplingParamsError it raises becomes a 400 (see errors.py)."""
    return SamplingParams(
        n=body.n or 1,
        temperature=1.0 if body.temperature is None else body.temperature,
        # top_p=0 is legal in OpenAI's API and means "only the most likely token".
        top_p=1.0 if body.top_p is None else max(body.top_p, 1e-9),
        top_k=body.top_k or 0,
        min_p=body.min_p or 0.0,
        seed=body.seed,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=body.repetition_penalty or 1.0,
        logit_bias=body.logit_bias_ids(),
        stop=body.stop_strings,
        stop_token_ids=body.stop_token_ids or [],
        include_stop_str_in_output=bool(body.include_stop_str_in_output),
        ignore_eos=bool(body.ignore_eos),
        min_tokens=body.min_tokens or 0,
        max_tokens=max_tokens,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        skip_special_tokens=body.skip_special_tokens is not False,
        structured=body.response_format.structured_output() if body.response_format else None,
    )


async def build_stop_matcher(runtime: ReplicaRuntime, params: SamplingParams) -> None:
    """Build the stop strings' automaton on a prompt worker (tens of ms for the largest allowed),
    so the engine's shared step thread never pays for it."""
    if params.stop:
        await runtime.prompts.run(lambda: params.stop_matcher, "stop")


async def build_grammar(runtime: ReplicaRuntime, params: SamplingParams) -> None:
    """Compile the response format's grammar on a prompt worker (once per schema: then cached),
    before any response starts: a bad schema is a 400, and the engine's step never compiles."""
    if params.structured is not None:
        engine = runtime.engine
        await runtime.prompts.run(lambda: engine.compile_grammar(params), "response_format")


class LatencyTracker:
    """TTFT, inter-token latency, end-to-end and queue time of one engine request (and, when
    traced, its engine spans: replica.http_api.tracing)."""

    def __init__(self, metrics: ReplicaMetrics, arrival: float) -> None:
        self.metrics = metrics
        self.arrival = arrival
        self.last_token_at: float | None = None

    def saw(self, out: RequestOutput) -> None:
        if any(o.delta_token_ids for o in out.outputs):
            now = time.time()
            if self.last_token_at is None:
                self.metrics.ttft.observe(now - self.arrival)
            else:
                self.metrics.itl.observe(now - self.last_token_at)
            self.last_token_at = now
        if out.finished:
            self.finished(out)

    def finished(self, out: RequestOutput) -> None:
        m = self.metrics
        m.e2e.observe(time.time() - self.arrival)
        if out.metrics is not None and out.metrics.first_scheduled_time is not None:
            m.queue.observe(out.metrics.first_scheduled_time - out.metrics.arrival_time)
        m.prompt_tokens.inc(len(out.prompt_token_ids))
        m.generation_tokens.inc(sum(len(o.token_ids) for o in out.outputs))
        engine_finished(out)


def open_streams(
    runtime: ReplicaRuntime,
    request_id: str,
    prompts: Sequence[list[int]],
    params: SamplingParams,
    max_tokens_param: str = "max_tokens",
    generated_ids: list[int] | None = None,
) -> list[AsyncGenerator[RequestOutput, None]]:
    """The engine's stream for each prompt (`request_id`, or `request_id-i` for several).

    The engine checks each request here, before any response starts, so that a stream never opens
    for a request it would refuse; a SamplingParamsError becomes a 400 naming the field (errors.py),
    `max_tokens_param` where the request set the limit under another name. Nothing reaches the
    engine until a stream is iterated. `generated_ids`: a resumed stream's output so far."""
    ids = [request_id] if len(prompts) == 1 else [f"{request_id}-{i}" for i in range(len(prompts))]
    try:
        return [
            runtime.engine.generate(rid, prompt, params, generated_ids=generated_ids)
            for rid, prompt in zip(ids, prompts, strict=True)
        ]
    except SamplingParamsError as exc:
        if exc.param == "max_tokens" and max_tokens_param != exc.param:
            raise SamplingParamsError(max_tokens_param, str(exc), exc.code) from None
        raise


async def run_prompt(
    runtime: ReplicaRuntime, outputs: AsyncGenerator[RequestOutput, None], arrival: float
) -> AsyncIterator[RequestOutput]:
    """The outputs of one engine stream, with latency metrics. Closing this early (disconnect,
    error) closes the engine's stream at once, which aborts the request and frees its KV blocks."""
    tracker = LatencyTracker(runtime.metrics, arrival)
    try:
        async for out in outputs:
            tracker.saw(out)
            yield out
    finally:
        await outputs.aclose()


async def run_prompts(
    runtime: ReplicaRuntime,
    streams: Sequence[AsyncGenerator[RequestOutput, None]],
    arrival: float,
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) for several prompts running side by side in the engine."""
    if len(streams) == 1:
        async for out in run_prompt(runtime, streams[0], arrival):
            yield 0, out
        return
    # (prompt index, its next output, the exception that ended it, or None once it is done)
    queue: asyncio.Queue[tuple[int, RequestOutput | Exception | None]] = asyncio.Queue()

    async def pump(i: int, stream: AsyncGenerator[RequestOutput, None]) -> None:
        try:
            async for out in run_prompt(runtime, stream, arrival):
                queue.put_nowait((i, out))
            queue.put_nowait((i, None))
        except Exception as exc:
            queue.put_nowait((i, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class RequestScope:
    """One generation request's holds: the in-flight count (drain waits on it) and the API key's
    admission. `close` releases both exactly once, however the request ends.

    A request that ends early (the client left, an error) is still charged to its key: its prompt
    and the tokens generated so far, as last reported by `saw` (tokens the engine made after the
    last output it delivered cannot be known)."""

    def __init__(
        self,
        runtime: ReplicaRuntime,
        admission: Admission,
        arrival: float,
        prompt_tokens: int,
        seqs: int = 1,
    ) -> None:
        self.runtime = runtime
        self.admission = admission
        self.arrival = arrival
        self.prompt_tokens = prompt_tokens
        self.seqs = seqs
        self._generated: dict[int, int] = {}  # prompt index -> tokens of its choices so far
        self._closed = False
        runtime.request_started(seqs)

    def saw(self, index: int, out: RequestOutput) -> None:
        """Record the tokens generated so far for prompt `index` (what an early end is charged)."""
        self._generated[index] = sum(len(o.token_ids) for o in out.outputs)

    async def settle(self, prompt_tokens: int, completion_tokens: int) -> None:
        await self.admission.settle(prompt_tokens, completion_tokens)

    async def close(self) -> None:
        """Charge what was used unless `settle` already did (settling twice is a no-op)."""
        if self._closed:
            return
        self._closed = True
        self.runtime.request_finished(self.seqs)
        await self.admission.settle(self.prompt_tokens, sum(self._generated.values()))


class Job(Protocol):
    """One generation request, answered whole (`collect`) or as SSE frames (`stream`)."""

    scope: RequestScope

    def stream(self) -> AsyncGenerator[bytes, None]: ...

    async def collect(self) -> dict: ...


async def answer(request: Request, job: Job, stream: bool) -> Response:
    """Stream the job, or collect it (cancelled if the client leaves first); either way its scope
    is closed exactly once."""
    if stream:
        return SSEResponse(job.stream(), on_close=job.scope.close)
    try:
        return json_response(await until_disconnect(request, job.collect()))
    finally:
        await job.scope.close()
