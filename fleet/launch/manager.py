"""The fleet manager: starts Redis, the router and the replicas of a spec, keeps them alive, and
performs the operations behind `fleet status / restart / scale / down` until told to stop.

It runs in the foreground under `fleet up`, or as a background process (`fleet up --detach`, see
fleet.launch.daemon); either way it records the fleet in a state file and answers on its
socket in the run folder. Replica servers register themselves in Redis membership once healthy;
the manager only starts, watches and stops processes (or Ray actors) and reads what they publish.

The embedded Redis requires a password generated here; children get the Redis URL (with it) and
the fleet's internal secret in their environment, never on a command line, and events, logs and
status show the URL masked. What the socket's operations do lives in fleet.launch.operations.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import sys
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING

from rich.text import Text

from fleet.control import membership
from fleet.control.internal import INTERNAL_SECRET_ENV
from fleet.control.keys import KeyAdmin, admin_key_from_env, new_admin_key
from fleet.control.redis_conn import REDIS_DOWN_ERRORS, REDIS_URL_ENV, async_client, mask_redis_url
from fleet.embedded_redis import EmbeddedRedis
from fleet.launch.local import LocalBackend
from fleet.launch.manager_socket import ManagerSocket
from fleet.launch.operations import FleetOperations
from fleet.launch.process import ProcessSpec
from fleet.launch.ray_cluster import ClusterError, RayCluster
from fleet.launch.replicas import ReplicaBackend, ReplicaHandle, ReplicaLaunch
from fleet.launch.scrape import write_scrape_targets
from fleet.launch.state import SCRAPE_TARGETS, FleetState, ProcessRecord
from fleet.launch.supervisor import RestartPolicy, Supervisor, SupervisorEvent
from fleet.launch.teardown import teardown
from fleet.spec import FleetSpec, ModelSpec, replica_count, replica_device

if TYPE_CHECKING:
    from fleet.launch.ray_backend import RayBackend

log = logging.getLogger("fleet.manager")


class FleetStartError(RuntimeError):
    """The fleet could not become ready; the message says which part and why."""


class FleetManager:
    def __init__(self, spec: FleetSpec, run_dir: Path) -> None:
        self.spec = spec
        self.run_dir = run_dir
        self.log_dir = run_dir / "logs"
        self.events: deque[str] = deque(maxlen=200)
        self.policy = RestartPolicy(**spec.supervision.model_dump())
        self.redis: EmbeddedRedis | None = None
        self.redis_url = spec.redis.url or ""
        self.admin_key = spec.keys.admin_key or admin_key_from_env()
        # Routers derive each replica's key from it (fleet.control.internal): never shown or stored.
        self.internal_secret = secrets.token_urlsafe(32)
        self.router: Supervisor | None = None
        self.replicas: dict[str, ReplicaHandle] = {}
        self.model_names: list[str] = []  # served name of each spec model, in spec order
        self.model_paths: dict[str, str] = {}
        self._backend: ReplicaBackend | None = None  # made first by `start`
        self.cluster: RayCluster | None = None  # the hosts' Ray cluster, once `ray up` ran
        self.state: FleetState | None = None
        self.socket: ManagerSocket | None = None
        self._stop = asyncio.Event()
        self.operations = FleetOperations(self)
        self._next_index: dict[str, int] = {}

    # ------------------------------------------------------------------ events

    def note(self, message: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {message}"
        self.events.append(line)
        log.info("%s", Text.from_markup(message).plain)

    def _on_supervisor(self, event: SupervisorEvent) -> None:
        if event.kind == "gave_up":
            self.note(f"[red]{event.name} gave up[/]: {event.detail}")
        elif event.kind == "crashed":
            self.note(f"[yellow]{event.name} crashed[/] ({event.detail}); restarting with backoff")
        elif event.kind in ("started", "ready"):
            self.note(f"{event.name} {event.kind} {event.detail}".rstrip())
        if event.kind in ("started", "gave_up") and self.state is not None:
            self.save()

    # ------------------------------------------------------------------ start

    @property
    def router_url(self) -> str:
        host = self.spec.router.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        return f"http://{host}:{self.spec.router.port}"

    async def start(self) -> None:
        """Launch everything (returns before replicas are ready; see `wait_ready`)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir.chmod(0o700)
        self.log_dir.mkdir(exist_ok=True)
        existing = FleetState.load(self.run_dir)
        if existing is not None and existing.manager_pid != os.getpid():
            if existing.manager_alive():
                raise FleetStartError(
                    f"a fleet is already running from {self.run_dir} (manager pid "
                    f"{existing.manager_pid}); stop it with `fleet down` or use another --run-dir"
                )
            for line in await asyncio.to_thread(lambda: list(teardown(existing, 30.0))):
                self.note(f"left by a previous fleet: {line}")
        _check_port_free(self.spec.router.host, self.spec.router.port)
        self._backend = await self._make_backend()
        await self.start_redis()
        if not self.admin_key:
            self.admin_key = new_admin_key()
        self.state = FleetState(
            name=self.spec.name,
            backend=self.spec.backend,
            run_dir=str(self.run_dir),
            manager_pid=os.getpid(),
            redis_url=self.redis_url,
            router_url=self.router_url,
            admin_key=self.admin_key,
            spec=self.spec.model_dump(mode="json"),
        )
        self.save()
        self.socket = ManagerSocket(self.state.manager_socket, self.operations.handlers())
        await self.socket.start()
        await self._resolve_models()
        await self._start_router()
        for index, model in enumerate(self.spec.models):
            for _ in range(self._count(model)):
                await self.add_replica(index)
        self.save()

    @property
    def backend(self) -> ReplicaBackend:
        if self._backend is None:
            raise RuntimeError("the fleet manager has not started")
        return self._backend

    async def _make_backend(self) -> ReplicaBackend:
        if self.spec.backend == "ray":
            from fleet.launch.ray_backend import RayBackend

            address = self.spec.ray_address
            if self.spec.hosts.addresses:
                address = await self._start_cluster()
            backend = RayBackend(self.spec.name, address, self.policy, self.note)
            await asyncio.to_thread(backend.connect)
            if self.cluster is not None:
                await self._wait_for_hosts(backend)
            return backend
        return LocalBackend(self.log_dir, self.policy, self._on_supervisor)

    async def _start_cluster(self) -> str:
        """`ray up` over the spec's hosts; the Ray Client address of their head."""
        hosts = self.spec.hosts.addresses
        try:
            self.cluster = RayCluster.of(self.spec, self.run_dir)
        except ClusterError as exc:
            raise FleetStartError(str(exc)) from None
        self.note(f"starting Ray over SSH on {', '.join(hosts)} (ray up; head {hosts[0]})")
        began = time.monotonic()
        try:
            await asyncio.to_thread(self.cluster.up)
        except ClusterError as exc:
            raise FleetStartError(str(exc)) from None
        self.note(f"Ray is up on head {hosts[0]} after {time.monotonic() - began:.0f}s")
        return self.cluster.client_address

    async def _wait_for_hosts(self, backend: RayBackend) -> None:
        hosts = self.spec.hosts
        joined = await asyncio.to_thread(
            backend.wait_for_nodes, len(hosts.addresses), hosts.join_timeout_s
        )
        if joined < len(hosts.addresses):
            raise FleetStartError(
                f"only {joined} of {len(hosts.addresses)} hosts joined the Ray cluster within "
                f"{hosts.join_timeout_s:.0f}s: the head ({hosts.addresses[0]}) starts the others "
                "over SSH; see /tmp/ray/session_latest/logs/monitor.* there"
            )

    async def start_redis(self) -> None:
        """The spec's Redis, or an embedded one that requires a freshly generated password (on
        the Ray backend it listens on the head's address, where protected mode no longer
        shields it)."""
        if self.spec.redis.url:
            self.note(f"using Redis at {mask_redis_url(self.spec.redis.url)}")
            return
        host = "127.0.0.1" if self._backend is None else self._backend.head_address()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.redis = EmbeddedRedis(
            host=host, data_dir=self.run_dir / "redis", password=secrets.token_urlsafe(32)
        )
        await asyncio.to_thread(self.redis.start)
        self.redis_url = self.redis.url
        self.note(f"embedded Redis at {mask_redis_url(self.redis_url)}")

    async def _resolve_models(self) -> None:
        from fleet.model_factory import cached_model

        for model in self.spec.models:
            if model.path is None:
                self.note("preparing the factory's tiny model (built once, then cached)")
                path = await asyncio.to_thread(cached_model)
                self.model_names.append(model.display_name(path))
                self.model_paths[self.model_names[-1]] = str(path)
            else:
                self.model_names.append(model.display_name())
                self.model_paths[self.model_names[-1]] = model.path

    def _count(self, model: ModelSpec) -> int:
        if self.spec.backend == "ray" and model.replicas == "auto":
            return self.backend.gpu_count()  # each Ray replica holds one GPU, whatever its device
        return replica_count(model, self.backend.gpu_count())

    def router_process(self) -> ProcessSpec:
        """The router's launch: secrets and the Redis URL in its environment, not its argv."""
        router = self.spec.router
        argv = [sys.executable, "-m", "router", "--host", router.host, "--port", str(router.port),
                "--policy", router.policy]  # fmt: skip
        env = {"FLEET_ADMIN_KEY": self.admin_key or "", REDIS_URL_ENV: self.redis_url}
        if self.spec.keys.enabled:
            env[INTERNAL_SECRET_ENV] = self.internal_secret
        else:
            argv.append("--no-fleet-keys")
        return ProcessSpec(argv + router.args, self.log_dir / "router.log", env)

    async def _start_router(self) -> None:
        spec = self.router_process()
        self.router = Supervisor(
            "router", spec, self.policy, f"{self.router_url}/health", self._on_supervisor
        )
        self.router.start()

    async def add_replica(self, model_index: int) -> ReplicaHandle:
        model = self.spec.models[model_index]
        name = self.model_names[model_index]
        index = self._next_index.get(name, 0)
        self._next_index[name] = index + 1
        gpus = self.backend.gpu_count()
        device = replica_device(model, gpus) if self.spec.backend == "local" else model.device
        env = {"TOKENIZERS_PARALLELISM": "false", **model.env}
        flags = model.engine_flags()
        if self.spec.keys.enabled:
            env[INTERNAL_SECRET_ENV] = self.internal_secret
        else:
            flags.append("--no-fleet-keys")
        if device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            env.setdefault("OMP_NUM_THREADS", str(self.backend.cpu_threads(self._count(model))))
        launch = ReplicaLaunch(
            name=f"{name}-{index}",
            model=name,
            model_path=self.model_paths[name],
            device=device,
            redis_url=self.redis_url,
            flags=flags,
            env=env,
        )
        handle = self.backend.create(launch)
        self.replicas[handle.name] = handle
        await handle.start()
        return handle

    # ------------------------------------------------------------------ readiness

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Until the router answers and every replica is healthy and in membership."""
        timeout = timeout or self.policy.ready_timeout_s
        deadline = time.monotonic() + timeout
        assert self.router is not None
        if not await self.router.wait_ready(timeout):
            raise FleetStartError(self.failure("router", self.router.crash_report))
        for handle in list(self.replicas.values()):
            await self.wait_replica(handle, deadline)
        if self.spec.keys.enabled and self.spec.keys.example_key and self.state:
            self.state.example_key = await self._create_example_key()
        assert self.state is not None
        self.state.phase = "ready"
        self.save()
        self.note(f"[green]fleet ready[/] at {self.router_url}")

    async def wait_replica(self, handle: ReplicaHandle, deadline: float) -> None:
        remaining = max(1.0, deadline - time.monotonic())
        if not await handle.wait_ready(remaining):
            snap = await handle.snapshot()
            raise FleetStartError(
                self.failure(handle.name, snap.get("crash_report"), snap.get("state"))
            )
        if not await self.wait_member(handle, max(1.0, deadline - time.monotonic())):
            raise FleetStartError(
                f"{handle.name} is healthy at {handle.url} but never joined membership in "
                f"{mask_redis_url(self.redis_url)}; see `fleet logs {handle.name}`"
            )

    def failure(self, name: str, report: object, state: str | None = None) -> str:
        """Why a part is not serving, for the user: its crash report, else where to look."""
        if report is None:
            return f"{name} did not become ready ({state or 'timed out'}); see `fleet logs {name}`"
        return str(report.render() if hasattr(report, "render") else report)

    async def _members(self) -> list[membership.ReplicaInfo]:
        client = async_client(self.redis_url, socket_timeout=2.0, connect_timeout=2.0)
        try:
            return await membership.list_replicas(client)
        except REDIS_DOWN_ERRORS:
            return []
        finally:
            await client.aclose()

    async def wait_member(self, handle: ReplicaHandle, timeout: float) -> bool:
        """Until the replica is `ready` in Redis membership (what the routers go by)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            urls = {m.url.rstrip("/"): m.state for m in await self._members()}
            if handle.url and urls.get(handle.url.rstrip("/")) == "ready":
                return True
            await asyncio.sleep(0.1)
        return False

    async def _create_example_key(self) -> str | None:
        client = async_client(self.redis_url, socket_timeout=2.0, connect_timeout=2.0)
        try:
            _, secret = await KeyAdmin(client).create("fleet-up-example")
            return secret
        except REDIS_DOWN_ERRORS as exc:
            self.note(f"could not create the example API key: {exc}")
            return None
        finally:
            await client.aclose()

    # ------------------------------------------------------------------ run and stop

    def request_stop(self) -> None:
        self._stop.set()

    async def run_until_stopped(self) -> None:
        await self._stop.wait()

    async def shutdown(self) -> None:
        """Drain and stop replicas, then the router and Redis; leave no process and no membership."""
        if self.state is not None:
            self.state.phase = "stopping"
            self.save()
        self.note("stopping: draining replicas")
        await asyncio.gather(*(h.stop() for h in self.replicas.values()), return_exceptions=True)
        if self.router is not None:
            await self.router.stop()
        await self._remove_stale_members()
        if self._backend is not None:
            await self._backend.close()
        if self.cluster is not None:
            self.note(f"stopping Ray on {', '.join(self.spec.hosts.addresses)}")
            for line in await asyncio.to_thread(self.cluster.down):
                self.note(line)
        if self.socket is not None:
            await self.socket.close()
        if self.redis is not None:
            await asyncio.to_thread(self.redis.stop)
        FleetState.remove(self.run_dir)
        self.note("fleet stopped")

    async def _remove_stale_members(self) -> None:
        """Entries of our replicas that a crash left behind (a clean exit removes its own)."""
        ours = {h.url.rstrip("/") for h in self.replicas.values() if h.url}
        ids = {h.name for h in self.replicas.values()}
        client = async_client(self.redis_url, socket_timeout=2.0, connect_timeout=2.0)
        try:
            for member in await membership.list_replicas(client):
                if member.managed == "lease" and (
                    member.url.rstrip("/") in ours or member.id in ids
                ):
                    await membership.unregister(client, member.id)
        except REDIS_DOWN_ERRORS:
            pass
        finally:
            await client.aclose()

    def save(self) -> None:
        """Rewrite the state file and the Prometheus targets after any change of processes."""
        if self.state is None:
            return
        records: list[ProcessRecord] = []
        if self.redis is not None and self.redis.process is not None:
            records.append(
                ProcessRecord(
                    "redis", "redis", self.redis.process.pid, mask_redis_url(self.redis_url)
                )
            )
        if self.router is not None:
            records.append(
                ProcessRecord(
                    "router",
                    "router",
                    self.router.pid,
                    self.router_url,
                    str(self.router.spec.log_path),
                )
            )
        records += [h.record() for h in self.replicas.values()]
        self.state.processes = records
        self.state.spec = self.spec.model_dump(mode="json")
        self.state.save()
        write_scrape_targets(self.run_dir / SCRAPE_TARGETS, self.spec.name, records)


def _check_port_free(host: str, port: int) -> None:
    """Fail before starting anything when the router could not bind its port."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise FleetStartError(
                f"the router cannot listen on {host} port {port}: {(exc.strerror or str(exc)).lower()} "
                "(port in use? pick another with --port)"
            ) from None
