"""Where the router's workers placed each new prefix: a table in a file that every worker maps
into memory (a prompt's anchor -> the replica it was placed on), so that a prefix new to one
worker goes where another worker already placed it.

Why: a worker's prefix index knows only the prompts it sent itself, and its placement of a prefix
new to it weighs its own claims on each cache, which differ from worker to worker: two workers
placed one tenant on two replicas (81% of 400 sequential requests of 8 tenants reached their
tenant's first replica through 2 workers, 100% through one). The table is a fact both read the
moment it is written, not a message between them.

SLOTS slots of (anchor, replica salt, check), open addressing over PROBES slots; the check makes a
slot read while another worker writes it look empty. A full neighbourhood gives up its first
slot: the table is a hint, and a lost entry only means one more placement.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

SLOTS = 1 << 16
PROBES = 8
_ENTRY = struct.Struct("<QQQ")
_MASK = (1 << 64) - 1
_MIX = 0x9E3779B97F4A7C15
FILE = "placements.bin"


def _check(anchor: int, salt: int) -> int:
    return ((anchor * _MIX) ^ salt ^ 0xA5A5A5A5A5A5A5A5) & _MASK or 1


class SharedPlacements:
    def __init__(self, folder: str | Path) -> None:
        path = Path(folder) / FILE
        if not path.exists():  # the parent makes it before the workers start
            path.write_bytes(bytes(SLOTS * _ENTRY.size))
        with open(path, "r+b") as file:
            self._map = mmap.mmap(file.fileno(), SLOTS * _ENTRY.size)

    def _slots(self, anchor: int) -> range:
        start = (anchor * _MIX & _MASK) >> 48  # the top 16 bits: SLOTS == 1 << 16
        return range(start, start + PROBES)

    def get(self, anchor: int) -> int | None:
        """The salt of the replica `anchor` was placed on, if any worker recorded it."""
        for slot in self._slots(anchor):
            key, salt, check = _ENTRY.unpack_from(self._map, (slot % SLOTS) * _ENTRY.size)
            if key == anchor and check == _check(anchor, salt):
                return int(salt)
            if key == 0:
                return None
        return None

    def put(self, anchor: int, salt: int) -> None:
        slots = self._slots(anchor)
        target = slots[0]
        for slot in slots:
            key = _ENTRY.unpack_from(self._map, (slot % SLOTS) * _ENTRY.size)[0]
            if key in (0, anchor):
                target = slot
                break
        _ENTRY.pack_into(
            self._map, (target % SLOTS) * _ENTRY.size, anchor, salt, _check(anchor, salt)
        )
