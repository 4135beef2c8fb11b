"""Offline throughput: our engine against transformers' `generate` (static batches) and its
continuous batching (`generate_batch`), same model, same requests, in one run.

    .venv/bin/python loadtests/bench_engine.py                     # the issue's setup
    .venv/bin/python loadtests/bench_engine.py --num-prompts 16 --prompt-len 32 --output-len 32

Requests: random token prompts (seeded), greedy, every request runs to exactly --output-len tokens
(ignore_eos for us, eos_token_id=None for transformers). The default model is the factory's `small`
(~100M) Llama, built once under ~/.cache/fleetserve. Prints output tokens/s per engine and dtype and
the ratios to transformers.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def make_prompts(vocab: int, num: int, length: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    # Stay clear of the few special tokens at the start of the factory vocabulary.
    return [torch.randint(8, vocab, (length,), generator=gen).tolist() for _ in range(num)]


def timed(run: Callable[[], list[list[int]]]) -> tuple[float, list[list[int]]]:
    """Seconds taken and the generated token ids per prompt, in prompt order."""
    gc.collect()
    start = time.perf_counter()
    outputs = run()
    return time.perf_counter() - start, outputs


def bench_ours(path: Path, dtype: str, prompts: list[list[int]], args) -> tuple[float, int]:
    from replica import LLM, SamplingParams

    llm = LLM(
        str(path), dtype=dtype, max_model_len=args.prompt_len + args.output_len + 16,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=False,
    )  # fmt: skip
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    warm = make_prompts(llm.engine.vocab_size, 2, args.prompt_len, seed=99)
    llm.generate(warm, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))

    def run() -> list[list[int]]:
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]

    result = timed(run)
    return result


def bench_hf_static(path: Path, dtype: str, prompts: list[list[int]], args) -> tuple[float, int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    batch = args.hf_batch

    def generate(chunk: list[list[int]], new_tokens: int) -> list[list[int]]:
        ids = torch.tensor(chunk)
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0,
        )  # fmt: skip
        return out[:, ids.shape[1] :].tolist()

    with torch.inference_mode():
        generate(prompts[:2], 4)
        result = timed(
            lambda: [
                ids
                for i in range(0, len(prompts), batch)
                for ids in generate(prompts[i : i + batch], args.output_len)
            ]
        )
    return result


def bench_hf_batch(path: Path, dtype: str, prompts: list[list[int]], args) -> tuple[float, int]:
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    gen_config = GenerationConfig(
        max_new_tokens=args.output_len, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    cb_config = ContinuousBatchingConfig(num_blocks=args.hf_cache_blocks)

    def run() -> list[list[int]]:
        outs = model.generate_batch(
            prompts, generation_config=gen_config, continuous_batching_config=cb_config
        )
        by_prompt = {tuple(o.prompt_ids): list(o.generated_tokens) for o in outs.values()}
        return [by_prompt.get(tuple(p), []) for p in prompts]

    result = timed(run)
    return result


ENGINES: dict[str, Callable] = {
    "fleetserve": bench_ours,
    "hf generate (static)": bench_hf_static,
    "hf generate_batch": bench_hf_batch,
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="model folder (default: the factory's small Llama)")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument(
        "--hf-batch", type=int, default=16, help="static batch size for hf generate"
    )
    parser.add_argument("--hf-cache-blocks", type=int, default=128, help="generate_batch KV blocks")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model:
        path = Path(args.model)
    else:
        from fleet.model_factory import cached_model

        path = cached_model("llama", "small")
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(path).vocab_size
    prompts = make_prompts(vocab, args.num_prompts, args.prompt_len, args.seed)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    print(
        f"model {path} | {args.num_prompts} prompts x {args.prompt_len} in / {args.output_len} out, "
        f"greedy | torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}"
    )
    rows = []
    for dtype in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
        rates: dict[str, float] = {}
        reference: list[list[int]] | None = None
        for name in engines:
            load_before = os.getloadavg()[0]
            seconds, outputs = ENGINES[name](path, dtype, prompts, args)
            load = f"load {load_before:.1f}->{os.getloadavg()[0]:.1f}"
            tokens = sum(len(o) for o in outputs)
            rates[name] = tokens / seconds
            reference = reference or outputs
            same = sum(o == r for o, r in zip(outputs, reference, strict=True))
            rows.append((dtype, name, tokens, seconds, rates[name], same, load))
            print(
                f"  {dtype:9s} {name:22s} {tokens:6d} tokens in {seconds:7.2f} s "
                f"= {rates[name]:8.1f} tok/s ({same}/{len(prompts)} outputs as {engines[0]}, {load})",
                flush=True,
            )
        for name in engines[1:]:
            print(f"  {dtype:9s} {engines[0]} / {name}: {rates[engines[0]] / rates[name]:.2f}x")
    print()
    header = f"same outputs as {engines[0]}"
    print(f"| dtype | engine | output tokens | seconds | tokens/s | {header} | machine load |")
    print("|---|---|---:|---:|---:|---:|---|")
    for dtype, name, tokens, seconds, rate, same, load in rows:
        print(
            f"| {dtype} | {name} | {tokens} | {seconds:.2f} | {rate:.1f} "
            f"| {same}/{len(prompts)} | {load} |"
        )


if __name__ == "__main__":
    main()
