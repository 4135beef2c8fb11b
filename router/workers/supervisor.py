"""`fleet router --workers N`: the parent of N router processes on one port.

The parent binds nothing. Each worker is today's router (router.serve) with its own listening
socket on the same host and port (SO_REUSEPORT), and the kernel spreads new connections over
the listening sockets by a hash of each connection's addresses. Why not one socket bound here
and inherited by every worker: with one shared accept queue, whichever worker's event loop is
awake first takes the connection, so a busy worker takes more (the imbalance nginx moved to
`reuseport` for); and a worker's own socket goes with it, so while a worker is down (crashed,
restarting) the kernel hands its share to the live ones at once, and when all drain, new
connections are refused instead of queued where nobody will accept them. The cost: connections
still waiting in a dying worker's accept queue are reset.

Workers are forked from this process (the router's code is already imported here, so a restart
is quick) and each tells the parent it is listening through a pipe. The parent forwards SIGTERM
and SIGINT for the graceful drain and exits 0 once every worker has drained; restarts a worker
that died, with exponential backoff (BACKOFF_S doubling up to BACKOFF_MAX_S; a worker that ran
STABLE_S is forgiven), and gives up after MAX_RESTARTS quick crashes in a row; and exits 1 with one
line when the workers cannot start.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from types import FrameType

from router.config import RouterConfig
from router.workers.placements import SharedPlacements
from router.workers.shared import SharedFolder, WorkerSlot

log = logging.getLogger("router.workers")

START_TIMEOUT_S = 120.0
STOP_EXTRA_S = 10.0  # past the drain's grace, then SIGKILL
BACKOFF_S = 0.5
BACKOFF_MAX_S = 30.0
STABLE_S = 60.0
MAX_RESTARTS = 5
TICK_S = 0.05


def share(total: int, index: int, count: int) -> int:
    """Worker `index`'s part of a router-wide cap `total` (0: no cap); at least 1 of a cap."""
    if total == 0:
        return 0
    return max(total // count + (1 if index < total % count else 0), 1)


def worker_config(config: RouterConfig, slot: WorkerSlot) -> RouterConfig:
    """What one worker runs: its slot, and its share of `--replica-max-in-flight` (a cap on
    the whole router's requests to one replica). The queue's bounds stay per worker."""
    cap = share(config.queue.replica_max_in_flight, slot.index, slot.count)
    queue = dataclasses.replace(config.queue, replica_max_in_flight=cap)
    return dataclasses.replace(config, worker=slot, queue=queue)


def run_workers(config: RouterConfig, count: int, prog: str, grace_s: float) -> int:
    """Run `count` workers until SIGTERM or SIGINT; the exit status."""
    folder = tempfile.mkdtemp(prefix="fleet-router-workers-")
    try:
        return Workers(config, count, folder, prog, grace_s).run()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class Workers:
    def __init__(
        self, config: RouterConfig, count: int, folder: str, prog: str, grace_s: float
    ) -> None:
        self.config = config
        self.count = count
        self.folder = folder
        self.prog = prog
        self.grace_s = grace_s
        self.pids: dict[int, int] = {}  # live worker pid -> index
        self.started: dict[int, float] = {}  # index -> when its process started
        self.crashes = [0] * count  # quick crashes in a row, per index
        self.restart_at: dict[int, float] = {}  # index -> when to start it again
        self.listening: set[int] = set()
        self.stop_requested = False
        SharedPlacements(folder)  # its file, before any worker maps it
        self._ready_r, self._ready_w = os.pipe()
        os.set_blocking(self._ready_r, False)

    # -- the parent's life

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        for index in range(self.count):
            self._spawn(index)
        failure = self._wait_listening()
        if failure is not None:
            print(f"{self.prog}: {failure}", file=sys.stderr, flush=True)
            self._stop_all()
            return 1
        log.info(
            "%d workers listening on %s:%d (pids %s)",
            self.count, self.config.host, self.config.port, " ".join(map(str, self.pids)),
        )  # fmt: skip
        while not self.stop_requested:
            failure = self._supervise()
            if failure is not None:
                log.error("%s", failure)
                print(f"{self.prog}: {failure}", file=sys.stderr, flush=True)
                self._stop_all()
                return 1
            time.sleep(TICK_S)
        return self._stop_all()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stop_requested = True

    def _wait_listening(self) -> str | None:
        """None once every worker listens; else why they cannot start."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while len(self.listening) < self.count:
            if self.stop_requested:
                return None
            self._read_listening()
            for index, status in self._reap():
                return (
                    f"worker {index} exited with status {status} before it was listening on "
                    f"{self.config.host}:{self.config.port} (its output is above); stopping"
                )
            if time.monotonic() > deadline:
                return f"workers not listening after {START_TIMEOUT_S:g} s; stopping"
            time.sleep(TICK_S)
        return None

    def _supervise(self) -> str | None:
        """One look at the workers: restart the dead after their backoff; why to give up, if so."""
        self._read_listening()
        now = time.monotonic()
        for index, status in self._reap():
            ran = now - self.started[index]
            self.crashes[index] = 0 if ran >= STABLE_S else self.crashes[index] + 1
            if self.crashes[index] > MAX_RESTARTS:
                return f"worker {index} crashed {MAX_RESTARTS + 1} times in a row; stopping"
            delay = min(BACKOFF_S * 2 ** max(self.crashes[index] - 1, 0), BACKOFF_MAX_S)
            log.warning(
                "worker %d exited with status %s after %.1f s; restarting it in %.1f s",
                index, status, ran, delay,
            )  # fmt: skip
            self.restart_at[index] = now + delay
        for index, when in list(self.restart_at.items()):
            if when <= now:
                del self.restart_at[index]
                self._spawn(index)
        return None

    def _stop_all(self) -> int:
        """SIGTERM every worker (each drains), wait, SIGKILL what outlives the grace; the exit
        status: 0 when every worker drained and exited cleanly."""
        status = 0
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s + STOP_EXTRA_S
        while self.pids:
            for index, code in self._reap():
                if code != 0:
                    log.warning("worker %d exited with status %d while stopping", index, code)
                    status = 1
            if time.monotonic() > deadline:
                for pid in self.pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                status = 1
                deadline = float("inf")
            time.sleep(TICK_S)
        return status

    def _reap(self) -> list[tuple[int, int]]:
        """(index, exit status) of each worker that exited since the last look."""
        exited = []
        while self.pids:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            index = self.pids.pop(pid, None)
            if index is None:
                continue
            self.listening.discard(index)
            SharedFolder(self.folder).fold_exited(index, pid)
            exited.append((index, os.waitstatus_to_exitcode(wait_status)))
        return exited

    def _read_listening(self) -> None:
        with contextlib.suppress(BlockingIOError):
            for index in os.read(self._ready_r, 4096):
                self.listening.add(index)

    # -- a worker

    def _spawn(self, index: int) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the worker; it never returns from here
            os._exit(self._worker(index))
        self.pids[pid] = index
        self.started[index] = time.monotonic()

    def _worker(self, index: int) -> int:
        status = 1
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, signal.SIG_DFL)
            os.close(self._ready_r)
            slot = WorkerSlot(index, self.count, self.folder)
            _name_worker_logs(index)
            from router.serve import serve

            def listening() -> None:
                os.write(self._ready_w, bytes([index]))

            serve(worker_config(self.config, slot), listening)
            status = 0
        except SystemExit as exc:
            status = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
        return status


def _name_worker_logs(index: int) -> None:
    """Each worker's log lines say which worker wrote them."""
    from router.serve import LOG_FORMAT

    formatter = logging.Formatter(LOG_FORMAT.replace("%(name)s", f"w{index} %(name)s"))
    for handler in logging.getLogger().handlers:
        handler.setFormatter(formatter)
