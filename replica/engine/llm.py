"""The offline API: `LLM(model, **engine_args).generate(prompts, params)`, and
`LLM(model, task="embed").embed(prompts)`."""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq
from typing import cast

from replica.engine.config import EngineArgs
from replica.engine.core import EngineCore
from replica.engine.outputs import EngineLoad, PoolingOutput, RequestOutput
from replica.engine.sampling_params import SamplingParams


class LLM:
    """Runs batches of prompts to completion with continuous batching, in the caller's thread."""

    def __init__(self, model: str, **engine_args) -> None:
        self.engine = EngineCore(EngineArgs(model=str(model), **engine_args))
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(
        self,
        prompts: str | list[int] | Seq[str | list[int]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """One RequestOutput per prompt, in prompt order. A prompt is a string or token ids."""
        prompts = _as_batch(prompts)
        params = sampling_params if sampling_params is not None else SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        engine = self.engine
        token_ids = [engine.tokenize(prompt) for prompt in prompts]
        for ids, p in zip(token_ids, params, strict=True):
            engine.validate(ids, p)  # all or nothing: a bad prompt adds no request
            engine.compile_grammar(p)
        order: dict[str, int] = {}
        for index, (prompt, ids, p) in enumerate(zip(prompts, token_ids, params, strict=True)):
            request_id = f"offline-{next(self._ids)}"
            text = prompt if isinstance(prompt, str) else None
            engine.enqueue(request_id, text, ids, p)
            order[request_id] = index
        results: list[RequestOutput | None] = [None] * len(prompts)
        while self.engine.has_unfinished:
            for output in self.engine.step(stream=False):
                assert isinstance(output, RequestOutput)
                results[order[output.request_id]] = output
        return [r for r in results if r is not None]

    def embed(self, prompts: str | list[int] | Seq[str | list[int]]) -> list[list[float]]:
        """One normalised embedding per prompt, in prompt order (an engine with task="embed")."""
        engine = self.engine
        token_ids = [engine.tokenize(prompt) for prompt in _as_batch(prompts)]
        for ids in token_ids:
            engine.validate_pooling(ids)  # all or nothing, as generate
        order: dict[str, int] = {}
        for index, ids in enumerate(token_ids):
            request_id = f"offline-{next(self._ids)}"
            engine.enqueue_pooling(request_id, ids)
            order[request_id] = index
        results: list[list[float]] = [[] for _ in token_ids]
        while engine.has_unfinished:
            for output in engine.step():
                assert isinstance(output, PoolingOutput)
                results[order[output.request_id]] = output.embedding
        return results

    def load(self) -> EngineLoad:
        return self.engine.load()


def _as_batch(prompts: str | list[int] | Seq[str | list[int]]) -> list[str | list[int]]:
    """One prompt (a string or token ids) or several, as a list of prompts."""
    if isinstance(prompts, str):
        return [prompts]
    if prompts and isinstance(prompts[0], int):
        return [cast("list[int]", prompts)]
    return list(cast("Seq[str | list[int]]", prompts))
