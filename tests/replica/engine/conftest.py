"""Fixtures for engine tests: tiny factory models and engines built on them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from engine_helpers import ARCHS


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread, and far faster when the box is oversubscribed
    (OpenMP barriers wait for descheduled threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_models(model_factory) -> dict[str, Path]:
    return {arch: model_factory(arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def llama_path(tiny_models) -> Path:
    return tiny_models["llama"]


@pytest.fixture(scope="session")
def make_llm() -> Callable:
    """Build an LLM with small defaults suited to tiny models (each test states what it needs)."""
    from replica import LLM

    def build(path: Path, **kwargs):
        kwargs.setdefault("kv_cache_tokens", 8192)
        kwargs.setdefault("max_model_len", 512)
        return LLM(str(path), **kwargs)

    return build


@pytest.fixture(scope="session")
def llama_llm(llama_path, make_llm):
    """One shared engine for tests that only add requests (each must leave it idle)."""
    return make_llm(llama_path)
