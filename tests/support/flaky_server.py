"""A stand-in server for supervision tests: crashes its first N starts, then serves /health.

Run as a script: `flaky_server.py PORT STATE_DIR CRASHES [--grandchild]`. Each start is counted in
STATE_DIR/starts; while the count is at most CRASHES it prints a message and exits 3. With
--grandchild it also spawns a long `sleep` (its pid in STATE_DIR/grandchild) to prove a stop kills
the whole process group.
"""

from __future__ import annotations

import http.server
import os
import signal
import subprocess
import sys
from pathlib import Path


class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def main() -> None:
    port, state_dir, crashes = int(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    counter = state_dir / "starts"
    starts = int(counter.read_text()) + 1 if counter.exists() else 1
    counter.write_text(str(starts))
    (state_dir / "pid").write_text(str(os.getpid()))
    if starts <= crashes:
        print(f"boom: start {starts} failed on purpose", flush=True)
        sys.exit(3)
    if "--grandchild" in sys.argv:
        child = subprocess.Popen(["sleep", "600"])
        (state_dir / "grandchild").write_text(str(child.pid))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"serving on {port}", flush=True)
    http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()


if __name__ == "__main__":
    main()
