"""Fuzz every public route of the replica and the router with thousands of cases (issue #14).

    .venv/bin/python loadtests/fuzz_routes.py --cases 5000

Starts `python -m replica` on a tiny random model and `python -m router` in front of it (static
keys, the replica under the ids `main` and `decoy`), draws `--cases` hypothesis cases per route
(tests/security/fuzz_cases.py, seeded by `--seed`: a run can be repeated exactly), sends them
`--concurrency` at a time over raw HTTP/1.1 and prints one row per route, then every distinct
finding with the smallest request that showed it. A server that dies or stops answering /health
is restarted and counted as a crash. Exits 1 on any 5xx, hang, dropped connection, crash or
non-OpenAI error body. Cases for the next routes are drawn in worker processes while the current
route runs.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "support")]

from fuzz_cases import (  # noqa: E402
    ROUTES,
    Case,
    Fleet,
    Route,
    Tally,
    draw_cases,
    fleet,
    run_cases,
    servers,
)

COLUMNS = ("2xx", "3xx", "4xx", "5xx", "hang", "drop", "crash")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=5000, help="cases per route")
    p.add_argument("--seed", type=int, default=0, help="the same seed draws the same cases")
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight")
    p.add_argument("--route", action="append", default=[], help="only routes naming this")
    p.add_argument("--workers", type=int, default=2, help="processes drawing cases")
    p.add_argument("--workdir", type=Path, help="model and server logs (default: a temp dir)")
    p.add_argument("--show", type=int, default=10, help="findings printed per route")
    p.add_argument(
        "--open-replica",
        action="store_true",
        help="run the replica without an API key (a trusted network's setup)",
    )
    return p.parse_args(argv)


def run(args: argparse.Namespace, routes: list[Route], running: Fleet) -> list[Tally]:
    """Route after route; the next `workers` routes' cases are drawn while one runs."""
    tallies = []
    with ProcessPoolExecutor(args.workers) as pool:
        drawn: dict[int, Future] = {}
        for i, route in enumerate(routes):
            for ahead in range(i, min(i + 1 + args.workers, len(routes))):
                if ahead not in drawn:
                    drawn[ahead] = pool.submit(draw_cases, routes[ahead], args.cases, args.seed)
            tallies.append(fuzz_route(route, drawn.pop(i).result(), running, args.concurrency))
    return tallies


def fuzz_route(route: Route, cases: list[Case], running: Fleet, concurrency: int) -> Tally:
    started = time.monotonic()
    tally = Tally(route.name)
    for result in asyncio.run(run_cases(running, cases, concurrency)):
        tally.add(result)
    tally.elapsed_s = time.monotonic() - started
    print(f"{route.name}: {tally.cases} cases, {tally.counts}", flush=True)
    return tally


def table(tallies: list[Tally]) -> Table:
    out = Table(title="fuzzed routes")
    for name in ("route", "cases", *COLUMNS, "bad bodies", "s"):
        out.add_column(name, justify="left" if name == "route" else "right")
    for t in tallies:
        counts = [str(t.counts.get(c, 0)) for c in COLUMNS]
        out.add_row(t.route, str(t.cases), *counts, str(t.bad_bodies), f"{t.elapsed_s:.0f}")
    return out


def tracebacks(running: Fleet) -> list[str]:
    """The servers' own tracebacks (what a 500 hid from the client), one line each."""
    found = []
    for server in (running.replica, running.router):
        lines = server.log.read_text(errors="replace").splitlines()
        for i, line in enumerate(lines):
            if line.startswith("Traceback"):
                last = next((ln for ln in lines[i + 1 :] if not ln.startswith((" ", "\t"))), "")
                found.append(f"{server.name}: {last}")
    return found


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    routes = [r for r in ROUTES if not args.route or any(s in r.name for s in args.route)]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fuzz-routes-"))
    workdir.mkdir(parents=True, exist_ok=True)
    from fleet.model_factory import make_model

    model = make_model(workdir / "model", arch="llama", size="tiny", seed=0)
    console = Console(width=200)
    started = time.monotonic()
    with fleet(servers(model, workdir, replica_key=not args.open_replica)) as running:
        if running.unroutable:
            console.print(running.unroutable, markup=False)
        tallies = run(args, routes, running)
        errors = tracebacks(running)
    console.print(table(tallies))
    console.print(f"{sum(t.cases for t in tallies)} cases in {time.monotonic() - started:.0f} s; "
                  f"server logs in {workdir}")  # fmt: skip
    for t in tallies:
        for line in t.describe()[: args.show]:
            console.print(line, markup=False, highlight=False)
    for line in sorted(set(errors)):
        console.print(f"server traceback ({errors.count(line)}x): {line}", markup=False)
    if running.dead:
        console.print(f"crashes: {running.dead}", markup=False)
    return 1 if running.unroutable or any(t.failed for t in tallies) else 0


if __name__ == "__main__":
    sys.exit(main())
