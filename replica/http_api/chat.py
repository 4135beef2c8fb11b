"""POST /v1/chat/completions: messages rendered with the model's chat template, `n` choices, chat
logprobs, whole or streamed (a role chunk per choice first, then content deltas)."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field

import orjson
from starlette.requests import Request
from starlette.responses import Response

from fleet.control.errors import APIError
from replica.engine.outputs import CompletionOutput, RequestOutput, TokenLogprob
from replica.engine.sampling_params import SamplingParams
from replica.http_api.chat_tools import (
    ParserFactory,
    chat_tools,
    choice_parser,
    finish_reason,
    with_tools,
)
from replica.http_api.generation import (
    RequestScope,
    answer,
    build_grammar,
    build_stop_matcher,
    open_generation,
    open_streams,
    run_prompt,
    sampling_params,
)
from replica.http_api.prompts import chat_token_ids
from replica.http_api.protocol import ChatCompletionRequest, plain_messages
from replica.http_api.responses import (
    ResponseHead,
    chat_choice,
    chat_chunk,
    chat_logprobs,
    chat_response,
    usage,
    usage_chunk,
)
from replica.http_api.resume import StreamResume
from replica.http_api.sse_response import frame
from replica.http_api.tool_calls import ToolCallParser, assemble, delta_fields


async def create_chat_completion(request: Request) -> Response:
    opened = await open_generation(request, ChatCompletionRequest)
    runtime, engine, body, resume, model = opened.parts()
    runtime.check_fanout(body.n or 1)
    tools = await runtime.prompts.run(lambda: chat_tools(body, runtime.tool_parser), "tools")
    prompt_ids = await runtime.prompts.run(
        lambda: chat_token_ids(
            engine.tokenizer,
            runtime.limits,
            plain_messages(body.messages),
            body.add_generation_prompt,
            body.continue_final_message,
            body.chat_template_kwargs,
            runtime.chat_template,
            [t.for_template() for t in tools.tools] if tools else None,
        ),
        "messages",
    )
    # Without a limit the completion may use the rest of the context.
    max_tokens = body.requested_max_tokens or max(1, engine.max_model_len - len(prompt_ids))
    top_n = (body.top_logprobs or 0) if body.logprobs else None
    params = sampling_params(body, max_tokens, top_n)
    if tools is not None:
        params = with_tools(params, tools, runtime.tool_parser)
    await build_stop_matcher(runtime, params)
    param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    head = resume.head(body, "chatcmpl", model)
    [outputs] = open_streams(runtime, head.id, [prompt_ids], params, param, resume.generated_ids)
    await build_grammar(runtime, params)
    runtime.check_queue(params.n)
    reserve = len(prompt_ids) + max_tokens * params.n
    # A key's model list applies to the name the request used (any served name).
    admission = await runtime.auth.admit(opened.record, body.model or model, reserve)
    job = ChatJob(
        RequestScope(runtime, admission, opened.arrival, len(prompt_ids), params.n),
        head,
        body,
        prompt_ids,
        outputs,
        params,
        top_n,
        resume,
        choice_parser(tools, runtime.tool_parser),
    )
    return await answer(request, job, bool(body.stream))


@dataclass
class ChatJob:
    scope: RequestScope
    head: ResponseHead
    body: ChatCompletionRequest
    prompt_ids: list[int]
    engine_stream: AsyncGenerator[RequestOutput, None]
    params: SamplingParams
    top_n: int | None  # None: no logprobs
    resume: StreamResume
    new_parser: ParserFactory | None = None  # None: the answer is plain content
    _parsers: dict[int, ToolCallParser] = field(default_factory=dict)  # of streamed choices
    _called: set[int] = field(default_factory=set)  # streamed choices that made a call

    def _outputs(self) -> AsyncIterator[RequestOutput]:
        return run_prompt(self.scope.runtime, self.engine_stream, self.scope.arrival)

    def _logprobs(self, entries: list[TokenLogprob] | None) -> dict | None:
        texts = self.scope.runtime.texts
        if self.top_n is None or texts is None:
            return None
        return chat_logprobs(entries or [], texts, self.top_n)

    def _usage(self, final: RequestOutput) -> dict:
        completion = sum(len(o.token_ids) for o in final.outputs)
        return usage(len(self.prompt_ids), completion, final.num_cached_tokens)

    async def collect(self) -> dict:
        final = None
        async for out in self._outputs():
            self.scope.saw(0, out)
            final = out
        if final is None or not final.finished:
            raise APIError(500, "the engine ended a request without finishing it")
        choices = [self._choice(o) for o in final.outputs]
        body_usage = self._usage(final)
        await self.scope.settle(body_usage["prompt_tokens"], body_usage["completion_tokens"])
        return chat_response(self.head, choices, body_usage)

    async def stream(self) -> AsyncGenerator[bytes, None]:
        include_usage = self.body.include_usage
        head = self.head
        resume = self.resume
        if resume.generated_ids is None:  # a continuation's client already has its role chunk
            role = {"role": "assistant", "content": ""}
            yield b"".join(
                frame(
                    orjson.dumps(
                        resume.tag(chat_chunk(head, k, role, None, None, include_usage), k, [])
                    )
                )
                for k in range(self.params.n)
            )
        done: set[int] = set()
        final = None
        async for out in self._outputs():
            self.scope.saw(0, out)
            final = out
            frames = []
            for o in out.outputs:
                if o.index in done:
                    continue
                delta = self._delta(o) if self._has_news(o) else None
                if delta is None or not any(delta):  # a parser may hold a delta's text back
                    resume.hold(o.index, o.delta_token_ids)
                    continue
                chunk = chat_chunk(head, o.index, *delta, include_usage)
                frames.append(frame(orjson.dumps(resume.tag(chunk, o.index, o.delta_token_ids))))
            done.update(o.index for o in out.outputs if o.finished)
            if frames:
                yield b"".join(frames)
        if final is None or not final.finished:
            raise APIError(500, "the engine ended a request without finishing it")
        body_usage = self._usage(final)
        await self.scope.settle(body_usage["prompt_tokens"], body_usage["completion_tokens"])
        if include_usage:
            yield frame(orjson.dumps(usage_chunk(head, "chat.completion.chunk", body_usage)))

    def _has_news(self, o: CompletionOutput) -> bool:
        """Text, a finish, or (with logprobs) tokens whose text is still held back."""
        return bool(o.delta_text or o.finished or (self.top_n is not None and o.delta_token_ids))

    def _choice(self, o: CompletionOutput) -> dict:
        logprobs = self._logprobs(o.logprobs)
        if self.new_parser is None:
            return chat_choice(o.index, o.text, logprobs, o.finish_reason)
        parser = self.new_parser()
        message = assemble(parser.feed(o.text) + parser.finish())
        calls = [c.to_openai() for c in message.tool_calls]
        reason = finish_reason(o.finish_reason, bool(calls))
        return chat_choice(o.index, message.content, logprobs, reason, calls)

    def _delta(self, o: CompletionOutput) -> tuple[dict, dict | None, str | None]:
        logprobs = self._logprobs(o.delta_logprobs)
        if self.new_parser is None:
            delta = {"content": o.delta_text} if o.delta_text else {}
            return delta, logprobs, o.finish_reason
        parser = self._parsers.get(o.index)
        if parser is None:
            parser = self._parsers[o.index] = self.new_parser()
        events = parser.feed(o.delta_text) + (parser.finish() if o.finished else [])
        if parser.calls:
            self._called.add(o.index)
        reason = finish_reason(o.finish_reason, o.index in self._called)
        return delta_fields(events), logprobs, reason
