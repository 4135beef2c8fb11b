"""Reading SSE streams into records: timings, token counts and what counts as a failure."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from llm_stream import RequestRecord, read_stream, request_body


class Clock:
    """Each chunk arrives 10 ms after the previous one; the request is sent at t=0."""

    def __init__(self, first: float = 0.05, step: float = 0.01) -> None:
        self.now = first - step
        self.step = step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def sse(*objs: object) -> list[bytes]:
    lines: list[bytes] = []
    for obj in objs:
        payload = obj if isinstance(obj, str) else json.dumps(obj)
        lines += [f"data: {payload}\n".encode(), b"\n"]
    return lines


def chat(text: str | None, finish: str | None = None) -> dict:
    return {
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}],
    }


USAGE = {
    "choices": [],
    "usage": {
        "prompt_tokens": 12,
        "completion_tokens": 3,
        "total_tokens": 15,
        "prompt_tokens_details": {"cached_tokens": 8},
    },
}


def record(api: str = "chat") -> RequestRecord:
    return RequestRecord(api=api, workload="random", start=1000.0)


def test_chat_stream_timings_and_usage() -> None:
    rec = record()
    lines = [
        b": keep-alive comment\n",
        *sse(chat(""), chat("Hel"), chat("lo"), chat("!", "length"), USAGE, "[DONE]"),
    ]
    read_stream(lines, rec, sent_at=0.0, clock=Clock(first=0.05, step=0.01))
    assert rec.ok, rec.error
    # clock reads: role chunk 0.05, "Hel" 0.06, "lo" 0.07, "!" 0.08, usage 0.09, end 0.10
    assert rec.ttft_ms == pytest.approx(60.0)
    assert rec.itl_ms == pytest.approx([10.0, 10.0])
    assert rec.e2e_ms == pytest.approx(100.0)
    assert (rec.prompt_tokens, rec.output_tokens, rec.cached_tokens) == (12, 3, 8)
    assert rec.tpot_ms == pytest.approx((100.0 - 60.0) / 2)
    assert rec.finish_reason == "length"
    assert rec.text == "Hello!"
    row = rec.to_json()
    assert "text" not in row and row["tpot_ms"] == pytest.approx(20.0)


def test_completion_stream_without_usage_counts_chunks() -> None:
    rec = record("completions")
    chunks = [
        {"choices": [{"index": 0, "text": t, "finish_reason": None}]} for t in ("a", "b", "", "c")
    ]
    read_stream(sse(*chunks, "[DONE]"), rec, sent_at=0.0, clock=Clock())
    assert rec.ok and rec.text == "abc"
    assert rec.output_tokens == 3 and rec.prompt_tokens is None
    assert len(rec.itl_ms) == 2


def test_error_frame_is_a_failure_and_reading_stops() -> None:
    frames = sse(
        chat("x"),
        {"error": {"message": "replica lost", "type": "server_error"}},
        chat("never read"),
        "[DONE]",
    )
    lines: Iterator[bytes] = iter(frames)
    rec = record()
    read_stream(lines, rec, sent_at=0.0, clock=Clock())
    assert rec.error == "error frame: replica lost"
    assert next(lines) == b"\n"  # the rest is left for the caller to drop with the connection


@pytest.mark.parametrize(
    ("lines", "error"),
    [
        (sse(chat("a"), chat("b")), "stream ended without [DONE]"),
        (sse(chat(""), "[DONE]"), "stream carried no tokens"),
        ([b"data: {not json\n"], "malformed stream frame"),
    ],
)
def test_incomplete_streams_are_failures(lines: list[bytes], error: str) -> None:
    rec = record()
    read_stream(lines, rec, sent_at=0.0, clock=Clock())
    assert rec.error is not None and rec.error.startswith(error)


def test_tokens_without_text_leave_ttft_unmeasured() -> None:
    rec = record()
    read_stream(sse(chat(""), chat(""), USAGE, "[DONE]"), rec, sent_at=0.0, clock=Clock())
    assert rec.ok and rec.output_tokens == 3
    assert rec.ttft_ms is None and rec.tpot_ms is None and rec.itl_ms == []


def test_transport_break_is_a_failure() -> None:
    def broken() -> Iterator[bytes]:
        yield from sse(chat("a"))
        raise ConnectionResetError("peer went away")

    rec = record()
    read_stream(broken(), rec, sent_at=0.0, clock=Clock())
    assert rec.error == "stream broken: ConnectionResetError: peer went away"
    assert rec.ttft_ms is not None and rec.e2e_ms > rec.ttft_ms


def test_request_body_forces_length_and_asks_for_usage() -> None:
    body = request_body("chat", "m", [{"role": "user", "content": "hi"}], 64)
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert (body["max_tokens"], body["min_tokens"], body["ignore_eos"]) == (64, 64, True)
    assert body["messages"][0]["content"] == "hi"
    plain = request_body("completions", "m", "hi", 8, force_length=False)
    assert plain["prompt"] == "hi" and "ignore_eos" not in plain and "min_tokens" not in plain
