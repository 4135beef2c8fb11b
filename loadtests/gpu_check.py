"""One GPU check of the kernels and the engine, printed as tables (< 8 minutes on one H100).

1. every Triton kernel's max error against its torch reference (reference run in float32);
2. each kernel's time (CUDA events after warm-up, L2 flushed, random inputs) and achieved
   bandwidth against the device's measured copy bandwidth, next to the torch reference's time;
3. the engine's decode step time for a Llama-3-8B-shaped model with random bf16 weights at batch
   1, 32 and 128 (context 1,024) against the memory floor (weight bytes + KV bytes read per step,
   over the measured bandwidth), and output tokens/s for 256 requests (512 in / 256 out) against
   transformers' `generate` on the same GPU, same weights, same prompts.

Nothing is downloaded: the model is built from a LlamaConfig with random weights and saved once
as a Hugging Face folder that both the engine and transformers load. Imports only torch,
transformers, tokenizers, `replica` and tests/support/kernel_cases.py (no server packages).
Parts 1 and 2 are gpu_kernels.py, part 3 gpu_engine.py. Run from the repository root:

    PYTHONPATH=. python loadtests/gpu_check.py            # on the GPU box
    python loadtests/gpu_check.py --smoke                 # tiny shapes on CPU, kernels interpreted
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

SMOKE = "--smoke" in sys.argv
if SMOKE:
    # Must precede the first import of the Triton kernel modules.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_engine import (  # noqa: E402
    engine_decode_steps,
    engine_throughput,
    release,
    transformers_throughput,
    write_model,
)
from gpu_kernels import check_kernels  # noqa: E402
from gpu_shapes import LLAMA3_8B, TINY  # noqa: E402
from gpu_timing import Bench, Row  # noqa: E402


def print_table(title: str, rows: list[Row]) -> None:
    print(f"\n## {title}")
    if not rows:
        print("(nothing measured)")
        return
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(r.get(c, "")) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    print("  ".join("-" * widths[c] for c in columns))
    for row in rows:
        print("  ".join(row.get(c, "").ljust(widths[c]) for c in columns))
    sys.stdout.flush()


# -- main -------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--smoke", action="store_true", help="tiny shapes on CPU (kernels interpreted)"
    )
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--skip-engine", action="store_true")
    parser.add_argument("--workdir", default=None, help="where the random model folder is written")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="  (log) %(message)s")

    if args.smoke:
        s, device, dtype = TINY, torch.device("cpu"), torch.float32
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: run with --smoke for the CPU check of this script")
        s, device, dtype = LLAMA3_8B, torch.device("cuda"), torch.bfloat16
    began = time.perf_counter()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke)"
    print(f"# gpu_check on {where}: torch {torch.__version__}", end="")
    import transformers
    import triton

    print(f", triton {triton.__version__}, transformers {transformers.__version__}")

    bench = Bench(device, s.reps)
    bandwidth = bench.copy_bandwidth()
    print(f"measured device copy bandwidth: {bandwidth / 1e9:,.0f} GB/s (read + write)")
    print_table("Kernels: error, time, bandwidth", check_kernels(s, bench, bandwidth, dtype))
    print(f"[{time.perf_counter() - began:.0f} s]")
    if args.skip_engine:
        return

    workdir = Path(tempfile.mkdtemp(prefix="gpu_check-", dir=args.workdir))
    folder = workdir / "llama3-8b-shaped"
    try:
        write_model(s, folder, device, dtype)
        release(device)
        print(f"[{time.perf_counter() - began:.0f} s] wrote the random model to {folder}")
        throughput = []
        if not args.skip_transformers:
            throughput.append(transformers_throughput(s, folder, device, dtype))
            print(f"[{time.perf_counter() - began:.0f} s] transformers done")

        from replica import LLM

        llm = LLM(
            str(folder),
            dtype="bfloat16" if dtype == torch.bfloat16 else "float32",
            device=device.type,
            max_model_len=max(s.decode_context, s.prompt_len) + s.output_len + 64,
            max_num_seqs=max(s.requests, *s.decode_batches),
            **({"kernel_backend": "triton"} if args.smoke else {}),
        )
        decode_rows = engine_decode_steps(s, llm, bandwidth, bench)
        print_table(
            f"Engine decode step, {s.layers}-layer {s.hidden}-wide model ({dtype})", decode_rows
        )
        throughput.insert(0, engine_throughput(s, llm, device))
        if len(throughput) == 2:
            ours = float(throughput[0]["output tok/s"].replace(",", ""))
            theirs = float(throughput[1]["output tok/s"].replace(",", ""))
            throughput[0]["vs transformers"] = f"{ours / theirs:.1f}x"
            throughput[1]["vs transformers"] = "1.0x"
        title = f"Throughput: {s.requests} requests, {s.prompt_len} in / {s.output_len} out"
        print_table(title, throughput)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"\n[total {time.perf_counter() - began:.0f} s]")


if __name__ == "__main__":
    main()
