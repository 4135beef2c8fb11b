"""Paged attention over the block table for a mixed batch of prefill chunks and decodes.

One kernel serves both: the rows of a program are (query token, query head) pairs that share
one KV head, so decodes with grouped-query attention still fill a tensor-core tile and every KV
tile is read once per group instead of once per query head. Each sequence's queries are the last
positions of its context (cached prefix + new tokens), attended causally.

For long contexts at small batch the same kernel splits each sequence's keys across programs
(flash-decoding) and a second kernel merges the partial softmaxes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from replica.kernels.triton_common import check_launchable, next_pow2

_LOG2E = 1.4426950408889634
_NEG_BIG = tl.constexpr(-1.0e30)  # finite "minus infinity": fully masked rows stay NaN-free


@triton.jit
def _find_sequence(query_start_loc_ptr, num_seqs, qblock_id, BLOCK_Q: tl.constexpr):
    """Sequence whose query blocks hold `qblock_id` (sequence b starts at qsl[b] // BLOCK_Q + b)."""
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        start = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if start <= qblock_id:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _paged_attention_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    partial_out_ptr,
    partial_max_ptr,
    partial_sum_ptr,
    scale_log2,
    num_seqs,
    num_q_heads,
    num_splits,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_cb,
    stride_cs,
    stride_ch,
    stride_bt,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLIT_KV: tl.constexpr,
    ONE_QBLOCK_PER_SEQ: tl.constexpr,
    WIDE_OFFSETS: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    qblock_id = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    if ONE_QBLOCK_PER_SEQ:
        seq = qblock_id
        qblock = 0
    else:
        seq = _find_sequence(query_start_loc_ptr, num_seqs, qblock_id, BLOCK_Q)
        qblock = qblock_id - (tl.load(query_start_loc_ptr + seq) // BLOCK_Q + seq)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if qblock * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len

    rows = tl.arange(0, BLOCK_M)
    q_tok = qblock * BLOCK_Q + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_valid = (rows < BLOCK_Q * GROUP) & (q_tok < q_len)
    q_pos = context_len + q_tok
    dims = tl.arange(0, BLOCK_D)
    dim_valid = dims < HEAD_DIM

    q_rows = (q_start + q_tok).to(tl.int64)
    q = tl.load(
        q_ptr + q_rows[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :],
        mask=row_valid[:, None] & dim_valid[None, :],
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)

    kv_end = tl.minimum(context_len + (qblock + 1) * BLOCK_Q, seq_len)
    num_tiles = tl.cdiv(kv_end, BLOCK_N)
    if SPLIT_KV:
        tiles_per_split = tl.cdiv(num_tiles, num_splits)
        tile_lo = split * tiles_per_split
        tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)
    else:
        tile_lo = 0
        tile_hi = num_tiles

    m_i = tl.full([BLOCK_M], _NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    block_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for tile in range(tile_lo, tile_hi):
        kpos = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        k_valid = kpos < kv_end
        phys = tl.load(block_row + kpos // BLOCK_SIZE, mask=k_valid, other=0)
        if WIDE_OFFSETS:
            phys = phys.to(tl.int64)
        kv_off = phys * stride_cb + (kpos % BLOCK_SIZE) * stride_cs + kv_head * stride_ch
        kv_mask = k_valid[:, None] & dim_valid[None, :]
        k = tl.load(k_cache_ptr + kv_off[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + kv_off[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        else:  # a cache kept wider than q computes in q's dtype (a no-op when they match)
            k = k.to(q.dtype)
            v = v.to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        visible = (kpos[None, :] <= q_pos[:, None]) & k_valid[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    store_mask = row_valid[:, None] & dim_valid[None, :]
    if not SPLIT_KV:
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        tl.store(
            out_ptr + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=store_mask,
        )
    else:
        part = (q_rows * num_q_heads + head) * num_splits + split
        tl.store(partial_out_ptr + part[:, None] * BLOCK_D + dims[None, :], acc, mask=store_mask)
        tl.store(partial_max_ptr + part, m_i, mask=row_valid)
        tl.store(partial_sum_ptr + part, l_i, mask=row_valid)


@triton.jit
def _merge_splits_kernel(
    out_ptr,
    partial_out_ptr,
    partial_max_ptr,
    partial_sum_ptr,
    num_q_heads,
    num_splits,
    head_dim,
    stride_ot,
    stride_oh,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    splits = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, BLOCK_D)
    split_valid = splits < num_splits
    base = (token * num_q_heads + head) * num_splits
    m = tl.load(partial_max_ptr + base + splits, mask=split_valid, other=_NEG_BIG)
    sums = tl.load(partial_sum_ptr + base + splits, mask=split_valid, other=0.0)
    weight = tl.math.exp2(m - tl.max(m, 0))
    total = tl.sum(sums * weight, 0)
    acc = tl.load(
        partial_out_ptr + (base + splits)[:, None] * BLOCK_D + dims[None, :],
        mask=split_valid[:, None],
        other=0.0,
    )
    out = tl.sum(acc * weight[:, None], 0) / tl.where(total > 0.0, total, 1.0)
    tl.store(
        out_ptr + token * stride_ot + head * stride_oh + dims,
        out.to(out_ptr.dtype.element_ty),
        mask=dims < head_dim,
    )


@dataclass(frozen=True)
class AttentionConfig:
    """Tile shape and split count of one launch; chosen by `choose_config`, overridable in tests."""

    block_q: int
    block_m: int
    block_n: int
    num_splits: int
    num_warps: int
    num_stages: int


def _max_offset(t: torch.Tensor) -> int:
    """Largest element offset inside `t`: 32-bit cache offsets save registers when it fits."""
    return sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.cache
def _capability(device_index: int) -> int:
    major, minor = torch.cuda.get_device_capability(device_index)
    return 10 * major + minor


def choose_config(
    *,
    num_seqs: int,
    num_kv_heads: int,
    group: int,
    head_dim: int,
    max_query_len: int,
    max_seq_len: int,
    num_sms: int | None,
    capability: int = 90,
    block_n: int | None = None,
    num_splits: int | None = None,
) -> AttentionConfig:
    """Pick tiles by heuristics (autotuning is unavailable under the interpreter and in graphs).

    Decode-like batches use 16-row tiles (one query token x the GQA group) and 32-key tiles,
    which keep a program's registers low enough for several to share an SM; prefill chunks use
    64/128-row tiles on Hopper (`capability` 90) and 64x32 before it, where bigger tiles spill.
    Keys are split across programs only when the batch alone would leave some of the GPU's
    `num_sms` idle (None: never split), at least two key tiles per split. The choice depends on
    `max_seq_len` and the batch only, never on device data, so a captured graph stays valid.
    """
    rows_needed = max(1, max_query_len) * group
    decode_like = rows_needed <= 16
    hopper = capability >= 90
    block_m = max(16, next_pow2(group))
    if not decode_like:
        block_m = max(block_m, 64 if rows_needed <= 64 or not hopper else 128)
    block_q = max(1, block_m // group)
    wide_head = next_pow2(head_dim) > 128
    if block_n is None:
        if decode_like or not hopper:
            block_n = 16 if wide_head else 32
        else:
            block_n = 32 if wide_head else 64
    if num_splits is None:
        num_splits = 1
        programs = num_seqs * num_kv_heads
        max_tiles = triton.cdiv(max(1, max_seq_len), block_n)
        if decode_like and num_sms is not None and programs < num_sms and max_tiles >= 4:
            num_splits = min(triton.cdiv(2 * num_sms, programs), max_tiles // 2, 64)
    return AttentionConfig(
        block_q=block_q,
        block_m=block_m,
        block_n=block_n,
        num_splits=num_splits,
        num_warps=8 if block_m > 16 and hopper else 4,
        num_stages=2,
    )


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    *,
    max_seq_len: int,
    max_query_len: int,
    config: AttentionConfig | None = None,
) -> torch.Tensor:
    """q [T, Hq, D] over caches [blocks, block_size, Hkv, D] -> [T, Hq, D] (see contracts)."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    num_seqs = seq_lens.shape[0]
    out = torch.empty((num_tokens, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    if num_tokens == 0 or num_seqs == 0:
        return out
    interpreted = check_launchable(_paged_attention_kernel, q, k_cache)
    assert q.stride(2) == 1 and k_cache.stride(3) == 1 and k_cache.stride() == v_cache.stride()
    assert num_q_heads % num_kv_heads == 0 and block_tables.stride(1) == 1
    group = num_q_heads // num_kv_heads
    if config is None:
        config = choose_config(
            num_seqs=num_seqs,
            num_kv_heads=num_kv_heads,
            group=group,
            head_dim=head_dim,
            max_query_len=max_query_len,
            max_seq_len=max_seq_len,
            num_sms=_num_sms(q.device.index or 0) if q.is_cuda else None,
            capability=_capability(q.device.index or 0) if q.is_cuda else 90,
        )
    block_d = max(16, next_pow2(head_dim))
    one_qblock = max_query_len <= config.block_q
    qblocks = num_seqs if one_qblock else num_tokens // config.block_q + num_seqs
    splits = config.num_splits
    if splits > 1:
        parts = num_tokens * num_q_heads * splits
        partial_out = torch.empty((parts, block_d), dtype=torch.float32, device=q.device)
        partial_max = torch.empty((parts,), dtype=torch.float32, device=q.device)
        partial_sum = torch.empty((parts,), dtype=torch.float32, device=q.device)
    else:
        partial_out = partial_max = partial_sum = out
    _paged_attention_kernel[(qblocks, num_kv_heads, splits)](
        q,
        k_cache,
        v_cache,
        out,
        block_tables,
        seq_lens,
        query_start_loc,
        partial_out,
        partial_max,
        partial_sum,
        scale * _LOG2E,
        num_seqs,
        num_q_heads,
        splits,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        HEAD_DIM=head_dim,
        BLOCK_SIZE=k_cache.shape[1],
        GROUP=group,
        BLOCK_Q=config.block_q,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_D=block_d,
        SPLIT_KV=splits > 1,
        ONE_QBLOCK_PER_SEQ=one_qblock,
        WIDE_OFFSETS=_max_offset(k_cache) >= 2**31,
        UPCAST=interpreted,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    if splits > 1:
        _merge_splits_kernel[(num_tokens, num_q_heads)](
            out,
            partial_out,
            partial_max,
            partial_sum,
            num_q_heads,
            splits,
            head_dim,
            out.stride(0),
            out.stride(1),
            BLOCK_S=next_pow2(splits),
            BLOCK_D=block_d,
            num_warps=4,
        )
    return out
