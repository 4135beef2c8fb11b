"""Sampling settings, checked on real engine runs of a tiny model."""

from __future__ import annotations

import math

import pytest
import torch
from engine_helpers import hf_logits, random_prompts

from replica import SamplingParams, SamplingParamsError


def _ids(llm, prompts, params):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


def test_seeded_sampling_is_the_same_alone_and_in_a_busy_batch(llama_llm) -> None:
    prompt = random_prompts([12], seed=11)[0]
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=20, ignore_eos=True)
    alone = _ids(llama_llm, [prompt], seeded)[0]
    others = random_prompts([5, 30, 9, 17, 3], seed=12)
    busy = [SamplingParams(temperature=0.8, max_tokens=25, ignore_eos=True)] * len(others)
    outs = llama_llm.generate([*others, prompt, *others], [*busy, seeded, *busy])
    assert outs[len(others)].outputs[0].token_ids == alone
    other_seed = SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=20, ignore_eos=True)
    assert _ids(llama_llm, [prompt], other_seed)[0] != alone


def test_n_choices_with_a_seed_differ_and_repeat(llama_llm) -> None:
    prompt = random_prompts([10], seed=13)[0]
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=10, ignore_eos=True)
    first = [o.token_ids for o in llama_llm.generate(prompt, params)[0].outputs]
    second = [o.token_ids for o in llama_llm.generate(prompt, params)[0].outputs]
    assert first == second and len(set(map(tuple, first))) == 3


def test_top_k_one_and_tiny_top_p_are_greedy(llama_llm) -> None:
    prompts = random_prompts([7, 21], seed=14)
    greedy = _ids(llama_llm, prompts, SamplingParams(temperature=0, max_tokens=10))
    assert (
        _ids(llama_llm, prompts, SamplingParams(temperature=1.5, top_k=1, max_tokens=10)) == greedy
    )
    assert (
        _ids(llama_llm, prompts, SamplingParams(temperature=1.0, top_p=1e-6, max_tokens=10))
        == greedy
    )
    assert (
        _ids(llama_llm, prompts, SamplingParams(temperature=1.0, min_p=1.0, max_tokens=10))
        == greedy
    )


def test_top_k_limits_choices_to_the_k_best(llama_path, llama_llm) -> None:
    prompt = random_prompts([9], seed=15)[0]
    best = set(hf_logits(llama_path, prompt)[-1].topk(3).indices.tolist())
    firsts = {
        llama_llm.generate(prompt, SamplingParams(temperature=5.0, top_k=3, seed=s, max_tokens=1))[
            0
        ]
        .outputs[0]
        .token_ids[0]
        for s in range(30)
    }
    assert firsts <= best and len(firsts) > 1


def test_logit_bias_forces_a_token_and_min_tokens_holds_eos_back(llama_llm) -> None:
    prompt = random_prompts([6], seed=16)[0]
    forced = SamplingParams(temperature=0, max_tokens=5, logit_bias={42: 100.0})
    assert _ids(llama_llm, [prompt], forced)[0] == [42] * 5
    eos = llama_llm.engine.eos_token_ids[0]
    to_eos = SamplingParams(temperature=0, max_tokens=10, logit_bias={eos: 100.0})
    out = llama_llm.generate(prompt, to_eos)[0].outputs[0]
    assert out.token_ids == [eos] and out.finish_reason == "stop" and out.text == ""
    held = SamplingParams(temperature=0, max_tokens=10, min_tokens=4, logit_bias={eos: 100.0})
    out = llama_llm.generate(prompt, held)[0].outputs[0]
    assert len(out.token_ids) == 5 and out.token_ids[-1] == eos and eos not in out.token_ids[:4]
    ignoring = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logit_bias={eos: 100.0})
    out = llama_llm.generate(prompt, ignoring)[0].outputs[0]
    assert out.token_ids == [eos] * 6 and out.finish_reason == "length"


def test_stop_token_ids_end_with_stop_reason(llama_llm) -> None:
    prompt = random_prompts([8], seed=17)[0]
    greedy = _ids(
        llama_llm, [prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    )[0]
    target = greedy[3]
    out = llama_llm.generate(
        prompt,
        SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, stop_token_ids=[target]),
    )[0].outputs[0]
    cut = greedy.index(target)
    assert out.token_ids == greedy[: cut + 1]
    assert out.finish_reason == "stop" and out.stop_reason == target


def test_penalties_change_repetitions(llama_llm) -> None:
    prompt = random_prompts([4], seed=18)[0]
    plain = _ids(
        llama_llm, [prompt], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    )[0]
    assert len(set(plain)) < len(plain)  # random tiny models repeat themselves
    for params in (
        SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, presence_penalty=2.0),
        SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, frequency_penalty=2.0),
        SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, repetition_penalty=1e6),
    ):
        out = _ids(llama_llm, [prompt], params)[0]
        assert len(set(out)) > len(set(plain))
    strict = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, repetition_penalty=1e6)
    out = _ids(llama_llm, [prompt], strict)[0]
    assert len(set(out)) == len(out) and not set(out) & set(prompt)


def test_logprobs_match_transformers(llama_path, llama_llm) -> None:
    prompt = random_prompts([11], seed=19)[0]
    params = SamplingParams(
        temperature=0, max_tokens=4, ignore_eos=True, logprobs=3, prompt_logprobs=2
    )
    out = llama_llm.generate(prompt, params)[0]
    choice = out.outputs[0]
    full = prompt + choice.token_ids
    want = torch.log_softmax(hf_logits(llama_path, full), dim=-1)
    assert len(choice.logprobs) == 4
    for i, entry in enumerate(choice.logprobs):
        row = want[len(prompt) - 1 + i]
        assert entry.token_id == choice.token_ids[i] and entry.rank == 1
        assert math.isclose(entry.logprob, row[entry.token_id].item(), abs_tol=1e-4)
        assert [t for t, _ in entry.top] == row.topk(3).indices.tolist()
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for pos in range(1, len(prompt)):
        entry = out.prompt_logprobs[pos]
        assert entry.token_id == prompt[pos] and len(entry.top) == 2
        assert math.isclose(entry.logprob, want[pos - 1][prompt[pos]].item(), abs_tol=1e-4)
    assert choice.delta_logprobs is not None


def test_prompt_logprobs_survive_chunked_prefill(llama_path, make_llm) -> None:
    llm = make_llm(llama_path, max_num_batched_tokens=5)
    prompt = random_prompts([23], seed=20)[0]
    out = llm.generate(prompt, SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    want = torch.log_softmax(hf_logits(llama_path, prompt), dim=-1)
    got = [e.logprob for e in out.prompt_logprobs[1:]]
    assert torch.allclose(
        torch.tensor(got), want[torch.arange(22), torch.tensor(prompt[1:])], atol=1e-4
    )


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
        ({"logprobs": -1}, "logprobs"),
        ({"seed": 2**64}, "seed"),
    ],
)
def test_bad_fields_name_the_parameter(fields, param) -> None:
    with pytest.raises(SamplingParamsError) as err:
        SamplingParams(**fields)
    assert err.value.param == param


def test_engine_rejects_requests_it_cannot_serve(llama_llm) -> None:
    engine = llama_llm.engine
    with pytest.raises(SamplingParamsError, match="exceeds") as err:
        engine.add_request("long", [5] * 500, SamplingParams(max_tokens=100))
    assert err.value.param == "max_tokens"
    with pytest.raises(SamplingParamsError) as err:
        engine.add_request("oov", [5, 100000], SamplingParams())
    assert err.value.param == "prompt"
    with pytest.raises(SamplingParamsError) as err:
        engine.add_request("bias", [5], SamplingParams(logit_bias={-3: 1.0}))
    assert err.value.param == "logit_bias"
    assert not engine.has_unfinished


def test_a_bad_prompt_in_a_batch_adds_nothing(llama_llm) -> None:
    with pytest.raises(SamplingParamsError):
        llama_llm.generate([[5, 6], [5] * 600], SamplingParams(max_tokens=4))
    assert not llama_llm.engine.has_unfinished and not llama_llm.engine.requests
