"""The load-test modules live in loadtests/ (run by locust as plain files, not a package): put that
folder on the path the way locust does for its locustfile."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

LOADTESTS = Path(__file__).resolve().parents[2] / "loadtests"
sys.path.insert(0, str(LOADTESTS))

from scripted_server import ScriptedServer  # noqa: E402


@pytest.fixture(scope="module")
def scripted_server() -> Iterator[ScriptedServer]:
    with ScriptedServer() as server:
        yield server
