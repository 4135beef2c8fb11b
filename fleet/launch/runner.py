"""Run a fleet manager from start to stop: the body of the manager process (fleet.launch.daemon).

Signals, the manager socket's `stop`, and (for a foreground `fleet up`) the death of the terminal
process that started it all end in the same orderly shutdown: replicas drain, then the router and
Redis stop, then the state file goes.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from fleet.launch.manager import FleetManager, FleetStartError
from fleet.launch.state import ERROR_FILE, pid_alive


async def run_fleet(manager: FleetManager, parent_pid: int | None = None) -> int:
    """0 after a requested stop, 1 if the fleet never became ready (reason in ERROR_FILE)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, manager.request_stop)
    watcher = asyncio.create_task(_stop_when_gone(parent_pid, manager)) if parent_pid else None
    error_file = manager.run_dir / ERROR_FILE
    error_file.unlink(missing_ok=True)
    code = 0
    try:
        await _start_until_ready_or_stopped(manager)
    except (FleetStartError, OSError) as exc:
        code = 1
        manager.note(f"[red]fleet failed to start[/]: {exc}")
        _write_error(error_file, str(exc))
    finally:
        await manager.shutdown()
        if watcher is not None:
            watcher.cancel()
    return code


async def _stop_when_gone(pid: int, manager: FleetManager) -> None:
    """A foreground fleet lives as long as the `fleet up` that shows it (closed terminal, kill -9)."""
    while pid_alive(pid):
        await asyncio.sleep(0.5)
    manager.note(f"`fleet up` (pid {pid}) is gone: stopping the fleet")
    manager.request_stop()


async def _start_until_ready_or_stopped(manager: FleetManager) -> None:
    stop = asyncio.create_task(manager.run_until_stopped())
    ready = asyncio.create_task(_start_and_wait(manager))
    done, _ = await asyncio.wait({ready, stop}, return_when=asyncio.FIRST_COMPLETED)
    if ready not in done:
        ready.cancel()
        await asyncio.gather(ready, return_exceptions=True)
        return
    ready.result()
    await stop


async def _start_and_wait(manager: FleetManager) -> None:
    await manager.start()
    await manager.wait_ready()


def _write_error(path: Path, message: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(message + "\n")
