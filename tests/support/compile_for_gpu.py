"""Compile every Triton kernel for a real GPU target on a machine without one.

The interpreter accepts code the compiler rejects (non-constexpr globals, type mismatches in
loops) and says nothing about registers, so this compiles each kernel with the configurations the
heuristics pick for a Llama-3-8B shape and prints, as JSON lines, registers and spilled bytes read
back from the cubin with the cuobjdump that Triton ships. Run with TRITON_INTERPRET unset.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from replica.kernels import (
    triton_activation,
    triton_attention,
    triton_cache,
    triton_norm,
    triton_rotary,
)

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def _resources(cubin: bytes) -> tuple[int, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [os.path.join(BIN, "cuobjdump"), "-res-usage", f.name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", out)
    assert found, out
    return int(found.group(1)), int(found.group(2))


def compile_kernel(
    kernel, pointers: dict[str, str], constexprs: dict, floats=(), arch: int = 90, **options
):
    """Compile for sm_<arch>; args not named are i32 scalars. Returns (registers, spilled bytes)."""
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = "*" + pointers[name]
        else:
            signature[name] = "fp32" if name in floats else "i32"
    compiled = triton.compile(
        ASTSource(kernel, signature, constexprs),
        target=GPUTarget("cuda", arch, 32),
        options=options,
    )
    return _resources(compiled.asm["cubin"])


def _attention_cases():
    pointers = dict.fromkeys(("q_ptr", "k_cache_ptr", "v_cache_ptr", "out_ptr"), "bf16")
    pointers.update(
        dict.fromkeys(("block_tables_ptr", "seq_lens_ptr", "query_start_loc_ptr"), "i32")
    )
    pointers.update(
        dict.fromkeys(("partial_out_ptr", "partial_max_ptr", "partial_sum_ptr"), "fp32")
    )
    llama = dict(num_kv_heads=8, group=4, head_dim=128)  # Llama-3-8B
    small = dict(num_kv_heads=2, group=7, head_dim=64)  # Qwen2-0.5B
    cases = {
        "decode b1 ctx1024 (split)": (llama, dict(num_seqs=1, max_query_len=1), 90),
        "decode b128": (llama, dict(num_seqs=128, max_query_len=1), 90),
        "prefill 12 tokens": (llama, dict(num_seqs=4, max_query_len=12), 90),
        "prefill 512 tokens": (llama, dict(num_seqs=4, max_query_len=512), 90),
        "decode b1 D64 G7 (split)": (small, dict(num_seqs=1, max_query_len=1), 90),
        "prefill 512 D64 G7": (small, dict(num_seqs=4, max_query_len=512), 90),
        "decode b128 sm_80": (llama, dict(num_seqs=128, max_query_len=1), 80),
        "prefill 512 sm_80": (llama, dict(num_seqs=4, max_query_len=512), 80),
    }
    for name, (model, shape, arch) in cases.items():
        config = triton_attention.choose_config(
            max_seq_len=1024,
            num_sms=132 if arch == 90 else 108,
            capability=arch,
            **model,
            **shape,
        )
        head_dim = model["head_dim"]
        constexprs = dict(
            HEAD_DIM=head_dim,
            BLOCK_SIZE=16,
            GROUP=model["group"],
            BLOCK_Q=config.block_q,
            BLOCK_M=config.block_m,
            BLOCK_N=config.block_n,
            BLOCK_D=head_dim,
            SPLIT_KV=config.num_splits > 1,
            ONE_QBLOCK_PER_SEQ=shape["max_query_len"] <= config.block_q,
            WIDE_OFFSETS=False,
            UPCAST=False,
            DOT_PRECISION="tf32",
        )
        yield (
            f"paged_attention {name}",
            triton_attention._paged_attention_kernel,
            pointers,
            constexprs,
            ("scale_log2",),
            dict(arch=arch, num_warps=config.num_warps, num_stages=config.num_stages),
        )
    yield (
        "merge_splits",
        triton_attention._merge_splits_kernel,
        dict(
            out_ptr="bf16", partial_out_ptr="fp32", partial_max_ptr="fp32", partial_sum_ptr="fp32"
        ),
        dict(BLOCK_S=16, BLOCK_D=128),
        (),
        dict(num_warps=4),
    )


def _split(shape: dict[str, int]) -> tuple[dict[str, int], dict[str, int]]:
    """A module's launch_shape -> (constexprs, compile options)."""
    constexprs = {k: v for k, v in shape.items() if k != "num_warps"}
    return constexprs, {"num_warps": shape["num_warps"]}


def _layer_cases():
    """Llama-3-8B shapes: 8 KV heads of 128, hidden 4096, intermediate 14336; a q/k norm too."""
    kv_consts, kv_options = _split(triton_cache.launch_shape(8, 128))
    yield (
        "store_kv",
        triton_cache._store_kv_kernel,
        dict.fromkeys(("key_ptr", "value_ptr", "k_cache_ptr", "v_cache_ptr"), "bf16")
        | {"slot_ptr": "i64"},
        kv_consts,
        (),
        kv_options,
    )
    norm_pointers = dict.fromkeys(
        ("x_ptr", "residual_ptr", "weight_ptr", "out_ptr", "residual_out_ptr"), "bf16"
    )
    for name, width, residual in (("rms_norm+residual", 4096, True), ("rms_norm head", 128, False)):
        consts, options = _split(triton_norm.launch_shape(width))
        yield (
            name,
            triton_norm._rms_norm_kernel,
            norm_pointers,
            consts | {"HAS_RESIDUAL": residual},
            ("eps",),
            options,
        )
    rope_consts, rope_options = _split(triton_rotary.launch_shape(64))
    yield (
        "rotary",
        triton_rotary._rotary_kernel,
        dict(positions_ptr="i64", q_ptr="bf16", k_ptr="bf16", cache_ptr="fp32"),
        rope_consts,
        (),
        rope_options,
    )
    silu_consts, silu_options = _split(triton_activation.launch_shape(14336))
    yield (
        "silu_and_mul",
        triton_activation._silu_and_mul_kernel,
        dict(x_ptr="bf16", out_ptr="bf16"),
        silu_consts,
        (),
        silu_options,
    )


def main() -> None:
    for name, kernel, pointers, constexprs, floats, options in (
        *_attention_cases(),
        *_layer_cases(),
    ):
        registers, spilled = compile_kernel(kernel, pointers, constexprs, floats, **options)
        print(json.dumps({"kernel": name, "registers": registers, "spilled_bytes": spilled}))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
