"""The fleet manager's socket: how `fleet status/restart/scale/down` talk to a running manager,
with JSON lines on a Unix socket.

A request is one line `{"op": ..., "args": {...}}`; the answer is any number of
`{"progress": "..."}` lines (long operations such as a rolling restart report each step) and then
one `{"ok": true, "result": ...}` or `{"ok": false, "error": "..."}` line. The socket lives in
the fleet's run folder (mode 0700), so only its owner can drive the fleet.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("fleet.manager_socket")

Progress = Callable[[str], None]
Handler = Callable[[dict, Progress], Awaitable[Any]]


class ManagerError(RuntimeError):
    """The manager refused or failed an operation (its message is for the user)."""


class ManagerSocket:
    def __init__(self, path: Path, handlers: dict[str, Handler]) -> None:
        self.path = path
        self.handlers = handlers
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        self.path.chmod(0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        def send(message: dict) -> None:
            writer.write(json.dumps(message).encode() + b"\n")

        try:
            request = json.loads(await reader.readline())
            handler = self.handlers.get(request.get("op", ""))
            if handler is None:
                send({"ok": False, "error": f"unknown operation {request.get('op')!r}"})
            else:
                result = await handler(request.get("args") or {}, lambda m: send({"progress": m}))
                send({"ok": True, "result": result})
        except ManagerError as exc:
            send({"ok": False, "error": str(exc)})
        except (ValueError, AttributeError):
            send({"ok": False, "error": "malformed request"})
        except Exception as exc:
            log.exception("manager operation failed")
            send({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
        with contextlib.suppress(ConnectionError):
            await writer.drain()
            writer.close()


def call(
    path: Path,
    op: str,
    args: dict | None = None,
    on_progress: Progress | None = None,
    timeout: float | None = None,
) -> Any:
    """Run one operation on the manager; raises ManagerError with its message, OSError if absent."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5.0)
        sock.connect(str(path))
        sock.settimeout(timeout)
        sock.sendall(json.dumps({"op": op, "args": args or {}}).encode() + b"\n")
        with sock.makefile("rb") as stream:
            for line in stream:
                message = json.loads(line)
                if "progress" in message:
                    if on_progress is not None:
                        on_progress(message["progress"])
                    continue
                if message.get("ok"):
                    return message.get("result")
                raise ManagerError(message.get("error") or "operation failed")
    raise ManagerError("the fleet manager closed the connection without an answer")
