"""`fleet up --hosts`, before any host is touched: the spec it makes, the launcher config it writes
for Ray's `local` provider, and one clear line for each mistake (a bad host list, a key that is not
there, a host that refuses SSH). The end-to-end run over SSH is tests/fleet/test_up_hosts.py."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from fleet_harness import fleet_env, run_cli

from fleet.embedded_redis import free_port
from fleet.launch.ray_cluster import RayCluster
from fleet.launch.ssh import SshLogin
from fleet.spec import HostsSpec, SpecError, load_spec
from tests.fleet.test_cli_mistakes import nothing_started, one_line_error


@pytest.fixture
def env(fleet_cache: Path) -> dict[str, str]:
    return {k: v for k, v in fleet_env(fleet_cache).items() if not k.startswith("FLEET_REDIS")}


def test_hosts_imply_the_ray_backend() -> None:
    spec = load_spec(None, {"hosts.addresses": ["10.0.0.1", "gpu-2.lan"]})
    assert spec.backend == "ray" and spec.hosts.addresses == ["10.0.0.1", "gpu-2.lan"]
    assert load_spec(None, {}).backend == "local"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"hosts.addresses": ["a", ""]}, "an empty host name"),
        ({"hosts.addresses": ["a b"]}, "'a b' is not a host name or IP address"),
        ({"hosts.addresses": ["a", "a"]}, "hosts must differ (repeated: a)"),
        ({"hosts.addresses": ["a"], "backend": "local"}, "backend must be ray"),
        ({"hosts.addresses": ["a"], "ray_address": "auto"}, "drop ray_address"),
        ({"hosts.addresses": ["a"], "hosts.ssh_user": "x;y"}, "'x;y' is not a user name"),
    ],
)
def test_bad_hosts_are_spec_errors(overrides: dict, message: str) -> None:
    with pytest.raises(SpecError, match=None) as caught:
        load_spec(None, overrides)
    assert message in str(caught.value)


def test_the_launcher_config_is_a_fixed_on_prem_cluster(tmp_path: Path) -> None:
    hosts = HostsSpec(
        addresses=["10.0.0.10", "10.0.0.11", "gpu-3"],
        ray_args=["--num-gpus=2", '--resources={"a": 1}'],
    )
    cluster = RayCluster("fleetserve-demo", hosts, SshLogin("ops", tmp_path / "key"), tmp_path)
    config = cluster.config()
    assert config["provider"] == {
        "type": "local", "head_ip": "10.0.0.10", "worker_ips": ["10.0.0.11", "gpu-3"],
    }  # fmt: skip
    assert config["auth"] == {"ssh_user": "ops", "ssh_private_key": str(tmp_path / "key")}
    assert config["min_workers"] == config["max_workers"] == 2
    assert config["file_mounts"] == {} and "docker" not in config
    assert config["setup_commands"] == config["initialization_commands"] == []
    ray = str(Path(sys.executable).parent / "ray")  # this venv's ray, at the same path on hosts
    head, worker = config["head_start_ray_commands"][-1], config["worker_start_ray_commands"][-1]
    assert config["head_start_ray_commands"][0] == config["worker_start_ray_commands"][0]
    assert config["head_start_ray_commands"][0] == f"{ray} stop"
    head_argv = shlex.split(head.split(";", 1)[1])
    assert head_argv[:3] == [ray, "start", "--head"]
    assert {"--port=6380", "--ray-client-server-port=10001", "--node-ip-address=10.0.0.10",
            "--include-dashboard=false", "--num-gpus=2", '--resources={"a": 1}'} <= set(head_argv)  # fmt: skip
    worker_argv = shlex.split(worker.split(";", 1)[1])
    assert worker_argv[:3] == [ray, "start", "--address=$RAY_HEAD_IP:6380"]
    assert "--num-gpus=2" in worker_argv and "--head" not in worker_argv
    assert cluster.client_address == "ray://10.0.0.10:10001"
    assert yaml.safe_load(yaml.safe_dump(config)) == config


def test_up_with_a_bad_host_list(tmp_path: Path, env: dict[str, str]) -> None:
    result = run_cli("up", "--detach", "--run-dir", str(tmp_path / "run"), "--hosts", "a,,b",
                     env=env, timeout=60)  # fmt: skip
    one_line_error(result, 2, "--hosts a,,b", "an empty host name")
    assert nothing_started(tmp_path / "run")


def test_up_with_a_missing_ssh_key(tmp_path: Path, env: dict[str, str]) -> None:
    result = run_cli("up", "--detach", "--run-dir", str(tmp_path / "run"), "--hosts", "10.0.0.1",
                     "--ssh-key", "/nonexistent/key", "--port", str(free_port()),
                     env=env, timeout=60)  # fmt: skip
    one_line_error(result, 2, "--ssh-key /nonexistent/key: no such file")
    assert nothing_started(tmp_path / "run")


def test_up_with_a_host_that_refuses_ssh(tmp_path: Path, env: dict[str, str]) -> None:
    """127.0.0.1 has no sshd here (or one that does not know the key): either way, it refuses."""
    if shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        pytest.skip("needs the OpenSSH client (ssh, ssh-keygen)")
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    began = time.monotonic()
    result = run_cli("up", "--detach", "--run-dir", str(tmp_path / "run"), "--hosts", "127.0.0.1",
                     "--ssh-user", "nobody", "--ssh-key", str(key), "--port", str(free_port()),
                     env=env, timeout=60)  # fmt: skip
    one_line_error(
        result, 2, "--hosts 127.0.0.1: cannot log in to 127.0.0.1 over SSH as nobody",
        f"--ssh-key {key}",
    )  # fmt: skip
    assert time.monotonic() - began < 30
    assert nothing_started(tmp_path / "run")


def test_a_failed_ray_up_is_told_by_the_failing_command() -> None:
    """The launcher's output ends in its own "Failed to setup head node"; the user needs what the
    command on the host said before the launcher gave up on it (and not a missing ~/.bashrc)."""
    from fleet.launch.ray_cluster import _reason

    output = "\n".join([
        "2026-12-07 02:16:11,421\tINFO updater.py:413 -- New status: setting-up",
        "bash: /root/.bashrc: No such file or directory",
        "2026-12-07 02:16:18,902\tVVINFO command_runner.py:401 -- Full command is `ssh -o "
        "ExitOnForwardFailure=yes ...`",
        "Error: No such option '--bogus-flag'.",
        "2026-12-07 02:16:22,509\tERR updater.py:177 -- New status: update-failed",
        "click.exceptions.ClickException: SSH command failed.",
        "Error: Failed to setup head node.",
    ])  # fmt: skip
    assert _reason(output) == "Error: No such option '--bogus-flag'."
    assert _reason("Shared connection closed.\nError: Failed to setup head node.") == (
        "Error: Failed to setup head node."
    )
    assert _reason("") == "no output"
