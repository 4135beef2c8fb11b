"""The folder a router's workers share: what each worker counted, and the drains of `--replica`
URLs (which have no Redis record to hold them).

Files, not messages: a worker writes its own file whole (a temporary file renamed over it, so a
reader sees the old or the new one, never half), and reads the others' when it needs them. The
parent folds the counters of a worker that exited into `exited.json`, so the router's counters
never go back when a worker is restarted.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

import orjson

from router.metrics import MetricsState, RouterMetrics

EXITED = "exited.json"
DRAINS = "drains.json"
LOCK = "drains.lock"


@dataclass(frozen=True)
class WorkerSlot:
    """Which of the router's `count` workers this process is, and the folder they share."""

    index: int
    count: int
    folder: str


class WorkerState(TypedDict):
    """One worker's file: its metrics and how much it served."""

    index: int
    pid: int
    connections: int  # accepted since it started
    cpu_s: float  # user + system since it started
    metrics: MetricsState


def _write(path: Path, data: object) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.write_bytes(orjson.dumps(data))
    os.replace(temporary, path)


def _read(path: Path) -> object:
    try:
        return orjson.loads(path.read_bytes())
    except (FileNotFoundError, orjson.JSONDecodeError):
        return None


class SharedFolder:
    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder)

    def worker_file(self, index: int) -> Path:
        return self.path / f"worker-{index}.json"

    # -- metrics

    def write_worker(self, state: WorkerState) -> None:
        _write(self.worker_file(state["index"]), state)

    def workers(self, skip: int | None = None) -> list[WorkerState]:
        """The live workers' last states (but worker `skip`'s), by index."""
        states = []
        for path in sorted(self.path.glob("worker-*.json")):
            state = _read(path)
            if isinstance(state, dict) and state.get("index") != skip:
                states.append(state)
        return states  # type: ignore[return-value]  # our own files, written by write_worker

    def exited(self) -> MetricsState | None:
        """The counters of every worker that has exited, added up (gauges zero)."""
        state = _read(self.path / EXITED)
        return state if isinstance(state, dict) else None  # type: ignore[return-value]

    def fold_exited(self, index: int, pid: int) -> None:
        """Worker `index` (process `pid`) exited: add its last counters to the exited ones and
        remove its file (the parent calls this before starting its successor)."""
        path = self.worker_file(index)
        state = _read(path)
        if not isinstance(state, dict) or state.get("pid") != pid:
            return
        folded = [state["metrics"]]
        before = self.exited()
        if before is not None:
            folded.append(before)
        total = RouterMetrics.merged(folded).state()
        total["replicas"] = [(r, 0, False) for r, _, _ in total["replicas"]]
        total["queue_depth"] = 0
        _write(self.path / EXITED, total)
        path.unlink(missing_ok=True)

    # -- drains of `--replica` URLs

    def drains(self) -> set[str]:
        ids = _read(self.path / DRAINS)
        return {i for i in ids if isinstance(i, str)} if isinstance(ids, list) else set()

    def drains_version(self) -> int:
        """Changes whenever the drains file is replaced (its inode and time)."""
        try:
            stat = (self.path / DRAINS).stat()
        except FileNotFoundError:
            return 0
        return hash((stat.st_ino, stat.st_mtime_ns))

    def set_drained(self, replica_id: str, drained: bool) -> None:
        with self._locked():
            ids = self.drains()
            if drained:
                ids.add(replica_id)
            else:
                ids.discard(replica_id)
            _write(self.path / DRAINS, sorted(ids))

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.path / LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield
