"""Neox-style rotary embedding applied in place to q and k from a precomputed cos/sin cache.

The cache already carries any frequency scaling (Llama 3's included), so the kernel only rotates.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from replica.kernels.triton_common import check_launchable, next_pow2, rows_per_program


@triton.jit
def _rotate_rows(
    x_ptr,
    positions_ptr,
    cache_ptr,
    block_id,
    num_tokens,
    num_heads,
    stride_t,
    stride_h,
    stride_cache,
    half,
    ROWS: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Rotate ROWS (token, head) rows of x, the block_id-th group of them."""
    rows = block_id * ROWS + tl.arange(0, ROWS)[:, None]
    token = rows // num_heads
    head = rows % num_heads
    cols = tl.arange(0, BLOCK_R)[None, :]
    mask = (token < num_tokens) & (cols < half)
    pos = tl.load(positions_ptr + token, mask=token < num_tokens, other=0)
    trig = cache_ptr + pos * stride_cache + cols
    cos = tl.load(trig, mask=mask, other=0.0).to(tl.float32)
    sin = tl.load(trig + half, mask=mask, other=0.0).to(tl.float32)
    first = x_ptr + token.to(tl.int64) * stride_t + head * stride_h + cols
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
    num_tokens,
    num_q_heads,
    num_k_heads,
    q_programs,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_cache,
    half,
    ROWS: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """One launch for both: the first q_programs programs rotate q's rows, the rest k's."""
    pid = tl.program_id(0)
    if pid < q_programs:
        _rotate_rows(
            q_ptr, positions_ptr, cache_ptr, pid, num_tokens, num_q_heads,
            stride_qt, stride_qh, stride_cache, half, ROWS, BLOCK_R,
        )  # fmt: skip
    else:
        _rotate_rows(
            k_ptr, positions_ptr, cache_ptr, pid - q_programs, num_tokens, num_k_heads,
            stride_kt, stride_kh, stride_cache, half, ROWS, BLOCK_R,
        )  # fmt: skip


def launch_shape(half: int) -> dict[str, int]:
    """Tile constants for a rotary half-width (shared with the GPU compile check)."""
    block_r = next_pow2(half)
    rows = rows_per_program(block_r, max_rows=64, tile_elements=2048)
    return {"ROWS": rows, "BLOCK_R": block_r, "num_warps": 4}


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
        shape = launch_shape(half)
        rows = shape["ROWS"]
        q_programs = triton.cdiv(num_tokens * q.shape[1], rows)
        k_programs = triton.cdiv(num_tokens * k.shape[1], rows)
        _rotary_kernel[(q_programs + k_programs,)](
            positions,
            q,
            k,
            cos_sin_cache,
            num_tokens,
            q.shape[1],
            k.shape[1],
            q_programs,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            cos_sin_cache.stride(0),
            half,
            **shape,
        )
    return q, k
