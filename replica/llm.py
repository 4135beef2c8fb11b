"""The offline API: `LLM(model, **engine_args).generate(prompts, params)`."""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq

from replica.config import EngineArgs
from replica.engine.llm_engine import EngineCore
from replica.outputs import RequestOutput
from replica.sampling_params import SamplingParams


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
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
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
            engine.add_request(request_id, prompt, p, prompt_token_ids=ids)
            order[request_id] = index
        results: list[RequestOutput | None] = [None] * len(prompts)
        while self.engine.has_unfinished:
            for output in self.engine.step(stream=False):
                results[order[output.request_id]] = output
        return [r for r in results if r is not None]

    def load(self) -> dict:
        return self.engine.load()
