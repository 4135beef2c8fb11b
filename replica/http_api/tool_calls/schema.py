"""What a "required" or named `tool_choice` constrains the answer to: JSON the grammar enforces.

We constrain to the call's JSON only (as vLLM does for these choices), not to the family's wrapper
(`<tool_call>`, `[TOOL_CALLS]`): the answer is the call, so the wrapper is never needed to find it;
the grammar cache and compiler of response_format serve it unchanged; and wrappers that are special
tokens (Mistral's) would need token-level grammars that detokenizing then drops.

Named: the function's parameters. "required": `{"name", "arguments"}` of any tool (anyOf), name
first so the parser knows the call before its arguments; with parallel calls, a list of them."""

from __future__ import annotations

from typing import Any

from replica.http_api.tool_calls.request import ToolRequest

# A random or looping model must still end a list of calls: the grammar closes it at this many.
MAX_PARALLEL_CALLS = 16


def forced_schema(request: ToolRequest) -> dict[str, Any]:
    if request.function is not None:
        return request.tool(request.function).parameters
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": t.name}, "arguments": t.parameters},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in request.tools
    ]
    one = calls[0] if len(calls) == 1 else {"anyOf": calls}
    if not request.parallel:
        return one
    return {"type": "array", "items": one, "minItems": 1, "maxItems": MAX_PARALLEL_CALLS}
