"""What the fleet manager asks its router's admin API during operations: drain or undrain one
replica, and whether the router routes to it again. All best effort: without an admin key, or
with a router that does not answer, the operation goes on and the replica's own state decides."""

from __future__ import annotations

import asyncio
import contextlib
import time

import httpx


async def replica_action(router_url: str, admin_key: str | None, action: str, name: str) -> None:
    """POST /admin/replicas/{name}/{action} ("drain", "undrain"); the replica marks itself
    draining anyway, this only closes the gap sooner."""
    if not admin_key:
        return
    headers = {"Authorization": f"Bearer {admin_key}"}
    async with httpx.AsyncClient(timeout=5.0) as client:
        with contextlib.suppress(httpx.HTTPError):
            await client.post(f"{router_url}/admin/replicas/{name}/{action}", headers=headers)


async def wait_routable(
    router_url: str, admin_key: str | None, name: str, timeout: float = 10.0
) -> bool:
    """Until the router lists the replica as routable (when its admin API can tell us)."""
    if not admin_key:
        await asyncio.sleep(1.0)
        return True
    headers = {"Authorization": f"Bearer {admin_key}"}
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=2.0) as client:
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError, ValueError):
                response = await client.get(f"{router_url}/admin/replicas", headers=headers)
                if response.status_code != 200:
                    await asyncio.sleep(1.0)
                    return False
                for entry in _router_entries(response.json()):
                    if entry.get("id") == name and _routable(entry):
                        return True
            await asyncio.sleep(0.1)
    return False


def _router_entries(payload: object) -> list[dict]:
    if isinstance(payload, dict):
        payload = payload.get("replicas", payload.get("data", []))
    return [e for e in payload if isinstance(e, dict)] if isinstance(payload, list) else []


def _routable(entry: dict) -> bool:
    if "routable" in entry:
        return bool(entry["routable"])
    return entry.get("state", "ready") == "ready" and not entry.get("admin_drained")
