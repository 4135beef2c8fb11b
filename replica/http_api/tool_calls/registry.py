"""The parser of each model family by its `--tool-call-parser` name, and `auto`: the family told
by what its chat template writes for a call."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, get_args

from replica.http_api.tool_calls.events import ToolCallParser
from replica.http_api.tool_calls.forced import ChosenCallsParser, NamedCallParser
from replica.http_api.tool_calls.hermes import HermesParser
from replica.http_api.tool_calls.llama3 import Llama3JsonParser
from replica.http_api.tool_calls.mistral import MistralParser

PARSERS: dict[str, Callable[[], ToolCallParser]] = {
    "hermes": HermesParser,
    "llama3_json": Llama3JsonParser,
    "mistral": MistralParser,
}
ParserName = Literal["auto", "hermes", "llama3_json", "mistral", "none"]
PARSER_NAMES: tuple[str, ...] = get_args(ParserName)
# What a family's template writes around a call, in the order they are tried.
_TEMPLATE_MARKERS = (
    ("<tool_call>", "hermes"),
    ("[TOOL_CALLS]", "mistral"),
    ("<|python_tag|>", "llama3_json"),
)


def make_parser(name: str) -> ToolCallParser:
    return PARSERS[name]()


def forced_parser(function: str | None) -> ToolCallParser:
    """The parser of an answer constrained to a call: of `function`, else of any tool (one call
    or a list of them)."""
    return NamedCallParser(function) if function is not None else ChosenCallsParser()


def detect_parser(template: str | None) -> str:
    for marker, name in _TEMPLATE_MARKERS:
        if template and marker in template:
            return name
    return "none"


def resolve_parser(flag: str, template: str | None) -> str:
    """The parser a replica uses: the flag's, or for `auto` the one its chat template implies."""
    if flag not in PARSER_NAMES:
        raise ValueError(
            f"unknown tool-call parser {flag!r}; choose from {', '.join(PARSER_NAMES)}"
        )
    return detect_parser(template) if flag == "auto" else flag


def keeps_special_tokens(name: str) -> bool:
    """Whether the parser reads a special token (Mistral's [TOOL_CALLS]) that detokenizing drops."""
    return bool(getattr(PARSERS.get(name), "keeps_special_tokens", False))
