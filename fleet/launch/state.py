"""The state file of a running fleet: how `fleet down`, `status`, `logs`, `restart` and `scale` find it.

Written by the fleet manager (atomically, mode 0600: it holds the admin key) into the run folder and
rewritten whenever a process starts or stops; removed when the fleet stops cleanly. The recorded
process groups let `fleet down` clean up even after the manager itself was killed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

STATE_FILE = "state.json"
MANAGER_SOCKET = "control.sock"  # the manager's socket (fleet.launch.manager_socket)
SPEC_FILE = "spec.json"  # what `fleet up` hands the manager process
ERROR_FILE = "startup-error.txt"  # why a fleet did not start, for `fleet up` to print
SCRAPE_TARGETS = "prometheus-targets.json"  # Prometheus file_sd targets (fleet.launch.scrape)

Phase = Literal["starting", "ready", "stopping", "failed"]


@dataclass
class ProcessRecord:
    """One process of the fleet on this host (a Ray replica records its node instead of a pid)."""

    name: str
    kind: Literal["redis", "router", "replica"]
    pid: int | None = None
    url: str | None = None
    log: str | None = None
    model: str | None = None
    node: str | None = None


@dataclass
class FleetState:
    name: str
    backend: str
    run_dir: str
    manager_pid: int
    redis_url: str
    router_url: str
    admin_key: str | None = None
    example_key: str | None = None
    phase: Phase = "starting"
    error: str | None = None
    started_at: float = field(default_factory=time.time)
    processes: list[ProcessRecord] = field(default_factory=list)
    spec: dict = field(default_factory=dict)

    @property
    def manager_socket(self) -> Path:
        return Path(self.run_dir) / MANAGER_SOCKET

    def save(self) -> None:
        folder = Path(self.run_dir)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{STATE_FILE}.{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(dataclasses.asdict(self), fh, indent=2)
        os.replace(tmp, folder / STATE_FILE)

    @classmethod
    def load(cls, run_dir: Path) -> FleetState | None:
        try:
            raw = json.loads((run_dir / STATE_FILE).read_text())
        except (OSError, ValueError):
            return None
        raw["processes"] = [ProcessRecord(**p) for p in raw.get("processes", [])]
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})

    def manager_alive(self) -> bool:
        return pid_alive(self.manager_pid)

    @staticmethod
    def remove(run_dir: Path) -> None:
        for name in (STATE_FILE, MANAGER_SOCKET, SCRAPE_TARGETS):
            with contextlib.suppress(FileNotFoundError):
                (run_dir / name).unlink()


def pid_alive(pid: int | None) -> bool:
    """True for a live, non-zombie process."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True
