"""One child process in its own process group, logging to a file, that dies with its parent.

Its own process group lets a stop reach everything the server spawned; the parent-death signal
(Linux `PR_SET_PDEATHSIG`) means a supervisor killed with SIGKILL, or a Ray node torn down, still
sends the server its SIGTERM, so it drains and leaves membership instead of lingering as an orphan.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

_PR_SET_PDEATHSIG = 1


@dataclass
class ProcessSpec:
    """How to start a child: argv, extra environment (on top of ours) and the log file."""

    argv: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None


def _die_with_parent() -> None:
    """Runs in the child between fork and exec: SIGTERM it when the forking thread exits."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def tail(path: Path, lines: int = 40, start: int = 0) -> str:
    """The last `lines` lines of a log, reading only from byte offset `start` (this run's output)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(start)
            last = deque(fh, maxlen=lines)
    except OSError:
        return ""
    return b"".join(last).decode(errors="replace")


def signal_group(pgid: int, sig: int) -> bool:
    """Signal a whole process group; False when nothing is left in it."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False
    return True


def group_alive(pgid: int) -> bool:
    return signal_group(pgid, 0)


class ChildProcess:
    """A running child started from a `ProcessSpec` (asyncio); `stop()` ends its whole group."""

    def __init__(self, spec: ProcessSpec) -> None:
        self.spec = spec
        self.proc: asyncio.subprocess.Process | None = None
        self.started_at = 0.0
        self.log_offset = 0
        self.failure_reason = ""

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode if self.proc else None

    async def start(self) -> None:
        self.spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.spec.log_path, "ab") as log:
            self.log_offset = log.tell()
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(f"--- {stamp} start: {' '.join(self.spec.argv)}\n".encode())
            log.flush()
            self.proc = await asyncio.create_subprocess_exec(
                *self.spec.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                env={**os.environ, **self.spec.env},
                cwd=self.spec.cwd,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        self.started_at = time.monotonic()

    def uptime(self) -> float:
        return time.monotonic() - self.started_at if self.started_at else 0.0

    async def wait(self) -> int:
        assert self.proc is not None
        return await self.proc.wait()

    async def stop(self, grace: float) -> int | None:
        """SIGTERM the server (it drains), SIGKILL its group after `grace`, reap leftovers."""
        if self.proc is None:
            return None
        pgid = self.proc.pid
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), grace)
            except asyncio.TimeoutError:
                signal_group(pgid, signal.SIGKILL)
                await self.proc.wait()
        signal_group(pgid, signal.SIGKILL)  # whatever the server left behind in its group
        return self.proc.returncode

    def log_tail(self, lines: int = 40) -> str:
        return tail(self.spec.log_path, lines, self.log_offset)
