"""The `fleet` command. Each group of subcommands lives in its own module under fleet/commands/."""

from __future__ import annotations

import typer

from fleet.commands import bench, external, fleet_ops, keys, models, servers

app = typer.Typer(
    name="fleet",
    help="fleetserve: one OpenAI-compatible endpoint in front of many LLM engine replicas.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
models.register(app)
servers.register(app)
fleet_ops.register(app)
bench.register(app)
keys.register(app)
external.register(app)


def main() -> None:
    app()
