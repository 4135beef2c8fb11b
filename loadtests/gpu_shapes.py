"""The model and workload sizes gpu_check.py runs: Llama-3-8B on the GPU, a toy under --smoke."""

from __future__ import annotations

from dataclasses import dataclass


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
