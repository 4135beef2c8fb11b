"""Tool calling on the chat route: the request's tools checked against the replica's parser, the
sampling constrained when the request demands a call, and each choice's parser chosen."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from fleet.control.errors import APIError
from replica.engine.sampling_params import SamplingParams
from replica.engine.structured import GrammarError, StructuredOutput
from replica.http_api.protocol import ChatCompletionRequest
from replica.http_api.tool_calls import (
    ToolCallParser,
    forced_parser,
    keeps_special_tokens,
    make_parser,
)
from replica.http_api.tool_calls.request import ToolRequest, tool_request
from replica.http_api.tool_calls.schema import forced_schema

ParserFactory = Callable[[], ToolCallParser]


def chat_tools(body: ChatCompletionRequest, parser: str) -> ToolRequest | None:
    """The request's tools; a 400 for a call demanded where it cannot be honoured."""
    tools = tool_request(body.tools, body.tool_choice, body.parallel_tool_calls)
    if tools is None or not tools.forces_call:
        return tools
    if parser == "none":
        raise APIError(
            400, "this replica serves no tool calls (--tool-call-parser none); "
            f"tool_choice {tools.function or tools.choice!r} cannot be honoured", "tool_choice",
        )  # fmt: skip
    if body.response_format is not None and body.response_format.type != "text":
        raise APIError(
            400, "'response_format' cannot be combined with a tool_choice that demands a call",
            "response_format",
        )  # fmt: skip
    return tools


def with_tools(params: SamplingParams, tools: ToolRequest, parser: str) -> SamplingParams:
    """A demanded call is generated under its JSON schema's grammar; a parser that reads special
    tokens keeps them in the text."""
    if tools.forces_call:
        try:
            spec = StructuredOutput.json_schema(forced_schema(tools))
        except GrammarError as exc:
            raise APIError(400, f"invalid tool parameters: {exc}", "tools") from None
        return dataclasses.replace(params, structured=spec)
    if tools.choice == "auto" and keeps_special_tokens(parser):
        return dataclasses.replace(params, skip_special_tokens=False)
    return params


def choice_parser(tools: ToolRequest | None, parser: str) -> ParserFactory | None:
    """What makes each choice's parser; None where the answer is plain content."""
    if tools is None or tools.choice == "none" or parser == "none":
        return None
    if tools.forces_call:
        return lambda: forced_parser(tools.function)
    return lambda: make_parser(parser)


def finish_reason(reason: str | None, called: bool) -> str | None:
    """`tool_calls` for an answer that ended by itself after calling (a cut one stays `length`)."""
    return "tool_calls" if called and reason == "stop" else reason
