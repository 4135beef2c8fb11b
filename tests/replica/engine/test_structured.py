"""Structured outputs in the engine: grammars compiled once per schema, masks applied only to the
constrained rows of a batch, every constrained answer valid and finished by the grammar."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jsonschema
import pytest

from replica import SamplingParams
from replica.engine.sampling_params import SamplingParamsError
from replica.engine.structured import GrammarError, StructuredOutput

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "loadtests"))
from structured_schemas import MAX_TOKENS, SCHEMAS

PROMPT = [5, 17, 42, 99, 7]


def constrained(name: str, **kwargs) -> SamplingParams:
    kwargs.setdefault("temperature", 0)
    return SamplingParams(
        max_tokens=MAX_TOKENS, structured=StructuredOutput.json_schema(SCHEMAS[name]), **kwargs
    )


def test_spec_keeps_property_order_and_names_its_kind() -> None:
    spec = StructuredOutput.json_schema({"type": "object", "properties": {"b": {}, "a": {}}})
    assert spec.kind == "json_schema"
    assert spec.schema.index('"b"') < spec.schema.index('"a"')
    assert StructuredOutput.json_schema(spec.schema) == spec  # text or dict: the same key
    assert StructuredOutput.json_object().kind == "json_object"


def test_each_schema_compiles_once(llama_llm) -> None:
    grammars = llama_llm.engine.grammars
    spec = StructuredOutput.json_schema({**SCHEMAS["person"], "title": "compile-once"})
    before = grammars.num_compiled
    first = grammars.compile(spec)
    assert grammars.compile(StructuredOutput.json_schema(spec.schema)) is first
    assert grammars.num_compiled == before + 1
    assert grammars.cached(spec)


@pytest.mark.parametrize(
    ("schema", "fragment"),
    [
        ({"type": "objec"}, "objec"),
        ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "missing"),
        ({"type": "string", "pattern": "(unclosed"}, "parenthesis is not closed"),
        ({"type": "string", "maxLength": -1}, "non-negative integers"),
    ],
)
def test_bad_schemas_name_the_problem(llama_llm, schema: dict, fragment: str) -> None:
    with pytest.raises(GrammarError) as info:
        llama_llm.engine.grammars.compile(StructuredOutput.json_schema(schema))
    assert fragment in str(info.value)
    assert "/project/" not in str(info.value)  # no C++ source paths on the wire
    params = SamplingParams(structured=StructuredOutput.json_schema(schema))
    with pytest.raises(SamplingParamsError) as refused:
        llama_llm.generate(PROMPT, params)
    assert refused.value.param == "response_format"
    assert not llama_llm.engine.has_unfinished


def test_bounded_strings_take_no_control_characters_nor_broken_utf8(llama_llm) -> None:
    """xgrammar's own length rule lets both through (invalid JSON, or U+FFFD that break the
    length): bounded strings go through a pattern instead."""
    import xgrammar

    spec = StructuredOutput.json_schema({"type": "string", "maxLength": 3})
    grammar = llama_llm.engine.grammars.compile(spec)
    cases = [
        (b'"a\xc3\xa9\xe6\x97\xa5"', True),  # a, é, 日
        (b'"a\x0f', False),  # a control character
        (b'"\xed\xa0\x80', False),  # a surrogate
        (b'"\xe0\x80\x80', False),  # an overlong encoding
        (b'"abcd', False),  # one too many
    ]
    for text, ok in cases:
        assert xgrammar.GrammarMatcher(grammar).accept_string(text) is ok, text


def _nested(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


@pytest.mark.parametrize(
    ("schema", "fragment"),
    [
        ({"type": "string", "pattern": "^(ab|cd){0,5000}$"}, "unrolls to 20002 items"),
        ({"type": "string", "pattern": "((a|bc){0,20}){0,20}"}, "unrolls to 1200"),
        ({"properties": {f"p{i}": {} for i in range(600)}}, "600 properties"),
        (_nested(5000), "deeper than 64"),
        ({"description": "x" * 70_000}, "longer than"),
        ('{"type": ', "not valid JSON"),
        ("[1]", "must be a JSON object"),
    ],
)
def test_costly_or_malformed_schemas_are_refused_before_compiling(schema, fragment: str) -> None:
    """Compile time grows steeply with unrolled pattern repeats and properties: bounds keep one
    request from holding a compile thread for seconds (or a Python recursion from crashing)."""
    with pytest.raises(GrammarError) as info:
        StructuredOutput.json_schema(schema)
    assert fragment in str(info.value)


def test_cheap_repeats_are_allowed() -> None:
    for pattern in ("^[a-z]{0,100000}$", "^[A-Z]{3}-[0-9]{3}$", "^(a|b){0,900}$"):
        StructuredOutput.json_schema({"type": "string", "pattern": pattern})


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_greedy_answers_are_valid_and_end_with_the_grammar(llama_llm, name: str) -> None:
    [out] = llama_llm.generate(PROMPT, constrained(name))
    choice = out.outputs[0]
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.text), SCHEMAS[name])


def test_sampled_choices_are_all_valid(llama_llm) -> None:
    outs = llama_llm.generate(
        [PROMPT, PROMPT[:2]], [constrained(n, temperature=1.0, n=3, seed=7) for n in ("order", "event")]
    )  # fmt: skip
    for out, name in zip(outs, ("order", "event"), strict=True):
        for choice in out.outputs:
            assert choice.finish_reason == "stop"
            jsonschema.validate(json.loads(choice.text), SCHEMAS[name])


def test_json_object_is_an_object(llama_llm) -> None:
    """Any object will do; the bias towards closing quotes and braces lets a random model end it."""
    tokenizer = llama_llm.tokenizer
    bias = {tokenizer.convert_tokens_to_ids(t): 8.0 for t in ('"', "}")}
    params = SamplingParams(
        temperature=0, max_tokens=64, logit_bias=bias, structured=StructuredOutput.json_object()
    )
    [out] = llama_llm.generate(PROMPT, params)
    assert out.outputs[0].finish_reason == "stop"
    assert isinstance(json.loads(out.outputs[0].text), dict)


def test_free_requests_pay_nothing(make_llm, llama_path) -> None:
    llm = make_llm(llama_path)
    llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=4))
    assert llm.engine.runner.sampler.grammar_masks is None
    assert llm.engine.grammars.num_compiled == 0


def test_ignore_eos_still_ends_at_the_grammar(llama_llm) -> None:
    [out] = llama_llm.generate(PROMPT, constrained("person", ignore_eos=True, min_tokens=3))
    assert out.outputs[0].finish_reason == "stop"
    jsonschema.validate(json.loads(out.outputs[0].text), SCHEMAS["person"])
