"""POST /v1/completions: one or several prompts (text or token ids), `n` choices each, optional echo
and logprobs, whole or streamed. Choice `index` runs over prompt x n, prompt 0's choices first."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import cast

import orjson
from starlette.requests import Request
from starlette.responses import Response

from fleet.control.errors import APIError
from replica.engine.outputs import CompletionOutput, RequestOutput
from replica.engine.sampling_params import SamplingParams
from replica.http_api.generation import (
    RequestScope,
    answer,
    build_grammar,
    build_stop_matcher,
    open_generation,
    open_streams,
    run_prompts,
    sampling_params,
)
from replica.http_api.prompts import encode
from replica.http_api.protocol import CompletionRequest
from replica.http_api.responses import (
    CompletionLogprobs,
    ResponseHead,
    completion_choice,
    completion_chunk,
    completion_response,
    usage,
    usage_chunk,
)
from replica.http_api.resume import StreamResume
from replica.http_api.sse_response import frame

DEFAULT_MAX_TOKENS = 16  # the OpenAI default for this route


@dataclass
class Prompt:
    token_ids: list[int]
    echo_text: str  # what echo prepends: the prompt as given, or its ids decoded


async def create_completion(request: Request) -> Response:
    opened = await open_generation(request, CompletionRequest)
    runtime, engine, body, resume, model = opened.parts()
    tokenizer = engine.tokenizer
    runtime.check_fanout(len(body.prompts) * (body.n or 1))
    prompt_ids = await runtime.prompts.run(
        lambda: [
            encode(tokenizer, p, runtime.limits) if isinstance(p, str) else p for p in body.prompts
        ],
        "prompt",
    )
    max_tokens = DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
    echo_logprobs = body.logprobs if body.echo else None
    # Echo with max_tokens=0 runs one token that is never shown (the engine needs at least one).
    params = sampling_params(body, max(max_tokens, 1), body.logprobs, echo_logprobs)
    await build_stop_matcher(runtime, params)
    head = resume.head(body, "cmpl", model)
    streams = open_streams(runtime, head.id, prompt_ids, params, "max_tokens", resume.generated_ids)
    await build_grammar(runtime, params)
    prompts = [
        Prompt(
            ids,
            (p if isinstance(p, str) else cast(str, tokenizer.decode(ids))) if body.echo else "",
        )
        for p, ids in zip(body.prompts, prompt_ids, strict=True)
    ]
    seqs = len(prompts) * params.n
    runtime.check_queue(seqs)
    reserve = sum(len(p.token_ids) + max_tokens * params.n for p in prompts)
    admission = await runtime.auth.admit(opened.record, body.model or model, reserve)  # name used
    prompt_tokens = sum(len(p.token_ids) for p in prompts)
    job = CompletionJob(
        RequestScope(runtime, admission, opened.arrival, prompt_tokens, seqs),
        head,
        body,
        prompts,
        streams,
        params,
        resume,
        output_wanted=max_tokens > 0,
    )
    return await answer(request, job, bool(body.stream))


@dataclass
class CompletionJob:
    scope: RequestScope
    head: ResponseHead
    body: CompletionRequest
    prompts: list[Prompt]
    engine_streams: list[AsyncGenerator[RequestOutput, None]]  # one per prompt
    params: SamplingParams
    resume: StreamResume
    output_wanted: bool  # False for echo with max_tokens=0: the prompt (and its logprobs) only

    def _outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        return run_prompts(self.scope.runtime, self.engine_streams, self.scope.arrival)

    def _logprobs(self) -> CompletionLogprobs | None:
        texts = self.scope.runtime.texts
        return None if self.body.logprobs is None or texts is None else CompletionLogprobs(texts)

    def _echo(self, i: int, out: RequestOutput, lp: CompletionLogprobs | None) -> tuple[str, dict]:
        """The prompt part of an echoed choice: its text and, with logprobs, its token entries."""
        if lp is None:
            return self.prompts[i].echo_text, {}
        entries = out.prompt_logprobs or [None] * len(out.prompt_token_ids)
        return self.prompts[i].echo_text, lp.build(out.prompt_token_ids, entries)

    def _generated(self, o: CompletionOutput, lp: CompletionLogprobs | None, delta: bool) -> dict:
        entries = o.delta_logprobs if delta else o.logprobs
        if lp is None or not entries:
            return {}
        return lp.build([e.token_id for e in entries], entries)

    def _choice(
        self, i: int, out: RequestOutput, o: CompletionOutput, lp: CompletionLogprobs | None,
        echo: bool, delta: bool,
    ) -> tuple[str, dict, str | None]:  # fmt: skip
        """(text, logprobs object, finish reason) of one choice, whole or since the last output."""
        text, lp_dict = self._echo(i, out, lp) if echo else ("", {})
        if not self.output_wanted:
            return text, lp_dict, "length"
        text += o.delta_text if delta else o.text
        return text, _merge(lp_dict, self._generated(o, lp, delta)), o.finish_reason

    def _saw(self, i: int, out: RequestOutput) -> None:
        if self.output_wanted:  # echo-only requests report (and are charged) no completion
            self.scope.saw(i, out)

    def _usage(self, finals: dict[int, RequestOutput]) -> dict:
        completion = 0
        if self.output_wanted:
            completion = sum(len(o.token_ids) for out in finals.values() for o in out.outputs)
        return usage(
            sum(len(p.token_ids) for p in self.prompts),
            completion,
            sum(out.num_cached_tokens for out in finals.values()),
        )

    async def collect(self) -> dict:
        finals: dict[int, RequestOutput] = {}
        async for i, out in self._outputs():
            self._saw(i, out)
            if out.finished:
                finals[i] = out
        if len(finals) != len(self.prompts):
            raise APIError(500, "the engine ended a request without finishing it")
        choices = []
        for i, out in sorted(finals.items()):
            for o in out.outputs:
                text, lp_dict, finish = self._choice(
                    i, out, o, self._logprobs(), bool(self.body.echo), delta=False
                )
                index = i * self.params.n + o.index
                choices.append(completion_choice(index, text, lp_dict or None, finish))
        body_usage = self._usage(finals)
        await self.scope.settle(body_usage["prompt_tokens"], body_usage["completion_tokens"])
        return completion_response(self.head, choices, body_usage)

    async def stream(self) -> AsyncGenerator[bytes, None]:
        n = self.params.n
        include_usage = self.body.include_usage
        logprobs = {k: self._logprobs() for k in range(len(self.prompts) * n)}
        started: set[int] = set()
        done: set[int] = set()
        finals: dict[int, RequestOutput] = {}
        async for i, out in self._outputs():
            self._saw(i, out)
            frames = []
            for o in out.outputs:
                index = i * n + o.index
                if index in done:
                    continue
                echo = bool(self.body.echo) and index not in started
                started.add(index)
                text, lp_dict, finish = self._choice(i, out, o, logprobs[index], echo, delta=True)
                if not text and not lp_dict and finish is None:
                    self.resume.hold(index, o.delta_token_ids)
                    continue
                if finish is not None:
                    done.add(index)
                choice = completion_choice(index, text, lp_dict or None, finish)
                chunk = completion_chunk(self.head, choice, include_usage)
                frames.append(frame(orjson.dumps(self.resume.tag(chunk, index, o.delta_token_ids))))
            if out.finished:
                finals[i] = out
            if frames:
                yield b"".join(frames)
        if len(finals) != len(self.prompts):
            raise APIError(500, "the engine ended a request without finishing it")
        body_usage = self._usage(finals)
        await self.scope.settle(body_usage["prompt_tokens"], body_usage["completion_tokens"])
        if include_usage:
            yield frame(orjson.dumps(usage_chunk(self.head, "text_completion", body_usage)))


def _merge(first: dict, second: dict) -> dict:
    """Concatenate two completions logprobs objects (echoed prompt, then generated tokens)."""
    if not first or not second:
        return first or second
    return {key: first[key] + second[key] for key in first}
