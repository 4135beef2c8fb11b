"""Router test fixtures: three fake replica processes per module, reset before each test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from router_harness import MODEL, FakeReplica, fake_replicas, fresh


@pytest.fixture(scope="module")
def fakes() -> Iterator[list[FakeReplica]]:
    """Three fake replicas of MODEL for the module, reset (and restarted if killed) per test."""
    with fake_replicas(3, "--model", MODEL, "--chunks", "8") as started:
        yield started


@pytest.fixture
def replicas(fakes: list[FakeReplica]) -> list[FakeReplica]:
    return fresh(fakes)
