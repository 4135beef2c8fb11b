"""The Ray backend on a local multi-node cluster: one replica per logical GPU, placement across
nodes, and a node going away (its replicas leave membership and the router; a new node takes them).

The head has no GPU, so replicas land on the two "hosts" (2 CPUs, 2 logical GPUs each); replicas run
on CPU with the tiny model. Everything else is real: Ray actors, replica servers, router, Redis.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fleet_harness import RunningFleet, fleet_env, run_cli, wait_for

from fleet.embedded_redis import free_port

ray = pytest.importorskip("ray", reason="the ray backend needs the 'ray' extra")
from ray.cluster_utils import Cluster  # noqa: E402

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    cluster = Cluster(
        initialize_head=True,
        connect=False,
        head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False},
    )
    for _ in range(2):
        cluster.add_node(num_cpus=2, num_gpus=2)
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()


def _by_node(rows: list[dict]) -> dict[str, set[str]]:
    nodes: dict[str, set[str]] = {}
    for row in rows:
        nodes.setdefault(row["node_id"], set()).add(row["gpu"])
    return nodes


def _router_ids(fleet: RunningFleet) -> set[str]:
    view = fleet.status()["router"]["view"]["replicas"]["data"]
    return {entry["id"] for entry in view if entry["routable"]}


def test_one_replica_per_gpu_and_node_loss(
    cluster: Cluster, tmp_path: Path, fleet_cache: Path
) -> None:
    env = fleet_env(fleet_cache)
    run_dir = tmp_path / "run"
    began = time.monotonic()
    up = run_cli(
        "up", "--detach", "--backend", "ray", "--ray-address", cluster.address, "--name", "ray-ci",
        "--device", "cpu", "--port", str(free_port()), "--run-dir", str(run_dir),
        env=env, timeout=400,
    )  # fmt: skip
    print(f"fleet up --backend ray: {time.monotonic() - began:.1f}s")
    assert up.code == 0, up.text
    fleet = RunningFleet(run_dir, env, up)
    try:
        rows = fleet.status()["replicas"]
        assert len(rows) == 4 and {r["state"] for r in rows} == {"ready"}
        nodes = _by_node(rows)
        assert len(nodes) == 2 and all(gpus == {"0", "1"} for gpus in nodes.values()), nodes
        assert len({r["url"] for r in rows}) == 4
        assert _router_ids(fleet) == {r["id"] for r in rows}
        assert fleet.chat()["usage"]["completion_tokens"] >= 1

        lost_node_id = rows[0]["node_id"]
        lost = {r["id"] for r in rows if r["node_id"] == lost_node_id}
        kept = {r["id"] for r in rows} - lost
        (node,) = [n for n in cluster.worker_nodes if n.node_id == lost_node_id]
        began = time.monotonic()
        cluster.remove_node(node)

        def gone_from_router() -> bool:
            return _router_ids(fleet) == kept

        wait_for(gone_from_router, 60, "the router to drop the lost node's replicas")
        print(f"router dropped the lost node's replicas after {time.monotonic() - began:.1f}s")
        from fleet.control.membership import list_replicas_sync

        members = {m.id for m in list_replicas_sync(fleet.state["redis_url"])}
        assert members == kept
        for _ in range(6):  # the router sends only to the surviving replicas, and nothing fails
            fleet.chat()
        served = {
            e["id"]: e["requests"] for e in fleet.status()["router"]["view"]["replicas"]["data"]
        }
        assert set(served) == kept

        cluster.add_node(num_cpus=2, num_gpus=2)  # a new host: Ray restarts the actors there
        began = time.monotonic()

        def moved() -> list[dict] | None:
            now = fleet.status()["replicas"]
            ready = [r for r in now if r["state"] == "ready" and r["node_id"]]
            return now if len(ready) == 4 and _router_ids(fleet) == kept | lost else None

        rows = wait_for(moved, 240, "the lost replicas to restart on the new node", every=2.0)
        print(f"replicas moved to the new node after {time.monotonic() - began:.1f}s")
        assert lost_node_id not in _by_node(rows)
        assert all(gpus == {"0", "1"} for gpus in _by_node(rows).values())
        assert fleet.chat()["usage"]["completion_tokens"] >= 1
    finally:
        down = fleet.cli("down")
    assert down.code == 0, down.text
    ray.init(address=cluster.address, namespace="fleetserve", log_to_driver=False)
    try:
        assert [a for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith("ray-ci.")] == []  # fmt: skip
    finally:
        ray.shutdown()
    for row in rows:  # no replica server is left on any node
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{row['url']}/health", timeout=2)
