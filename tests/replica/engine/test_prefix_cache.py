"""Automatic prefix caching: hits are counted, outputs never change, eviction stays correct."""

from __future__ import annotations

from engine_helpers import random_prompts

from replica import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=12)


def test_shared_prefix_hits_and_identical_output(llama_path, make_llm) -> None:
    prefix, tail_a, tail_b = random_prompts([64, 7, 9], seed=3)
    cold = make_llm(llama_path, enable_prefix_caching=False)
    want = [
        o.outputs[0].token_ids for o in cold.generate([prefix + tail_a, prefix + tail_b], GREEDY)
    ]

    llm = make_llm(llama_path)
    first = llm.generate(prefix + tail_a, GREEDY)[0]
    before = llm.load()
    second = llm.generate(prefix + tail_b, GREEDY)[0]
    after = llm.load()
    assert [first.outputs[0].token_ids, second.outputs[0].token_ids] == want
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == 64  # four full blocks of the shared prefix
    assert after["prefix_cache_hits"] - before["prefix_cache_hits"] == 64
    assert after["prefix_cache_queries"] - before["prefix_cache_queries"] == 73
    # A repeat of the same prompt reuses all its full blocks but recomputes the last token.
    again = llm.generate(prefix + tail_a, GREEDY)[0]
    assert again.outputs[0].token_ids == want[0]
    assert again.num_cached_tokens == 64
    assert llm.load()["free_blocks"] == llm.load()["num_blocks"]


def test_generated_tokens_are_cached_too(llama_path, make_llm) -> None:
    """A follow-up turn that repeats prompt + answer hits the blocks the answer filled."""
    llm = make_llm(llama_path)
    prompt = random_prompts([20], seed=4)[0]
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0]
    follow = prompt + out.outputs[0].token_ids + [5, 6, 7]
    assert llm.generate(follow, GREEDY)[0].num_cached_tokens == 48


def test_eviction_under_pressure_keeps_outputs_right(llama_path, make_llm) -> None:
    prompts = random_prompts([40, 45, 50, 55, 60, 35], seed=5)
    shared = random_prompts([48], seed=6)[0]
    prompts += [shared + p[:10] for p in prompts]
    reference = make_llm(llama_path, enable_prefix_caching=False)
    want = [o.outputs[0].token_ids for o in reference.generate(prompts, GREEDY)]
    # 12 blocks: every request evicts cached blocks of earlier ones.
    llm = make_llm(llama_path, kv_cache_tokens=192, max_model_len=192, max_num_seqs=2)
    for _ in range(2):
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
        assert got == want
    load = llm.load()
    assert load["prefix_cache_hits"] > 0
    assert load["free_blocks"] == load["num_blocks"] == 12


def test_parallel_samples_share_prompt_blocks(llama_path, make_llm) -> None:
    llm = make_llm(llama_path)
    engine = llm.engine
    prompt = random_prompts([70], seed=7)[0]  # 4 full blocks + 6 tokens
    engine.add_request("fan", prompt, SamplingParams(n=4, temperature=1.0, seed=1, max_tokens=3))
    engine.step()
    assert engine.load()["num_blocks"] - engine.load()["free_blocks"] == 4 + 4  # shared + 4 tails
    while engine.has_unfinished:
        outputs = engine.step()
    (out,) = outputs
    assert [o.index for o in out.outputs] == [0, 1, 2, 3]
    assert all(len(o.token_ids) == 3 for o in out.outputs)
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1


def test_cache_salt_isolates_tenants(llama_path, make_llm) -> None:
    llm = make_llm(llama_path)
    engine = llm.engine
    prompt = random_prompts([40], seed=8)[0]
    for request_id, salt in (("a", "tenant-1"), ("b", "tenant-2"), ("c", "tenant-1")):
        engine.add_request(request_id, prompt, GREEDY, cache_salt=salt)
        while engine.has_unfinished:
            (out, *_) = engine.step() or [None]
        assert out is not None and out.num_cached_tokens == (32 if request_id == "c" else 0)
