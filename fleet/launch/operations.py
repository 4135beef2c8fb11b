"""What the fleet manager does when `fleet status / logs / restart / scale / down` ask over its
socket (fleet.launch.manager_socket): one handler per operation, one operation that changes the
fleet at a time."""

from __future__ import annotations

import asyncio
import os
import time
from typing import TYPE_CHECKING, Any

from fleet.control.redis_conn import mask_redis_url
from fleet.launch.manager_socket import Handler, ManagerError, Progress
from fleet.launch.replicas import ReplicaHandle
from fleet.launch.router_admin import replica_action, wait_routable
from fleet.launch.status import collect_status

if TYPE_CHECKING:
    from fleet.launch.manager import FleetManager


class FleetOperations:
    """The manager's operations, on the manager's own state (see FleetManager)."""

    def __init__(self, manager: FleetManager) -> None:
        self.manager = manager
        self._changing = asyncio.Lock()  # restarts and scaling never interleave

    def handlers(self) -> dict[str, Handler]:
        return {
            "status": self._op_status,
            "logs": self._op_logs,
            "restart": self._op_restart,
            "scale": self._op_scale,
            "stop": self._op_stop,
        }

    async def _op_stop(self, args: dict, progress: Progress) -> str:
        self.manager.request_stop()
        return "stopping"

    async def _op_status(self, args: dict, progress: Progress) -> dict:
        return await self.status()

    async def status(self) -> dict:
        m = self.manager
        handles = list(m.replicas.items())
        snapshots = await asyncio.gather(*(h.snapshot() for _, h in handles))
        supervised = {name: snap for (name, _), snap in zip(handles, snapshots, strict=True)}
        return await collect_status(
            fleet={
                "name": m.spec.name,
                "backend": m.spec.backend,
                "phase": m.state.phase if m.state else "starting",
                "router_url": m.router_url,
                "redis_url": mask_redis_url(m.redis_url),
                "run_dir": str(m.run_dir),
                "manager_pid": os.getpid(),
                "events": list(m.events)[-10:],
            },
            redis_url=m.redis_url,
            router_url=m.router_url,
            admin_key=m.admin_key,
            router=m.router.snapshot() if m.router else None,
            supervised=supervised,
        )

    async def _op_logs(self, args: dict, progress: Progress) -> dict:
        replicas, router = self.manager.replicas, self.manager.router
        lines = int(args.get("lines") or 100)
        name = args.get("replica")
        if name is None or name in ("", "router"):
            targets = {"router": router.log_tail(lines) if router else ""}
            if name is None:
                for replica, handle in replicas.items():
                    targets[replica] = await handle.logs(lines)
            return targets
        found = replicas.get(name) or self._by_member_id(name)
        if found is None:
            raise ManagerError(f"no replica {name!r}; known: {', '.join(replicas) or 'none'}")
        return {found.name: await found.logs(lines)}

    def _by_member_id(self, name: str) -> ReplicaHandle | None:
        return next(
            (h for h in self.manager.replicas.values() if h.url and h.url.endswith(name)), None
        )

    async def _op_restart(self, args: dict, progress: Progress) -> dict:
        return await self.rolling_restart(args.get("model"), args.get("replica"), progress)

    async def rolling_restart(
        self, model: str | None = None, replica: str | None = None, progress: Progress = print
    ) -> dict:
        """One replica at a time: drain it, restart it, wait until it serves again, then the next."""
        m = self.manager
        async with self._changing:
            targets = [
                h
                for h in m.replicas.values()
                if (model is None or h.model == model) and (replica is None or h.name == replica)
            ]
            if not targets:
                raise ManagerError("nothing to restart: no replica matches")
            timings = {}
            for handle in targets:
                began = time.monotonic()
                progress(f"draining {handle.name}")
                await replica_action(m.router_url, m.admin_key, "drain", handle.name)
                progress(f"restarting {handle.name}")
                if not await handle.restart(m.policy.ready_timeout_s):
                    snap = await handle.snapshot()
                    raise ManagerError(m.failure(handle.name, snap.get("crash_report")))
                if not await m.wait_member(handle, 60.0):
                    raise ManagerError(f"{handle.name} restarted but did not rejoin membership")
                await replica_action(m.router_url, m.admin_key, "undrain", handle.name)
                await wait_routable(m.router_url, m.admin_key, handle.name)
                timings[handle.name] = round(time.monotonic() - began, 2)
                progress(f"{handle.name} ready again ({timings[handle.name]:.1f}s)")
                m.save()
            return {"restarted": timings}

    async def _op_scale(self, args: dict, progress: Progress) -> dict:
        return await self.scale(str(args["model"]), int(args["replicas"]), progress)

    async def scale(self, model: str, replicas: int, progress: Progress = print) -> dict[str, Any]:
        """Add replicas (started, waited for) or drain and stop the newest ones."""
        m = self.manager
        if replicas < 0:
            raise ManagerError("the replica count must be 0 or more")
        async with self._changing:
            try:
                index = m.spec.find_model(model)
            except ValueError:
                index = m.model_names.index(model) if model in m.model_names else -1
                if index < 0:
                    raise ManagerError(
                        f"no model named {model!r}; this fleet serves {', '.join(m.model_names)}"
                    ) from None
            name = m.model_names[index]
            current = [h for h in m.replicas.values() if h.model == name]
            added, removed = [], []
            for _ in range(replicas - len(current)):
                handle = await m.add_replica(index)
                progress(f"starting {handle.name}")
                added.append(handle)
            m.save()
            for handle in added:
                await m.wait_replica(handle, time.monotonic() + m.policy.ready_timeout_s)
                progress(f"{handle.name} ready")
            for handle in reversed(current[replicas:]):
                progress(f"draining and stopping {handle.name}")
                await replica_action(m.router_url, m.admin_key, "drain", handle.name)
                await handle.stop()
                m.backend.release(handle.name)
                del m.replicas[handle.name]
                removed.append(handle.name)
            m.spec.models[index].replicas = replicas
            m.save()
            return {"model": name, "replicas": replicas, "added": [h.name for h in added],
                    "removed": removed}  # fmt: skip
