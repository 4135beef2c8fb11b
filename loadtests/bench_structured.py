"""Offline structured-output throughput: 64 requests constrained to JSON schemas against the same
64 requests free, same prompts, same token counts, one run each; and grammar compile time per schema.

    .venv/bin/python loadtests/bench_structured.py                 # the factory's tiny Llama
    .venv/bin/python loadtests/bench_structured.py --size small    # the ~100M benchmark Llama

Constrained requests are sampled (temperature 1, seeded) under the five schemas of
structured_schemas.py in turn and end where their grammar ends; each free request then runs to
exactly as many tokens (ignore_eos), so both runs generate the same tokens in the same batch
shapes and the ratio measures what the grammar costs: mask fill, mask apply and matcher updates.
The three runs alternate `--repeat` times and each keeps its best wall time and its best CPU time
of this process (a shared machine's load moves single wall-clock runs by 2x; with --threads 1 the
CPU time is the steadier figure).
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from structured_schemas import SCHEMAS

from replica import LLM, SamplingParams
from replica.engine.structured import GrammarCompiler, StructuredOutput


def compile_times(llm: LLM) -> list[tuple[str, float]]:
    """Cold compile of each schema (and json_object) by a fresh compiler; first row: its setup."""
    engine = llm.engine
    grammars = GrammarCompiler(engine.tokenizer, engine.vocab_size, engine.eos_token_ids)
    specs = [(name, StructuredOutput.json_schema(s)) for name, s in SCHEMAS.items()]
    specs.append(("json_object", StructuredOutput.json_object()))
    start = time.perf_counter()
    grammars.compile(StructuredOutput.json_schema({"type": "boolean"}))
    rows = [("(setup: tokenizer tables)", time.perf_counter() - start)]
    for name, spec in specs:
        start = time.perf_counter()
        grammars.compile(spec)
        rows.append((name, time.perf_counter() - start))
    return rows


def run(
    llm: LLM, prompts: list[list[int]], params: list[SamplingParams]
) -> tuple[float, float, list[list[int]]]:
    """Wall seconds, CPU seconds of this process and each request's output tokens."""
    start, cpu = time.perf_counter(), time.process_time()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start, time.process_time() - cpu
    return *elapsed, [o.outputs[0].token_ids for o in outs]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="model folder (default: the factory's --size Llama)")
    parser.add_argument("--size", default="tiny", choices=["tiny", "small"])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=400)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model:
        path = Path(args.model)
    else:
        from fleet.model_factory import cached_model

        path = cached_model("llama", args.size)
    llm = LLM(
        str(path), dtype=args.dtype, max_model_len=args.prompt_len + args.max_tokens + 8,
        max_num_seqs=args.num_requests, enable_prefix_caching=False,
    )  # fmt: skip
    print(f"model {path.name}, vocab {llm.engine.vocab_size}, {args.dtype}, "
          f"torch threads {torch.get_num_threads()}\n")  # fmt: skip
    print(f"{'compile':<26} {'ms':>8}")
    for name, seconds in compile_times(llm):
        print(f"{name:<26} {seconds * 1e3:8.1f}")

    gen = torch.Generator().manual_seed(0)
    vocab = llm.engine.vocab_size
    prompts = [torch.randint(8, vocab, (args.prompt_len,), generator=gen).tolist()
               for _ in range(args.num_requests)]  # fmt: skip
    names = [list(SCHEMAS)[i % len(SCHEMAS)] for i in range(args.num_requests)]
    constrained = [
        SamplingParams(temperature=1.0, seed=i, max_tokens=args.max_tokens,
                       structured=StructuredOutput.json_schema(SCHEMAS[name]))
        for i, name in enumerate(names)
    ]  # fmt: skip
    run(llm, prompts[:4], constrained[:4])  # warm-up: compiles the grammars, warms torch
    *_, c_tokens = run(llm, prompts, constrained)
    lengths = [len(t) for t in c_tokens]
    free = [SamplingParams(temperature=1.0, seed=i, max_tokens=n, ignore_eos=True)
            for i, n in enumerate(lengths)]  # fmt: skip
    half = args.num_requests // 2
    runs = {
        "free": free,
        "constrained": constrained,
        "half and half": constrained[:half] + free[half:],
    }
    best = {label: [float("inf"), float("inf")] for label in runs}
    for _ in range(args.repeat):
        for label, params in runs.items():
            wall, cpu, tokens = run(llm, prompts, params)
            assert [len(t) for t in tokens] == lengths  # seeded: the same answers every time
            best[label] = [min(best[label][0], wall), min(best[label][1], cpu)]
    total = sum(lengths)
    print(f"\n{'run (' + str(args.num_requests) + ' requests)':<22} {'tokens':>7} {'wall s':>7} "
          f"{'tok/s':>7} {'vs free':>7} {'CPU s':>6} {'tok/CPU s':>9} {'vs free':>7}")  # fmt: skip
    free_wall, free_cpu = best["free"]
    for label, (wall, cpu) in best.items():
        print(f"{label:<22} {total:7d} {wall:7.2f} {total / wall:7.0f} {free_wall / wall:7.0%} "
              f"{cpu:6.2f} {total / cpu:9.0f} {free_cpu / cpu:7.0%}")  # fmt: skip
    print(f"\noutput lengths: min {min(lengths)}, mean {total / len(lengths):.0f}, "
          f"max {max(lengths)} tokens")  # fmt: skip


if __name__ == "__main__":
    main()
