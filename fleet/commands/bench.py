"""`fleet bench`: benchmark a fleet (or any OpenAI-compatible endpoint) with the locust workloads.

The benchmark lives in the source tree's loadtests/ (it needs locust, a dev dependency), so this
command only hands its arguments to loadtests/run_bench.py, whose parser owns the options.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

_PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}
RUN_BENCH = Path(__file__).resolve().parents[2] / "loadtests" / "run_bench.py"


def register(app: typer.Typer) -> None:
    @app.command(context_settings=_PASS_THROUGH, add_help_option=False)
    def bench(ctx: typer.Context) -> None:
        """Load-test an endpoint, or a local fleet with --up; print a vLLM-style summary (see --help)."""
        if not RUN_BENCH.exists():
            typer.echo(
                f"error: fleet bench runs {RUN_BENCH}, which is not there: it needs a source checkout "
                "of fleetserve installed with its dev extra (pip install -e '.[dev]')",
                err=True,
            )
            raise typer.Exit(2)
        os.execv(sys.executable, [sys.executable, str(RUN_BENCH), *ctx.args])
