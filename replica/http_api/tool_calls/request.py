"""A chat request's `tools`, `tool_choice` and `parallel_tool_calls`, checked: anything wrong is a
400 naming the field, before the prompt is rendered.

Checking a schema against its metaschema takes up to ~1 s for the largest allowed, so the chat
route runs this on a prompt worker, and each schema's verdict is cached: agents send the same
tools every turn."""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from fleet.control.errors import APIError
from replica.engine.structured import GrammarError, StructuredOutput

MAX_TOOLS = 128  # OpenAI's limit
_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}
Choice = Literal["none", "auto", "required", "function"]


@dataclass(frozen=True)
class FunctionTool:
    name: str
    description: str | None
    parameters: dict[str, Any]  # a JSON schema of an object

    def for_template(self) -> dict[str, Any]:
        """The tool as chat templates take it (OpenAI's shape, as transformers documents)."""
        function: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            function["description"] = self.description
        function["parameters"] = self.parameters
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolRequest:
    tools: list[FunctionTool]
    choice: Choice
    function: str | None  # the named function when choice is "function"
    parallel: bool

    @property
    def forces_call(self) -> bool:
        return self.choice in ("required", "function")

    def tool(self, name: str) -> FunctionTool:
        return next(t for t in self.tools if t.name == name)


def tool_request(tools: Any, tool_choice: Any, parallel_tool_calls: Any) -> ToolRequest | None:
    """The checked request; None when it has no tools (then `tool_choice` may only be "none" or
    "auto", as OpenAI's)."""
    if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
        raise APIError(400, "'parallel_tool_calls' must be a boolean", "parallel_tool_calls")
    functions = _functions(tools)
    choice, function = _choice(tool_choice, {f.name for f in functions})
    if not functions:
        if choice in ("required", "function"):
            raise APIError(
                400, "'tool_choice' is only allowed when 'tools' are given", "tool_choice"
            )
        return None
    return ToolRequest(functions, choice, function, parallel_tool_calls is not False)


def _functions(tools: Any) -> list[FunctionTool]:
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise APIError(400, "'tools' must be a list", "tools")
    if len(tools) > MAX_TOOLS:
        raise APIError(400, f"'tools' may hold at most {MAX_TOOLS} tools", "tools")
    out: list[FunctionTool] = []
    for i, tool in enumerate(tools):
        param = f"tools.{i}"
        if not isinstance(tool, dict):
            raise APIError(400, f"'{param}' must be an object", param)
        if tool.get("type") != "function":
            raise APIError(
                400, f"'{param}.type' must be 'function' (only function tools are supported)",
                f"{param}.type",
            )  # fmt: skip
        function = tool.get("function")
        if not isinstance(function, dict):
            raise APIError(400, f"'{param}.function' is required", f"{param}.function")
        out.append(_function(function, f"{param}.function"))
        if out[-1].name in {f.name for f in out[:-1]}:
            raise APIError(400, f"'{param}.function.name': two tools named {out[-1].name!r}",
                           f"{param}.function.name")  # fmt: skip
    return out


def _function(function: dict[str, Any], param: str) -> FunctionTool:
    name = function.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise APIError(
            400, f"'{param}.name' must be 1-64 letters, digits, '_' or '-'", f"{param}.name"
        )
    description = function.get("description")
    if description is not None and not isinstance(description, str):
        raise APIError(400, f"'{param}.description' must be a string", f"{param}.description")
    parameters = function.get("parameters", EMPTY_PARAMETERS)
    check_parameters(parameters, f"{param}.parameters")
    return FunctionTool(name, description, parameters)


def check_parameters(parameters: Any, param: str) -> None:
    """A JSON schema of an object (what OpenAI takes), within the grammar compiler's bounds and
    valid against its metaschema."""
    if not isinstance(parameters, dict):
        raise APIError(400, f"'{param}' must be a JSON schema object", param)
    if parameters.get("type", "object") != "object":
        raise APIError(400, f"'{param}' must describe an object (type 'object')", param)
    try:
        problem = _schema_problem(StructuredOutput.json_schema(parameters).schema)
    except GrammarError as exc:
        problem = str(exc)
    if problem is not None:
        raise APIError(400, f"invalid schema in '{param}': {problem}", param)


@functools.lru_cache(maxsize=256)
def _schema_problem(schema_text: str) -> str | None:
    import jsonschema

    schema = json.loads(schema_text)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        return f"{exc.message:.200}"
    return None


def _choice(tool_choice: Any, names: set[str]) -> tuple[Choice, str | None]:
    if tool_choice is None:
        return ("auto" if names else "none"), None
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise APIError(
                400, "'tool_choice' must be 'none', 'auto', 'required' or a named function",
                "tool_choice",
            )  # fmt: skip
        return tool_choice, None  # type: ignore[return-value]
    function = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    if not isinstance(tool_choice, dict) or tool_choice.get("type") != "function":
        raise APIError(400, "'tool_choice.type' must be 'function'", "tool_choice.type")
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise APIError(400, "'tool_choice.function.name' is required", "tool_choice.function.name")
    if name not in names:
        raise APIError(
            400, f"'tool_choice.function.name': no tool named {name[:64]!r} in 'tools'",
            "tool_choice.function.name",
        )  # fmt: skip
    return "function", name
