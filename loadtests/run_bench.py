r"""Benchmark an OpenAI-compatible endpoint with the locust workloads and print the summary.

    python loadtests/run_bench.py --host http://127.0.0.1:8000 --duration 2m --users 16 \
        --workload shared-prefix --goodput ttft:500,tpot:50
    python loadtests/run_bench.py --up --up-args="--model models/small --replicas 2" --duration 60

`--up` starts a local fleet first (`fleet up --detach` on a free port, in its own run folder, using
the API key the fleet hands out) and stops it afterwards (`--keep-up` leaves it running). Options
this script does not know go to locust as they are: the locustfile's own (`--workload`,
`--output-len`, `--request-rate`, ...: listed below) and locust's. `fleet bench` runs this script with the same arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from llm_options import help_text

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"


@dataclass
class Endpoint:
    url: str
    api_key: str | None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fleet(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fleet", *args], text=True, capture_output=True)


@contextmanager
def local_fleet(up_args: list[str], keep: bool, run_dir: Path | None = None) -> Iterator[Endpoint]:
    """`fleet up --detach` in its own run folder; `fleet down` on the way out unless `keep`. A
    temporary run folder goes too once the fleet stopped cleanly (it keeps the logs otherwise)."""
    temporary = run_dir is None
    run_dir = run_dir or Path(tempfile.mkdtemp(prefix="fleet-bench-"))
    port = _free_port()
    print(f"starting a local fleet (run folder {run_dir}, port {port}) ...", flush=True)
    started = _fleet("up", "--detach", "--run-dir", str(run_dir), "--port", str(port), *up_args)
    if started.returncode != 0:
        _fleet("down", "--run-dir", str(run_dir))
        raise SystemExit(
            f"fleet up failed (logs in {run_dir}/logs):\n{started.stdout}{started.stderr}"
        )
    state = json.loads((run_dir / "state.json").read_text())
    try:
        yield Endpoint(state["router_url"], state.get("example_key"))
    finally:
        if keep:
            key = f" (API key {state['example_key']})" if state.get("example_key") else ""
            print(
                f"fleet left running at {state['router_url']}{key}: `fleet down --run-dir {run_dir}` stops it"
            )
        else:
            stopped = _fleet("down", "--run-dir", str(run_dir))
            if stopped.returncode != 0:
                print(f"fleet down failed:\n{stopped.stdout}{stopped.stderr}", file=sys.stderr)
            elif temporary:
                shutil.rmtree(run_dir, ignore_errors=True)


def locust_command(endpoint: Endpoint, args: argparse.Namespace, extra: list[str]) -> list[str]:
    users = args.users if args.users is not None else (1 if "--request-rate" in extra else 8)
    stem = Path(args.results_dir) / args.run_name
    return [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
        "--host", endpoint.url, "-u", str(users), "-r", str(users), "-t", args.duration,
        "--stop-timeout", str(args.stop_timeout), "--results-dir", args.results_dir,
        "--run-name", args.run_name, "--csv", f"{stem}.locust", "--json-file", f"{stem}.locust",
        *extra,
    ]  # fmt: skip


def run_locust(endpoint: Endpoint, args: argparse.Namespace, extra: list[str]) -> int:
    env = dict(os.environ)
    if endpoint.api_key and not args.keep_api_key:
        env["OPENAI_API_KEY"] = endpoint.api_key
    stem = Path(args.results_dir) / args.run_name
    stem.parent.mkdir(parents=True, exist_ok=True)
    command = locust_command(endpoint, args, extra)
    print(
        f"running locust for {args.duration} against {endpoint.url} (log: {stem}.locust.log)",
        flush=True,
    )
    with open(f"{stem}.locust.log", "w") as log:
        code = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    summary = Path(f"{stem}.summary.txt")
    if summary.exists():
        print(summary.read_text(), end="")
        print(f"records, summary, plot and locust's stats: {stem}.*")
    if code not in (0, 1) or not summary.exists():  # 1: some requests failed, shown above
        print(Path(f"{stem}.locust.log").read_text()[-4000:], file=sys.stderr)
    return code


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description=__doc__,
        epilog=help_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--host", default="http://127.0.0.1:8000", help="endpoint to benchmark")
    target.add_argument("--up", action="store_true", help="start a local fleet and benchmark it")
    parser.add_argument(
        "--up-args",
        default="",
        help="arguments for `fleet up`, as one string: --up-args='--model PATH -n 2'",
    )
    parser.add_argument("--keep-up", action="store_true", help="leave the --up fleet running")
    parser.add_argument(
        "--fleet-dir", type=Path, help="run folder of the --up fleet (default: a new temporary one)"
    )
    parser.add_argument(
        "--duration", default="60s", help="locust run time: 30s, 2m, ... (default 60s)"
    )
    parser.add_argument(
        "--users",
        type=int,
        help="concurrent users (default 8; 1 with --request-rate, whose users only schedule)",
    )
    parser.add_argument(
        "--stop-timeout", type=int, default=120, help="seconds in-flight requests get to finish"
    )
    parser.add_argument("--results-dir", default="bench-results")
    parser.add_argument(
        "--run-name", default="", help="file name stem of the results (default <workload>-<api>)"
    )
    parser.add_argument(
        "--keep-api-key",
        action="store_true",
        help="with --up, use $OPENAI_API_KEY rather than the fleet's key",
    )
    return parser.parse_known_args(argv)


def default_run_name(extra: list[str]) -> str:
    """The locustfile's own default stem, from the workload and API options passed through."""
    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument("--workload", default=os.environ.get("LOCUST_WORKLOAD", "random"))
    peek.add_argument("--api", default=os.environ.get("LOCUST_API", "chat"))
    known, _ = peek.parse_known_args(extra)
    return f"{known.workload}-{known.api}"


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(argv)
    args.run_name = args.run_name or default_run_name(extra)
    if args.up:
        with local_fleet(shlex.split(args.up_args), args.keep_up, args.fleet_dir) as endpoint:
            return run_locust(endpoint, args, extra)
    return run_locust(Endpoint(args.host.rstrip("/"), None), args, extra)


if __name__ == "__main__":
    sys.exit(main())
