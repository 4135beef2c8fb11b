"""Fault-injection fixtures: one fleet of each kind per module, each a set of real processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fault_scenarios import CliFleet, FakeFleet, RealFleet, cli_fleet, fake_fleet, real_fleet


@pytest.fixture(scope="module")
def fakes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeFleet]:
    with fake_fleet(tmp_path_factory.mktemp("fake-fleet")) as fleet:
        yield fleet


@pytest.fixture(scope="module")
def reals(tmp_path_factory: pytest.TempPathFactory, model_factory) -> Iterator[RealFleet]:
    model = model_factory("llama", "tiny", seed=0)
    with real_fleet(tmp_path_factory.mktemp("real-fleet"), model) as fleet:
        yield fleet


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory, fleet_cache: Path) -> Iterator[CliFleet]:
    with cli_fleet(tmp_path_factory.mktemp("cli-fleet"), fleet_cache) as fleet:
        yield fleet


@pytest.fixture(scope="session")
def fleet_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fleet-cache")
