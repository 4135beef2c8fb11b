"""The Ray backend: one named, detached supervisor actor per replica, each holding one GPU.

The actor runs the replica server as its child process (own process group, parent-death signal),
under the same Supervisor as the local backend, on a free port of its node, advertising the node's
reachable address to membership. Ray restarts an actor whose process or node dies, on whatever node
has a free GPU, so replicas move when a host goes away (or wait until one returns). The router never
asks Ray anything: it reads membership from Redis like any other replica's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from fleet.embedded_redis import free_port
from fleet.launch.process import ProcessSpec
from fleet.launch.replicas import ReplicaLaunch
from fleet.launch.state import ProcessRecord
from fleet.launch.supervisor import RestartPolicy, Supervisor

NAMESPACE = "fleetserve"


def _ray():
    try:
        import ray
    except ImportError as exc:
        raise RuntimeError(
            "the ray backend needs Ray: pip install 'fleetserve[ray]' (ray[default]>=2.40)"
        ) from exc
    return ray


def actor_name(fleet: str, replica: str) -> str:
    return f"{fleet}.{replica}"


class ReplicaActor:
    """Lives on a GPU host: starts and supervises one replica server there (threaded actor)."""

    def __init__(self, launch: dict, policy: dict, fleet: str) -> None:
        ray = _ray()
        self.launch = ReplicaLaunch(**launch)
        self.node_ip = ray.util.get_node_ip_address()
        self.node_id = ray.get_runtime_context().get_node_id()
        self.cuda_visible_devices = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        self.port = free_port("0.0.0.0")
        self.url = f"http://{self.node_ip}:{self.port}"
        log_path = Path(tempfile.gettempdir()) / "fleetserve" / fleet / f"{self.launch.name}.log"
        env = {**self.launch.environment(), "CUDA_VISIBLE_DEVICES": self.cuda_visible_devices}
        argv = self.launch.argv("0.0.0.0", self.port, advertise_url=self.url)
        self.supervisor = Supervisor(
            self.launch.name,
            ProcessSpec(argv, log_path, env),
            RestartPolicy(**policy),
            health_url=f"http://127.0.0.1:{self.port}/health",
        )
        # The supervisor's loop thread lives as long as this actor: its children die with it.
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="supervisor", daemon=True).start()
        self._run(self._start())

    async def _start(self) -> None:
        self.supervisor.start()

    def _run(self, coro: Coroutine[Any, Any, Any], timeout: float | None = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def info(self) -> dict:
        return {
            **self.supervisor.snapshot(),
            "model": self.launch.model,
            "url": self.url,
            "node": self.node_ip,
            "node_id": self.node_id,
            "gpu": self.cuda_visible_devices,
            "actor_pid": os.getpid(),
        }

    def wait_ready(self, timeout: float) -> bool:
        return self._run(self.supervisor.wait_ready(timeout))

    def restart(self, timeout: float) -> bool:
        return self._run(self.supervisor.restart(timeout))

    def stop(self) -> None:
        self._run(self.supervisor.stop())

    def logs(self, lines: int) -> str:
        return self.supervisor.log_tail(lines)


class RayReplica:
    """The manager's handle on one replica actor; its URL follows the actor across restarts."""

    def __init__(self, launch: ReplicaLaunch, actor: Any, policy: RestartPolicy) -> None:
        self.name = launch.name
        self.model = launch.model
        self.actor = actor
        self.policy = policy
        self._info: dict = {}

    @property
    def url(self) -> str | None:
        return self._info.get("url")

    async def start(self) -> None:
        return None  # the actor's constructor starts the server

    async def _ask(self, method: str, *args: Any, timeout: float = 5.0) -> Any:
        # Shielded: an ask that times out must not cancel Ray Client's future of the answer, which
        # Ray would then fail to resolve (a traceback in the log for every such ask).
        answer = asyncio.ensure_future(getattr(self.actor, method).remote(*args))
        answer.add_done_callback(lambda done: done.cancelled() or done.exception())
        return await asyncio.wait_for(asyncio.shield(answer), timeout)

    async def wait_ready(self, timeout: float) -> bool:
        try:
            ready = await self._ask("wait_ready", timeout, timeout=timeout + 5)
        except (asyncio.TimeoutError, Exception):  # placement pending, actor restarting or dead
            return False
        await self.snapshot()
        return bool(ready)

    async def restart(self, timeout: float) -> bool:
        with contextlib.suppress(Exception):
            ready = await self._ask(
                "restart", timeout, timeout=timeout + self.policy.drain_timeout_s
            )
            await self.snapshot()
            return bool(ready)
        return False

    async def stop(self) -> None:
        ray = _ray()
        with contextlib.suppress(Exception):
            await self._ask("stop", timeout=self.policy.drain_timeout_s + 10)
        with contextlib.suppress(Exception):
            ray.kill(self.actor, no_restart=True)

    async def snapshot(self) -> dict:
        try:
            self._info = await self._ask("info", timeout=1.0)
            return dict(self._info)
        except Exception:  # not placed yet, or being restarted by Ray
            return {"name": self.name, "model": self.model, "state": "starting", "url": self.url}

    async def logs(self, lines: int) -> str:
        try:
            return await self._ask("logs", lines)
        except Exception as exc:
            return f"(logs of {self.name} unavailable: {type(exc).__name__})\n"

    def record(self) -> ProcessRecord:
        return ProcessRecord(
            self.name, "replica", None, self.url, self._info.get("log"), self.model,
            self._info.get("node"),
        )  # fmt: skip


class RayBackend:
    kind = "ray"

    def __init__(
        self,
        fleet: str,
        address: str | None,
        policy: RestartPolicy,
        note: Callable[[str], None],
    ) -> None:
        self.fleet = fleet
        self.address = address
        self.policy = policy
        self.note = note
        self._actor_class: Any = None

    @property
    def client_mode(self) -> bool:
        """Connected through Ray Client (`ray://head:port`): this host is no node of the cluster."""
        return bool(self.address and self.address.startswith("ray://"))

    def connect(self) -> None:
        ray = _ray()
        # Ray Client's head sometimes fails to start the server for a new connection: try again.
        attempts = 5 if self.client_mode else 1
        for attempt in range(1, attempts + 1):
            if ray.is_initialized():
                break
            try:
                ray.init(
                    address=self.address,
                    namespace=NAMESPACE,
                    log_to_driver=False,
                    ignore_reinit_error=True,
                    configure_logging=False,
                )
            except ConnectionError as exc:
                with contextlib.suppress(Exception):
                    ray.shutdown()
                if attempt == attempts:
                    raise
                self.note(f"Ray Client at {self.address}: {type(exc).__name__}; trying again")
                time.sleep(2.0)
        for name in kill_fleet_actors(self.fleet, connected=True):
            self.note(f"removed leftover Ray actor {name}")
        self._actor_class = ray.remote(ReplicaActor)
        resources = ray.cluster_resources()
        self.note(
            f"Ray cluster: {len(ray.nodes())} node(s), {resources.get('GPU', 0):g} GPU(s), "
            f"{resources.get('CPU', 0):g} CPU(s)"
        )

    def gpu_count(self) -> int:
        return int(_ray().cluster_resources().get("GPU", 0))

    def wait_for_nodes(self, count: int, timeout: float) -> int:
        """Until `count` nodes are alive (hosts the head's autoscaler still starts); how many are."""
        deadline = time.monotonic() + timeout
        alive = 0
        while True:
            now = sum(1 for node in _ray().nodes() if node.get("Alive"))
            if now != alive:
                self.note(f"Ray cluster: {now} of {count} host(s) joined")
                alive = now
            if alive >= count or time.monotonic() > deadline:
                return alive
            time.sleep(1.0)

    def head_address(self) -> str:
        if self.client_mode:  # the address of this host on the way to the cluster's head
            assert self.address is not None
            return local_address_towards(self.address.removeprefix("ray://").rsplit(":", 1)[0])
        return _ray().util.get_node_ip_address()

    def cpu_threads(self, cpu_replicas: int) -> int:
        return max(1, (os.cpu_count() or 1) // max(1, cpu_replicas))

    def create(self, launch: ReplicaLaunch) -> RayReplica:
        actor = self._actor_class.options(
            name=actor_name(self.fleet, launch.name),
            namespace=NAMESPACE,
            lifetime="detached",
            num_gpus=1,
            num_cpus=0,
            max_restarts=-1,
            max_concurrency=16,
        ).remote(vars(launch), vars(self.policy), self.fleet)
        return RayReplica(launch, actor, self.policy)

    def release(self, name: str) -> None:
        return None

    async def close(self) -> None:
        ray = _ray()
        if ray.is_initialized():
            await asyncio.to_thread(ray.shutdown)


def local_address_towards(host: str) -> str:
    """This host's address that packets to `host` leave from (a UDP connect sends nothing)."""
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.connect((host, 9))
        return str(sock.getsockname()[0])


def kill_fleet_actors(
    fleet: str, address: str | None = None, *, connected: bool = False
) -> list[str]:
    """Kill every actor of this fleet (after a manager crash); names of those killed."""
    ray = _ray()
    if not connected:
        try:
            ray.init(address=address or "auto", namespace=NAMESPACE, log_to_driver=False,
                     configure_logging=False)  # fmt: skip
        except (ConnectionError, RuntimeError):
            return []  # no cluster: nothing of ours can be left on it
    killed = []
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry.get("namespace") != NAMESPACE or not entry["name"].startswith(f"{fleet}."):
            continue
        with contextlib.suppress(Exception):
            actor = ray.get_actor(entry["name"], namespace=NAMESPACE)
            with contextlib.suppress(Exception):
                ray.get(actor.stop.remote(), timeout=30)
            ray.kill(actor, no_restart=True)
            killed.append(entry["name"])
    if not connected:
        ray.shutdown()
    return killed
