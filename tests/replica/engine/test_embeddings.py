"""Embeddings (`task="embed"`): the pooled, L2-normalised final hidden states of our decoder equal
transformers' AutoModel `last_hidden_state` on the same tiny weights, pooled the same way, within
1e-5 in float32; also across chunked prefill (prompts longer than one step's token budget)."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from engine_helpers import ARCHS, random_prompts

from replica.engine.pooling import truncate
from replica.engine.sampling_params import SamplingParams, SamplingParamsError


@functools.cache
def _hf_base_model(path: str):
    from transformers import AutoModel

    return AutoModel.from_pretrained(path, dtype=torch.float32).eval()


def hf_embedding(path, ids: list[int], pooling: str) -> torch.Tensor:
    """The reference: AutoModel's hidden states after the final norm, pooled, normalised."""
    with torch.no_grad():
        hidden = _hf_base_model(str(path))(torch.tensor([ids])).last_hidden_state[0].float()
    pooled = hidden[-1] if pooling == "last" else hidden.mean(dim=0)
    return F.normalize(pooled, dim=0)


@pytest.mark.parametrize("pooling", ["last", "mean"])
@pytest.mark.parametrize("arch", ARCHS)
def test_embeddings_match_transformers_hidden_states(arch, pooling, tiny_models, make_llm) -> None:
    path = tiny_models[arch]
    # A 32-token step budget splits the 37- and 70-token prompts over several steps.
    llm = make_llm(path, task="embed", pooling=pooling, dtype="float32", max_num_batched_tokens=32)
    prompts = random_prompts([5, 37, 1, 70], seed=11)
    ours = llm.embed(prompts)
    assert len(ours) == len(prompts)
    for ids, vector in zip(prompts, ours, strict=True):
        reference = hf_embedding(path, ids, pooling)
        torch.testing.assert_close(torch.tensor(vector), reference, atol=1e-5, rtol=0)
    assert llm.load()["free_blocks"] == llm.load()["num_blocks"]  # every KV block came back


def test_text_is_tokenized_like_a_prompt_and_the_engine_idles_after(llama_path, make_llm) -> None:
    llm = make_llm(llama_path, task="embed", dtype="float32")
    text = "The quick brown fox jumps over the lazy dog."
    ids = llm.tokenizer.encode(text)
    [from_text] = llm.embed(text)
    assert from_text == llm.embed([ids])[0]
    assert abs(float(torch.tensor(from_text).norm()) - 1.0) < 1e-5
    assert not llm.engine.has_unfinished


def test_bad_inputs_are_refused_before_any_work(llama_path, make_llm) -> None:
    llm = make_llm(llama_path, task="embed", max_model_len=64)
    with pytest.raises(SamplingParamsError) as empty:
        llm.embed([[]])
    with pytest.raises(SamplingParamsError) as too_long:
        llm.embed([[5] * 65])
    with pytest.raises(SamplingParamsError) as outside:
        llm.embed([[5, 10**9]])
    assert (empty.value.param, too_long.value.param, outside.value.param) == ("input",) * 3
    assert too_long.value.code == "context_length_exceeded"
    assert not llm.engine.has_unfinished


def test_an_embed_engine_refuses_generation_and_a_generate_engine_refuses_embedding(
    llama_path, make_llm, llama_llm
) -> None:
    embedder = make_llm(llama_path, task="embed")
    with pytest.raises(SamplingParamsError, match="embed"):
        embedder.generate([[5, 6]], SamplingParams(max_tokens=2))
    with pytest.raises(SamplingParamsError, match="generate"):
        llama_llm.embed([[5, 6]])


def test_truncation_renormalises_matryoshka_style() -> None:
    full = F.normalize(torch.tensor([3.0, 4.0, 12.0]), dim=0).tolist()
    assert truncate(full, 2) == pytest.approx([0.6, 0.8])
    assert truncate(full, 3) == pytest.approx(full)


def test_unknown_task_or_pooling_is_a_clear_error(llama_path) -> None:
    from replica.engine.config import EngineArgs

    with pytest.raises(ValueError, match="task"):
        EngineArgs(model=str(llama_path), task="classify")
    with pytest.raises(ValueError, match="pooling"):
        EngineArgs(model=str(llama_path), pooling="cls")


async def test_cancelled_embeddings_are_aborted_and_give_their_blocks_back(llama_path) -> None:
    """What a client disconnect does to /v1/embeddings: cancelling the gathered inputs aborts
    every one still queued or running in the engine."""
    import asyncio

    from replica.engine.async_engine import AsyncEngine
    from replica.engine.config import EngineArgs
    from replica.http_api.embeddings import _pool_all

    args = EngineArgs(
        model=str(llama_path), task="embed", device="cpu", dtype="float32", max_model_len=512,
        kv_cache_tokens=8192, max_num_batched_tokens=16,
    )  # fmt: skip
    engine = AsyncEngine(args)
    try:
        streams = [engine.embed(f"e{i}", ids) for i, ids in enumerate(random_prompts([400] * 8))]
        work = asyncio.ensure_future(_pool_all(streams))
        while engine.load()["running"] == 0:
            await asyncio.sleep(0.005)
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)
        for _ in range(200):
            load = engine.load()
            if load["running"] == load["waiting"] == 0:
                break
            await asyncio.sleep(0.01)
        assert load["running"] == load["waiting"] == 0
        assert load["free_blocks"] == load["num_blocks"]
        assert not engine.core.requests
    finally:
        engine.shutdown()
