"""`X-Session-Id` stickiness by rendezvous hashing: every router instance picks the same replica
for a session without sharing any state, and a replica leaving moves only its own sessions."""

from __future__ import annotations

import hashlib

from router.backends.backend import Replica


def _score(session_id: str, replica_id: str) -> int:
    digest = hashlib.blake2b(f"{session_id}\x00{replica_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def sticky_replica(session_id: str, candidates: list[Replica]) -> Replica:
    return max(candidates, key=lambda replica: _score(session_id, replica.id))
