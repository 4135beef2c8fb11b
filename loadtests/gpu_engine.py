"""gpu_check.py part 3: the engine's decode step time on an 8B-shaped model with random weights
against the memory floor, and its output tokens/s against transformers' `generate` on the same
GPU, weights and prompts."""

from __future__ import annotations

import gc
import statistics
import time
from pathlib import Path

import torch
from gpu_shapes import Shapes
from gpu_timing import Bench, Row, fmt_time


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


def release(device: torch.device) -> None:
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
        release(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    del model
    release(device)
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
                "decode step": fmt_time(step),
                "memory floor": fmt_time(floor),
                "step / floor": f"{step / floor:.2f}x",
                "eager step": fmt_time(statistics.median(eager)),
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
