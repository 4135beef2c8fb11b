"""Operations under load on a fleet started by `fleet up --detach` (real replicas, embedded
Redis, API keys): a rolling restart (`fleet restart`), then `fleet scale MODEL 1`. In file order:
the scale-down leaves the fleet one replica."""

from __future__ import annotations

import asyncio

import pytest
from fault_scenarios import CI, CLI_SCENARIOS, CliFleet

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]


@pytest.mark.parametrize("scenario", CLI_SCENARIOS, ids=lambda s: s.__name__)
def test_operation_under_load(cli: CliFleet, scenario) -> None:
    result = asyncio.run(scenario(cli, CI))
    print(result.cells())
    assert result.sent >= 20, result
    assert result.clean, result
