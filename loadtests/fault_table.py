"""The fault-injection scenarios of tests/faults in their long versions, as one table.

Each scenario runs under steady load from several fleet API keys (half the requests streamed)
on real processes: fake replicas for the routing faults, real tiny-model replicas joining through
Redis behind two routers for the engine and control-plane faults, and a `fleet up --detach` fleet
for the operations. A replica frozen for 20 s, Redis down for 30 s, 1,000 streams of which a
random third are cut by their client. Takes about ten minutes on two cores.

    .venv/bin/python loadtests/fault_table.py [--only redis] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))

from fault_scenarios import (
    CI,
    CLI_SCENARIOS,
    FAKE_SCENARIOS,
    LONG,
    REAL_SCENARIOS,
    Row,
    Scale,
    cli_fleet,
    fake_fleet,
    real_fleet,
    table,
)

from fleet.model_factory import make_model


def run(work: Path, scale: Scale, only: str) -> list[Row]:
    rows: list[Row] = []

    def chosen(scenarios: list) -> list:
        return [s for s in scenarios if only in s.__name__]

    def play(fleet: object, scenarios: list) -> None:
        for scenario in scenarios:
            began = time.monotonic()
            rows.append(asyncio.run(scenario(fleet, scale)))
            took = time.monotonic() - began
            print(f"{scenario.__name__} ({took:.0f} s): {rows[-1].cells()}", file=sys.stderr)

    if fakes := chosen(FAKE_SCENARIOS):
        with fake_fleet(work) as fleet:
            play(fleet, fakes)
    if reals := chosen(REAL_SCENARIOS):
        model = make_model(work / "model", arch="llama", size="tiny", seed=0)
        with real_fleet(work, model) as fleet:
            play(fleet, reals)
    if operations := chosen(CLI_SCENARIOS):
        with cli_fleet(work, work / "cache") as fleet:
            play(fleet, operations)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="scenarios whose name contains this")
    parser.add_argument("--quick", action="store_true", help="the short versions the tests run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fault-table-") as tmp:
        rows = run(Path(tmp), CI if args.quick else LONG, args.only)
    print(table(rows))
    dirty = [r.scenario for r in rows if not r.clean]
    print(f"\n{len(rows) - len(dirty)} of {len(rows)} scenarios met the target", end="")
    print(f"; not: {', '.join(dirty)}" if dirty else "")
    return 1 if dirty else 0


if __name__ == "__main__":
    sys.exit(main())
