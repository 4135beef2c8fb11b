"""Faults of the control plane and of the data path on real tiny-model replicas that join
through Redis, behind two routers: clients cutting a third of their streams (nothing stays held
in the engines, the routers or the keys' slots; usage holds what was generated), one router
killed and restarted, Redis killed and restarted with and without its data."""

from __future__ import annotations

import asyncio

import pytest
from fault_scenarios import CI, REAL_SCENARIOS, RealFleet

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


@pytest.mark.parametrize("scenario", REAL_SCENARIOS, ids=lambda s: s.__name__)
def test_fleet_fault(reals: RealFleet, scenario) -> None:
    result = asyncio.run(scenario(reals, CI))
    print(result.cells())
    assert result.sent >= 20, result
    assert result.clean, result
