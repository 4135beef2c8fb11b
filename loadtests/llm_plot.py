"""One PNG per run: latency over time shows warm-up, queueing and stalls that percentiles hide.

matplotlib is imported on first use: it takes about a second, which would otherwise be spent
while locust starts."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from itertools import accumulate
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def _chunk_times(row: dict[str, Any], t0: float) -> list[float]:
    """Seconds since t0 at which each text chunk of a request arrived."""
    if row.get("ttft_ms") is None:
        return []
    first = row["start"] - t0 + row["ttft_ms"] / 1000.0
    return [first, *(first + gap / 1000.0 for gap in accumulate(row.get("itl_ms") or ()))]


def plot_records(rows: Sequence[dict[str, Any]], path: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")

    ok = [r for r in rows if r.get("error") is None]
    failed = [r for r in rows if r.get("error") is not None]
    t0 = min((r["start"] for r in rows), default=0.0)
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    ttft, e2e, itl, rate = axes.flat

    timed = [r for r in ok if r.get("ttft_ms") is not None]
    ttft.scatter([r["start"] - t0 for r in timed], [r["ttft_ms"] for r in timed], s=6, label="ok")
    if failed:
        ttft.scatter(
            [r["start"] - t0 for r in failed],
            [0] * len(failed),
            s=12,
            c="red",
            marker="x",
            label="failed",
        )
    ttft.set(title="TTFT by request start", xlabel="s since start", ylabel="ms")
    ttft.legend(loc="upper left")

    e2e.scatter([r["start"] - t0 for r in ok], [r["e2e_ms"] for r in ok], s=6)
    e2e.set(title="End-to-end latency by request start", xlabel="s since start", ylabel="ms")

    gaps = [gap for r in ok for gap in r.get("itl_ms") or ()]
    itl.hist(gaps or [0.0], bins=60)
    itl.set(title="Inter-token latency", xlabel="ms", ylabel="chunks", yscale="log")

    per_second = Counter(int(t) for r in ok for t in _chunk_times(r, t0))
    seconds = range(max(per_second, default=0) + 1)
    rate.plot(list(seconds), [per_second.get(s, 0) for s in seconds])
    rate.set(
        title="Streamed chunks per second (≈ output tokens/s)",
        xlabel="s since start",
        ylabel="chunks/s",
    )

    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
