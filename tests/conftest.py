"""Fixtures every test area shares: a real Redis server and tiny Hugging Face model folders."""

from __future__ import annotations

import json
import os
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

# Helpers the test areas share (harnesses, the fake replica, cases) import by module name.
sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow") or os.environ.get("FLEET_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow scenario: run with --runslow or FLEET_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def redis_server() -> Iterator:
    """One real redis-server for the whole session, on a free loopback port."""
    from fleet.embedded_redis import EmbeddedRedis

    with EmbeddedRedis() as server:
        yield server


@pytest.fixture(scope="session")
def redis_url(redis_server) -> str:
    return redis_server.url


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`model_factory("llama")` -> path of a tiny model folder, built once per session per args."""
    from fleet.model_factory import make_model

    root = tmp_path_factory.mktemp("models")
    built: dict[tuple[str, str, int, str], Path] = {}

    def build(arch: str = "llama", size: str = "tiny", seed: int = 0, **overrides) -> Path:
        key = (arch, size, seed, json.dumps(overrides, sort_keys=True))
        if key not in built:
            name = f"{arch}-{size}-{seed}-{len(built)}"
            built[key] = make_model(root / name, arch=arch, size=size, seed=seed, **overrides)
        return built[key]

    return build


@pytest.fixture(scope="session")
def tiny_model(model_factory: Callable[..., Path]) -> Path:
    """The tiny Llama most server and security tests serve."""
    return model_factory("llama", "tiny", seed=0)


@pytest.fixture
async def key_store(redis_url: str) -> AsyncIterator:
    """A KeyStore on the session's Redis, under a prefix of its own (no test sees another's keys)."""
    from fleet.control.keys import KeyStore

    store = KeyStore(redis_url, prefix=f"t-{uuid.uuid4().hex[:10]}")
    yield store
    await store.close()
