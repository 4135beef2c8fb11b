"""Write a step's new keys and values into the paged KV cache by slot mapping."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from replica.kernels.triton_common import check_launchable, next_pow2, rows_per_program


@triton.jit
def _store_kv_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    num_tokens,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cb,
    stride_cs,
    stride_ch,
    block_size,
    num_kv_heads,
    head_dim,
    ROWS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    tokens = tl.program_id(0) * ROWS + tl.arange(0, ROWS)[:, None]
    slots = tl.load(slot_ptr + tokens, mask=tokens < num_tokens, other=-1)
    # Columns are (head, dim) pairs of one token, flattened into one tile axis.
    cols = tl.arange(0, BLOCK_H * BLOCK_D)[None, :]
    heads = cols // BLOCK_D
    dims = cols % BLOCK_D
    # A negative slot is padding or a token whose K/V is already cached: skip it.
    mask = (slots >= 0) & (heads < num_kv_heads) & (dims < head_dim)
    tokens = tokens.to(tl.int64)
    k = tl.load(key_ptr + tokens * stride_kt + heads * stride_kh + dims, mask=mask)
    v = tl.load(value_ptr + tokens * stride_vt + heads * stride_vh + dims, mask=mask)
    dst = (slots // block_size) * stride_cb + (slots % block_size) * stride_cs
    dst += heads * stride_ch + dims
    tl.store(k_cache_ptr + dst, k, mask=mask)
    tl.store(v_cache_ptr + dst, v, mask=mask)


def launch_shape(num_kv_heads: int, head_dim: int) -> dict[str, int]:
    """Tile constants for a K/V row shape (shared with the GPU compile check)."""
    block_h, block_d = next_pow2(num_kv_heads), next_pow2(head_dim)
    rows = rows_per_program(block_h * block_d, max_rows=16)
    return {"ROWS": rows, "BLOCK_H": block_h, "BLOCK_D": block_d, "num_warps": 4}


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """key/value [T, Hkv, D] (rows may be strided views) -> caches [blocks, block_size, Hkv, D]."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    check_launchable(_store_kv_kernel, key, k_cache)
    assert key.stride(2) == 1 and value.stride(2) == 1, "head_dim must be contiguous"
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1
    shape = launch_shape(num_kv_heads, head_dim)
    _store_kv_kernel[(triton.cdiv(num_tokens, shape["ROWS"]),)](
        key,
        value,
        k_cache,
        v_cache,
        slot_mapping,
        num_tokens,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        k_cache.shape[1],
        num_kv_heads,
        head_dim,
        **shape,
    )
