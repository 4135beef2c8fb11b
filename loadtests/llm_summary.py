"""Turn per-request records into the summary vLLM's `bench serve` prints (same names, same
definitions), so numbers from our fleet and from other servers compare directly.

Percentiles come from the raw per-request values (locust's own are bucketed). Run as a script to
re-summarize saved records (several files, e.g. from locust workers, add up) with other SLOs:
    python loadtests/llm_summary.py bench-results/random-chat.records.jsonl --goodput ttft:500
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

PERCENTILES = (50, 90, 99)
SLO_METRICS = {"ttft": "ttft_ms", "tpot": "tpot_ms", "e2e": "e2e_ms", "e2el": "e2e_ms"}


def parse_goodput(spec: str | Sequence[str] | None) -> dict[str, float]:
    """`"ttft:500 tpot:50"` (or comma-separated, or a list) -> {"ttft_ms": 500.0, ...}; in ms."""
    if not spec:
        return {}
    items = spec.replace(",", " ").split() if isinstance(spec, str) else list(spec)
    slos: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition(":")
        if not sep or name.lower() not in SLO_METRICS:
            raise ValueError(f"bad SLO {item!r}: use NAME:MS with NAME one of ttft, tpot, e2e")
        try:
            slos[SLO_METRICS[name.lower()]] = float(value)
        except ValueError as exc:
            raise ValueError(f"bad SLO {item!r}: {value!r} is not a number of ms") from exc
    return slos


def percentile(values: Sequence[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default, which vLLM uses)."""
    ordered = sorted(values)
    if not ordered:
        return 0.0
    rank = (len(ordered) - 1) * p / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _distribution(values: Sequence[float]) -> dict[str, float]:
    stats = {"mean": statistics.fmean(values) if values else 0.0}
    stats.update({f"p{p}": percentile(values, p) for p in PERCENTILES})
    return stats


def _meets(row: dict[str, Any], slos: dict[str, float]) -> bool:
    """A one-token answer has no TPOT to miss; an answer without text has no TTFT to meet."""
    for key, limit in slos.items():
        value = row.get(key)
        if value is None and key == "tpot_ms":
            continue
        if value is None or value > limit:
            return False
    return True


def summarize(
    rows: Iterable[dict[str, Any]], slos: dict[str, float] | None = None
) -> dict[str, Any]:
    """Summary of JSON-lines rows (see `RequestRecord.to_json`). Duration runs from the first
    request sent to the last one finished; failed requests count only as failures."""
    rows = list(rows)
    ok = [r for r in rows if r.get("error") is None]
    failed = [r for r in rows if r.get("error") is not None]
    duration = 0.0
    if rows:
        first = min(r["start"] for r in rows)
        last = max(r["start"] + r["e2e_ms"] / 1000.0 for r in rows)
        duration = max(last - first, 1e-9)
    input_tokens = sum(r.get("prompt_tokens") or 0 for r in ok)
    output_tokens = sum(r.get("output_tokens") or 0 for r in ok)
    cached = [r["cached_tokens"] for r in ok if r.get("cached_tokens") is not None]
    per_second = (lambda n: n / duration) if duration else (lambda n: 0.0)
    summary: dict[str, Any] = {
        "completed": len(ok),
        "failed": len(failed),
        "duration_s": duration,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": per_second(len(ok)),
        "output_throughput": per_second(output_tokens),
        "total_token_throughput": per_second(input_tokens + output_tokens),
        "mean_concurrency": per_second(sum(r["e2e_ms"] for r in ok) / 1000.0),
        "cached_prompt_fraction": (sum(cached) / input_tokens) if cached and input_tokens else None,
        "ttft_ms": _distribution([r["ttft_ms"] for r in ok if r.get("ttft_ms") is not None]),
        "tpot_ms": _distribution([r["tpot_ms"] for r in ok if r.get("tpot_ms") is not None]),
        "itl_ms": _distribution([gap for r in ok for gap in r.get("itl_ms") or ()]),
        "e2e_ms": _distribution([r["e2e_ms"] for r in ok]),
        "errors": dict(Counter(str(r["error"])[:120] for r in failed).most_common(5)),
    }
    if slos:
        good = sum(1 for r in ok if _meets(r, slos))
        summary["slos_ms"] = dict(slos)
        summary["good_requests"] = good
        summary["request_goodput"] = per_second(good)
    return summary


_SECTIONS = (
    ("ttft_ms", "Time to First Token", "TTFT"),
    ("tpot_ms", "Time per Output Token (excl. 1st token)", "TPOT"),
    ("itl_ms", "Inter-token Latency", "ITL"),
    ("e2e_ms", "End-to-end Latency", "E2EL"),
)


def format_summary(summary: dict[str, Any], title: str = "Serving Benchmark Result") -> str:
    """The text table, laid out like vLLM's `bench serve` output."""

    def line(label: str, value: Any, fmt: str = ".2f") -> str:
        text = format(value, fmt) if isinstance(value, float) else str(value)
        return f"{label:<40}{text:<10}"

    out = [f"{' ' + title + ' ':=^50}"]
    out.append(line("Successful requests:", summary["completed"]))
    out.append(line("Failed requests:", summary["failed"]))
    out.append(line("Benchmark duration (s):", summary["duration_s"]))
    out.append(line("Total input tokens:", summary["total_input_tokens"]))
    out.append(line("Total generated tokens:", summary["total_output_tokens"]))
    out.append(line("Request throughput (req/s):", summary["request_throughput"]))
    if "request_goodput" in summary:
        slos = " ".join(f"{k.removesuffix('_ms')}:{v:g}" for k, v in summary["slos_ms"].items())
        out.append(line("Goodput SLOs (ms):", slos))
        out.append(line("Request goodput (req/s):", summary["request_goodput"]))
    out.append(line("Output token throughput (tok/s):", summary["output_throughput"]))
    out.append(line("Total Token throughput (tok/s):", summary["total_token_throughput"]))
    out.append(line("Mean concurrency:", summary["mean_concurrency"]))
    if summary.get("cached_prompt_fraction") is not None:
        out.append(
            line("Prompt tokens served from cache (%):", summary["cached_prompt_fraction"] * 100)
        )
    for key, heading, short in _SECTIONS:
        stats = summary[key]
        out.append(f"{heading:-^50}")
        out.append(line(f"Mean {short} (ms):", stats["mean"]))
        out.append(line(f"Median {short} (ms):", stats["p50"]))
        for p in PERCENTILES[1:]:
            out.append(line(f"P{p} {short} (ms):", stats[f"p{p}"]))
    for message, count in summary["errors"].items():
        out.append(f"error x{count}: {message}")
    out.append("=" * 50)
    return "\n".join(out)


def read_records(path: Path) -> list[dict[str, Any]]:
    with path.open("rb") as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Summarize a load test's records (JSON lines).")
    parser.add_argument("records", type=Path, nargs="+", help="records files, summarized together")
    parser.add_argument(
        "--goodput", nargs="*", default=[], help="SLOs in ms, e.g. ttft:500 tpot:50"
    )
    parser.add_argument("--plot", type=Path, help="also write the PNG plot here")
    args = parser.parse_args(argv)
    rows = [row for path in args.records for row in read_records(path)]
    print(format_summary(summarize(rows, parse_goodput(args.goodput))))
    if args.plot:
        from llm_plot import plot_records

        plot_records(rows, args.plot)


if __name__ == "__main__":
    main()
