"""Output tokens/s through the replica's HTTP server against the offline engine, same requests, one run.

    .venv/bin/python loadtests/bench_replica.py --rounds 3   # 64 x (128 in, 128 out), `small`, bf16

Requests and engine settings are the engine benchmark's (loadtests/bench_engine.py). The offline
number is `LLM.generate` on all prompts at once in this process. The HTTP number is a
`python -m replica` subprocess (as deployed) fed the same prompts as 64 concurrent streaming
/v1/completions requests by an aiohttp client that parses only the final usage chunk. Both are
greedy with ignore_eos, so both generate exactly requests x output-len tokens. The gap between
them is what the HTTP layer costs: parsing, SSE framing, the client, and sharing the CPU with the
event loop. On a shared machine runs vary by +-10-20%: `--rounds` alternates the modes and keeps
each one's best.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson
import torch
from bench_engine import make_prompts

from fleet.model_factory import cached_model
from replica import LLM, SamplingParams


@dataclass
class Result:
    mode: str
    seconds: float
    output_tokens: int
    ttft_p50_s: float | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds


def engine_kwargs(args: argparse.Namespace) -> dict:
    """The engine benchmark's settings, for both sides."""
    return dict(
        dtype=args.dtype,
        device="cpu",
        max_model_len=args.prompt_len + args.output_len + 16,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=False,
    )


def server_flags(args: argparse.Namespace) -> list[str]:
    flags = []
    for name, value in engine_kwargs(args).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else flag.replace("--", "--no-", 1))
        else:
            flags += [flag, str(value)]
    return flags


def run_offline(model: Path, prompts: list[list[int]], args: argparse.Namespace) -> Result:
    seconds, tokens = _time_generate(model, prompts, args)
    gc.collect()
    return Result("offline LLM.generate", seconds, tokens)


def _time_generate(
    model: Path, prompts: list[list[int]], args: argparse.Namespace
) -> tuple[float, int]:
    """A fresh engine (empty prefix cache), a warm-up on other prompts, then the timed batch."""
    llm = LLM(str(model), **engine_kwargs(args))
    warmup = make_prompts(llm.engine.vocab_size, 2, args.prompt_len, seed=99)
    llm.generate(warmup, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    return time.perf_counter() - start, sum(len(o.outputs[0].token_ids) for o in outputs)


async def _stream_one(session: aiohttp.ClientSession, url: str, body: bytes) -> tuple[int, float]:
    """(completion tokens from the usage chunk, time to first chunk)."""
    start = time.perf_counter()
    first = None
    last_data = b""
    async with session.post(url, data=body, headers={"content-type": "application/json"}) as r:
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {await r.text()}")
        async for line in r.content:
            if line.startswith(b"data: "):
                if first is None:
                    first = time.perf_counter() - start
                if line.strip() != b"data: [DONE]":
                    last_data = line
    usage = orjson.loads(last_data[6:])["usage"]
    return usage["completion_tokens"], first or 0.0


def _body(prompt: list[int], max_tokens: int) -> bytes:
    return orjson.dumps({
        "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
        "stream": True, "stream_options": {"include_usage": True},
    })  # fmt: skip


async def _load(
    url: str, prompts: list[list[int]], warmup: list[int], output_len: int
) -> tuple[float, list]:
    bodies = [_body(p, output_len) for p in prompts]
    connector = aiohttp.TCPConnector(limit=len(prompts))
    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await _stream_one(session, url, _body(warmup, 4))
        start = time.perf_counter()
        results = await asyncio.gather(*(_stream_one(session, url, b) for b in bodies))
        return time.perf_counter() - start, results


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_http(model: Path, prompts: list[list[int]], vocab: int, args: argparse.Namespace) -> Result:
    port = _free_port()
    cmd = [sys.executable, "-m", "replica", "--model", str(model), "--port", str(port),
           "--log-level", "warning", *server_flags(args)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    server = subprocess.Popen(cmd, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(base, server)
        warmup = make_prompts(vocab, 1, args.prompt_len, seed=99)[0]
        url = f"{base}/v1/completions"
        seconds, results = asyncio.run(_load(url, prompts, warmup, args.output_len))
    finally:
        server.terminate()
        server.wait(60)
    ttft = statistics.median(r[1] for r in results)
    return Result(
        f"HTTP, {len(prompts)} concurrent streams", seconds, sum(r[0] for r in results), ttft
    )


def _wait_healthy(base: str, server: subprocess.Popen) -> None:
    async def probe() -> bool:
        try:
            async with aiohttp.ClientSession() as s, s.get(f"{base}/health") as r:
                return r.status == 200
        except aiohttp.ClientError:
            return False

    deadline = time.monotonic() + 300
    while not asyncio.run(probe()):
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the replica did not become healthy")
        time.sleep(0.5)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model folder (default: the factory's `small` Llama)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--threads", type=int, help="torch threads for both sides (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=1, help="repeat all modes; best of each counts")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = Path(args.model) if args.model else cached_model("llama", "small")
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(model).vocab_size
    prompts = make_prompts(vocab, args.num_prompts, args.prompt_len, args.seed)
    print(f"model {model} ({args.dtype}), {args.num_prompts} requests x ({args.prompt_len} "
          f"prompt, {args.output_len} output) tokens, greedy, ignore_eos, torch threads "
          f"{torch.get_num_threads()}; the two modes run in turn, {args.rounds} round(s)\n")  # fmt: skip
    print(f"{'round':>5} {'mode':<30} {'tok/s':>8} {'seconds':>8} {'TTFT p50':>9} {'load avg':>8}")
    best: dict[str, Result] = {}
    for round_ in range(1, args.rounds + 1):
        for run in (
            lambda: run_offline(model, prompts, args),
            lambda: run_http(model, prompts, vocab, args),
        ):
            r = run()
            ttft = f"{r.ttft_p50_s:.2f} s" if r.ttft_p50_s is not None else "-"
            print(f"{round_:>5} {r.mode:<30} {r.tokens_per_s:>8.1f} {r.seconds:>8.2f} {ttft:>9} "
                  f"{os.getloadavg()[0]:>8.1f}", flush=True)  # fmt: skip
            if r.mode not in best or r.tokens_per_s > best[r.mode].tokens_per_s:
                best[r.mode] = r
    offline, http = best.values()
    print(f"\nbest of {args.rounds}: HTTP {http.tokens_per_s:.1f} tok/s = "
          f"{http.tokens_per_s / offline.tokens_per_s:.1%} of offline LLM.generate "
          f"({offline.tokens_per_s:.1f}; target >= 85%)")  # fmt: skip


if __name__ == "__main__":
    main()
