"""Torch implementations of the engine's kernel ops.

They are the CPU serving path and the ground truth the Triton kernels are tested against, so they
favour clarity first and then batch-wide torch calls (no per-sequence Python loops).

Layouts (see notes in contracts): KV cache per layer is [num_blocks, block_size, num_kv_heads,
head_dim]; the tokens of a step are packed into T rows without padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write each token's K/V into its slot (block * block_size + offset); negative slots skip."""
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        key, value, slot_mapping = key[keep], value[keep], slot_mapping[keep]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, key.to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, value.to(v_cache.dtype))


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
) -> torch.Tensor:
    """Causal attention of packed queries over each sequence's paged context.

    Sequence b's queries (rows query_start_loc[b]:query_start_loc[b+1]) are the last positions of
    its context of seq_lens[b] tokens, whose K/V are already in the cache. The blocks of every
    sequence are gathered into one padded batch and handed to SDPA with a mask; the query heads
    of one KV head are folded into the query axis, so GQA needs no copy of K/V.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    num_seqs = block_tables.shape[0]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    num_blocks = -(-max_seq_len // block_size)
    ctx = num_blocks * block_size
    decode = max_query_len == 1 and num_tokens == num_seqs

    # index_select on [num_blocks, block_size * Hkv * D] rows copies whole blocks (memcpy speed).
    tables = block_tables[:, :num_blocks].reshape(-1).long().clamp_min(0)  # padding may be -1
    k = k_cache.view(k_cache.shape[0], -1).index_select(0, tables)
    v = v_cache.view(v_cache.shape[0], -1).index_select(0, tables)
    k = k.view(num_seqs, ctx, num_kv_heads, head_dim).transpose(1, 2)
    v = v.view(num_seqs, ctx, num_kv_heads, head_dim).transpose(1, 2)

    keys = torch.arange(ctx, device=q.device)
    if decode:  # one query per sequence, at its last position: no padding, no causal band
        padded = q.view(num_seqs, num_kv_heads, group, head_dim)
        mask = (keys[None, :] < seq_lens[:, None]).view(num_seqs, 1, 1, ctx)
        out = _sdpa(padded, k, v, mask, scale)
        return out.reshape(num_tokens, num_q_heads, head_dim)

    starts = query_start_loc[:-1].long()
    q_lens = query_start_loc[1:].long() - starts
    steps = torch.arange(max_query_len, device=q.device)
    rows = (starts[:, None] + steps[None, :]).clamp_max(num_tokens - 1)
    padded = q[rows]  # [B, Q, Hq, D]; rows past a sequence's queries are dropped below
    # [B, Q, Hkv, G, D] -> [B, Hkv, G*Q, D]: query row g * Q + i, so GQA needs no copy of K/V.
    padded = padded.view(num_seqs, max_query_len, num_kv_heads, group, head_dim)
    padded = padded.permute(0, 2, 3, 1, 4).reshape(
        num_seqs, num_kv_heads, group * max_query_len, head_dim
    )
    # Query i of sequence b sits at position seq_len - q_len + i and sees keys up to it.
    last_key = (seq_lens.long() - q_lens)[:, None] + steps[None, :]  # [B, Q]
    mask = keys[None, None, :] <= last_key[:, :, None]  # [B, Q, ctx]
    mask = mask.repeat(1, group, 1).unsqueeze(1)  # [B, 1, G*Q, ctx]
    out = _sdpa(padded, k, v, mask, scale)
    out = out.view(num_seqs, num_kv_heads, group, max_query_len, head_dim)
    out = out.permute(0, 3, 1, 2, 4).reshape(num_seqs, max_query_len, num_q_heads, head_dim)
    return out[steps[None, :] < q_lens[:, None]]


def _sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """SDPA in the cache's dtype (wider than q when bf16 is served in fp32 on CPUs without bf16
    units), the result back in q's dtype."""
    out = F.scaled_dot_product_attention(q.to(k.dtype), k, v, attn_mask=mask, scale=scale)
    return out.to(q.dtype)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm with an optional fused residual add: returns (normed, x + residual or x).

    The statistic is taken in float32; the weight is applied in x's dtype as transformers does,
    which keeps bf16 outputs bit-identical to it.
    """
    if residual is not None:
        x = x + residual
    variance = x.float().pow(2).mean(-1, keepdim=True)
    normed = (x.float() * torch.rsqrt(variance + eps)).to(x.dtype)
    return weight * normed, x


def rotary_embedding(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_sin_cache: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style rotary embedding (rotate halves); cos_sin_cache rows are [cos(D/2) | sin(D/2)]."""
    cos_sin = cos_sin_cache[positions].to(q.dtype)
    half = cos_sin.shape[-1] // 2
    cos, sin = cos_sin[:, None, :half], cos_sin[:, None, half:]
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU gate: silu(x[:, :I]) * x[:, I:]."""
    half = x.shape[-1] // 2
    return F.silu(x[..., :half]) * x[..., half:]
