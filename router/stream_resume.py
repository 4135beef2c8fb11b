"""Streams that survive their replica: what a stream from one of our own (fleetserve) replicas
leaves behind so another replica can carry it on when the first dies mid-way.

The router asks such a replica for each chunk's token ids (`X-Fleet-Token-Ids: 1`; the replica's
side is replica/http_api/resume.py). A `StreamTrail` passes the stream on in whole SSE frames (a
frame torn by the replica's death never reaches the client), strips the ids and keeps them with
the response's id and `created`. When the replica dies (connection lost before the stream's end,
or silent past the idle timeout), the exchange (router.exchange) sends `continuation(body)` to
another fleetserve replica of the model: the original request with `fleet_resume`, whose stream
carries the same id and `created`, no second role chunk, and the total `usage`.

A stream is resumed only with one choice, no logprobs and (completions) one prompt without echo:
the ids and text of one sequence are all a continuation needs. Streams from vLLM/SGLang replicas
have no ids, and end with today's error event.
"""

from __future__ import annotations

from typing import Any

import orjson

TOKEN_IDS_HEADER = b"X-Fleet-Token-Ids: 1\r\n"
MAX_RESUMES = 2  # per stream; each also takes a retry from the retry budget
_FIELD = b',"fleet_token_ids":['
_FRAME_END = b"\n\n"  # our replicas' frame separator (sse_response.frame)
_CHOICE = b'"choices":[{'
_FINISHED = b'"finish_reason":"'  # a JSON null has no quote; quotes in text are escaped


def resumable(request: dict[str, Any], route: str) -> bool:
    """Whether a stream of this request could be continued elsewhere (see the module's note)."""
    logprobs = request.get("logprobs")  # completions' logprobs=0 still asks for them
    if request.get("n") not in (None, 1) or not (logprobs is None or logprobs is False):
        return False
    if route == "completions":
        prompt = request.get("prompt")
        several = isinstance(prompt, list) and bool(prompt) and not isinstance(prompt[0], int)
        return not several and not request.get("echo")
    # A tool call's parser state lives in the replica that streamed it: a continuation elsewhere
    # would parse the rest of a call as new text.
    return not request.get("tools")


class StreamTrail:
    """What the client has been sent of one stream: its frames' token ids, id and `created`."""

    __slots__ = ("blind", "created", "finished", "ids", "response_id", "tail")

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.tail = b""
        self.response_id: str | None = None  # None until the first whole frame
        self.created: int | None = None
        self.finished = False  # the choice's last chunk went out: nothing is left to resume
        self.blind = False  # a chunk came without ids: the replica is not one of ours

    def feed(self, data: bytes) -> bytes:
        """The whole frames of `data` (a partial one waits for its end), without their ids. A
        stream that turns out not to be one of ours passes through untouched from then on."""
        if self.tail:
            data, self.tail = self.tail + data, b""
        if self.blind:
            return data
        if not data.endswith(_FRAME_END):
            cut = data.rfind(_FRAME_END)
            if cut < 0:
                if b"\r\n\r\n" in data:  # another server's framing: not ours
                    self.blind = True
                    return data
                self.tail = data
                return b""
            cut += len(_FRAME_END)
            data, self.tail = data[:cut], data[cut:]
        if self.response_id is None:
            self._read_head(data[: data.find(_FRAME_END)])
        tagged = data.count(_FIELD)
        if tagged != data.count(_CHOICE):
            self.blind = True
        if _FINISHED in data:
            self.finished = True
        return self._strip(data) if tagged else data

    def flush(self) -> bytes:
        tail, self.tail = self.tail, b""
        return tail

    @property
    def resumable(self) -> bool:
        return not self.blind and not self.finished

    def continuation(self, body: bytes) -> bytes:
        """The request that carries the stream on: `body` as first sent plus `fleet_resume`, or
        `body` itself while the client has not had a whole frame (a fresh start is then right)."""
        self.tail = b""  # the dead replica's torn frame
        if self.response_id is None:
            return body
        request = orjson.loads(body)
        request["fleet_resume"] = {
            "token_ids": self.ids,
            "id": self.response_id,
            "created": self.created,
        }
        return orjson.dumps(request)

    def _read_head(self, first: bytes) -> None:
        try:
            chunk = orjson.loads(first.removeprefix(b"data:"))
        except orjson.JSONDecodeError:
            chunk = None
        if not isinstance(chunk, dict) or not isinstance(chunk.get("id"), str):
            self.blind = True
            return
        self.response_id = chunk["id"]
        created = chunk.get("created")
        self.created = created if isinstance(created, int) else None

    def _strip(self, data: bytes) -> bytes:
        out = []
        ids = self.ids
        start = 0
        while (at := data.find(_FIELD, start)) >= 0:
            end = data.find(b"]", at)
            listed = data[at + len(_FIELD) : end]
            if listed:
                ids.extend(int(token) for token in listed.split(b","))
            out.append(data[start:at])
            start = end + 1
        out.append(data[start:])
        return b"".join(out)
