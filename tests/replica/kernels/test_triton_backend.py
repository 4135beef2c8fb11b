"""The Triton op set as the engine gets it: get_ops("triton") and its behaviour off the GPU."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from replica.kernels import get_ops, reference, triton_ops


def test_get_ops_triton_returns_the_triton_kernels() -> None:
    ops = get_ops("triton", device="cpu")
    assert ops.name == "triton"
    assert ops.paged_attention is triton_ops.paged_attention
    x = torch.randn(3, 16)
    torch.testing.assert_close(ops.silu_and_mul(x), reference.silu_and_mul(x))


def test_cpu_tensors_without_interpreter_fail_with_a_clear_error() -> None:
    code = (
        "import torch\n"
        "from replica.kernels import triton_ops\n"
        "triton_ops.silu_and_mul(torch.ones(2, 4))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0
    assert "TRITON_INTERPRET=1" in done.stderr and "torch backend" in done.stderr


def _greedy(model: str, backend: str, prompts: list[str]) -> tuple[list[list[int]], int]:
    """Token ids of each prompt, then of each prompt extended (served from the prefix cache)."""
    from replica import LLM, SamplingParams

    llm = LLM(
        model,
        kernel_backend=backend,
        device="cpu",
        dtype="float32",
        block_size=4,
        max_num_batched_tokens=16,  # long prompts prefill in chunks over their own prefix
    )
    assert llm.engine.ops.name == backend
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    first = llm.generate(prompts, params)
    again = llm.generate([p + " and then some more" for p in prompts], params)
    cached = sum(r.num_cached_tokens for r in again)
    return [r.outputs[0].token_ids for r in first + again], cached


def test_engine_greedy_output_same_with_triton_kernels(model_factory) -> None:
    """The engine on a tiny GQA model: interpreted Triton kernels and torch ops agree token by token
    over prefills, chunked prefills, prefix-cache hits and decodes."""
    model = str(model_factory("llama", "tiny"))
    prompts = [
        "The quick brown fox",
        "Serving large language models means batching requests and caching keys",
        "def fibonacci(n: int) -> int:",
    ]
    expected, cached_torch = _greedy(model, "torch", prompts)
    got, cached_triton = _greedy(model, "triton", prompts)
    assert cached_torch > 0 and cached_triton == cached_torch
    assert got == expected
