"""Random paged-attention batches in the contract's layout, shared by the kernel tests."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class PagedBatch:
    """One step's attention inputs over a paged cache, in the contract's layout."""

    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    scale: float
    max_seq_len: int
    max_query_len: int

    def args(self) -> tuple:
        return (
            self.q,
            self.k_cache,
            self.v_cache,
            self.block_tables,
            self.seq_lens,
            self.query_start_loc,
            self.scale,
        )

    def kwargs(self) -> dict[str, int]:
        return {"max_seq_len": self.max_seq_len, "max_query_len": self.max_query_len}


def make_paged_batch(
    cached: list[int],
    new: list[int],
    *,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> PagedBatch:
    """Sequences with `cached[b]` prefix tokens and `new[b]` queries, over shuffled blocks.

    Every cache slot holds random data, so a kernel that reads past a sequence's length (the
    unused tail of its last block, or other sequences' blocks) gives a wrong answer. q is a
    strided view into a fused QKV buffer, as the model hands it over.
    """
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [c + n for c, n in zip(cached, new, strict=True)]
    blocks_per_seq = [math.ceil(s / block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3
    physical = torch.randperm(num_blocks, generator=gen).tolist()
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    width = max(blocks_per_seq) + 2
    block_tables = torch.full((len(seq_lens), width), -1, dtype=torch.int32)
    for b, count in enumerate(blocks_per_seq):
        block_tables[b, :count] = torch.tensor([physical.pop() for _ in range(count)])
    num_tokens = sum(new)
    qkv = torch.randn(num_tokens, (num_q_heads + 2 * num_kv_heads) * head_dim, generator=gen)
    q = qkv.to(dtype)[:, : num_q_heads * head_dim].view(num_tokens, num_q_heads, head_dim)
    starts = [0]
    for n in new:
        starts.append(starts[-1] + n)
    return PagedBatch(
        q=q,
        k_cache=k_cache,
        v_cache=v_cache,
        block_tables=block_tables,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        scale=1.0 / math.sqrt(head_dim),
        max_seq_len=max(seq_lens),
        max_query_len=max(new),
    )


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    """bf16 gets ~2 ulps: the interpreter truncates float32 -> bf16 where a GPU rounds."""
    if dtype == torch.bfloat16:
        return {"atol": 3e-2, "rtol": 2e-2}
    if dtype == torch.float16:
        return {"atol": 2e-3, "rtol": 2e-3}
    return {"atol": 2e-5, "rtol": 1e-5}
