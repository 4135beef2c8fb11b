"""The security suite: attacks found on the running system, replayed against real processes.

Router attacks reuse the router tests' harness (fake replicas as real processes, routers as real
servers on loopback), so its folder is importable from here.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "router"))
# Replica attacks reuse the replica-server tests' live server (tests/server/live_replica.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))
