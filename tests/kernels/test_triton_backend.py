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
