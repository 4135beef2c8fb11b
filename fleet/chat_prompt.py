"""A chat request's prompt as a replica renders it, shared by the replica and the router.

Why here: a router that hashes a chat prompt into the replica's KV block hashes must render it
exactly as the replica does (the same messages and tools handed to the same chat template, with
the same arguments), and the router and the replica must not import each other. The replica calls
`apply_template` to render; the router builds the template's inputs from the raw JSON body with
`template_inputs`, which mirrors the replica's checked request (replica/http_api/protocol.py's
`plain_messages`, tool_calls/request.py's `FunctionTool.for_template`) for every request the
replica accepts (tests/router/test_exact_affinity.py holds the two equal).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import orjson

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


def apply_template(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool,
    continue_final_message: bool,
    template_kwargs: dict[str, Any] | None,
    chat_template: str | None,
    tools: list[dict[str, Any]] | None,
) -> str:
    """The rendered text (the template writes its own special tokens: encode it without)."""
    text = tokenizer.apply_chat_template(
        messages,
        chat_template=chat_template,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        continue_final_message=continue_final_message,
        tools=[*tools] if tools else None,
        **(template_kwargs or {}),
    )
    return cast(str, text)


@dataclass(frozen=True)
class TemplateInputs:
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    add_generation_prompt: bool
    continue_final_message: bool
    template_kwargs: dict[str, Any] | None


class Unrenderable(ValueError):
    """A body the replica would refuse or render otherwise: the router does not guess."""


def template_inputs(body: dict[str, Any]) -> TemplateInputs:
    """What the replica hands its chat template for this body; Unrenderable where unsure."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise Unrenderable("messages")
    add_generation_prompt = body.get("add_generation_prompt", True)
    continue_final = body.get("continue_final_message", False)
    kwargs = body.get("chat_template_kwargs")
    if not isinstance(add_generation_prompt, bool) or not isinstance(continue_final, bool):
        raise Unrenderable("generation prompt flags")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise Unrenderable("chat_template_kwargs")
    return TemplateInputs(
        [_message(m) for m in messages],
        _tools(body.get("tools")),
        add_generation_prompt,
        continue_final,
        kwargs or None,
    )


def _message(m: object) -> dict[str, Any]:
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise Unrenderable("message")
    out: dict[str, Any] = {"role": m["role"], "content": _text(m.get("content"))}
    if m.get("name") is not None:
        out["name"] = _str(m["name"])
    calls = m.get("tool_calls")
    if calls:
        if not isinstance(calls, list):
            raise Unrenderable("tool_calls")
        out["tool_calls"] = [_call(c) for c in calls]
    if m.get("tool_call_id") is not None:
        out["tool_call_id"] = _str(m["tool_call_id"])
    return out


def _text(content: object) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise Unrenderable("content")
    texts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") != "text":
            raise Unrenderable("content part")
        texts.append(_str(part.get("text")))
    return "\n".join(texts)


def _call(call: object) -> dict[str, Any]:
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        raise Unrenderable("tool call")
    function = call["function"]
    raw = _str(function.get("arguments"))
    try:
        arguments: Any = orjson.loads(raw)
    except orjson.JSONDecodeError:
        arguments = raw
    named = {"name": _str(function.get("name")), "arguments": arguments}
    return {"id": _str(call.get("id")), "type": "function", "function": named}


def _tools(tools: object) -> list[dict[str, Any]] | None:
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise Unrenderable("tools")
    out = []
    for tool in tools:
        if not isinstance(tool, dict) or not isinstance(tool.get("function"), dict):
            raise Unrenderable("tool")
        function = tool["function"]
        rendered: dict[str, Any] = {"name": _str(function.get("name"))}
        if function.get("description") is not None:
            rendered["description"] = _str(function["description"])
        rendered["parameters"] = function.get("parameters", EMPTY_PARAMETERS)
        out.append({"type": "function", "function": rendered})
    return out or None


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise Unrenderable("a string field")
    return value
