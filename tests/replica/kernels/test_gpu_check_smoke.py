"""loadtests/gpu_check.py runs end to end on CPU (`--smoke`: toy shapes, interpreted kernels), so
the script the GPU box runs once is known not to be broken."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def _table(out: str, title: str) -> list[dict[str, str]]:
    """Rows of the printed table whose heading starts with `title`."""
    lines = out.split(f"## {title}", 1)[1].splitlines()[1:]
    header = re.split(r"\s{2,}", lines[0].strip())
    rows = []
    for line in lines[2:]:
        if not line.strip() or line.startswith(("#", "[")):
            break
        rows.append(dict(zip(header, re.split(r"\s{2,}", line.strip()), strict=True)))
    return rows


@pytest.mark.slow
def test_gpu_check_smoke_prints_every_table(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, "loadtests/gpu_check.py", "--smoke", "--workdir", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    kernels = _table(done.stdout, "Kernels")
    names = " ".join(row["kernel"] for row in kernels)
    for kernel in ("store_kv", "rms_norm", "rotary", "silu_and_mul", "split-KV", "mixed"):
        assert kernel in names
    assert max(float(row["max err vs fp32 ref"]) for row in kernels) < 1e-4
    decode = _table(done.stdout, "Engine decode step")
    assert [row["batch"] for row in decode] == ["1", "2", "4"]
    throughput = _table(done.stdout, "Throughput")
    assert {row["what"].split(" (")[0] for row in throughput} == {
        "replica engine",
        "transformers generate",
    }
    assert not list(tmp_path.iterdir()), "the random model folder is removed afterwards"
