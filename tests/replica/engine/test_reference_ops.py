"""The torch reference ops against plain per-sequence math (they are also the Triton kernels' oracle)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from replica.kernels import get_ops

ops = get_ops("torch")


def _naive_attention(q, k, v, scale):
    """q [Q,Hq,D] are the last Q positions of k/v [L,Hkv,D]; causal, GQA by repetition."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k.double()) * scale
    offset = k.shape[0] - q.shape[0]
    mask = torch.arange(k.shape[0])[None, :] <= (torch.arange(q.shape[0])[:, None] + offset)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.double())


def test_store_kv_and_paged_attention_match_per_sequence_math() -> None:
    torch.manual_seed(0)
    block_size, num_blocks, hkv, hq, d = 4, 32, 2, 6, 8
    k_cache = torch.zeros(num_blocks, block_size, hkv, d)
    v_cache = torch.zeros_like(k_cache)
    seq_lens = [7, 1, 12, 5]
    q_lens = [3, 1, 12, 1]  # cached prefix + chunk, decode, full prefill, decode
    perm = torch.randperm(num_blocks).tolist()
    tables = torch.full((4, 4), -1, dtype=torch.int32)
    full_k, full_v, qs, slots = [], [], [], []
    for b, (n, ql) in enumerate(zip(seq_lens, q_lens, strict=True)):
        blocks = [perm.pop() for _ in range(-(-n // block_size))]
        tables[b, : len(blocks)] = torch.tensor(blocks)
        k, v = torch.randn(n, hkv, d), torch.randn(n, hkv, d)
        full_k.append(k)
        full_v.append(v)
        qs.append(torch.randn(ql, hq, d))
        slots.append(
            torch.tensor([blocks[i // block_size] * block_size + i % block_size for i in range(n)])
        )
    # Store the whole context (a -1 slot must be skipped).
    keys, values = torch.cat(full_k), torch.cat(full_v)
    slot_mapping = torch.cat(slots)
    ops.store_kv(
        torch.cat([keys, torch.ones(1, hkv, d)]),
        torch.cat([values, torch.ones(1, hkv, d)]),
        k_cache,
        v_cache,
        torch.cat([slot_mapping, torch.tensor([-1])]),
    )
    assert torch.equal(k_cache.view(-1, hkv, d)[slot_mapping], keys)
    assert k_cache.view(-1, hkv, d).abs().sum(dim=(1, 2)).ne(0).sum() == len(slot_mapping)

    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    out = ops.paged_attention(
        torch.cat(qs),
        k_cache,
        v_cache,
        tables,
        torch.tensor(seq_lens, dtype=torch.int32),
        qsl,
        d**-0.5,
        max_seq_len=max(seq_lens),
        max_query_len=max(q_lens),
    )
    want = torch.cat(
        [_naive_attention(q, k, v, d**-0.5) for q, k, v in zip(qs, full_k, full_v, strict=True)]
    )
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


def test_paged_attention_decode_batch() -> None:
    torch.manual_seed(1)
    block_size, hkv, hq, d = 16, 1, 4, 16
    k_cache, v_cache = torch.randn(8, block_size, hkv, d), torch.randn(8, block_size, hkv, d)
    tables = torch.tensor([[3, 5], [0, 7], [6, 1]], dtype=torch.int32)
    seq_lens = torch.tensor([17, 32, 2], dtype=torch.int32)
    q = torch.randn(3, hq, d)
    out = ops.paged_attention(
        q,
        k_cache,
        v_cache,
        tables,
        seq_lens,
        torch.arange(4, dtype=torch.int32),
        0.25,
        max_seq_len=32,
        max_query_len=1,
    )
    for b in range(3):
        n = int(seq_lens[b])
        k = k_cache[tables[b].long()].reshape(-1, hkv, d)[:n]
        v = v_cache[tables[b].long()].reshape(-1, hkv, d)[:n]
        torch.testing.assert_close(
            out[b : b + 1].double(),
            _naive_attention(q[b : b + 1], k, v, 0.25),
            atol=1e-5,
            rtol=1e-5,
        )


def test_rms_norm_with_and_without_residual() -> None:
    x, r, w = torch.randn(5, 32), torch.randn(5, 32), torch.rand(32)
    normed, res = ops.rms_norm(x, w, 1e-6)
    torch.testing.assert_close(normed, w * x / (x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt())
    assert res is x
    normed, res = ops.rms_norm(x, w, 1e-6, residual=r)
    torch.testing.assert_close(res, x + r)
    torch.testing.assert_close(normed, w * res / (res.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt())


def test_rotary_embedding_rotates_halves() -> None:
    d, max_pos = 8, 16
    inv_freq = 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d)
    freqs = torch.arange(max_pos).float()[:, None] * inv_freq[None, :]
    cache = torch.cat([freqs.cos(), freqs.sin()], dim=-1)
    positions = torch.tensor([0, 3, 15])
    q, k = torch.randn(3, 4, d), torch.randn(3, 2, d)
    q2, k2 = ops.rotary_embedding(positions, q.clone(), k.clone(), cache)
    torch.testing.assert_close(q2[0], q[0])
    cos, sin = freqs[positions].cos()[:, None], freqs[positions].sin()[:, None]
    rot = torch.cat([q[..., :4] * cos - q[..., 4:] * sin, q[..., 4:] * cos + q[..., :4] * sin], -1)
    torch.testing.assert_close(q2, rot)
    assert k2.shape == k.shape


def test_silu_and_mul() -> None:
    x = torch.randn(3, 10)
    torch.testing.assert_close(ops.silu_and_mul(x), F.silu(x[:, :5]) * x[:, 5:])
