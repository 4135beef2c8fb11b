"""Triton store_kv, RMSNorm(+residual), rotary and SiLU-and-mul against the torch reference ops."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import tolerance

from replica.kernels import reference, triton_ops
from replica.models.rope import cos_sin_cache

DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


@pytest.mark.parametrize(
    ("dtype", "cache_dtype"),
    [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.bfloat16, torch.float32),
    ],
    ids=["fp32", "bf16", "bf16-into-fp32-cache"],
)
def test_store_kv_writes_slots_and_skips_negative(dtype, cache_dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    num_blocks, block_size, hkv, d = 6, 4, 2, 24
    # K/V are strided views into a fused QKV buffer, as the model produces them.
    qkv = torch.randn(7, (4 + 2 * hkv) * d, generator=gen).to(dtype)
    key = qkv[:, 4 * d : (4 + hkv) * d].view(7, hkv, d)
    value = qkv[:, (4 + hkv) * d :].view(7, hkv, d)
    slots = torch.tensor([0, 5, -1, 9, 23, -1, 12])
    caches = [
        torch.randn(num_blocks, block_size, hkv, d, generator=gen).to(cache_dtype) for _ in "kv"
    ]
    expected = [c.clone() for c in caches]
    reference.store_kv(key, value, *expected, slots)
    triton_ops.store_kv(key, value, *caches, slots)
    assert torch.equal(caches[0], expected[0]) and torch.equal(caches[1], expected[1])


@DTYPES
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(dtype, with_residual: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(70, 48, generator=gen).to(dtype)  # several programs, the last one partial
    residual = torch.randn(70, 48, generator=gen).to(dtype) if with_residual else None
    weight = (1 + 0.1 * torch.randn(48, generator=gen)).to(dtype)
    expected, expected_residual = reference.rms_norm(x, weight, 1e-5, residual)
    got, got_residual = triton_ops.rms_norm(x, weight, 1e-5, residual)
    assert got.dtype == dtype and got_residual.dtype == dtype
    torch.testing.assert_close(got.float(), expected.float(), **tolerance(dtype))
    torch.testing.assert_close(got_residual.float(), expected_residual.float(), **tolerance(dtype))
    if not with_residual:
        assert torch.equal(got_residual, x)


@DTYPES
@pytest.mark.parametrize("scaling", [None, LLAMA3_SCALING], ids=["plain", "llama3"])
def test_rotary_embedding(dtype, scaling) -> None:
    gen = torch.Generator().manual_seed(2)
    hq, hkv, d = 4, 2, 32
    cache = cos_sin_cache(d, 10000.0, scaling, max_positions=512)
    edges = torch.tensor([0, 1, 7, 63, 64, 200, 511])
    positions = torch.cat([edges, torch.randint(0, 512, (33,), generator=gen)])
    qkv = torch.randn(len(positions), (hq + 2 * hkv) * d, generator=gen).to(dtype)
    q = qkv[:, : hq * d].view(-1, hq, d)
    k = qkv[:, hq * d : (hq + hkv) * d].view(-1, hkv, d)
    v_before = qkv[:, (hq + hkv) * d :].clone()
    expected_q, expected_k = reference.rotary_embedding(positions, q.clone(), k.clone(), cache)
    got_q, got_k = triton_ops.rotary_embedding(positions, q, k, cache)
    torch.testing.assert_close(got_q.float(), expected_q.float(), **tolerance(dtype))
    torch.testing.assert_close(got_k.float(), expected_k.float(), **tolerance(dtype))
    # In place on the strided views; V (the rest of the fused buffer) untouched.
    assert got_q.data_ptr() == q.data_ptr()
    assert torch.equal(qkv[:, (hq + hkv) * d :], v_before)


@DTYPES
def test_silu_and_mul(dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 2 * 1100, generator=gen).to(dtype)  # crosses the 1024-column tile
    torch.testing.assert_close(
        triton_ops.silu_and_mul(x).float(),
        reference.silu_and_mul(x).float(),
        **tolerance(dtype),
    )
