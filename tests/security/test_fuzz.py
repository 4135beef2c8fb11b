"""Property-based fuzzing of every public route of the replica and the router (issue #14).

A quick, seeded run for CI: a few dozen hypothesis-drawn cases per route (mostly valid bodies with
one field mutated, plus noise, odd methods, paths, headers and slow-drip bodies), sent by a raw
HTTP/1.1 client to `python -m replica` on a tiny real model and `python -m router` in front of it.
Whatever a case sends, the server must answer it, within the time limit, without a 5xx, without
dying, and every refusal must be OpenAI error JSON. `loadtests/fuzz_routes.py` runs the same cases
by the thousand.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fuzz_cases import ROUTES, Fleet, Route, Tally, draw_cases, fleet, run_cases
from fuzz_cases import servers as servers_of

CASES_PER_ROUTE = 40
CONCURRENCY = 4
SEED = 14  # the number: any fixed seed keeps CI deterministic


@pytest.fixture(scope="module")
def servers(
    model_factory: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fleet]:
    model, workdir = model_factory("llama", "tiny", seed=0), tmp_path_factory.mktemp("fuzz")
    with fleet(servers_of(model, workdir)) as running:
        yield running


@pytest.mark.timeout(120)
@pytest.mark.parametrize("route", ROUTES, ids=lambda r: r.name)
def test_route_survives_fuzzing(servers: Fleet, route: Route) -> None:
    """No 5xx, hang, dropped connection or crash; every non-2xx body is OpenAI error JSON."""
    if route.target == "router":
        assert servers.unroutable is None, servers.unroutable
    cases = draw_cases(route, CASES_PER_ROUTE, SEED)
    tally = Tally(route.name)
    for result in asyncio.run(run_cases(servers, cases, CONCURRENCY)):
        tally.add(result)
    assert tally.cases >= CASES_PER_ROUTE
    assert not tally.failed, "\n".join(
        [f"{tally.counts}, bad bodies {tally.bad_bodies}", *tally.describe()]
    )
