"""`fleet replica` and `fleet router`: run one server in the foreground.

They hand their arguments to `python -m replica` / `python -m router`, typer commands of their own
(flags shared with fleet/ in fleet.commands.server_flags), so fleet/ never imports the servers
(they stand on fleet/, not the other way round).
"""

from __future__ import annotations

import os
import sys

import typer

_PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


def _exec_module(module: str, args: list[str]) -> None:
    os.execv(sys.executable, [sys.executable, "-m", module, *args])


def register(app: typer.Typer) -> None:
    @app.command(context_settings=_PASS_THROUGH, add_help_option=False)
    def replica(ctx: typer.Context) -> None:
        """Run one replica: an OpenAI-compatible server over one engine (see --help)."""
        _exec_module("replica", ctx.args)

    @app.command(context_settings=_PASS_THROUGH, add_help_option=False)
    def router(ctx: typer.Context) -> None:
        """Run one router: the fleet's OpenAI endpoint in front of the replicas (see --help)."""
        _exec_module("router", ctx.args)
