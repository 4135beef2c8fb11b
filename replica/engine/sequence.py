"""A request and its `n` sequences (one per choice), the units the scheduler moves around."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable

import torch

from replica.engine.detokenizer import IncrementalDetokenizer
from replica.engine.grammar_mask import SequenceGrammar
from replica.engine.outputs import RequestMetrics, TokenLogprob
from replica.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Request:
    """One client request: a prompt, its sampling settings and one sequence per choice."""

    def __init__(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        detokenizer_factory: Callable[[list[int], SamplingParams], IncrementalDetokenizer],
        cache_salt: str | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.cache_salt = cache_salt
        self.metrics = RequestMetrics(arrival_time=time.time())
        self.prompt_logprobs: list[TokenLogprob | None] | None = (
            [None] if params.prompt_logprobs is not None else None
        )
        self.seqs = [
            Sequence(self, index, detokenizer_factory(prompt_token_ids, params))
            for index in range(params.n)
        ]

    @property
    def finished(self) -> bool:
        return all(seq.status is SequenceStatus.FINISHED for seq in self.seqs)

    @property
    def num_cached_tokens(self) -> int:
        return max(seq.num_cached_tokens for seq in self.seqs)


class Sequence:
    """Token ids (prompt then output), KV blocks and decoding state of one choice."""

    def __init__(self, request: Request, index: int, detokenizer: IncrementalDetokenizer) -> None:
        params = request.params
        self.request = request
        self.params = params
        self.index = index
        self.token_ids = list(request.prompt_token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []  # chained hashes of the full blocks seen so far
        self.num_registered_blocks = 0  # leading blocks already offered to the prefix cache
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.detokenizer = detokenizer
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self.generator: torch.Generator | None = None  # made by the sampler for seeded requests
        self.grammar: SequenceGrammar | None = None  # set by the engine for structured outputs
        self.emitted_tokens = 0  # output tokens already handed out in a stream
        self.emitted_chars = 0

    def resume(self, generated: list[int]) -> None:
        """Continue after `generated` output tokens (a stream resumed from a replica that died).

        They count as output (max_tokens, penalties, min_tokens, a seed's positions) and their
        text is replayed through the detokenizer, so a stop string is matched across the boundary
        and the text held back then is held back now; it is not streamed again."""
        for token in generated:
            self.token_ids.append(token)
            if self.grammar is not None:
                self.grammar.accept(token)
            ended = self.num_output_tokens >= self.params.min_tokens
            self.detokenizer.add_token(token, check_stop=ended)
        self.emitted_tokens = self.num_output_tokens
        self.emitted_chars = self.detokenizer.safe_length()

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
