"""Hosts reachable over SSH, made on this machine for tests of `fleet up --hosts`.

Each host is a network namespace (its own address on a bridge, 10.77.N.2, .3, ...; the machine
itself is 10.77.N.1) whose sshd runs as the first process of a PID namespace of its own, with a
private /tmp/ray and home folder: so Ray's `ray stop` on one host ends that host's processes only,
two Ray nodes never share a session folder, and "no process left on the host" is a question with
an exact answer. Files (the venv, models) are shared, as on hosts that mount the same paths.

Needs root, `ip netns`, `unshare` and Debian's openssh-server; `ssh_hosts` skips the test when one
is missing. Everything it made is removed on exit, failure included: killing a PID namespace's
first process ends every process in it.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SSHD = "/usr/sbin/sshd"


@dataclass
class SshHost:
    netns: str
    address: str
    home: Path
    server: subprocess.Popen  # `unshare`, whose child (sshd) is the first process of the host

    def pid_namespace(self) -> str:
        return os.readlink(f"/proc/{self.server.pid}/ns/pid_for_children")

    def processes(self) -> list[str]:
        """Live processes on this host other than its sshd, as `pid name: command line`."""
        found = []
        namespace = self.pid_namespace()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if os.readlink(entry / "ns" / "pid") != namespace:
                    continue
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            except OSError:
                continue  # exited meanwhile
            name, state = (
                stat[stat.index("(") + 1 : stat.rindex(")")],
                stat.rsplit(")", 1)[1].split()[0],
            )
            if state != "Z" and name != "sshd":
                found.append(f"{entry.name} {name}: {cmdline}")
        return found


@dataclass
class SshHosts:
    hosts: list[SshHost]
    key: Path  # the private key every host accepts for root
    gateway: str  # this machine's address on the hosts' network
    bridge: str
    log_dir: Path
    _veths: list[str] = field(default_factory=list)

    @property
    def addresses(self) -> list[str]:
        return [h.address for h in self.hosts]


def missing_requirement() -> str | None:
    """Why hosts cannot be made here, or None."""
    if os.geteuid() != 0:
        return "SSH hosts in network namespaces need root"
    if not os.path.exists(SSHD):
        return f"{SSHD} is missing (apt-get install openssh-server; .ci/run installs it)"
    for tool in ("ip", "unshare", "ssh", "ssh-keygen", "rsync"):
        if shutil.which(tool) is None:
            return f"`{tool}` is missing (Ray's cluster launcher needs ssh and rsync)"
    probe = f"fleet-probe-{os.getpid()}"
    try:
        _ip("netns", "add", probe)
    except subprocess.CalledProcessError as exc:
        return f"cannot create a network namespace: {exc.stderr.strip()}"
    _ip("netns", "del", probe)
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _free_subnet() -> int:
    used = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout
    for third in random.sample(range(1, 255), 254):
        if f" 10.77.{third}." not in used:
            return third
    raise RuntimeError("no free 10.77.N.0/24 subnet")


def _sshd_config(host_key: Path, keys: Path, address: str) -> str:
    lines = [
        f"ListenAddress {address}",
        "Port 22",
        f"HostKey {host_key}",
        f"AuthorizedKeysFile {keys}",
        "PermitRootLogin yes",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
        "StrictModes no",
        "PidFile none",
        "MaxSessions 64",
        "MaxStartups 64",
        "Subsystem sftp internal-sftp",
    ]
    if os.environ.get("PYTHONPATH"):  # a worktree's code on the hosts too, as on this machine
        lines.append(f"SetEnv PYTHONPATH={os.environ['PYTHONPATH']}")
    return "\n".join(lines) + "\n"


def _wait_listening(address: str, port: int, server: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"sshd on {address} exited with {server.returncode}")
        with contextlib.suppress(OSError), socket.create_connection((address, port), timeout=1):
            return
        time.sleep(0.1)
    raise RuntimeError(f"sshd on {address} did not listen within {timeout:.0f}s")


@contextlib.contextmanager
def ssh_hosts(count: int, folder: Path) -> Iterator[SshHosts]:
    """`count` SSH hosts for root with a generated ed25519 key; skips the test if impossible."""
    reason = missing_requirement()
    if reason:
        pytest.skip(reason)
    tag = f"{os.getpid() % 100000:05d}"
    third = _free_subnet()
    made = SshHosts([], folder / "id_ed25519", f"10.77.{third}.1", f"fsbr{tag}", folder / "sshd")
    made.log_dir.mkdir(parents=True, exist_ok=True)
    netns: list[str] = []
    try:
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(made.key)],
                       check=True)  # fmt: skip
        keys = folder / "authorized_keys"
        keys.write_text(Path(f"{made.key}.pub").read_text())
        _ip("link", "add", made.bridge, "type", "bridge")
        _ip("addr", "add", f"{made.gateway}/24", "dev", made.bridge)
        _ip("link", "set", made.bridge, "up")
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation folder
        Path("/tmp/ray").mkdir(exist_ok=True)  # each host mounts its own over it
        for index in range(count):
            name, veth = f"fleet-host-{tag}-{index}", f"fsv{tag}h{index}"
            address = f"10.77.{third}.{index + 2}"
            _ip("netns", "add", name)
            netns.append(name)
            _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", name)
            made._veths.append(veth)
            _ip("link", "set", veth, "master", made.bridge)
            _ip("link", "set", veth, "up")
            _ip("-n", name, "addr", "add", f"{address}/24", "dev", "eth0")
            _ip("-n", name, "link", "set", "eth0", "up")
            _ip("-n", name, "link", "set", "lo", "up")
            _ip("-n", name, "route", "add", "default", "via", made.gateway)
            host_key = folder / f"host-key-{index}"
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)],
                           check=True)  # fmt: skip
            config = folder / f"sshd-{index}.conf"
            config.write_text(_sshd_config(host_key, keys, address))
            home = folder / f"home-{index}"  # what the host writes to ~ (Ray's bootstrap files)
            (home / "work").mkdir(parents=True)
            (home / "upper").mkdir()
            overlay = f"lowerdir=/root,upperdir={home}/upper,workdir={home}/work"
            script = (f"mount -t tmpfs -o size=1g tmpfs /tmp/ray && mount -t overlay overlay -o {overlay} /root"
                      f" && exec {SSHD} -D -f {config} -E {made.log_dir / f'sshd-{index}.log'}")  # fmt: skip
            server = subprocess.Popen(
                ["ip", "netns", "exec", name, "unshare", "--pid", "--fork", "--kill-child",
                 "--mount-proc", "--propagation", "private", "sh", "-c", script],
                start_new_session=True,
            )  # fmt: skip
            made.hosts.append(SshHost(name, address, home, server))
            _wait_listening(address, 22, server, 20)
        yield made
    finally:
        for host in made.hosts:  # the namespace's first process dies, and every process with it
            with contextlib.suppress(ProcessLookupError):
                os.killpg(host.server.pid, signal.SIGKILL)
            host.server.wait(10)
        for name in netns:
            with contextlib.suppress(subprocess.CalledProcessError):
                _ip("netns", "del", name)
        with contextlib.suppress(subprocess.CalledProcessError):
            _ip("link", "del", made.bridge)
