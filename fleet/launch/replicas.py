"""What a replica is to the fleet manager, whatever runs it: its launch line and a handle.

`ReplicaLaunch` is the backend-neutral recipe (model, device, flags, Redis); a backend turns it
into a `ReplicaHandle`: a local child under a Supervisor, or a Ray actor on some GPU host.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Protocol

from fleet.control.redis_conn import REDIS_URL_ENV
from fleet.launch.state import ProcessRecord


@dataclass
class ReplicaLaunch:
    """Everything needed to start one replica server; `name` is also its membership id."""

    name: str
    model: str
    model_path: str
    device: str
    redis_url: str
    flags: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    def argv(self, host: str, port: int, advertise_url: str | None = None) -> list[str]:
        argv = [
            sys.executable,
            "-m",
            "replica",
            "--model",
            self.model_path,
            "--served-model-name",
            self.model,
            "--host",
            host,
            "--port",
            str(port),
            "--replica-id",
            self.name,
        ]
        if self.device != "auto":
            argv += ["--device", self.device]
        if advertise_url:
            argv += ["--advertise-url", advertise_url]
        return argv + self.flags

    def environment(self) -> dict[str, str]:
        """`env` plus the Redis URL, which may hold a password: kept out of argv (`ps`, logs)."""
        return {**self.env, REDIS_URL_ENV: self.redis_url}


class ReplicaHandle(Protocol):
    """One supervised replica, wherever it runs."""

    name: str
    model: str

    @property
    def url(self) -> str | None: ...

    async def start(self) -> None: ...

    async def wait_ready(self, timeout: float) -> bool: ...

    async def restart(self, timeout: float) -> bool: ...

    async def stop(self) -> None: ...

    async def snapshot(self) -> dict: ...

    async def logs(self, lines: int) -> str: ...

    def record(self) -> ProcessRecord: ...


class ReplicaBackend(Protocol):
    """Where replicas run: this host (fleet.launch.local) or a Ray cluster (ray_backend)."""

    def gpu_count(self) -> int: ...

    def cpu_threads(self, cpu_replicas: int) -> int: ...

    def head_address(self) -> str:
        """The address other hosts reach the manager's host at (the embedded Redis binds it)."""
        ...

    def create(self, launch: ReplicaLaunch) -> ReplicaHandle: ...

    def release(self, name: str) -> None: ...

    async def close(self) -> None: ...
