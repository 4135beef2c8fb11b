"""The vLLM-style summary: throughput, percentiles from raw values, goodput under SLOs, plot."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from llm_plot import plot_records
from llm_summary import format_summary, main, parse_goodput, percentile, summarize


def row(
    start: float, ttft: float, itl: list[float], prompt: int = 100, error: str | None = None
) -> dict:
    e2e = ttft + sum(itl)
    out = len(itl) + 1
    return {
        "api": "chat",
        "workload": "random",
        "start": start,
        "e2e_ms": e2e,
        "ttft_ms": ttft,
        "itl_ms": itl,
        "prompt_tokens": prompt,
        "output_tokens": out,
        "cached_tokens": 25,
        "error": error,
        "tpot_ms": (e2e - ttft) / (out - 1) if out > 1 else None,
    }


ROWS = [
    row(0.0, 100.0, [10.0] * 9),  # ends at 0.19 s
    row(0.5, 300.0, [20.0] * 9),  # ends at 0.98 s
    row(1.0, 200.0, [30.0] * 9),  # ends at 1.47 s
    row(1.5, 50.0, [5.0] * 9),  # ends at 1.595 s
    row(0.2, 10.0, [], error="HTTP 503: overloaded"),
]


def test_percentile_matches_numpy() -> None:
    values = [5.0, 1.0, 9.0, 3.0, 7.0, 2.0]
    for p in (0, 50, 90, 99, 100):
        assert percentile(values, p) == pytest.approx(np.percentile(values, p))


def test_summary_numbers() -> None:
    s = summarize(ROWS, {"ttft_ms": 250.0, "tpot_ms": 25.0})
    assert (s["completed"], s["failed"]) == (4, 1)
    assert s["duration_s"] == pytest.approx(1.595)
    assert (s["total_input_tokens"], s["total_output_tokens"]) == (400, 40)
    assert s["request_throughput"] == pytest.approx(4 / 1.595)
    assert s["output_throughput"] == pytest.approx(40 / 1.595)
    assert s["total_token_throughput"] == pytest.approx(440 / 1.595)
    assert s["cached_prompt_fraction"] == pytest.approx(0.25)
    assert s["ttft_ms"]["p50"] == pytest.approx(150.0)
    assert s["ttft_ms"]["mean"] == pytest.approx(162.5)
    assert s["tpot_ms"]["p99"] == pytest.approx(np.percentile([10, 20, 30, 5], 99))
    assert s["itl_ms"]["p90"] == pytest.approx(
        np.percentile([10] * 9 + [20] * 9 + [30] * 9 + [5] * 9, 90)
    )
    assert s["e2e_ms"]["mean"] == pytest.approx((190 + 480 + 470 + 95) / 4)
    # within 250 ms TTFT and 25 ms TPOT: the first and the last request
    assert s["good_requests"] == 2
    assert s["request_goodput"] == pytest.approx(2 / 1.595)
    assert s["errors"] == {"HTTP 503: overloaded": 1}


def test_format_uses_vllm_names() -> None:
    text = format_summary(summarize(ROWS, parse_goodput("ttft:250")))
    for label in (
        "Successful requests:",
        "Request throughput (req/s):",
        "Request goodput (req/s):",
        "Output token throughput (tok/s):",
        "Median TTFT (ms):",
        "P99 TPOT (ms):",
        "P90 ITL (ms):",
        "Mean E2EL (ms):",
    ):
        assert label in text
    assert "error x1: HTTP 503: overloaded" in text


def test_goodput_specs() -> None:
    assert parse_goodput("ttft:500,tpot:50") == {"ttft_ms": 500.0, "tpot_ms": 50.0}
    assert parse_goodput(["e2el:9000"]) == {"e2e_ms": 9000.0}
    assert parse_goodput("") == {}
    with pytest.raises(ValueError, match="bad SLO 'ttfb:5'"):
        parse_goodput("ttfb:5")
    with pytest.raises(ValueError, match="not a number"):
        parse_goodput("ttft:fast")


def test_empty_run_summarizes_to_zeros() -> None:
    s = summarize([])
    assert s["completed"] == 0 and s["request_throughput"] == 0.0 and s["ttft_ms"]["p99"] == 0.0


def test_resummarize_saved_records_and_plot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    records = tmp_path / "run.records.jsonl"
    records.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    png = tmp_path / "run.png"
    main([str(records), "--goodput", "ttft:250", "tpot:25", "--plot", str(png)])
    out = capsys.readouterr().out
    assert "Successful requests:                    4" in out
    assert "ttft:250 tpot:25" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_with_only_failures(tmp_path: Path) -> None:
    path = plot_records([ROWS[-1]], tmp_path / "failed.png")
    assert path.stat().st_size > 1000


def test_requests_without_text_count_but_have_no_ttft(tmp_path: Path) -> None:
    untimed = {**ROWS[0], "ttft_ms": None, "itl_ms": [], "tpot_ms": None}
    s = summarize([untimed, ROWS[1]], {"ttft_ms": 1000.0})
    assert s["completed"] == 2 and s["ttft_ms"]["mean"] == pytest.approx(300.0)
    assert s["good_requests"] == 1
    assert plot_records([untimed, ROWS[1]], tmp_path / "untimed.png").stat().st_size > 1000
