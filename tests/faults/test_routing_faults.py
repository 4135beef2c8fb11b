"""Replica faults under load from several API keys (fake replicas: these are about routing):
killed, frozen, answering 500s, slow to its first token, crash-looping. Target in each: no
request fails before its first byte, and nothing stays held afterwards."""

from __future__ import annotations

import asyncio

import pytest
from fault_scenarios import CI, FAKE_SCENARIOS, FakeFleet

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


@pytest.mark.parametrize("scenario", FAKE_SCENARIOS, ids=lambda s: s.__name__)
def test_replica_fault(fakes: FakeFleet, scenario) -> None:
    result = asyncio.run(scenario(fakes, CI))
    print(result.cells())
    assert result.sent >= 20, result
    assert result.clean, result
