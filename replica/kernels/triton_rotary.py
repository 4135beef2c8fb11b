"""Neox-style rotary embedding applied in place to q and k from a precomputed cos/sin cache.

The cache already carries any frequency scaling (Llama 3's included), so the kernel only rotates.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from replica.kernels.triton_common import check_launchable, next_pow2


@triton.jit
def _rotate_heads(
    x_ptr,
    stride_t,
    stride_h,
    token,
    num_heads,
    cos,
    sin,
    half,
    BLOCK_H: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    heads = tl.arange(0, BLOCK_H)[:, None]
    cols = tl.arange(0, BLOCK_R)[None, :]
    mask = (heads < num_heads) & (cols < half)
    first = x_ptr + token * stride_t + heads * stride_h + cols
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + half, mask=mask, other=0.0).to(tl.float32)
    dtype = x_ptr.dtype.element_ty
    tl.store(first, (x1 * cos - x2 * sin).to(dtype), mask=mask)
    tl.store(first + half, (x2 * cos + x1 * sin).to(dtype), mask=mask)


@triton.jit
def _rotary_kernel(
    positions_ptr,
    q_ptr,
    k_ptr,
    cache_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_cache,
    num_q_heads,
    num_k_heads,
    half,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    token = tl.program_id(0)
    pos = tl.load(positions_ptr + token)
    cols = tl.arange(0, BLOCK_R)[None, :]
    row = cache_ptr + pos * stride_cache + cols
    cos = tl.load(row, mask=cols < half, other=0.0).to(tl.float32)
    sin = tl.load(row + half, mask=cols < half, other=0.0).to(tl.float32)
    _rotate_heads(
        q_ptr, stride_qt, stride_qh, token, num_q_heads, cos, sin, half, BLOCK_HQ, BLOCK_R
    )
    _rotate_heads(
        k_ptr, stride_kt, stride_kh, token, num_k_heads, cos, sin, half, BLOCK_HK, BLOCK_R
    )


def rotary_embedding(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_sin_cache: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, Hq, D] and k [T, Hkv, D] in place by their positions; returns (q, k).

    cos_sin_cache is [max_pos, R] (R <= D: first R/2 cos, last R/2 sin); only the first R
    dims of each head rotate, as in partial-rotary models.
    """
    check_launchable(_rotary_kernel, q)
    assert q.stride(2) == 1 and k.stride(2) == 1 and cos_sin_cache.stride(1) == 1
    num_tokens = q.shape[0]
    half = cos_sin_cache.shape[1] // 2
    if num_tokens > 0:
        _rotary_kernel[(num_tokens,)](
            positions,
            q,
            k,
            cos_sin_cache,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            cos_sin_cache.stride(0),
            q.shape[1],
            k.shape[1],
            half,
            BLOCK_HQ=next_pow2(q.shape[1]),
            BLOCK_HK=next_pow2(k.shape[1]),
            BLOCK_R=next_pow2(half),
            num_warps=4,
        )
    return q, k
