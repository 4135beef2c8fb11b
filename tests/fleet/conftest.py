"""Fleet test fixtures (helpers live in tests/support/fleet_harness.py)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def fleet_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One model cache per session: the factory's default tiny model is built there once."""
    return tmp_path_factory.mktemp("fleet-cache")
