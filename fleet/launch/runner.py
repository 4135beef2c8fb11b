"""Run a fleet manager from start to stop, in the foreground or as the detached daemon.

Signals (Ctrl-C, SIGTERM, a closed terminal) and the control socket's `stop` all end in the same
orderly shutdown: replicas drain, then the router and Redis stop, then the state file goes.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from pathlib import Path

from fleet.launch.manager import FleetManager, FleetStartError

ERROR_FILE = "startup-error.txt"


async def run_fleet(
    manager: FleetManager,
    on_ready: Callable[[], None] | None = None,
    on_stopping: Callable[[], None] | None = None,
) -> int:
    """0 after a requested stop, 1 if the fleet never became ready (reason in ERROR_FILE)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, manager.request_stop)
    error_file = manager.run_dir / ERROR_FILE
    error_file.unlink(missing_ok=True)
    code = 0
    try:
        await _start_until_ready_or_stopped(manager, on_ready)
    except (FleetStartError, OSError) as exc:
        code = 1
        manager.note(f"[red]fleet failed to start[/]: {exc}")
        _write_error(error_file, str(exc))
    finally:
        if on_stopping is not None:
            on_stopping()
        await manager.shutdown()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    return code


async def _start_until_ready_or_stopped(
    manager: FleetManager, on_ready: Callable[[], None] | None
) -> None:
    stop = asyncio.create_task(manager.run_until_stopped())
    ready = asyncio.create_task(_start_and_wait(manager))
    done, _ = await asyncio.wait({ready, stop}, return_when=asyncio.FIRST_COMPLETED)
    if ready not in done:
        ready.cancel()
        await asyncio.gather(ready, return_exceptions=True)
        return
    ready.result()
    if on_ready is not None:
        on_ready()
    await stop


async def _start_and_wait(manager: FleetManager) -> None:
    await manager.start()
    await manager.wait_ready()


def _write_error(path: Path, message: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(message + "\n")
