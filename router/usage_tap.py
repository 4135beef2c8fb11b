"""Pass an SSE stream through frame by frame, picking out the `usage` the router settles keys with.

The router asks the replica for `stream_options.include_usage` whatever the client asked; when
the client did not ask, the usage-only frame is dropped and the `"usage":null` members that
include_usage adds to every other chunk are removed, so the client sees what it asked for.
Work per chunk is a few byte scans in C; JSON is parsed only for the frame that carries usage.
"""

from __future__ import annotations

import orjson

from router.usage import Usage

_NULLS = (b',"usage":null', b', "usage": null')


class UsageTap:
    __slots__ = ("frames", "sep", "strip", "tail", "usage")

    def __init__(self, strip: bool) -> None:
        self.strip = strip
        self.usage: Usage | None = None
        self.tail = b""
        self.sep = b"\n\n"
        self.frames = 0

    def feed(self, data: bytes) -> bytes:
        """Whole frames ready to send (a partial frame waits for its end)."""
        if self.tail:
            data = self.tail + data
            self.tail = b""
        sep = self.sep
        if not data.endswith(sep):
            if b"\r\n\r\n" in data and sep == b"\n\n":
                self.sep = sep = b"\r\n\r\n"
            cut = data.rfind(sep)
            if cut < 0:
                self.tail = data
                return b""
            cut += len(sep)
            self.tail = data[cut:]
            data = data[:cut]
        self.frames += data.count(sep)
        mentions = data.count(b'"usage"')
        if mentions:
            nulls = data.count(b'"usage":null') + data.count(b'"usage": null')
            if mentions > nulls:
                data = self._take_usage(data)
            if self.strip:
                for null in _NULLS:
                    data = data.replace(null, b"")
        return data

    def flush(self) -> bytes:
        tail, self.tail = self.tail, b""
        return tail

    def _take_usage(self, data: bytes) -> bytes:
        out = []
        sep = self.sep
        for frame in data.split(sep)[:-1]:
            if b'"usage"' in frame and frame.startswith(b"data:"):
                try:
                    chunk = orjson.loads(frame[5:])
                except orjson.JSONDecodeError:
                    chunk = None
                if isinstance(chunk, dict) and isinstance(chunk.get("usage"), dict):
                    self.usage = chunk["usage"]
                    if self.strip:
                        if not chunk.get("choices"):
                            continue
                        del chunk["usage"]
                        frame = b"data: " + orjson.dumps(chunk)
            out.append(frame + sep)
        return b"".join(out)
