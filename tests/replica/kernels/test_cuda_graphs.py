"""Decode CUDA graphs: the batch-size ladder and the padded static inputs (checked on CPU, where
the padded step runs eagerly through the same buffers a captured graph would read)."""

from __future__ import annotations

import torch

from replica.engine.cuda_graphs import (
    DecodeBuffers,
    DecodeGraphs,
    batch_size_ladder,
    padded_batch_size,
)
from replica.kernels import get_ops


def test_ladder_and_padding() -> None:
    assert batch_size_ladder(1) == [1]
    assert batch_size_ladder(6) == [1, 2, 4, 6]
    assert batch_size_ladder(20) == [1, 2, 4, 8, 16, 20]
    ladder = batch_size_ladder(256)
    assert ladder[:5] == [1, 2, 4, 8, 16] and ladder[-1] == 256 and len(ladder) == 35
    assert [padded_batch_size(n, ladder) for n in (1, 3, 5, 9, 255, 256)] == [1, 4, 8, 16, 256, 256]
    assert padded_batch_size(257, ladder) is None


def test_graphs_only_on_cuda_with_triton_ops() -> None:
    args = dict(max_num_seqs=4, max_model_len=64, block_size=16)
    cpu = torch.device("cpu")
    assert DecodeGraphs.build(None, get_ops("torch"), cpu, **args) is None  # type: ignore[arg-type]
    assert DecodeGraphs.build(None, get_ops("triton"), cpu, **args) is None  # type: ignore[arg-type]


def _decode_inputs(llm, prompts: list[list[int]]):
    """The runner's inputs for a decode step of these prompts (after their prefill)."""
    from replica import SamplingParams

    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    while engine.scheduler.waiting or any(
        s.num_tokens - s.num_computed_tokens > 1 for s in engine.scheduler.running
    ):
        engine.step(stream=False)
    inputs = engine.runner.prepare(engine.scheduler.schedule())
    assert inputs.is_decode and inputs.input_ids.shape[0] == len(prompts)
    return inputs


def test_padded_decode_step_matches_the_unpadded_one(model_factory) -> None:
    """Padding rows change neither the real rows' hidden states nor any KV cache slot (with the
    Triton ops, the only ones graphs capture, interpreted here)."""
    from replica import LLM

    llm = LLM(
        str(model_factory("llama", "tiny")),
        device="cpu",
        dtype="float32",
        kernel_backend="triton",
        max_model_len=96,
        block_size=4,
    )
    runner = llm.engine.runner
    inputs = _decode_inputs(llm, [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [3] * 13])
    caches_before = [c.clone() for c in runner.k_caches + runner.v_caches]

    with torch.inference_mode():
        eager = runner.model(inputs.input_ids, inputs.positions, inputs.meta).clone()
        caches_eager = [c.clone() for c in runner.k_caches + runner.v_caches]
        for c, before in zip(runner.k_caches + runner.v_caches, caches_before, strict=True):
            c.copy_(before)

        buffers = DecodeBuffers.allocate(8, 96, 4, torch.device("cpu"))
        buffers.load(inputs.input_ids, inputs.positions, inputs.meta, size=8)
        assert buffers.fits(inputs.input_ids, inputs.meta)
        padded = runner.model(*buffers.view(8))

    assert padded.shape[0] == 8
    torch.testing.assert_close(padded[:3], eager, atol=1e-5, rtol=1e-5)
    real_slots = set(inputs.meta.slot_mapping.tolist())
    caches_after = runner.k_caches + runner.v_caches
    for after, expected, before in zip(caches_after, caches_eager, caches_before, strict=True):
        torch.testing.assert_close(after, expected, atol=1e-5, rtol=1e-5)
        changed = (after != before).flatten(2).any(-1).flatten().nonzero().flatten().tolist()
        assert set(changed) == real_slots
    # A later, smaller step must not see the earlier step's rows as live sequences.
    with torch.inference_mode():
        buffers.load(inputs.input_ids[:1], inputs.positions[:1], _first(inputs.meta), size=2)
    assert buffers.slot_mapping[1].item() == -1 and buffers.seq_lens[1].item() == 1


def _first(meta):
    from replica.models import AttentionMetadata

    return AttentionMetadata(
        slot_mapping=meta.slot_mapping[:1],
        block_tables=meta.block_tables[:1],
        seq_lens=meta.seq_lens[:1],
        query_start_loc=meta.query_start_loc[:2],
        max_seq_len=int(meta.seq_lens[0]),
        max_query_len=1,
    )
