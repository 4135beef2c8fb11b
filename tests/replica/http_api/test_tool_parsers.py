"""Tool-call parsers on model-style outputs written out here (Hermes/Qwen, Llama 3.x JSON, Mistral),
fed whole and split at every character: both give the same message, malformed calls come back as
plain content, and the parsers of constrained answers stream arguments piece by piece."""

from __future__ import annotations

import itertools
import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replica.http_api.tool_calls import (
    ContentDelta,
    ToolCallDelta,
    assemble,
    detect_parser,
    forced_parser,
    make_parser,
)

WEATHER_ARGS = {"location": "San Francisco, CA, USA", "unit": "celsius"}

# (parser, model output, expected content, expected [(name, arguments as a dict)])
CASES = [
    # Qwen2.5 / Hermes 2 Pro
    (
        "hermes",
        '<tool_call>\n{"name": "get_current_temperature", "arguments": {"location": "San Francisco, '
        'CA, USA", "unit": "celsius"}}\n</tool_call>',
        None,
        [("get_current_temperature", WEATHER_ARGS)],
    ),
    (
        "hermes",
        '<tool_call>\n{"name": "get_current_temperature", "arguments": {"location": "San Francisco, '
        'CA, USA"}}\n</tool_call>\n<tool_call>\n{"name": "get_temperature_date", "arguments": '
        '{"location": "San Francisco, CA, USA", "date": "2024-10-01"}}\n</tool_call>',
        None,
        [
            ("get_current_temperature", {"location": "San Francisco, CA, USA"}),
            ("get_temperature_date", {"location": "San Francisco, CA, USA", "date": "2024-10-01"}),
        ],
    ),
    (
        "hermes",
        'Let me check that for you.\n<tool_call>\n{"name": "get_weather", "arguments": '
        '{"city": "Zürich"}}\n</tool_call>',
        "Let me check that for you.",
        [("get_weather", {"city": "Zürich"})],
    ),
    (
        "hermes",  # arguments as a JSON string, as some fine-tunes write them
        '<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}\n'
        "</tool_call>",
        None,
        [("get_weather", {"city": "Paris"})],
    ),
    (
        "hermes",  # the end of sequence came before the closing tag
        '<tool_call>\n{"name": "get_weather", "arguments": {}}',
        None,
        [("get_weather", {})],
    ),
    (
        "hermes",
        "The weather in Paris is sunny, 21 °C.",
        "The weather in Paris is sunny, 21 °C.",
        [],
    ),
    ("hermes", "if a < b and <tool> <tool_cal", "if a < b and <tool> <tool_cal", []),
    # Llama 3.1 / 3.2 / 3.3 JSON tool calling
    (
        "llama3_json",
        '{"name": "get_current_conditions", "parameters": {"location": "San Francisco, CA", '
        '"unit": "Fahrenheit"}}',
        None,
        [("get_current_conditions", {"location": "San Francisco, CA", "unit": "Fahrenheit"})],
    ),
    (
        "llama3_json",
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; '
        '{"name": "get_time", "parameters": {"tz": "CET"}}',
        None,
        [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "CET"})],
    ),
    (
        "llama3_json",
        "I can't look that up, but Paris is usually mild in May.",
        "I can't look that up, but Paris is usually mild in May.",
        [],
    ),
    # Mistral: v3 tokenizers (a JSON list) and v11+ (name[ARGS]arguments)
    (
        "mistral",
        '[TOOL_CALLS][{"name": "get_current_weather", "arguments": {"location": "Paris, France", '
        '"format": "celsius"}}, {"name": "get_time", "arguments": {}}]',
        None,
        [
            ("get_current_weather", {"location": "Paris, France", "format": "celsius"}),
            ("get_time", {}),
        ],
    ),
    (
        "mistral",
        'Sure.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{}',
        "Sure.",
        [("get_weather", {"city": "Paris"}), ("get_time", {})],
    ),
    ("mistral", "No tools needed: 2 + 2 = 4.", "No tools needed: 2 + 2 = 4.", []),
]

# Outputs that look like calls but are not: every one comes back as its own text.
MALFORMED = [
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}\n</tool_call>'),
    ("hermes", '<tool_call>\n{"arguments": {"city": "Paris"}}\n</tool_call>'),
    ("hermes", "<tool_call>\nnot json at all\n</tool_call>"),
    ("hermes", '<tool_call>\n{"name": "get_weather", "argu'),
    ("hermes", '<tool_call>\n{"name": 7, "arguments": {}}\n</tool_call>'),
    ("hermes", '<tool_call>\n{"name": "f", "arguments": [1, 2]}\n</tool_call>'),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris"}'),
    ("llama3_json", '{"city": "Paris", "unit": "celsius"}'),
    ("llama3_json", '{"name": "f", "parameters": {}}; oops'),
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {]'),
    ("mistral", "[TOOL_CALLS]not a call at all"),
    ("mistral", '[TOOL_CALLS]get weather[ARGS]{"city": "Paris"}'),
    ("mistral", "[TOOL_CALLS]get_weather[ARGS]{nope}"),
]


def run(parser: str, text: str, pieces: list[str]) -> tuple[str | None, list[tuple[str, dict]]]:
    p = make_parser(parser)
    events = [e for piece in pieces for e in p.feed(piece)] + p.finish()
    message = assemble(events)
    calls = [(c.name, json.loads(c.arguments)) for c in message.tool_calls]
    return message.content, calls


@pytest.mark.parametrize(("parser", "text", "content", "calls"), CASES)
def test_parses_whole_and_split_at_every_character(
    parser: str, text: str, content: str | None, calls: list
) -> None:
    assert run(parser, text, [text]) == (content, calls)
    assert run(parser, text, list(text)) == (content, calls)


@pytest.mark.parametrize(("parser", "text"), MALFORMED)
def test_malformed_calls_are_plain_content(parser: str, text: str) -> None:
    # (the Llama one with prose after a good call keeps the call: only the rest is content)
    for pieces in ([text], list(text)):
        content, calls = run(parser, text, pieces)
        if calls:
            assert (parser, calls) == ("llama3_json", [("f", {})])
            assert content == "oops"
        else:
            assert content == text


def test_a_good_call_then_a_malformed_one() -> None:
    good = '<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>'
    bad = '<tool_call>\n{"name": "b", "arguments": {"x": }\n</tool_call>'
    for pieces in ([good + "\n" + bad], list(good + "\n" + bad)):
        assert run("hermes", "", pieces) == (bad, [("a", {"x": 1})])


def test_call_ids_look_like_openai_ones_and_differ() -> None:
    p = make_parser("hermes")
    text = '<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>' * 3
    message = assemble(p.feed(text) + p.finish())
    ids = [c.id for c in message.tool_calls]
    assert all(re.fullmatch(r"call_[A-Za-z0-9]{24}", i) for i in ids)
    assert len(set(ids)) == 3


def test_plain_text_streams_as_it_comes() -> None:
    """Only a possible tag start (or trailing whitespace) is held back."""
    p = make_parser("hermes")
    assert p.feed("Hello wor") == [ContentDelta("Hello wor")]
    assert p.feed("ld <tool") == [ContentDelta("ld")]
    assert p.feed("box>") == [ContentDelta(" <toolbox>")]
    assert p.finish() == []


def test_named_function_streams_its_arguments() -> None:
    """Constrained to the parameters' JSON: every piece is an argument piece at once."""
    p = forced_parser("get_weather")
    first = p.feed('{"city": ')
    assert isinstance(first[0], ToolCallDelta) and first[0].name == "get_weather"
    assert [e.arguments for e in first] == ["", '{"city": ']
    assert p.feed('"Paris"}') == [ToolCallDelta(0, None, None, '"Paris"}')]
    message = assemble([*first, ToolCallDelta(0, None, None, '"Paris"}'), *p.finish()])
    assert [(c.name, c.arguments) for c in message.tool_calls] == [
        ("get_weather", '{"city": "Paris"}')
    ]
    assert message.content is None


@pytest.mark.parametrize("parallel", [False, True])
def test_required_choice_streams_each_call(parallel: bool) -> None:
    one = '{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2]}}'
    two = '{"name": "get_time", "arguments": {"tz": "}{\\"]"}}'
    text = f"[{one}, {two}]" if parallel else one
    p = forced_parser(None)
    events = [e for ch in text for e in p.feed(ch)] + p.finish()
    pieces = [e.arguments for e in events if isinstance(e, ToolCallDelta)]
    assert len(pieces) > 10  # argument characters leave as they come
    message = assemble(events)
    expected = [("get_weather", {"city": "Paris", "days": [1, 2]})]
    if parallel:
        expected.append(("get_time", {"tz": '}{"]'}))
    assert [(c.name, json.loads(c.arguments)) for c in message.tool_calls] == expected
    assert [c.index for c in message.tool_calls] == list(range(len(expected)))


def test_parser_chosen_from_the_chat_template() -> None:
    qwen = (
        "{%- if tools %}...For each function call, return a json object with function name and "
        'arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{"name": ...'
    )
    llama = '{{- "<|python_tag|>" + tool_call.name }}{%- if builtin_tools is defined %}ipython'
    mistral = "{%- if message.tool_calls %}{{- '[TOOL_CALLS][' }}"
    assert detect_parser(qwen) == "hermes"
    assert detect_parser(llama) == "llama3_json"
    assert detect_parser(mistral) == "mistral"
    assert detect_parser("{% for m in messages %}{{ m.content }}{% endfor %}") == "none"
    assert detect_parser(None) == "none"


FRAGMENTS = [
    "<tool_call>", "</tool_call>", "[TOOL_CALLS]", "[ARGS]", "<|python_tag|>", "{", "}", "[", "]",
    '"', "\\", ":", ", ", "; ", "\n", " ", '"name"', '"arguments"', '"parameters"', '"f"', "f",
    "1", "null", "é", "<", "tool",
]  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(
    parser=st.sampled_from(["hermes", "llama3_json", "mistral"]),
    text=st.lists(st.sampled_from(FRAGMENTS), max_size=30).map("".join),
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=8),
)
def test_any_text_parses_the_same_however_it_is_split(
    parser: str, text: str, cuts: list[int]
) -> None:
    """Never an exception (a 500), and the same message whole or in any pieces."""
    bounds = sorted({0, len(text), *(c for c in cuts if c < len(text))})
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    assert run(parser, text, pieces) == run(parser, text, [text])
    content, calls = run(parser, text, list(text))
    if not calls:
        assert content == text
