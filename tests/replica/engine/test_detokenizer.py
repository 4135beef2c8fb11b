"""Incremental text: multi-byte characters split across tokens, stop strings across tokens,
and streams that never show text a stop string later claims."""

from __future__ import annotations

import pytest
from engine_helpers import random_prompts

from replica import SamplingParams
from replica.engine.detokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def tokenizer(llama_llm):
    return llama_llm.tokenizer


def _detok(tokenizer, stop=(), include=False) -> IncrementalDetokenizer:
    backend = tokenizer.backend_tokenizer
    return IncrementalDetokenizer(
        lambda ids, skip: backend.decode(ids, skip_special_tokens=skip),
        [],
        list(stop),
        include,
        True,
    )


def _byte_symbols() -> dict[int, str]:
    """GPT-2's byte-level alphabet: the printable symbol standing for each byte."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    return {
        **{b: chr(b) for b in printable},
        **{b: chr(256 + i) for i, b in enumerate(others)},
    }


def _byte_tokens(tokenizer, text: str) -> list[int]:
    """One token per UTF-8 byte, so multi-byte characters are split across tokens."""
    symbols = _byte_symbols()
    return [tokenizer.convert_tokens_to_ids(symbols[b]) for b in text.encode()]


def test_multibyte_characters_come_out_whole(tokenizer) -> None:
    text = "añ日本🚀 ok"
    ids = _byte_tokens(tokenizer, text)
    assert len(ids) == len(text.encode())
    detok = _detok(tokenizer)
    pieces = []
    for token in ids:
        before = len(detok.text)
        detok.add_token(token)
        pieces.append(detok.text[before:])
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert pieces[:3] == ["a", "", "ñ"]  # ñ is two bytes: nothing until both arrived


def test_dangling_bytes_are_flushed_as_replacement(tokenizer) -> None:
    ids = _byte_tokens(tokenizer, "ok🚀")[:-2]
    detok = _detok(tokenizer)
    for token in ids:
        detok.add_token(token)
    assert detok.text == "ok"
    detok.flush()
    assert detok.text.startswith("ok") and detok.text.endswith("\ufffd")


def test_stop_string_across_tokens_is_cut_and_held_back(tokenizer) -> None:
    ids = _byte_tokens(tokenizer, "hello STOP world")
    detok = _detok(tokenizer, stop=["STOP"])
    shown = []
    found = None
    for token in ids:
        found = detok.add_token(token)
        shown.append(detok.text[: detok.safe_length()])
        if found:
            break
    assert found == "STOP" and detok.text == "hello "
    assert shown[-2] == "hello "  # "hello S", "hello ST", ... were never shown past "hello "
    assert all(not s.rstrip().endswith(("S", "ST", "STO")) for s in shown)
    inclusive = _detok(tokenizer, stop=["STOP"], include=True)
    for token in ids:
        if inclusive.add_token(token):
            break
    assert inclusive.text == "hello STOP"


def test_engine_stop_strings_and_streamed_deltas(llama_llm) -> None:
    engine = llama_llm.engine
    prompt = random_prompts([5], seed=21)[0]
    free = llama_llm.generate(
        prompt, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    )[0]
    text = free.outputs[0].text
    assert len(text) > 12
    stop = text[8:11]  # three characters from inside the output, likely spanning tokens
    engine.add_request(
        "s", prompt, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop])
    )
    deltas, final = [], None
    while engine.has_unfinished:
        for out in engine.step():
            deltas.append(out.outputs[0].delta_text)
            final = out
    choice = final.outputs[0]
    assert choice.finish_reason == "stop" and choice.stop_reason == stop
    assert choice.text == text[: text.index(stop)]
    assert "".join(deltas) == choice.text
    assert all(stop not in d for d in deltas)


def test_stop_strings_wait_for_min_tokens(llama_llm) -> None:
    prompt = random_prompts([5], seed=21)[0]
    free = llama_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    first_token_text = llama_llm.tokenizer.decode(free[0].outputs[0].token_ids[:1])
    assert first_token_text
    early = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[first_token_text])
    assert llama_llm.generate(prompt, early)[0].outputs[0].text == ""
    late = SamplingParams(
        temperature=0, max_tokens=6, ignore_eos=True, stop=[first_token_text], min_tokens=6
    )
    out = llama_llm.generate(prompt, late)[0].outputs[0]
    assert out.finish_reason == "length"
    assert out.text == llama_llm.tokenizer.decode(free[0].outputs[0].token_ids[:6])


def test_streamed_text_equals_a_full_decode(llama_llm) -> None:
    """Sampled byte-level output (partial UTF-8 included) streams to exactly the full decode."""
    engine, tokenizer = llama_llm.engine, llama_llm.tokenizer
    prompts = [tokenizer.encode("日本語と🚀 émoji"), *random_prompts([9, 4], seed=22)]
    params = SamplingParams(temperature=1.3, seed=5, max_tokens=60, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"utf8-{i}", prompt, params)
    deltas: dict[str, list[str]] = {f"utf8-{i}": [] for i in range(len(prompts))}
    finals = {}
    while engine.has_unfinished:
        for out in engine.step():
            deltas[out.request_id].append(out.outputs[0].delta_text)
            finals[out.request_id] = out.outputs[0]
    for request_id, choice in finals.items():
        full = tokenizer.decode(choice.token_ids, skip_special_tokens=True)
        assert choice.text == full == "".join(deltas[request_id])
