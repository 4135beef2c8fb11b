"""Continuing a request from tokens it already generated (a stream resumed on another replica):
the continuation must produce exactly what the uninterrupted request would have produced next."""

from __future__ import annotations

import pytest
from engine_helpers import random_prompts

from replica import SamplingParams, SamplingParamsError
from replica.engine.structured import StructuredOutput


def _run(llm, prompt: list[int], params: SamplingParams, generated: list[int] | None = None):
    """Run one request to its end on the engine; (final output, streamed text, streamed ids)."""
    engine = llm.engine
    engine.validate(prompt, params, generated or [])
    engine.enqueue("resume-test", None, prompt, params, generated_ids=generated)
    final, text, ids = None, "", []
    while engine.has_unfinished:
        for out in engine.step():
            text += out.outputs[0].delta_text
            ids += out.outputs[0].delta_token_ids
            final = out
    assert final is not None
    return final, text, ids


def _streamed(llm, prompt, params):
    """The uninterrupted run, with the text the stream had shown after each token."""
    engine = llm.engine
    engine.enqueue("resume-base", None, prompt, params)
    shown, text = [], ""
    while engine.has_unfinished:
        for out in engine.step():
            text += out.outputs[0].delta_text
            shown.append(text)
            final = out
    return final, shown


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
        SamplingParams(temperature=1.0, top_p=0.9, seed=4321, max_tokens=30, ignore_eos=True),
        SamplingParams(temperature=0.8, seed=7, max_tokens=30, ignore_eos=True,
                       frequency_penalty=0.5, min_tokens=12),
        SamplingParams(temperature=1.0, seed=3, max_tokens=30, ignore_eos=True,
                       structured=StructuredOutput.json_schema(
                           {"type": "array", "items": {"type": "integer"}, "minItems": 40})),
    ],
    ids=["greedy", "seeded", "seeded-penalised-min-tokens", "seeded-json-schema"],
)  # fmt: skip
def test_continuing_from_k_tokens_equals_the_uninterrupted_run(llama_llm, params) -> None:
    prompt = random_prompts([11], seed=60)[0]
    whole, shown = _streamed(llama_llm, prompt, params)
    tokens = whole.outputs[0].token_ids
    assert len(tokens) == 30
    for k in (1, 9, 29):
        final, text, ids = _run(llama_llm, prompt, params, tokens[:k])
        choice = final.outputs[0]
        assert choice.token_ids == tokens, k  # all generated tokens, the resumed ones included
        assert ids == tokens[k:], k  # only the new ones are streamed
        assert shown[k - 1] + text == whole.outputs[0].text, k
        assert choice.text == whole.outputs[0].text
        assert choice.finish_reason == "length"


def test_a_stop_string_across_the_boundary_is_found(llama_llm) -> None:
    prompt = random_prompts([5], seed=21)[0]
    free = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    whole = llama_llm.generate(prompt, free)[0].outputs[0]
    tokens, text = whole.token_ids, whole.text
    decode = llama_llm.tokenizer.decode
    k = next(k for k in range(3, 30) if 2 <= len(decode(tokens[:k])) < len(text) - 3)
    cut = len(decode(tokens[:k]))
    stop = text[cut - 2 : cut + 2]  # two characters before the boundary, two after
    if stop in text[: cut - 2 + len(stop) - 1]:
        pytest.skip("the stop string occurs earlier")
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop])
    uninterrupted = llama_llm.generate(prompt, params)[0].outputs[0]
    final, streamed, _ = _run(llama_llm, prompt, params, tokens[:k])
    choice = final.outputs[0]
    assert choice.finish_reason == "stop" and choice.stop_reason == stop
    assert choice.text == uninterrupted.text == text[: text.index(stop)]
    assert stop not in streamed


def test_a_continuation_is_checked_like_a_request(llama_llm) -> None:
    engine = llama_llm.engine
    prompt = random_prompts([5], seed=22)[0]
    with pytest.raises(SamplingParamsError) as exc:
        engine.validate(prompt, SamplingParams(max_tokens=3), [5, 6, 7])
    assert exc.value.param == "fleet_resume"  # nothing is left to generate
    with pytest.raises(SamplingParamsError):
        engine.validate(prompt, SamplingParams(max_tokens=8, n=2), [5])
    with pytest.raises(SamplingParamsError):
        engine.validate(prompt, SamplingParams(max_tokens=8, logprobs=2), [5])
    with pytest.raises(SamplingParamsError):
        engine.validate(prompt, SamplingParams(max_tokens=8), [10**9])
