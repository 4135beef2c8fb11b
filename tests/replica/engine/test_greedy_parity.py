"""Greedy outputs equal transformers' `generate` token for token, whatever the batching."""

from __future__ import annotations

import pytest
from engine_helpers import ARCHS, hf_greedy, random_prompts

from replica import SamplingParams

LENGTHS = [1, 5, 17, 33, 64, 100, 8, 40, 16, 3]
MAX_NEW = 24


@pytest.fixture(scope="module")
def expected(tiny_models):
    prompts = random_prompts(LENGTHS)
    return prompts, {
        arch: [hf_greedy(tiny_models[arch], p, MAX_NEW) for p in prompts] for arch in ARCHS
    }


def _run(llm, prompts):
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_NEW))
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("arch", ARCHS)
def test_batch_matches_transformers(arch, tiny_models, make_llm, expected) -> None:
    prompts, want = expected
    llm = make_llm(tiny_models[arch])
    assert _run(llm, prompts) == want[arch]
    assert llm.load()["free_blocks"] == llm.load()["num_blocks"]


@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_prefill_matches_transformers(arch, tiny_models, make_llm, expected) -> None:
    prompts, want = expected
    llm = make_llm(tiny_models[arch], max_num_batched_tokens=7, enable_prefix_caching=False)
    assert _run(llm, prompts) == want[arch]


@pytest.mark.parametrize("arch", ARCHS)
def test_preemption_matches_transformers(arch, tiny_models, make_llm, expected) -> None:
    prompts, want = expected
    llm = make_llm(tiny_models[arch], kv_cache_tokens=160, max_model_len=160)
    assert _run(llm, prompts) == want[arch]
    load = llm.load()
    assert load["num_preemptions"] > 0
    assert load["free_blocks"] == load["num_blocks"] == 10


def test_one_token_budget_matches_transformers(tiny_models, make_llm, expected) -> None:
    """Every step computes one token: prompts advance one position at a time next to decodes."""
    prompts, want = expected
    llm = make_llm(tiny_models["llama"], max_num_batched_tokens=1)
    assert _run(llm, prompts[:4]) == want["llama"][:4]


def test_free_requests_beside_constrained_ones_match_transformers(
    tiny_models, make_llm, expected
) -> None:
    """Grammar masks touch only their own rows: free greedy requests in the same batches keep
    transformers' tokens."""
    from replica.engine.structured import StructuredOutput

    prompts, want = expected
    llm = make_llm(tiny_models["llama"])
    free = SamplingParams(temperature=0, max_tokens=MAX_NEW)
    json_only = SamplingParams(
        temperature=0, max_tokens=MAX_NEW, structured=StructuredOutput.json_object()
    )
    params = [free if i % 2 == 0 else json_only for i in range(len(prompts))]
    outs = llm.generate(prompts, params)
    got = [o.outputs[0].token_ids for o in outs]
    assert got[::2] == want["llama"][::2]
    assert all(o.outputs[0].text.startswith("{") for o in outs[1::2])
