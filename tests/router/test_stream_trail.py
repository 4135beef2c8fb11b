"""router.stream_resume: what a stream leaves behind to be resumed, and what its client sees."""

from __future__ import annotations

import orjson

from router.stream_resume import StreamTrail, resumable


def _chunk(content: str, ids: list[int], finish: str | None = None, role: bool = False) -> bytes:
    delta = {"role": "assistant", "content": ""} if role else {"content": content}
    chunk = {"id": "chatcmpl-abc", "object": "chat.completion.chunk", "created": 1700000000,
             "model": "m", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
             "usage": None, "fleet_token_ids": ids}  # fmt: skip
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def test_frames_pass_whole_without_their_ids() -> None:
    stream = _chunk("", [], role=True) + _chunk('say "hi"', [5, 6]) + _chunk(" there", [7])
    trail = StreamTrail()
    out = b"".join(trail.feed(stream[i : i + 7]) for i in range(0, len(stream), 7))
    assert b"fleet_token_ids" not in out
    assert out.count(b"\n\n") == 3 and out.endswith(b"\n\n")
    frames = [orjson.loads(f[6:]) for f in out.split(b"\n\n")[:-1]]
    assert frames[1]["choices"][0]["delta"]["content"] == 'say "hi"'
    assert trail.ids == [5, 6, 7] and trail.resumable
    assert (trail.response_id, trail.created) == ("chatcmpl-abc", 1700000000)


def test_a_torn_frame_never_reaches_the_client_and_the_continuation_says_where_to_go_on() -> None:
    trail = StreamTrail()
    whole = _chunk("", [], role=True) + _chunk("a", [9])
    torn = _chunk("b", [10])[:-9]
    assert trail.feed(whole + torn) == whole.replace(b',"fleet_token_ids":[]', b"").replace(
        b',"fleet_token_ids":[9]', b""
    )
    body = orjson.dumps({"model": "m", "messages": [], "stream": True})
    continued = orjson.loads(trail.continuation(body))
    assert continued["fleet_resume"] == {"token_ids": [9], "id": "chatcmpl-abc",
                                         "created": 1700000000}  # fmt: skip
    assert continued["messages"] == [] and trail.flush() == b""


def test_before_any_whole_frame_the_continuation_is_the_request_itself() -> None:
    trail = StreamTrail()
    assert trail.feed(_chunk("", [], role=True)[:20]) == b""
    body = b'{"model":"m"}'
    assert trail.continuation(body) == body


def test_streams_without_ids_or_already_finished_are_not_resumable() -> None:
    blind = StreamTrail()
    blind.feed(_chunk("a", [1]).replace(b',"fleet_token_ids":[1]', b""))
    assert not blind.resumable
    done = StreamTrail()
    done.feed(_chunk("a", [1]) + _chunk("", [], finish="length"))
    assert not done.resumable
    crlf = StreamTrail()
    framed = b'data: {"id":"x","choices":[{"index":0}]}\r\n\r\n'
    assert crlf.feed(framed) == framed and not crlf.resumable  # passed on, never held
    assert crlf.feed(b"data: {") == b"data: {"
    usage_only = b'data: {"id":"x","choices":[],"usage":{"prompt_tokens":3}}\n\n'
    fine = StreamTrail()
    fine.feed(_chunk("a", [1]) + usage_only)
    assert fine.resumable  # the usage chunk covers no tokens


def test_which_requests_may_be_resumed() -> None:
    assert resumable({"messages": []}, "chat")
    assert resumable({"prompt": "x", "n": 1}, "completions")
    assert resumable({"prompt": [1, 2, 3]}, "completions")
    assert not resumable({"messages": [], "n": 2}, "chat")
    assert not resumable({"messages": [], "logprobs": True}, "chat")
    assert not resumable({"prompt": "x", "logprobs": 0}, "completions")
    assert not resumable({"prompt": ["a", "b"]}, "completions")
    assert not resumable({"prompt": "x", "echo": True}, "completions")
    assert not resumable({"messages": [], "tools": [{"type": "function"}]}, "chat")
