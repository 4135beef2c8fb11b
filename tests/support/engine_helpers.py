"""Helpers for engine tests: transformers references and seeded prompts."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

ARCHS = ("llama", "qwen2", "qwen3", "mistral")


@functools.cache
def _hf_model(path: str, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def hf_greedy(path: Path, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy `generate` for one prompt alone (EOS ends it, as in the engine)."""
    model = _hf_model(str(path))
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        )  # fmt: skip
    ids = out[0, len(prompt) :].tolist()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    for i, token in enumerate(ids):
        if token in eos:
            return ids[: i + 1]
    return ids


def hf_logits(path: Path, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return _hf_model(str(path))(torch.tensor([ids])).logits[0].float()


def random_prompts(lengths: list[int], seed: int = 0, vocab: int = 500) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]
