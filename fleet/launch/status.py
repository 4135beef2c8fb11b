"""`fleet status` data: membership from Redis, each replica's own `/load` and `/metrics`, the
router's admin view, and (when a manager runs the fleet) what supervision knows, joined by URL.

It works without a manager too (`fleet status --redis-url ...`), e.g. for a Kubernetes fleet.
"""

from __future__ import annotations

import asyncio
import contextlib

import httpx
from prometheus_client.parser import text_string_to_metric_families

from fleet.control import membership
from fleet.control.redis_conn import REDIS_DOWN_ERRORS, async_client, mask_redis_url

_GENERATION_ROUTES = ("/v1/completions", "/v1/chat/completions")


async def collect_status(
    *,
    redis_url: str,
    router_url: str | None,
    admin_key: str | None,
    fleet: dict | None = None,
    router: dict | None = None,
    supervised: dict[str, dict] | None = None,
) -> dict:
    supervised = supervised or {}
    members, redis_error = await _members(redis_url)
    async with httpx.AsyncClient(timeout=2.0) as client:
        loads = await asyncio.gather(*(_replica_view(client, m.url) for m in members))
        router_view = await _router_view(client, router_url, admin_key) if router_url else None
    rows: list[dict] = []
    by_url = {s.get("url", "").rstrip("/"): name for name, s in supervised.items()}
    seen: set[str] = set()
    for member, load in zip(members, loads, strict=True):
        name = by_url.get(member.url.rstrip("/")) or (
            member.id if member.id in supervised else None
        )
        sup = supervised.get(name, {}) if name else {}
        if name:
            seen.add(name)
        rows.append(_row(member, load, sup, name))
    for name, sup in supervised.items():  # supervised but not (yet, or no longer) in membership
        if name not in seen:
            rows.append(_row(None, {}, sup, name))
    return {
        "fleet": fleet or {},
        "redis": {"url": mask_redis_url(redis_url), "error": redis_error},
        "router": {"url": router_url, "process": router, "view": router_view},
        "replicas": rows,
    }


async def _members(redis_url: str) -> tuple[list[membership.ReplicaInfo], str | None]:
    client = async_client(redis_url, socket_timeout=2.0, connect_timeout=2.0)
    try:
        return await membership.list_replicas(client), None
    except REDIS_DOWN_ERRORS as exc:
        return [], f"{type(exc).__name__}: {exc}"
    finally:
        await client.aclose()


async def _replica_view(client: httpx.AsyncClient, url: str) -> dict:
    """The replica's /load plus requests served (from /metrics); {} when it does not answer."""
    view: dict = {}
    with contextlib.suppress(httpx.HTTPError, ValueError):
        response = await client.get(f"{url}/load")
        if response.status_code == 200:
            view.update(response.json())
    with contextlib.suppress(httpx.HTTPError, ValueError):
        response = await client.get(f"{url}/metrics")
        if response.status_code == 200:
            view["requests_served"] = requests_served(response.text)
    return view


def requests_served(metrics_text: str) -> int:
    """Finished generation requests (any status) from a replica's Prometheus text."""
    total = 0.0
    for family in text_string_to_metric_families(metrics_text):
        if family.name not in ("fleetserve_requests", "fleetserve_requests_total"):
            continue
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.labels.get("route") in _GENERATION_ROUTES:
                total += sample.value
    return int(total)


async def _router_view(client: httpx.AsyncClient, url: str, admin_key: str | None) -> dict:
    view: dict = {"healthy": False}
    with contextlib.suppress(httpx.HTTPError):
        view["healthy"] = (await client.get(f"{url}/health")).status_code == 200
    if admin_key:
        headers = {"Authorization": f"Bearer {admin_key}"}
        with contextlib.suppress(httpx.HTTPError, ValueError):
            response = await client.get(f"{url}/admin/replicas", headers=headers)
            if response.status_code == 200:
                view["replicas"] = response.json()
        with contextlib.suppress(httpx.HTTPError, ValueError):
            response = await client.get(f"{url}/admin/stats", headers=headers)
            if response.status_code == 200:
                view["queue"] = response.json().get("queue")
    return view


def _row(member: membership.ReplicaInfo | None, load: dict, sup: dict, name: str | None) -> dict:
    queries = load.get("prefix_cache_queries") or 0
    hits = load.get("prefix_cache_hits") or 0
    if member is None:
        state = sup.get("state", "unknown")
    elif sup.get("state") in ("failed", "backoff", "starting", "stopping"):
        state = sup["state"]
    else:
        state = member.state
    return {
        "name": name or (member.id if member else None),
        "id": member.id if member else None,
        "model": member.model if member else sup.get("model"),
        "host": member.host if member else sup.get("node"),
        "device": member.device if member else None,
        "gpu": sup.get("gpu"),
        "node_id": sup.get("node_id"),
        "state": state,
        "running": load.get("running"),
        "waiting": load.get("waiting"),
        "kv_usage": load.get("kv_usage"),
        "prefix_hit_rate": (hits / queries) if queries else None,
        "requests_served": load.get("requests_served"),
        "url": member.url if member else sup.get("url"),
        "pid": sup.get("pid"),
        "restarts": sup.get("restarts"),
        "crash_report": sup.get("crash_report"),
        "log": sup.get("log"),
    }
