"""Every kernel compiles for an H100 (sm_90; attention for an A100 too) with the configurations the
heuristics pick.

Catches what the interpreter lets through (Triton-only rules, type errors in loops) and register
spills, without a GPU: Triton's bundled ptxas and cuobjdump do the work.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

SCRIPT = Path(__file__).resolve().parents[2] / "support" / "compile_for_gpu.py"
NVIDIA_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


@pytest.mark.skipif(
    not (NVIDIA_BIN / "ptxas").exists(), reason="this Triton build ships no ptxas/cuobjdump"
)
def test_kernels_compile_for_sm90_without_spills() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    done = subprocess.run(
        [sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(line) for line in done.stdout.splitlines()]
    names = {r["kernel"] for r in results}
    expected = {"store_kv", "rms_norm+residual", "rms_norm head", "rotary", "silu_and_mul"}
    assert expected | {"merge_splits"} <= names
    assert sum(name.startswith("paged_attention") for name in names) == 8
    spilling = [r for r in results if r["spilled_bytes"] > 0]
    assert not spilling, spilling
