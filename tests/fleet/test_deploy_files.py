"""deploy/: every YAML and JSON file parses, and the manifests hold together (probes, drain, GPUs,
selectors, secrets), with container arguments checked by the servers' own argument parsers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
K8S = DEPLOY / "k8s"


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _k8s() -> list[dict]:
    return [doc for path in sorted(K8S.glob("*.yaml")) for doc in _docs(path)]


def _workloads() -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in _k8s() if d["kind"] in ("Deployment", "StatefulSet")}


@pytest.mark.parametrize(
    "path", sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml", ".json")), ids=str
)
def test_every_file_parses(path: Path) -> None:
    if path.suffix == ".json":
        assert isinstance(json.loads(path.read_text()), dict)
    else:
        assert _docs(path), f"{path} holds no document"


def test_kubernetes_objects_are_well_formed() -> None:
    docs = _k8s()
    kinds = {d["kind"] for d in docs if "apiVersion" in d and "metadata" in d}
    assert {"Namespace", "Secret", "Service", "Deployment", "StatefulSet", "NetworkPolicy"} <= kinds
    kustomization = next(d for d in docs if d["kind"] == "Kustomization")
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files
    for doc in docs:
        if doc["kind"] not in ("Kustomization", "Namespace"):
            assert doc["metadata"]["namespace"] == "fleetserve", doc["metadata"]["name"]


def test_services_select_their_pods() -> None:
    workloads = _workloads()
    for service in (d for d in _k8s() if d["kind"] == "Service"):
        matches = [
            w for w in workloads.values()
            if service["spec"]["selector"].items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]  # fmt: skip
        assert matches, f"service {service['metadata']['name']} selects no pod"
        ports = {p["name"] for w in matches for c in _containers(w) for p in c["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports


def _containers(workload: dict) -> list[dict]:
    return workload["spec"]["template"]["spec"]["containers"]


def _health_probe(container: dict, kind: str) -> dict:
    probe = container[kind]
    assert probe["httpGet"]["path"] == "/health"
    return probe


def test_replica_pods_one_gpu_each_with_probes_and_prestop_drain() -> None:
    replica = _workloads()["fleet-replica-llama"]
    (container,) = _containers(replica)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        _health_probe(container, kind)
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # large models load slowly
    pre_stop = " ".join(container["lifecycle"]["preStop"]["exec"]["command"])
    assert "kill -TERM 1" in pre_stop and "kill -0 1" in pre_stop
    args = _replica_args(container)
    grace = replica["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > args.drain_grace
    assert args.advertise_url == "http://$(POD_IP):8001" and args.replica_id == "$(POD_NAME)"
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert env["FLEET_INTERNAL_SECRET"]["valueFrom"]["secretKeyRef"]["key"] == "internal-secret"
    annotations = replica["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(args.port)


def _replica_args(container: dict):
    from replica.__main__ import parse_args

    assert container["args"][0] == "replica"
    return parse_args(container["args"][1:])


def test_router_deployment_probes_prestop_and_keys() -> None:
    from router.__main__ import parse_args

    router = _workloads()["fleet-router"]
    (container,) = _containers(router)
    _health_probe(container, "readinessProbe")
    _health_probe(container, "livenessProbe")
    assert container["lifecycle"]["preStop"]["exec"]["command"]
    assert container["args"][0] == "router"
    args = parse_args(container["args"][1:])
    assert args.policy == "prefix"
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
    assert env["FLEET_ADMIN_KEY"]["key"] == "admin-key"
    assert env["FLEET_INTERNAL_SECRET"]["key"] == "internal-secret"  # keys each replica
    secret = next(d for d in _k8s() if d["kind"] == "Secret")
    assert {"admin-key", "internal-secret", "redis-password"} <= set(secret["stringData"])
    (replica,) = _containers(_workloads()["fleet-replica-llama"])
    assert _env_value(container, "FLEET_REDIS_URL") == _env_value(replica, "FLEET_REDIS_URL")


def _env_value(container: dict, name: str) -> str:
    return next(e["value"] for e in container["env"] if e["name"] == name)


def test_redis_is_persistent_and_probed() -> None:
    redis = _workloads()["fleet-redis"]
    (container,) = _containers(redis)
    assert "--appendonly yes" in container["command"][-1] and container["readinessProbe"]["exec"]
    assert redis["spec"]["volumeClaimTemplates"]


def test_ray_cluster_config_for_ssh_hosts() -> None:
    (config,) = _docs(DEPLOY / "ray" / "cluster.yaml")
    assert config["provider"]["type"] == "local"
    assert config["provider"]["head_ip"] and config["provider"]["worker_ips"]
    assert config["auth"]["ssh_user"] and config["auth"]["ssh_private_key"]
    assert any("ray start --head" in c for c in config["head_start_ray_commands"])
    assert any("--address=$RAY_HEAD_IP" in c for c in config["worker_start_ray_commands"])
    assert any("[ray]" in c for c in config["setup_commands"])


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cpu"])
def test_dockerfiles(name: str) -> None:
    text = (DEPLOY / "docker" / name).read_text()
    base = re.search(r"^FROM (\S+)", text, re.M)
    assert base is not None
    assert ("nvidia/cuda" in base.group(1)) == (name == "Dockerfile")
    assert 'ENTRYPOINT ["/usr/bin/tini", "--", "fleet"]' in text and "USER fleet" in text
    assert (DEPLOY / "docker" / f"{name}.dockerignore").exists()
    if name == "Dockerfile.cpu":
        assert "download.pytorch.org/whl/cpu" in text


def test_prometheus_scrapes_routers_and_replicas() -> None:
    (config,) = _docs(DEPLOY / "monitoring" / "prometheus.yml")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert {"fleet-local", "fleet-router", "fleet-replica"} <= set(jobs)
    assert all(job["metrics_path"] == "/metrics" for job in jobs.values())
    assert jobs["fleet-local"]["file_sd_configs"][0]["files"]
    components = {
        rule["regex"]
        for name in ("fleet-router", "fleet-replica")
        for rule in jobs[name]["relabel_configs"]
        if rule.get("source_labels") == ["__meta_kubernetes_pod_label_app_kubernetes_io_component"]
    }
    assert components == {"router", "replica"}


def _metric_names(expr: str) -> set[str]:
    names = set(re.findall(r"\b(?:fleet_router|fleetserve)_[a-z_]+", expr))
    return {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in names}


def test_grafana_dashboard_uses_metrics_the_servers_export() -> None:
    dashboard = json.loads((DEPLOY / "monitoring" / "grafana-dashboard.json").read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len(panels) >= 10 and len({p["id"] for p in dashboard["panels"]}) == len(
        dashboard["panels"]
    )
    used = {n for p in panels for t in p["targets"] for n in _metric_names(t["expr"])}
    assert any(n.startswith("fleet_router_") for n in used) and any(
        n.startswith("fleetserve_") for n in used
    )
    root = DEPLOY.parent
    sources = (root / "router" / "metrics.py").read_text() + (
        root / "replica" / "http_api" / "metrics.py"
    ).read_text()
    for name in sorted(used):  # exported as written, or built as fleetserve_{name}
        short = name.removeprefix("fleetserve_")
        assert name in sources or f'"{short}"' in sources, f"{name} is not exported"


def test_example_spec_is_valid_and_documents_every_field() -> None:
    from fleet.spec import FleetSpec, ModelSpec, load_spec

    spec = load_spec(DEPLOY / "fleet.example.yaml")
    assert spec.name == "demo" and [m.served_model_name for m in spec.models] == [
        "llama-8b",
        "tiny",
    ]
    text = (DEPLOY / "fleet.example.yaml").read_text()
    fields = set(FleetSpec.model_fields) | {
        f"{section}.{name}"
        for section, model in (
            ("redis", spec.redis),
            ("router", spec.router),
            ("keys", spec.keys),
            ("supervision", spec.supervision),
        )
        for name in type(model).model_fields
    }
    for field in sorted(fields):
        assert f"{field.rsplit('.', 1)[-1]}:" in text, f"{field} is not shown in the example"
    shown = set(ModelSpec.model_fields) - {"max_model_len", "max_num_seqs", "max_num_batched_tokens",
                                           "block_size", "cpu_replicas", "env"}  # fmt: skip
    for field in sorted(shown):
        assert f"{field}:" in text
