"""The Ray backend on a local multi-node cluster: one replica per logical GPU, placement across
nodes, and a node going away (its replicas leave membership and the router; a new node takes them).

The head has no GPU, so replicas land on the two "hosts" (2 CPUs, 2 logical GPUs each); replicas run
on CPU with the tiny model. Everything else is real: Ray actors, replica servers, router, Redis.
The tests share one cluster and fleet and run in file order; the last one stops the fleet.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fleet_harness import RunningFleet, fleet_env, run_cli, wait_for

from fleet.control.membership import list_replicas_sync
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


@pytest.fixture(scope="module")
def fleet(
    cluster: Cluster, tmp_path_factory: pytest.TempPathFactory, fleet_cache: Path
) -> Iterator[RunningFleet]:
    env = fleet_env(fleet_cache)
    run_dir = tmp_path_factory.mktemp("ray-run")
    began = time.monotonic()
    up = run_cli(
        "up", "--detach", "--backend", "ray", "--ray-address", cluster.address, "--name", "ray-ci",
        "--device", "cpu", "--port", str(free_port()), "--run-dir", str(run_dir),
        env=env, timeout=400,
    )  # fmt: skip
    print(f"fleet up --backend ray: {time.monotonic() - began:.1f}s")
    assert up.code == 0, up.text
    running = RunningFleet(run_dir, env, up)
    yield running
    if (run_dir / "state.json").exists():
        running.cli("down")


def _by_node(rows: list[dict]) -> dict[str, set[str]]:
    nodes: dict[str, set[str]] = {}
    for row in rows:
        nodes.setdefault(row["node_id"], set()).add(row["gpu"])
    return nodes


def _router_ids(fleet: RunningFleet) -> set[str]:
    view = fleet.status()["router"]["view"]["replicas"]["data"]
    return {entry["id"] for entry in view if entry["routable"]}


def test_one_replica_per_gpu_across_nodes(fleet: RunningFleet) -> None:
    rows = fleet.status()["replicas"]
    assert len(rows) == 4 and {r["state"] for r in rows} == {"ready"}
    nodes = _by_node(rows)
    assert len(nodes) == 2 and all(gpus == {"0", "1"} for gpus in nodes.values()), nodes
    assert len({r["url"] for r in rows}) == 4
    assert _router_ids(fleet) == {r["id"] for r in rows}
    assert fleet.chat()["usage"]["completion_tokens"] >= 1


def _lose_a_node(fleet: RunningFleet, cluster: Cluster) -> tuple[set[str], set[str]]:
    """Remove the node of the first replica; (its replicas' ids, the others') once the router
    has dropped them."""
    rows = fleet.status()["replicas"]
    lost_node_id = rows[0]["node_id"]
    lost = {r["id"] for r in rows if r["node_id"] == lost_node_id}
    kept = {r["id"] for r in rows} - lost
    (node,) = [n for n in cluster.worker_nodes if n.node_id == lost_node_id]
    began = time.monotonic()
    cluster.remove_node(node)
    wait_for(lambda: _router_ids(fleet) == kept, 60, "the router to drop the lost replicas")
    print(f"router dropped the lost node's replicas after {time.monotonic() - began:.1f}s")
    return lost, kept


def test_lost_node_leaves_membership_and_router(fleet: RunningFleet, cluster: Cluster) -> None:
    lost, kept = _lose_a_node(fleet, cluster)
    assert {m.id for m in list_replicas_sync(fleet.state["redis_url"])} == kept
    for _ in range(6):  # only the surviving replicas get requests, and none fails
        fleet.chat()
    view = fleet.status()["router"]["view"]["replicas"]["data"]
    assert {e["id"] for e in view} == kept
    pending = [r for r in fleet.status()["replicas"] if r["name"] in lost]
    assert {r["state"] for r in pending} == {"starting"}  # waiting for a GPU to free up


@pytest.mark.slow
def test_new_node_takes_the_lost_replicas(fleet: RunningFleet, cluster: Cluster) -> None:
    if all(r["state"] == "ready" for r in fleet.status()["replicas"]):
        _lose_a_node(fleet, cluster)  # run on its own (`-m slow`): no node was lost before it
    before = {r["name"]: r["node_id"] for r in fleet.status()["replicas"]}
    cluster.add_node(num_cpus=2, num_gpus=2)  # a new host: Ray restarts the actors there
    began = time.monotonic()

    def moved() -> list[dict] | None:
        now = fleet.status()["replicas"]
        ready = [r for r in now if r["state"] == "ready" and r["node_id"]]
        return now if len(ready) == 4 and len(_router_ids(fleet)) == 4 else None

    rows = wait_for(moved, 240, "the lost replicas to restart on the new node", every=2.0)
    print(f"replicas moved to the new node after {time.monotonic() - began:.1f}s")
    nodes = _by_node(rows)
    assert len(nodes) == 2 and all(gpus == {"0", "1"} for gpus in nodes.values())
    assert set(nodes) - set(before.values()), "no replica runs on the new node"
    assert fleet.chat()["usage"]["completion_tokens"] >= 1


def test_down_removes_actors_servers_and_membership(fleet: RunningFleet, cluster: Cluster) -> None:
    urls = [r["url"] for r in fleet.status()["replicas"] if r["url"]]
    down = fleet.cli("down")
    assert down.code == 0, down.text
    ray.init(address=cluster.address, namespace="fleetserve", log_to_driver=False)
    try:
        actors = ray.util.list_named_actors(all_namespaces=True)
        assert [a for a in actors if a["name"].startswith("ray-ci.")] == []
    finally:
        ray.shutdown()
    for url in urls:  # no replica server is left on any node
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{url}/health", timeout=2)
