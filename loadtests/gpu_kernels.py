"""gpu_check.py parts 1 and 2: every Triton kernel's max error against its torch reference (run
in float32), its time and achieved bandwidth against the device's copy bandwidth, next to the
reference's time.

The paged-attention batches are the test suite's (tests/support/kernel_cases.py: random data in
every unused cache slot, -1 past each block table's end, q strided in a fused QKV buffer), so the
GPU sees the cases CI checks. Import this after setting TRITON_INTERPRET (gpu_check.py does).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from gpu_shapes import Shapes
from gpu_timing import Bench, Row, fmt_time

from replica.kernels import reference

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))
from kernel_cases import PagedBatch, make_paged_batch


@dataclass
class KernelCase:
    name: str
    shape: str
    run_triton: Callable[[], object]
    run_reference: Callable[[], object]
    error: Callable[[], float]
    bytes_moved: int


def _max_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return (got.float() - expected.float()).abs().max().item()


def _on_device(batch: PagedBatch, device: torch.device) -> PagedBatch:
    """The batch on `device`, its q still a strided view into a fused QKV buffer."""
    tokens, heads, dim = batch.q.shape
    qkv = torch.empty(tokens, batch.q.stride(0), dtype=batch.q.dtype, device=device)
    q = qkv[:, : heads * dim].view(tokens, heads, dim)
    q.copy_(batch.q)
    return dataclasses.replace(
        batch,
        q=q,
        k_cache=batch.k_cache.to(device),
        v_cache=batch.v_cache.to(device),
        block_tables=batch.block_tables.to(device),
        seq_lens=batch.seq_lens.to(device),
        query_start_loc=batch.query_start_loc.to(device),
    )


def _attention_cases(s: Shapes, device: torch.device, dtype: torch.dtype) -> list[KernelCase]:
    from replica.kernels import triton_ops

    ctx = s.decode_context
    layouts = {f"decode b{b} ctx{ctx}": ([ctx - 1] * b, [1] * b) for b in s.decode_batches} | {
        f"decode b1 ctx{s.split_context} (split-KV)": ([s.split_context - 1], [1]),
        f"mixed: 2 prefill chunks on prefixes + {s.mixed_decodes} decodes": (
            [ctx // 2, 0] + [ctx] * s.mixed_decodes,
            [ctx // 2, ctx // 4] + [1] * s.mixed_decodes,
        ),
    }
    cases = []
    for seed, (name, (cached, new)) in enumerate(layouts.items(), start=1):
        batch = make_paged_batch(
            cached, new, num_q_heads=s.heads, num_kv_heads=s.kv_heads, head_dim=s.head_dim,
            block_size=s.block_size, dtype=dtype, seed=seed,
        )  # fmt: skip
        batch = _on_device(batch, device)
        args, kwargs = batch.args(), batch.kwargs()
        kv_read = int(batch.seq_lens.sum()) * s.kv_heads * s.head_dim * 2
        moved = (kv_read + 2 * batch.q.numel()) * batch.q.element_size()
        fp32_args = tuple(a.float() if a.is_floating_point() else a for a in args[:3]) + args[3:]

        def error(args=args, kwargs=kwargs, fp32_args=fp32_args) -> float:
            expected = reference.paged_attention(*fp32_args, **kwargs)
            return _max_error(triton_ops.paged_attention(*args, **kwargs), expected)

        cases.append(
            KernelCase(
                f"paged_attention {name}",
                f"Hq{s.heads} Hkv{s.kv_heads} D{s.head_dim} bs{s.block_size}",
                lambda args=args, kwargs=kwargs: triton_ops.paged_attention(*args, **kwargs),
                lambda args=args, kwargs=kwargs: reference.paged_attention(*args, **kwargs),
                error,
                moved,
            )
        )
    return cases


def _layer_cases(s: Shapes, device: torch.device, dtype: torch.dtype) -> list[KernelCase]:
    from replica.kernels import triton_ops
    from replica.models.rope import cos_sin_cache

    gen = torch.Generator().manual_seed(2)
    T = s.kernel_tokens

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device, dtype)

    elem = torch.tensor([], dtype=dtype).element_size()
    cases = []

    # store_kv: T new tokens into shuffled slots of a cache with room for them.
    num_blocks = math.ceil(T / s.block_size) + 1
    key, value = rand(T, s.kv_heads, s.head_dim), rand(T, s.kv_heads, s.head_dim)
    slots = torch.randperm(num_blocks * s.block_size, generator=gen)[:T].to(device)
    caches = [rand(num_blocks, s.block_size, s.kv_heads, s.head_dim) for _ in range(2)]
    caches += [c.clone() for c in caches]

    def store_error() -> float:
        triton_ops.store_kv(key, value, caches[0], caches[1], slots)
        reference.store_kv(key, value, caches[2], caches[3], slots)
        return max(_max_error(caches[0], caches[2]), _max_error(caches[1], caches[3]))

    cases.append(
        KernelCase(
            "store_kv",
            f"T{T} Hkv{s.kv_heads} D{s.head_dim}",
            lambda: triton_ops.store_kv(key, value, caches[0], caches[1], slots),
            lambda: reference.store_kv(key, value, caches[2], caches[3], slots),
            store_error,
            4 * key.numel() * elem,
        )
    )

    x, residual = rand(T, s.hidden), rand(T, s.hidden)
    weight = (1 + 0.1 * torch.randn(s.hidden, generator=gen)).to(device, dtype)

    def norm_error() -> float:
        got, got_res = triton_ops.rms_norm(x, weight, 1e-5, residual)
        expected, expected_res = reference.rms_norm(
            x.float(), weight.float(), 1e-5, residual.float()
        )
        return max(_max_error(got, expected), _max_error(got_res, expected_res))

    cases.append(
        KernelCase(
            "rms_norm + residual",
            f"T{T} H{s.hidden}",
            lambda: triton_ops.rms_norm(x, weight, 1e-5, residual),
            lambda: reference.rms_norm(x, weight, 1e-5, residual),
            norm_error,
            4 * x.numel() * elem,
        )
    )

    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    table = cos_sin_cache(s.head_dim, 500000.0, scaling, 16384).to(device)
    positions = torch.randint(0, 16384, (T,), generator=gen).to(device)
    q, k = rand(T, s.heads, s.head_dim), rand(T, s.kv_heads, s.head_dim)

    def rope_error() -> float:
        got_q, got_k = triton_ops.rotary_embedding(positions, q.clone(), k.clone(), table)
        exp_q, exp_k = reference.rotary_embedding(positions, q.float(), k.float(), table)
        return max(_max_error(got_q, exp_q), _max_error(got_k, exp_k))

    cases.append(
        KernelCase(
            "rotary (llama3 table)",
            f"T{T} Hq{s.heads} Hkv{s.kv_heads} D{s.head_dim}",
            lambda: triton_ops.rotary_embedding(positions, q, k, table),
            lambda: reference.rotary_embedding(positions, q, k, table),
            rope_error,
            2 * (q.numel() + k.numel()) * elem + T * s.head_dim * 4,
        )
    )

    gate_up = rand(T, 2 * s.intermediate)
    cases.append(
        KernelCase(
            "silu_and_mul",
            f"T{T} I{s.intermediate}",
            lambda: triton_ops.silu_and_mul(gate_up),
            lambda: reference.silu_and_mul(gate_up),
            lambda: _max_error(
                triton_ops.silu_and_mul(gate_up), reference.silu_and_mul(gate_up.float())
            ),
            3 * T * s.intermediate * elem,
        )
    )
    return cases


def check_kernels(s: Shapes, bench: Bench, bandwidth: float, dtype: torch.dtype) -> list[Row]:
    rows = []
    for case in _layer_cases(s, bench.device, dtype) + _attention_cases(s, bench.device, dtype):
        error = case.error()
        seconds = bench.time(case.run_triton)
        reference_seconds = bench.time(case.run_reference)
        achieved = case.bytes_moved / seconds
        rows.append(
            {
                "kernel": case.name,
                "shape": case.shape,
                "max err vs fp32 ref": f"{error:.2e}",
                "triton": fmt_time(seconds),
                "GB/s": f"{achieved / 1e9:,.0f}",
                "% copy BW": f"{100 * achieved / bandwidth:.0f}%",
                "torch ref": fmt_time(reference_seconds),
                "speedup": f"{reference_seconds / seconds:.1f}x",
            }
        )
    return rows
