"""Triton paged attention (interpreted on CPU) against the torch reference op."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import make_paged_batch, tolerance

from replica.kernels import reference
from replica.kernels.triton_attention import AttentionConfig, choose_config, paged_attention

# cached prefix lengths and new tokens per sequence: a prefill chunk over a cached prefix, a
# decode, a fresh prefill that ends mid-block, a decode on an exact block boundary.
MIXED_CACHED = [0, 37, 5, 64]
MIXED_NEW = [13, 1, 20, 1]


def _check(batch, dtype: torch.dtype, config: AttentionConfig | None = None) -> None:
    expected = reference.paged_attention(*batch.args(), **batch.kwargs())
    got = paged_attention(*batch.args(), **batch.kwargs(), config=config)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), expected.float(), **tolerance(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("num_q_heads", "num_kv_heads"), [(4, 4), (4, 2), (8, 2)])
def test_mixed_prefill_and_decode_batch(num_q_heads: int, num_kv_heads: int, dtype) -> None:
    batch = make_paged_batch(
        MIXED_CACHED,
        MIXED_NEW,
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        head_dim=32,
        block_size=4,
        dtype=dtype,
    )
    _check(batch, dtype)


def test_float16_and_head_dim_not_a_power_of_two() -> None:
    batch = make_paged_batch(
        MIXED_CACHED,
        MIXED_NEW,
        num_q_heads=6,
        num_kv_heads=2,
        head_dim=24,
        block_size=16,
        dtype=torch.float16,
        seed=1,
    )
    _check(batch, torch.float16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_decode_only_batch(dtype) -> None:
    batch = make_paged_batch(
        [70, 37, 5, 64, 0],
        [1, 1, 1, 1, 1],
        num_q_heads=8,
        num_kv_heads=2,
        head_dim=32,
        block_size=16,
        dtype=dtype,
        seed=2,
    )
    _check(batch, dtype)


@pytest.mark.parametrize("num_splits", [2, 3, 5])
def test_split_kv_decode_matches(num_splits: int) -> None:
    """Flash-decoding: keys split across programs, partial softmaxes merged (some splits empty)."""
    batch = make_paged_batch(
        [90, 37, 5, 0],
        [1, 1, 1, 1],
        num_q_heads=4,
        num_kv_heads=1,
        head_dim=32,
        block_size=16,
        seed=3,
    )
    config = AttentionConfig(
        block_q=4, block_m=16, block_n=16, num_splits=num_splits, num_warps=4, num_stages=2
    )
    _check(batch, torch.float32, config)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_several_query_blocks_per_sequence(num_splits: int) -> None:
    """Small query tiles force several programs per prefill chunk (the sequence lookup path)."""
    batch = make_paged_batch(
        MIXED_CACHED,
        MIXED_NEW,
        num_q_heads=4,
        num_kv_heads=2,
        head_dim=16,
        block_size=4,
        seed=4,
    )
    config = AttentionConfig(
        block_q=4, block_m=16, block_n=16, num_splits=num_splits, num_warps=4, num_stages=2
    )
    _check(batch, torch.float32, config)


def test_long_prefill_uses_large_tiles_and_matches() -> None:
    batch = make_paged_batch(
        [0, 3], [150, 2], num_q_heads=2, num_kv_heads=2, head_dim=16, block_size=16, seed=5
    )
    config = choose_config(
        num_seqs=2,
        num_kv_heads=2,
        group=1,
        head_dim=16,
        max_query_len=150,
        max_seq_len=150,
        num_sms=None,
    )
    assert config.block_m == 128 and config.block_q == 128
    _check(batch, torch.float32)


def test_cache_wider_than_queries() -> None:
    """bf16 activations over a float32 cache (the engine's layout on CPUs without bf16 units)."""
    batch = make_paged_batch(
        MIXED_CACHED, MIXED_NEW, num_q_heads=4, num_kv_heads=2, head_dim=16, block_size=4, seed=6
    )
    batch.q = batch.q.to(torch.bfloat16)
    _check(batch, torch.bfloat16)


def test_empty_batch_returns_empty() -> None:
    batch = make_paged_batch([3], [1], num_q_heads=2, num_kv_heads=1, head_dim=16, block_size=4)
    q = batch.q[:0]
    out = paged_attention(
        q,
        batch.k_cache,
        batch.v_cache,
        batch.block_tables[:0],
        batch.seq_lens[:0],
        batch.query_start_loc[:1],
        batch.scale,
        max_seq_len=0,
        max_query_len=0,
    )
    assert out.shape == (0, 2, 16)


def test_config_heuristics() -> None:
    """Decodes get 16-row tiles; splits only on a GPU with too few programs to fill it."""
    decode = dict(num_kv_heads=8, group=4, head_dim=128, max_query_len=1, max_seq_len=1024)
    small = choose_config(num_seqs=1, num_sms=132, **decode)
    assert (small.block_m, small.block_q, small.block_n, small.num_splits) == (16, 4, 32, 16)
    assert choose_config(num_seqs=4, num_sms=132, **decode).num_splits == 9
    assert choose_config(num_seqs=1, num_sms=None, **decode).num_splits == 1
    assert choose_config(num_seqs=32, num_sms=132, **decode).num_splits == 1
    short = dict(decode, max_seq_len=64)
    assert choose_config(num_seqs=1, num_sms=132, **short).num_splits == 1
    prefill = dict(decode, max_query_len=512)
    assert choose_config(num_seqs=4, num_sms=132, **prefill).block_m == 128
    assert choose_config(num_seqs=4, num_sms=132, **prefill).num_splits == 1
    ampere = choose_config(num_seqs=4, num_sms=108, capability=80, **prefill)
    assert (ampere.block_m, ampere.block_n, ampere.num_warps) == (64, 32, 4)
