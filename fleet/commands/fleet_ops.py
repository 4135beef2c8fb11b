"""`fleet up / down / status / logs / restart / scale`: run a whole fleet and operate it.

`fleet up` reads an optional YAML spec (see fleet.spec); each flag below overrides one spec field
(`--set a.b=value` reaches any other), and `fleet up` with no arguments serves the factory's tiny
model on two CPU replicas behind the router at 127.0.0.1:8000. The other commands find the running
fleet through the state file in its run folder ($FLEET_HOME, default ~/.cache/fleetserve/run).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.errors import MarkupError
from rich.live import Live
from rich.text import Text

from fleet.commands.preflight import FlagError, check_model, check_port, check_redis_reachable
from fleet.control.keys import ADMIN_KEY_ENV
from fleet.control.redis_conn import REDIS_URL_ENV, mask_redis_url
from fleet.launch import manager_socket
from fleet.launch.state import ERROR_FILE, MANAGER_SOCKET, SPEC_FILE, FleetState
from fleet.spec import FleetSpec, SpecError, load_spec, parse_assignment, run_dir

# Piped output (logs, CI, grep) is not held to rich's default 80 columns, where the status tables
# squeeze their short columns into vertical headers: one line per replica instead.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, highlight=False)

# Options several commands take, declared once.
RUN_DIR = typer.Option(
    None,
    "--run-dir",
    help="Run folder of the fleet (state, logs); default $FLEET_HOME or ~/.cache/fleetserve/run.",
)


def _fail(message: str, code: int = 1) -> NoReturn:
    """One line on stderr (never wrapped at 80 columns, the message never read as markup)."""
    err.print(Text.assemble(("error:", "red"), " ", message), soft_wrap=True)
    raise typer.Exit(code)


# The spec field each `fleet up` flag sets (model flags set it in every model).
SPEC_PATHS = {
    "name": "name",
    "backend": "backend",
    "ray_address": "ray_address",
    "redis_url": "redis.url",
    "host": "router.host",
    "port": "router.port",
    "policy": "router.policy",
    "keys": "keys.enabled",
    "admin_key": "keys.admin_key",
    "model": "models.*.path",
    "served_model_name": "models.*.served_model_name",
    "replicas": "models.*.replicas",
    "device": "models.*.device",
    "dtype": "models.*.dtype",
    "max_model_len": "models.*.max_model_len",
    "max_num_seqs": "models.*.max_num_seqs",
    "kv_cache_tokens": "models.*.kv_cache_tokens",
    "max_num_batched_tokens": "models.*.max_num_batched_tokens",
    "block_size": "models.*.block_size",
    "cpu_replicas": "models.*.cpu_replicas",
    "replica_arg": "models.*.args",
    "router_arg": "router.args",
    "max_restarts": "supervision.max_restarts",
    "ready_timeout": "supervision.ready_timeout_s",
    "drain_timeout": "supervision.drain_timeout_s",
}


def _given(flags: dict[str, Any]) -> dict[str, Any]:
    return {flag: value for flag, value in flags.items() if value is not None and value != []}


def _overrides(**flags: Any) -> dict[str, Any]:
    """Flag values that were given, as dotted spec paths (model flags apply to every model)."""
    out: dict[str, Any] = {}
    for flag, value in _given(flags).items():
        if flag == "replicas":
            value = value if value == "auto" else _int(value, "--replicas")
        out[SPEC_PATHS[flag]] = value
    return out


def _int(text: str, flag: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise typer.BadParameter(f"{flag}: expected a number or 'auto', got {text!r}") from None


def build_spec(
    spec_file: Path | None, run_dir_opt: Path | None, sets: list[str], **flags: Any
) -> FleetSpec:
    overrides = _overrides(**flags)
    if run_dir_opt is not None:
        overrides["run_dir"] = str(run_dir_opt)
    try:
        for assignment in sets:
            key, value = parse_assignment(assignment)
            overrides[key] = value
        return load_spec(spec_file, overrides)
    except SpecError as exc:
        _fail(_one_line(str(exc), spec_file, sets, _given(flags)), 2)


def _one_line(message: str, spec_file: Path | None, sets: list[str], flags: dict[str, Any]) -> str:
    """fleet.spec's "invalid fleet spec" and its field lines, as one line naming what set each
    field: `--max-num-seqs 0: models.0.max_num_seqs: ...`, `--set KEY`, or the spec file."""
    head, *fields = message.splitlines()
    if not fields:
        return message
    where = f"{spec_file}: " if spec_file is not None else ""
    described = []
    for line in fields:
        loc, _, why = line.strip().removeprefix(where).partition(": ")
        origin = _origin(loc, sets, flags) or where.rstrip(": ")
        described.append(f"{origin}: {why}" if origin.endswith(loc) else f"{origin}: {loc}: {why}")
    return f"{head}: " + "; ".join(described)


def _origin(loc: str, sets: list[str], flags: dict[str, Any]) -> str | None:
    """The flag that set a spec field, as the user typed it; None: the spec file (or a default)."""
    for assignment in reversed(sets):  # the last --set of a field wins, as in build_spec
        key = assignment.partition("=")[0].strip()
        if loc == key or loc.startswith(key + "."):
            return f"--set {key}"
    for flag, value in flags.items():
        pattern = re.escape(SPEC_PATHS[flag]).replace(r"\*", r"\d+")
        if re.fullmatch(pattern + r"(\.\d+)?", loc):
            return f"--{flag.replace('_', '-')} {_shown(flag, value)}".rstrip()
    return None


def _shown(flag: str, value: Any) -> str:
    """A flag's value as an error message may show it: no secret, no Redis password."""
    if flag == "admin_key" or isinstance(value, bool):
        return ""
    return mask_redis_url(value) if flag == "redis_url" else str(value)


def preflight(spec: FleetSpec, flags: dict[str, Any]) -> None:
    """Values that cannot work end here, one line naming the flag (or spec field) and exit
    status 2, before any process starts: not after a replica crashed its way through restarts."""

    def name(flag: str, field: str) -> str:
        return f"--{flag.replace('_', '-')}" if flag in flags else field

    try:
        check_port(spec.router.host, spec.router.port, name("port", "router.port"))
        if spec.redis.url:
            check_redis_reachable(spec.redis.url, name("redis_url", "redis.url"))
        if spec.backend == "local":  # on Ray, the model folders are the replica hosts' to check
            for index, model in enumerate(spec.models):
                if model.path is not None:
                    check_model(model.path, name("model", f"models.{index}.path"))
    except FlagError as exc:
        _fail(str(exc), 2)


def _running_state(folder: Path) -> FleetState:
    state = FleetState.load(folder)
    if state is None:
        _fail(f"no fleet is running from {folder} (start one with `fleet up`)")
    if not state.manager_alive():
        _fail(
            f"the fleet manager (pid {state.manager_pid}) of {folder} is gone; "
            "`fleet down` cleans up what it left"
        )
    return state


def _call(state: FleetState, op: str, args: dict | None = None, quiet: bool = False) -> Any:
    printer = None if quiet else (lambda m: console.print(f"[cyan]•[/] {m}"))
    try:
        return manager_socket.call(state.manager_socket, op, args, on_progress=printer)
    except manager_socket.ManagerError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"cannot reach the fleet manager at {state.manager_socket}: {exc}")


def print_ready(state: FleetState) -> None:
    url = state.router_url
    console.print(f"\n[bold green]fleet ready[/]  OpenAI endpoint: [bold]{url}/v1[/]")
    models = [m.get("served_model_name") or m.get("path") for m in state.spec.get("models", [])]
    model = next((p.model for p in state.processes if p.kind == "replica"), None) or models[0]
    auth = ""
    if state.admin_key:
        console.print(f"admin key: [bold]{state.admin_key}[/]  (the router's /admin API)")
    if state.example_key:
        console.print(f"API key for you: [bold]{state.example_key}[/]")
        auth = f' \\\n  -H "Authorization: Bearer {state.example_key}"'
    home = "" if Path(state.run_dir) == run_dir() else f"FLEET_HOME={state.run_dir} "
    console.print(f"more keys: {home}fleet keys create --name NAME", soft_wrap=True)
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello!"}],
                       "max_tokens": 32})  # fmt: skip
    console.print(
        f"try it:\n  curl -s {url}/v1/chat/completions{auth} \\\n"
        f"  -H 'Content-Type: application/json' -d '{body}'",
        soft_wrap=True,
    )
    where = "" if Path(state.run_dir) == run_dir() else f" --run-dir {state.run_dir}"
    console.print(
        f"status: fleet status{where}   logs: fleet logs{where}   stop: fleet down{where}\n",
        soft_wrap=True,
    )


class _Hangup(KeyboardInterrupt):
    """SIGTERM or SIGHUP to `fleet up`: stop like Ctrl-C (after SIGHUP, nobody reads the output)."""


def _raise_interrupt(signum: int, frame: object) -> None:
    if signum == signal.SIGHUP:
        console.file = err.file = open(os.devnull, "w")  # noqa: SIM115 - the terminal is gone
    raise _Hangup


def _up(spec: FleetSpec, folder: Path, detach: bool, timeout: float) -> int:
    """Start the manager process, show progress until ready; in the foreground, stay until Ctrl-C."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupt)
    daemon = _spawn_manager(spec, folder, None if detach else os.getpid())
    try:
        state = _wait_until_ready(daemon, folder, timeout)
        print_ready(state)
        if detach:
            console.print(f"manager pid {daemon.pid} keeps the fleet running in the background")
            return 0
        console.print("[dim]Ctrl-C drains and stops the fleet[/]")
        _watch(state, daemon)
    except KeyboardInterrupt:
        pass
    return _stop_manager(daemon, folder)


def _spawn_manager(spec: FleetSpec, folder: Path, parent: int | None) -> subprocess.Popen:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "logs").mkdir(exist_ok=True)
    (folder / SPEC_FILE).write_text(spec.model_dump_json(indent=2))
    (folder / ERROR_FILE).unlink(missing_ok=True)
    argv = [sys.executable, "-m", "fleet.launch.daemon", str(folder)]
    with open(folder / "logs" / "manager.log", "ab") as log:
        return subprocess.Popen(
            argv + ([str(parent)] if parent else []),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _wait_until_ready(daemon: subprocess.Popen, folder: Path, timeout: float) -> FleetState:
    """The live status view (replicas loading, events) until the manager reports ready."""
    from fleet.launch.view import fleet_view

    deadline = time.monotonic() + timeout
    with Live(console=console, refresh_per_second=8, transient=True) as live:
        live.update(Text("starting the fleet…"))
        while time.monotonic() < deadline:
            if daemon.poll() is not None:
                live.stop()
                error = folder / ERROR_FILE
                message = error.read_text().strip() if error.exists() else _log_tail(folder)
                _fail(f"the fleet did not start:\n{message}")
            state = FleetState.load(folder)
            if state is not None and state.manager_pid == daemon.pid:
                if state.phase == "ready":
                    return state
                status = _status_or_none(state)
                if status is not None:
                    live.update(fleet_view(status))
            time.sleep(0.5)
    _stop_manager(daemon, folder)
    _fail(f"the fleet was not ready within {timeout:.0f}s; see {folder}/logs")


def _watch(state: FleetState, daemon: subprocess.Popen) -> None:
    from fleet.launch.view import fleet_view

    with Live(console=console, refresh_per_second=4) as live:
        while daemon.poll() is None:
            status = _status_or_none(state)
            if status is not None:
                live.update(fleet_view(status))
            time.sleep(1.0)
    err.print("[red]the fleet manager exited[/]; see its log: fleet logs manager")


def _status_or_none(state: FleetState) -> dict | None:
    try:
        return manager_socket.call(state.manager_socket, "status", timeout=10.0)
    except (OSError, manager_socket.ManagerError, ValueError):
        return None


def _stop_manager(daemon: subprocess.Popen, folder: Path) -> int:
    """Ask for an orderly stop (drain, then stop), then wait for it; Ctrl-C again stops waiting."""
    if daemon.poll() is None:
        try:
            manager_socket.call(folder / MANAGER_SOCKET, "stop", timeout=10.0)
        except (OSError, manager_socket.ManagerError, ValueError):
            daemon.send_signal(signal.SIGTERM)
    with contextlib.suppress(OSError):
        try:
            with console.status("draining and stopping the fleet…"):
                daemon.wait()
        except KeyboardInterrupt:
            console.print(f"still stopping in the background (manager pid {daemon.pid})")
            return 130
        console.print("[green]fleet stopped[/]")
    return 0


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


def _log_tail(folder: Path, lines: int = 30) -> str:
    from fleet.launch.process import tail

    return tail(folder / "logs" / "manager.log", lines)


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
        _fail(
            f"a fleet is already running from {folder} (pid {state.manager_pid}); `fleet down` first"
        )
    preflight(spec, _given(flags))
    raise typer.Exit(_up(spec, folder, detach, spec.supervision.ready_timeout_s + 120))


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
        _fail(f"no fleet is running from {folder} and there is no {log_file}")
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
        _fail(f"cannot follow {path}: {exc}")


def register(app: typer.Typer) -> None:
    for command in (up, down, status, logs, restart, scale):
        app.command()(command)
