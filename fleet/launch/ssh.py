"""SSH to the hosts of `fleet up --hosts`, with the options Ray's cluster launcher uses.

The launcher itself talks to the hosts during `ray up`; we use SSH to check, before that, that
every host lets us in (one line naming the host instead of a page of launcher output), and at
`fleet down` to run `ray stop` on every host (Ray's `ray down` stops only the head, and with a
`ray` it expects on the remote PATH). Host keys are not checked, as Ray does not check them.
"""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

# What Ray's SSHOptions set, less its connection sharing; BatchMode: never a password prompt.
_OPTIONS = {
    "BatchMode": "yes",
    "StrictHostKeyChecking": "no",
    "UserKnownHostsFile": "/dev/null",
    "IdentitiesOnly": "yes",
    "LogLevel": "ERROR",
    "ServerAliveInterval": "5",
    "ServerAliveCountMax": "3",
}


@dataclass(frozen=True)
class SshLogin:
    user: str
    key: Path

    def argv(self, host: str, command: str, connect_timeout: float = 10.0) -> list[str]:
        options = {**_OPTIONS, "ConnectTimeout": f"{connect_timeout:.0f}"}
        flags = [part for name, value in options.items() for part in ("-o", f"{name}={value}")]
        return ["ssh", "-i", str(self.key), *flags, f"{self.user}@{host}", command]

    def run(self, host: str, command: str, timeout: float) -> subprocess.CompletedProcess[str]:
        """The command's result; a timeout is exit status 124 with a note in stderr."""
        argv = self.argv(host, command)
        try:
            return subprocess.run(
                argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
            )
        except subprocess.TimeoutExpired:
            return subprocess.CompletedProcess(argv, 124, "", f"no answer within {timeout:.0f}s")

    def run_on_all(
        self, hosts: list[str], command: str, timeout: float
    ) -> dict[str, subprocess.CompletedProcess[str]]:
        with ThreadPoolExecutor(max_workers=max(1, min(16, len(hosts)))) as pool:
            results = pool.map(lambda host: self.run(host, command, timeout), hosts)
            return dict(zip(hosts, results, strict=True))

    def refusals(self, hosts: list[str], timeout: float = 20.0) -> dict[str, str]:
        """Hosts that do not let us in, each with ssh's reason (its last line of stderr)."""
        results = self.run_on_all(hosts, "true", timeout)
        return {
            host: last_line(result.stderr) or f"ssh exited with status {result.returncode}"
            for host, result in results.items()
            if result.returncode != 0
        }


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""
