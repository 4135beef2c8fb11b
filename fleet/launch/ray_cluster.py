"""`fleet up --hosts`: a Ray cluster over on-prem hosts, brought up and down by Ray's own launcher.

We write the launcher's config for its `local` provider (the first host is the head, the rest are
workers; no Docker, no file mounts, nothing fetched from the internet) into the run folder and run
`ray up` on it; Ray's autoscaler on the head then starts the workers over SSH. Every host must have
fleetserve installed at this machine's path (its `ray` runs there, as Ray's on-prem docs require)
and reach the head. The fleet manager then talks to the head through Ray Client and places
replicas as `--backend ray` does. `fleet down` runs `ray stop` on every host over SSH (Ray's
`ray down` stops only the head's Ray, with whatever `ray` is on its PATH), then `ray down`.
"""

from __future__ import annotations

import getpass
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fleet.launch.ssh import SshLogin, last_line
from fleet.spec import FleetSpec, HostsSpec

CONFIG_FILE = "ray-cluster.yaml"  # in the run folder: what `ray up` / `ray down` read
LOG_FILE = "ray-cluster.log"  # in its logs folder: everything `ray up` / `ray down` printed
DEFAULT_KEYS = ("id_ed25519", "id_rsa", "id_ecdsa")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class ClusterError(RuntimeError):
    """The cluster could not be brought up; the message is one line for the user."""


def ssh_key(given: str | None) -> Path | None:
    """The key to log in with: the given one, else the first of ~/.ssh's usual keys there is."""
    if given:
        return Path(given).expanduser().absolute()
    for name in DEFAULT_KEYS:
        path = Path("~/.ssh", name).expanduser()
        if path.is_file():
            return path
    return None


def ssh_login(hosts: HostsSpec) -> SshLogin:
    key = ssh_key(hosts.ssh_key)
    if key is None:
        raise ClusterError(f"no SSH key: give --ssh-key (none of ~/.ssh/{', '.join(DEFAULT_KEYS)})")
    return SshLogin(hosts.ssh_user or getpass.getuser(), key)


def ray_binary() -> str:
    """This environment's `ray`: the hosts run the one at the same path."""
    return str(Path(sys.executable).parent / "ray")


@dataclass
class RayCluster:
    name: str
    hosts: HostsSpec
    login: SshLogin
    run_dir: Path

    @classmethod
    def of(cls, spec: FleetSpec, run_dir: Path) -> RayCluster:
        return cls(f"fleetserve-{spec.name}", spec.hosts, ssh_login(spec.hosts), run_dir)

    @property
    def head(self) -> str:
        return self.hosts.addresses[0]

    @property
    def workers(self) -> list[str]:
        return self.hosts.addresses[1:]

    @property
    def config_path(self) -> Path:
        return self.run_dir / CONFIG_FILE

    @property
    def log_path(self) -> Path:
        return self.run_dir / "logs" / LOG_FILE

    @property
    def client_address(self) -> str:
        return f"ray://{_bracketed(self.head)}:{self.hosts.client_port}"

    def config(self) -> dict[str, Any]:
        """The launcher's config: a fixed-size on-prem cluster of exactly these hosts."""
        ray = shlex.quote(ray_binary())
        extra = "".join(f" {shlex.quote(arg)}" for arg in self.hosts.ray_args)
        node_ip = f" --node-ip-address={self.head}" if _is_ip(self.head) else ""
        head_start = (
            f"ulimit -n 65536; {ray} start --head --port={self.hosts.ray_port}"
            f" --ray-client-server-port={self.hosts.client_port}{node_ip}"
            " --include-dashboard=false --disable-usage-stats"
            f" --autoscaling-config=~/ray_bootstrap_config.yaml{extra}"
        )
        worker_start = (
            f"ulimit -n 65536; {ray} start --address=$RAY_HEAD_IP:{self.hosts.ray_port}"
            f" --disable-usage-stats{extra}"
        )
        return {
            "cluster_name": self.name,
            "provider": {"type": "local", "head_ip": self.head, "worker_ips": self.workers},
            "auth": {"ssh_user": self.login.user, "ssh_private_key": str(self.login.key)},
            "min_workers": len(self.workers),
            "max_workers": len(self.workers),
            "upscaling_speed": 1.0,
            "idle_timeout_minutes": 5,
            "file_mounts": {},
            "cluster_synced_files": [],
            "initialization_commands": [],
            "setup_commands": [],
            "head_setup_commands": [],
            "worker_setup_commands": [],
            "head_start_ray_commands": [f"{ray} stop", head_start],
            "worker_start_ray_commands": [f"{ray} stop", worker_start],
        }

    def up(self, timeout: float = 900.0) -> None:
        """`ray up`: Ray started on the head, which then starts it on the workers."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.config(), sort_keys=False))
        result = self._launcher("up", timeout)
        if result is None:
            raise ClusterError(
                f"`ray up` did not finish within {timeout:.0f}s on head {self.head} "
                f"(--hosts); see {self.log_path}"
            )
        if result.returncode != 0:
            raise ClusterError(
                f"`ray up` could not start Ray on head {self.head} (--hosts, as "
                f"{self.login.user} with --ssh-key {self.login.key}): {_reason(result.stdout)}; "
                f"see {self.log_path}"
            )

    def down(self, timeout: float = 120.0) -> list[str]:
        """`ray stop` on every host, then `ray down`; what happened, one line per step."""
        lines = []
        stop = f"{shlex.quote(ray_binary())} stop"
        for host, result in self.login.run_on_all(self.hosts.addresses, stop, timeout).items():
            if result.returncode == 0:
                lines.append(f"stopped Ray on {host}")
            else:
                lines.append(f"could not stop Ray on {host}: {last_line(result.stderr)}")
        if self.config_path.exists():
            released = self._launcher("down", timeout)
            if released is not None and released.returncode == 0:
                lines.append(f"`ray down` released the cluster {self.name}")
            else:
                lines.append(f"`ray down` failed; see {self.log_path}")
        return lines

    def _launcher(self, command: str, timeout: float) -> subprocess.CompletedProcess[str] | None:
        """Run `ray up|down -y CONFIG`, its output appended to the log; None: it timed out."""
        argv = [ray_binary(), command, "-y", "--log-color", "false", str(self.config_path)]
        if command == "up":
            argv.insert(3, "--no-config-cache")
        env = {
            **os.environ,
            # Ray 2.60's v2 autoscaler never starts the workers of a `local` provider; v1 does.
            "RAY_UP_enable_autoscaler_v2": "0",
            # The launcher's own state (node states, locks) stays in the fleet's run folder.
            "RAY_TMPDIR": str(self.run_dir / "ray-launcher"),
        }
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as log:
            log.write(f"\n==> {time.strftime('%H:%M:%S')} {shlex.join(argv)}\n")
            log.flush()
            try:
                result = subprocess.run(
                    argv, env=env, capture_output=True, text=True, timeout=timeout,
                    stdin=subprocess.DEVNULL,
                )  # fmt: skip
            except subprocess.TimeoutExpired as exc:
                log.write(_text(exc.stdout) + _text(exc.stderr))
                return None
            log.write(result.stdout + result.stderr)
        result.stdout = _ANSI.sub("", result.stdout + result.stderr)
        return result


_TELLING = re.compile(r"error|fail|refused|denied|timed out|no such|not found", re.I)
_LAUNCHER_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")  # the launcher's own log


def _reason(output: str) -> str:
    """The most telling line of `ray up`'s output: what the failing command on the host said last
    before the launcher gave up on it, else the launcher's last line naming a failure."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    cut = next((i for i, line in enumerate(lines) if "update-failed" in line), len(lines))
    remote = [line for line in lines[:cut] if not _LAUNCHER_LINE.match(line)]
    telling = [line for line in remote if _TELLING.search(line)]
    telling = telling or [line for line in lines if _TELLING.search(line)]
    return (telling or lines or ["no output"])[-1]


def _text(data: str | bytes | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def _is_ip(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host
