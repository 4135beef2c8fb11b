"""`fleet up`'s side of the manager process: start it, show progress until the fleet is ready,
then (in the foreground) watch it until Ctrl-C, and ask it for an orderly stop."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from rich.live import Live
from rich.text import Text

from fleet.commands.output import console, err, fail
from fleet.launch import manager_socket
from fleet.launch.state import ERROR_FILE, MANAGER_SOCKET, SPEC_FILE, FleetState
from fleet.spec import FleetSpec, run_dir


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


def run_manager(spec: FleetSpec, folder: Path, detach: bool, timeout: float) -> int:
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
                fail(f"the fleet did not start:\n{message}")
            state = FleetState.load(folder)
            if state is not None and state.manager_pid == daemon.pid:
                if state.phase == "ready":
                    return state
                status = _status_or_none(state)
                if status is not None:
                    live.update(fleet_view(status))
            time.sleep(0.5)
    _stop_manager(daemon, folder)
    fail(f"the fleet was not ready within {timeout:.0f}s; see {folder}/logs")


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


def _log_tail(folder: Path, lines: int = 30) -> str:
    from fleet.launch.process import tail

    return tail(folder / "logs" / "manager.log", lines)
