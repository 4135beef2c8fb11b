"""The local backend: replica servers as supervised child processes of the fleet manager."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from fleet.embedded_redis import free_port
from fleet.launch.process import ProcessSpec
from fleet.launch.replicas import ReplicaLaunch
from fleet.launch.state import ProcessRecord
from fleet.launch.supervisor import RestartPolicy, Supervisor, SupervisorEvent
from fleet.spec import visible_gpus


class LocalReplica:
    """A replica server on this host, on a fixed port, restarted by its Supervisor."""

    def __init__(
        self,
        launch: ReplicaLaunch,
        log_path: Path,
        policy: RestartPolicy,
        on_event: Callable[[SupervisorEvent], None],
        gpu: str | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.name = launch.name
        self.model = launch.model
        self.gpu = gpu
        self.port = free_port(host)
        self._url = f"http://{host}:{self.port}"
        env = {"CUDA_VISIBLE_DEVICES": gpu if gpu is not None else "", **launch.environment()}
        spec = ProcessSpec(launch.argv(host, self.port), log_path, env)
        self.supervisor = Supervisor(
            self.name, spec, policy, health_url=f"{self._url}/health", on_event=on_event
        )

    @property
    def url(self) -> str:
        return self._url

    async def start(self) -> None:
        self.supervisor.start()

    async def wait_ready(self, timeout: float) -> bool:
        return await self.supervisor.wait_ready(timeout)

    async def restart(self, timeout: float) -> bool:
        return await self.supervisor.restart(timeout)

    async def stop(self) -> None:
        await self.supervisor.stop()

    async def snapshot(self) -> dict:
        return {
            **self.supervisor.snapshot(),
            "model": self.model,
            "url": self.url,
            "node": os.uname().nodename,
            "gpu": self.gpu,
        }

    async def logs(self, lines: int) -> str:
        return self.supervisor.log_tail(lines)

    def record(self) -> ProcessRecord:
        return ProcessRecord(
            self.name,
            "replica",
            self.supervisor.pid,
            self.url,
            str(self.supervisor.spec.log_path),
            self.model,
        )


class LocalBackend:
    """Places replicas on this host's GPUs, one GPU each, or as CPU processes."""

    kind = "local"

    def __init__(self, log_dir: Path, policy: RestartPolicy, on_event) -> None:
        self.log_dir = log_dir
        self.policy = policy
        self.on_event = on_event
        self._gpus = visible_gpus()
        self._taken: dict[str, str] = {}

    def gpu_count(self) -> int:
        return len(self._gpus)

    def head_address(self) -> str:
        return "127.0.0.1"  # a local fleet is one host

    def create(self, launch: ReplicaLaunch) -> LocalReplica:
        gpu = None
        if launch.device != "cpu" and self._gpus:
            free = [g for g in self._gpus if g not in self._taken.values()]
            if not free:
                raise RuntimeError(
                    f"no free GPU for {launch.name}: all {len(self._gpus)} are taken by replicas"
                )
            gpu = self._taken[launch.name] = free[0]
        log_path = self.log_dir / f"{launch.name}.log"
        return LocalReplica(launch, log_path, self.policy, self.on_event, gpu)

    def release(self, name: str) -> None:
        self._taken.pop(name, None)

    def cpu_threads(self, cpu_replicas: int) -> int:
        """Threads per CPU replica so that replicas share the cores instead of fighting for them."""
        return max(1, (os.cpu_count() or 1) // max(1, cpu_replicas))

    async def close(self) -> None:
        return None
