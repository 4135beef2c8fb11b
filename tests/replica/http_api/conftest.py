"""Fixtures of the replica-server tests (helpers live in tests/support/live_replica.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from live_replica import API_KEY, LiveReplica, serve


@pytest.fixture(scope="module")
def replica(tiny_model: Path) -> Iterator[LiveReplica]:
    """One server shared by a module's tests, with a static API key."""
    with serve(tiny_model, api_key=API_KEY) as live:
        yield live
