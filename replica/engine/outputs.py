"""What the engine hands back: a request's outputs, offline (final) or streamed (once per step), and
its own load."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypedDict


@dataclass
class TokenLogprob:
    """A chosen token's log-probability (from the model's raw distribution) and its rank there,
    with the `top` most likely alternatives as (token_id, logprob), best first."""

    token_id: int
    logprob: float
    rank: int
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class CompletionOutput:
    """One of a request's `n` choices.

    Cumulative: `text`, `token_ids`, `logprobs`, `finish_reason` ("stop" | "length" | None while
    running), `stop_reason` (the stop string or token id that ended it, if any). Delta since the
    previous output of the same request: `delta_text`, `delta_token_ids`, `delta_logprobs`.
    `text` never contains a stop string (unless include_stop_str_in_output) nor text that might
    still become part of one.
    """

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprob] | None = None
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    delta_logprobs: list[TokenLogprob] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """Wall-clock timestamps (time.time()) for latency metrics; None until the event happens."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class RequestOutput:
    """A request's state. In a stream every choice is present each time, with its deltas since
    the previous yield (empty when it had nothing new); `finished` is true once all choices are."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    prompt_logprobs: list[TokenLogprob | None] | None = None
    metrics: RequestMetrics | None = None


@dataclass
class PoolingOutput:
    """An embedding request's result: its prompt's pooled, L2-normalised final hidden state."""

    request_id: str
    prompt_token_ids: list[int]
    embedding: list[float]
    finished: bool = True  # pooled once, when the whole prompt has run


class EngineLoad(TypedDict):
    """The engine's state after its last step: what /load, /metrics and routers weigh."""

    running: int  # requests with a sequence in the running batch
    waiting: int  # requests with a sequence waiting to be scheduled
    kv_usage: float  # fraction of KV blocks in use
    num_blocks: int
    free_blocks: int
    block_size: int  # tokens per KV block
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache, ever
    prefix_cache_hits: int  # ... and found there
    num_preemptions: int
