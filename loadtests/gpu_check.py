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
transformers, tokenizers, `replica` and tests/kernels/kernel_cases.py (no server packages). Run from the repository root:

    PYTHONPATH=. python loadtests/gpu_check.py            # on the GPU box
    python loadtests/gpu_check.py --smoke                 # tiny shapes on CPU, kernels interpreted
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SMOKE = "--smoke" in sys.argv
if SMOKE:
    # Must precede the first import of the Triton kernel modules.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from replica.kernels import reference  # noqa: E402

# The test suite's paged-attention batches (random data in every unused cache slot, -1 past each
# block table's end, q strided in a fused QKV buffer), so the GPU sees the cases CI checks.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "kernels"))
from kernel_cases import PagedBatch, make_paged_batch  # noqa: E402

Row = dict[str, str]


@dataclass(frozen=True)
class Shapes:
    """Model and workload sizes: Llama-3-8B on the GPU, a toy under --smoke."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    block_size: int
    kernel_tokens: int  # rows for the row-wise kernels
    decode_batches: tuple[int, ...]
    decode_context: int
    decode_steps: int
    split_context: int  # a long context at batch 1 (the split-KV path)
    mixed_decodes: int  # decodes riding along two prefill chunks in the mixed-batch case
    requests: int
    prompt_len: int
    output_len: int
    reps: int


LLAMA3_8B = Shapes(
    hidden=4096,
    intermediate=14336,
    layers=32,
    heads=32,
    kv_heads=8,
    head_dim=128,
    vocab=128256,
    block_size=16,
    kernel_tokens=4096,
    decode_batches=(1, 32, 128),
    decode_context=1024,
    decode_steps=30,
    split_context=8192,
    mixed_decodes=30,
    requests=256,
    prompt_len=512,
    output_len=256,
    reps=50,
)
TINY = Shapes(
    hidden=64,
    intermediate=128,
    layers=2,
    heads=4,
    kv_heads=2,
    head_dim=16,
    vocab=512,
    block_size=16,
    kernel_tokens=24,
    decode_batches=(1, 2, 4),
    decode_context=32,
    decode_steps=3,
    split_context=64,
    mixed_decodes=3,
    requests=4,
    prompt_len=16,
    output_len=8,
    reps=1,
)


# -- timing -----------------------------------------------------------------------------------


class Bench:
    """Times callables on one device: CUDA events around each call after warm-up, with L2
    flushed before each; on CPU, perf_counter."""

    def __init__(self, device: torch.device, reps: int) -> None:
        self.device, self.reps = device, reps
        self.cuda = device.type == "cuda"
        self._flush = (
            torch.empty(256 << 20, dtype=torch.uint8, device=device) if self.cuda else None
        )

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def time(self, fn: Callable[[], object], warmup: int = 3) -> float:
        """Median seconds per call."""
        for _ in range(warmup):
            fn()
        self.sync()
        samples = []
        for _ in range(self.reps):
            if self._flush is not None:
                self._flush.random_(0, 255)
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - t0)
        return statistics.median(samples)

    def copy_bandwidth(self) -> float:
        """Bytes/s of a device-to-device copy (read + write counted), the roofline we compare to."""
        numel = (1 << 30) if self.cuda else (64 << 20)
        src = torch.randn(numel // 4, device=self.device)
        dst = torch.empty_like(src)
        return 2 * numel / self.time(lambda: dst.copy_(src))


def _fmt_time(seconds: float) -> str:
    return f"{seconds * 1e6:,.1f} us" if seconds < 1e-2 else f"{seconds * 1e3:,.2f} ms"


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


# -- part 1 and 2: kernels --------------------------------------------------------------------


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
                "triton": _fmt_time(seconds),
                "GB/s": f"{achieved / 1e9:,.0f}",
                "% copy BW": f"{100 * achieved / bandwidth:.0f}%",
                "torch ref": _fmt_time(reference_seconds),
                "speedup": f"{reference_seconds / seconds:.1f}x",
            }
        )
    return rows


# -- part 3: the engine on an 8B-shaped model ---------------------------------------------------


def write_model(s: Shapes, folder: Path, device: torch.device, dtype: torch.dtype) -> None:
    """A random-weight Llama folder (config, safetensors, a word-level tokenizer over every id)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    config = LlamaConfig(
        vocab_size=s.vocab,
        hidden_size=s.hidden,
        intermediate_size=s.intermediate,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        head_dim=s.head_dim,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(folder)
    del model
    vocab = {f"t{i}": i for i in range(s.vocab)}
    tok = Tokenizer(WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t0").save_pretrained(
        folder
    )


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _prompts(s: Shapes, count: int, length: int, seed: int) -> list[list[int]]:
    """Distinct random prompts (no shared prefix: nothing is served from the prefix cache)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, s.vocab, (count, length), generator=gen).tolist()


def _generate_all(model, prompts: torch.Tensor, batch: int, new_tokens: int) -> int:
    """transformers' generate over the prompts in batches; returns the tokens it produced."""
    produced = 0
    for first in range(0, prompts.shape[0], batch):
        ids = prompts[first : first + batch]
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        produced += (out.shape[1] - ids.shape[1]) * ids.shape[0]
    return produced


def transformers_throughput(s: Shapes, folder: Path, device: torch.device, dtype) -> Row:
    """All requests in one `generate` batch (its best throughput), halved while it runs out of
    memory."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    prompts = torch.tensor(_prompts(s, s.requests, s.prompt_len, seed=7), device=device)
    batch = s.requests
    while True:
        out_of_memory = False
        start = time.perf_counter()
        try:
            produced = _generate_all(model, prompts, batch, s.output_len)
        except torch.OutOfMemoryError:
            if batch == 1:
                raise
            out_of_memory = True
        if not out_of_memory:
            break
        batch //= 2
        _release(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    del model
    _release(device)
    return {
        "what": f"transformers generate (batch {batch})",
        "requests": str(s.requests),
        "seconds": f"{seconds:.1f}",
        "output tok/s": f"{produced / seconds:,.0f}",
    }


def _timed_steps(engine, count: int, bench: Bench) -> tuple[list[float], list[float]]:
    """Wall time of `count` whole engine steps (schedule, inputs, forward, sampling) and the mean
    context length during each."""
    samples, contexts = [], []
    for _ in range(count):
        contexts.append(statistics.mean(seq.num_tokens for seq in engine.scheduler.running))
        bench.sync()
        start = time.perf_counter()
        engine.step(stream=False)
        bench.sync()
        samples.append(time.perf_counter() - start)
    return samples, contexts


def engine_decode_steps(s: Shapes, llm, bandwidth: float, bench: Bench) -> list[Row]:
    """Decode step time at each batch size, with the engine's CUDA graphs and without them."""
    from replica import SamplingParams

    engine = llm.engine
    runner = engine.runner
    graphs = runner.graphs
    model = runner.model
    # A step reads every weight once, except the embedding table (only its B rows), unless the
    # output projection shares it.
    tied = model.lm_head.weight is model.embed_tokens.weight
    weight_bytes = sum(
        p.numel() * p.element_size()
        for name, p in model.named_parameters(remove_duplicate=False)
        if not name.startswith("embed_tokens") or tied
    )
    if tied:
        weight_bytes -= model.embed_tokens.weight.numel() * model.embed_tokens.weight.element_size()
    kv_per_token = engine.model_config.kv_bytes_per_token(engine.dtype)
    eager_steps = max(1, s.decode_steps // 2)
    rows = []
    for batch in s.decode_batches:
        warmup = 3
        total = warmup + s.decode_steps + warmup + eager_steps + 2
        params = SamplingParams(temperature=0.0, max_tokens=total, ignore_eos=True)
        for i, prompt in enumerate(_prompts(s, batch, s.decode_context, seed=batch)):
            engine.add_request(f"decode-{batch}-{i}", prompt, params)
        running = engine.scheduler.running
        while engine.scheduler.waiting or any(
            seq.num_tokens - seq.num_computed_tokens > 1 for seq in running
        ):
            engine.step(stream=False)
        assert len(running) == batch, f"only {len(running)} of {batch} sequences are running"
        _timed_steps(engine, warmup, bench)
        samples, contexts = _timed_steps(engine, s.decode_steps, bench)
        runner.graphs = None
        _timed_steps(engine, warmup, bench)
        eager, _ = _timed_steps(engine, eager_steps, bench)
        runner.graphs = graphs
        for i in range(batch):
            engine.abort_request(f"decode-{batch}-{i}")
        step = statistics.median(samples)
        kv_bytes = batch * statistics.mean(contexts) * kv_per_token
        floor = (weight_bytes + kv_bytes) / bandwidth
        rows.append(
            {
                "batch": str(batch),
                "context": f"{statistics.mean(contexts):.0f}",
                "decode step": _fmt_time(step),
                "memory floor": _fmt_time(floor),
                "step / floor": f"{step / floor:.2f}x",
                "eager step": _fmt_time(statistics.median(eager)),
                "graphs": "yes" if graphs is not None else "no",
                "weights GB": f"{weight_bytes / 1e9:.2f}",
                "KV GB": f"{kv_bytes / 1e9:.2f}",
                "tok/s": f"{batch / step:,.0f}",
            }
        )
    return rows


def engine_throughput(s: Shapes, llm, device: torch.device) -> Row:
    from replica import SamplingParams

    prompts = _prompts(s, s.requests, s.prompt_len, seed=7)
    params = SamplingParams(temperature=0.0, max_tokens=s.output_len, ignore_eos=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    seconds = time.perf_counter() - start
    produced = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {
        "what": f"replica engine ({llm.engine.ops.name} kernels)",
        "requests": str(s.requests),
        "seconds": f"{seconds:.1f}",
        "output tok/s": f"{produced / seconds:,.0f}",
    }


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
        _release(device)
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
