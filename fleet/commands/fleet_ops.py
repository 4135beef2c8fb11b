"""`fleet up / down / status / logs / restart / scale`: run a whole fleet and operate it.

`fleet up` reads an optional YAML spec (see fleet.spec); each flag below overrides one spec field
(`--set a.b=value` reaches any other), and `fleet up` with no arguments serves the factory's tiny
model on two CPU replicas behind the router at 127.0.0.1:8000. The other commands find the running
fleet through the state file in its run folder ($FLEET_HOME, default ~/.cache/fleetserve/run).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import typer
from rich.errors import MarkupError
from rich.text import Text

from fleet.commands.manager_process import run_manager
from fleet.commands.output import console, fail
from fleet.commands.up_flags import SPEC_PATHS, build_spec, given_flags, preflight
from fleet.control.keys import ADMIN_KEY_ENV
from fleet.control.redis_conn import REDIS_URL_ENV
from fleet.launch import manager_socket
from fleet.launch.state import FleetState
from fleet.spec import run_dir

# Options several commands take, declared once.
RUN_DIR = typer.Option(
    None,
    "--run-dir",
    help="Run folder of the fleet (state, logs); default $FLEET_HOME or ~/.cache/fleetserve/run.",
)


def _running_state(folder: Path) -> FleetState:
    state = FleetState.load(folder)
    if state is None:
        fail(f"no fleet is running from {folder} (start one with `fleet up`)")
    if not state.manager_alive():
        fail(
            f"the fleet manager (pid {state.manager_pid}) of {folder} is gone; "
            "`fleet down` cleans up what it left"
        )
    return state


def _call(state: FleetState, op: str, args: dict | None = None, quiet: bool = False) -> Any:
    printer = None if quiet else (lambda m: console.print(f"[cyan]•[/] {m}"))
    try:
        return manager_socket.call(state.manager_socket, op, args, on_progress=printer)
    except manager_socket.ManagerError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot reach the fleet manager at {state.manager_socket}: {exc}")


def plain_events(status: dict) -> dict:
    """The status with its events as plain text: the manager writes them in rich markup for the
    terminal view, but a JSON reader (jq, a dashboard) wants "fleet ready", not "[green]...[/]"."""
    fleet = status.get("fleet")
    if not isinstance(fleet, dict) or not fleet.get("events"):
        return status
    return {**status, "fleet": {**fleet, "events": [_plain(e) for e in fleet["events"]]}}


def _plain(markup: str) -> str:
    try:
        return Text.from_markup(markup).plain
    except MarkupError:
        return markup


def up(
    spec_file: Path = typer.Argument(None, help="Fleet spec (YAML); none: the default fleet."),
    port: int = typer.Option(None, "--port", "-p", help="Router port (router.port, 8000)."),
    host: str = typer.Option(None, help="Router bind address (router.host, 127.0.0.1)."),
    policy: str = typer.Option(None, help="prefix, least-load or round-robin (router.policy)."),
    model: str = typer.Option(None, "--model", "-m", help="Model folder or HF id (models.*.path)."),
    served_model_name: str = typer.Option(None, help="Name clients use for the model."),
    replicas: str = typer.Option(None, "--replicas", "-n", help="Replicas per model, or auto."),
    device: str = typer.Option(None, help="auto, cpu or cuda (models.*.device)."),
    dtype: str = typer.Option(None, help="auto, float32, float16 or bfloat16."),
    max_model_len: int = typer.Option(None, help="Context length per replica."),
    max_num_seqs: int = typer.Option(None, help="Concurrent sequences per replica."),
    kv_cache_tokens: int = typer.Option(None, help="KV cache size per replica, in tokens."),
    max_num_batched_tokens: int = typer.Option(None, help="Token budget of one engine step."),
    block_size: int = typer.Option(None, help="KV cache block size, in tokens."),
    cpu_replicas: int = typer.Option(None, help="What replicas=auto means without GPUs (2)."),
    replica_arg: list[str] = typer.Option(
        [],
        "--replica-arg",
        help="Extra `fleet replica` flag (repeatable): --replica-arg=--seed=1",
    ),
    router_arg: list[str] = typer.Option(
        [], "--router-arg", help="Extra `fleet router` flag (repeatable)."
    ),
    redis_url: str = typer.Option(
        None, envvar=REDIS_URL_ENV, help="Use this Redis instead of an embedded one."
    ),
    keys: bool = typer.Option(None, "--keys/--no-keys", help="Require API keys (default on)."),
    admin_key: str = typer.Option(None, envvar=ADMIN_KEY_ENV, help="Admin key to use."),
    backend: str = typer.Option(None, help="local or ray."),
    ray_address: str = typer.Option(None, help="Ray cluster address (backend ray)."),
    hosts: str = typer.Option(
        None, help="Bring up a Ray cluster over SSH on these hosts (a,b,c; a is the head)."
    ),
    ssh_user: str = typer.Option(None, help="SSH user on the --hosts (default: yours)."),
    ssh_key: str = typer.Option(
        None, help="SSH private key for the --hosts (default: ~/.ssh/id_ed25519 or id_rsa)."
    ),
    name: str = typer.Option(None, help="Fleet name (Ray actor names)."),
    max_restarts: int = typer.Option(None, help="Quick crashes in a row before giving up."),
    ready_timeout: float = typer.Option(None, help="Seconds a replica may take to load."),
    drain_timeout: float = typer.Option(None, help="Seconds a stop waits for drains."),
    set_: list[str] = typer.Option([], "--set", help="Any spec field: --set models.0.replicas=3"),
    run_dir_opt: Path = RUN_DIR,
    detach: bool = typer.Option(
        False, "--detach", "-d", help="Return once ready; run in the background."
    ),
    print_spec: bool = typer.Option(
        False, "--print-spec", help="Print the resolved spec and exit."
    ),
) -> None:
    """Start a fleet: Redis, the router and the replicas of a spec, supervised."""
    # Every parameter named in SPEC_PATHS overrides its spec field (read before any local is set).
    flags = {flag: value for flag, value in locals().items() if flag in SPEC_PATHS}
    spec = build_spec(spec_file, run_dir_opt, set_, **flags)
    if print_spec:
        from fleet.spec import dump_spec

        console.print(dump_spec(spec), end="")
        return
    folder = spec.resolved_run_dir()
    state = FleetState.load(folder)
    if state is not None and state.manager_alive():
        fail(
            f"a fleet is already running from {folder} (pid {state.manager_pid}); `fleet down` first"
        )
    preflight(spec, given_flags(flags))
    raise typer.Exit(run_manager(spec, folder, detach, spec.supervision.ready_timeout_s + 120))


def down(
    run_dir_opt: Path = RUN_DIR,
    timeout: float = typer.Option(120.0, help="Seconds to wait for the drain before killing."),
) -> None:
    """Stop a fleet: drain replicas, stop router and Redis; no process or membership is left."""
    from fleet.launch.teardown import teardown

    folder = run_dir(run_dir_opt)
    state = FleetState.load(folder)
    if state is None:
        console.print(f"no fleet is running from {folder}")
        return
    for line in teardown(state, timeout):
        console.print(line)
    console.print("[green]fleet stopped[/]")


def status(
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    redis_url: str = typer.Option(
        None, envvar=REDIS_URL_ENV, help="Read a fleet that `fleet up` did not start."
    ),
    router_url: str = typer.Option(None, help="With --redis-url: the router to ask."),
    admin_key: str = typer.Option(None, envvar=ADMIN_KEY_ENV, help="For the router's view."),
    run_dir_opt: Path = RUN_DIR,
) -> None:
    """Per-replica table (state, load, KV, prefix hits, direct URL) plus the router's view."""
    from fleet.launch.view import fleet_view

    folder = run_dir(run_dir_opt)
    state = FleetState.load(folder)
    if state is not None and state.manager_alive():
        result = _call(state, "status", quiet=True)
    elif redis_url:
        from fleet.launch.status import collect_status

        result = asyncio.run(
            collect_status(
                redis_url=redis_url,
                router_url=router_url,
                admin_key=admin_key,
                fleet={"name": "external", "phase": "-"},
            )
        )
    else:
        _running_state(folder)
        return
    if as_json:
        typer.echo(json.dumps(plain_events(result), indent=2))
    else:
        console.print(fleet_view(result))


def logs(
    replica: str = typer.Argument(None, help="Replica name (e.g. tiny-0) or 'router'; none: all."),
    lines: int = typer.Option(100, "--lines", "-n", help="Last lines to show."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new lines."),
    run_dir_opt: Path = RUN_DIR,
) -> None:
    """Show a replica's (or the router's) log."""
    folder = run_dir(run_dir_opt)
    state = FleetState.load(folder)
    if state is not None and state.manager_alive():
        result = _call(state, "logs", {"replica": replica, "lines": lines}, quiet=True)
        for name, text in result.items():
            if len(result) > 1:
                console.print(f"[bold]==> {name} <==[/]")
            typer.echo(text, nl=False)
        if follow:
            _follow(folder, replica)
        return
    log_file = folder / "logs" / f"{replica or 'manager'}.log"
    if not log_file.exists():
        fail(f"no fleet is running from {folder} and there is no {log_file}")
    from fleet.launch.process import tail

    typer.echo(tail(log_file, lines), nl=False)
    if follow:
        _follow(folder, replica)


def restart(
    replica: str = typer.Argument(None, help="Only this replica; none: every replica."),
    model: str = typer.Option(None, "--model", "-m", help="Only the replicas of this model."),
    run_dir_opt: Path = RUN_DIR,
) -> None:
    """Rolling restart: drain one replica, restart it, wait until it serves, then the next."""
    state = _running_state(run_dir(run_dir_opt))
    result = _call(state, "restart", {"replica": replica, "model": model})
    console.print(f"[green]restarted[/] {', '.join(result['restarted'])}")


def scale(
    model: str = typer.Argument(..., help="Served model name."),
    replicas: int = typer.Argument(..., min=0, help="Replicas wanted."),
    run_dir_opt: Path = RUN_DIR,
) -> None:
    """Add replicas of a model (waits until they serve) or drain and stop some."""
    state = _running_state(run_dir(run_dir_opt))
    result = _call(state, "scale", {"model": model, "replicas": replicas})
    console.print(f"[green]{result['model']}[/]: {result['replicas']} replicas")


def _follow(folder: Path, replica: str | None) -> None:
    """`tail -f` of the local log file (Ctrl-C ends it)."""
    path = folder / "logs" / f"{replica or 'router'}.log"
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            while True:
                chunk = fh.read()
                if chunk:
                    sys.stdout.write(chunk.decode(errors="replace"))
                    sys.stdout.flush()
                else:
                    time.sleep(0.3)
    except KeyboardInterrupt:
        return
    except OSError as exc:
        fail(f"cannot follow {path}: {exc}")


def register(app: typer.Typer) -> None:
    for command in (up, down, status, logs, restart, scale):
        app.command()(command)
