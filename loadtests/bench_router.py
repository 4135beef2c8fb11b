"""Router benchmark: what the router costs (bench_overhead.py), what its routing buys
(bench_routing.py), and what predicts how `--workers N` scales (bench_workers.py).

Part 1, overhead: fake replicas answering instantly, reached directly, through the router (Redis
keys, static key) and through bare proxies (HTTP in and out, nothing else: the floor, and the
same on uvicorn, aiohttp or httpx; README, "Why our own HTTP server and clients"). Part 2, routing quality: three real
tiny-model replicas behind the router with each policy. `--pin` gives the router CPU 0 and
everything else the other CPUs.

    .venv/bin/python loadtests/bench_router.py --out bench_router.png
    .venv/bin/python loadtests/bench_router.py --part overhead --rounds 3
    .venv/bin/python loadtests/bench_router.py --part overhead --pin --baseline 11b5f4d
    .venv/bin/python loadtests/bench_router.py --part workers --pin
    .venv/bin/python loadtests/bench_router.py --part overhead workers --pin

Prints tables; saves a PNG with both parts. Everything runs on loopback and ends by itself.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_overhead
import bench_routing
import bench_workers
from bench_plot import save_panels


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--part",
        nargs="+",
        choices=["overhead", "routing", "workers", "all"],
        default=["all"],
        help="one or more parts, run in this order in one run",
    )
    parser.add_argument("--out", type=Path, default=Path("bench_router.png"))
    parser.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="router on CPU 0, replicas and load generator on the others",
    )
    bench_overhead.add_arguments(parser)
    bench_routing.add_arguments(parser)
    bench_workers.add_arguments(parser)
    args = parser.parse_args(argv)
    parts = {"overhead", "routing", "workers"} if "all" in args.part else set(args.part)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="bench-router-") as tmp:
        workdir = Path(tmp)
        overhead_rows = bench_overhead.overhead(args, workdir) if "overhead" in parts else []
        routing_rows = bench_routing.routing(args, workdir) if "routing" in parts else []
        workers_results = bench_workers.workers(args, workdir) if "workers" in parts else []
    if overhead_rows:
        bench_overhead.print_overhead(overhead_rows)
    if routing_rows:
        bench_routing.print_routing(routing_rows, args)
    if workers_results:
        bench_workers.print_workers(workers_results)
    panels = bench_overhead.overhead_panels(overhead_rows)
    save_panels(panels + bench_routing.routing_panels(routing_rows), args.out)


if __name__ == "__main__":
    main()
