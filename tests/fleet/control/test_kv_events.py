"""KV-cache events: the wire format, the router's exact index (stores, evictions, gaps, bounds),
the engine's hash against the router's, and publisher to reader through a real Redis."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis

from fleet.control.kv_events import (
    Batch,
    ExactIndex,
    Snapshot,
    block_keys,
    events_info,
    key_of,
    keys,
    merge,
    pack,
    readable,
    unpack,
)
from fleet.control.kv_publisher import KVEventPublisher
from fleet.control.kv_reader import KVEventReader
from fleet.control.redis_conn import async_client
from replica.engine.block_manager import BlockManager, block_hash
from replica.engine.detokenizer import IncrementalDetokenizer
from replica.engine.sampling_params import SamplingParams
from replica.engine.sequence import Request


def _seq(tokens: list[int]):
    def detok(prompt, params):
        return IncrementalDetokenizer(lambda ids, skip: "", prompt, [], False, True)

    return Request("r", None, tokens, SamplingParams(), detok, None).seqs[0]


def test_pack_round_trips_big_endian_64_bit_keys() -> None:
    values = [0, 1, 2**63, 2**64 - 1, 0x0102030405060708]
    data = pack(values)
    assert len(data) == 40 and data[32:] == bytes(range(1, 9))
    assert unpack(data) == values
    with pytest.raises(ValueError):
        unpack(b"\x00" * 7)


def test_batch_and_snapshot_encode_and_decode() -> None:
    batch = Batch(b"e1", 7, [1, 2**64 - 1], [5])
    assert Batch.decode(batch.encode()) == batch
    snap = Snapshot(b"e1", 9, [3, 4])
    assert Snapshot.decode(snap.encode()) == snap
    assert merge([{1: True, 2: True}, {1: False, 3: True}]) == ([2, 3], [1])


def test_scheme_is_named_and_readers_refuse_others() -> None:
    info = events_info(16)
    assert info == {"scheme": "sha256-chain/v1", "block_size": 16, "key_bits": 64, "salt": "none"}
    assert readable(info) == 16
    assert readable({**info, "scheme": "xxhash/v9"}) is None
    assert readable({**info, "salt": "per-request"}) is None
    assert readable(None) is None


def test_router_block_keys_equal_the_engines_hashes() -> None:
    tokens = list(range(1000, 1000 + 53))
    parent, expected = b"", []
    for i in range(3):
        parent = block_hash(parent, tokens[16 * i : 16 * (i + 1)], None)
        expected.append(key_of(parent))
    assert block_keys(tokens, 16) == expected  # 53 tokens: three full blocks


def test_block_manager_notes_stores_evictions_and_resets() -> None:
    blocks = BlockManager(num_blocks=4, block_size=4, enable_prefix_caching=True)
    blocks.record_events()
    first = _seq(list(range(8)))
    assert blocks.allocate(first, 8)
    stored = blocks.take_events()
    assert stored == dict.fromkeys(block_keys(list(range(8)), 4), True)
    assert sorted(map(key_of, blocks.cached_digests())) == sorted(stored)
    blocks.free_sequence(first)
    assert blocks.take_events() == {}  # freed blocks stay cached
    other = _seq(list(range(100, 116)))  # needs all four blocks: both cached ones are evicted
    assert blocks.allocate(other, 16)
    events = blocks.take_events()
    for k in stored:
        assert events[k] is False
    assert sum(events.values()) == 4  # the new prompt's blocks
    blocks.free_sequence(other)
    blocks.reset_prefix_cache()
    assert set(blocks.take_events().values()) == {False} and blocks.cached_digests() == []


def test_index_applies_batches_in_order_and_loses_track_on_gaps() -> None:
    index = ExactIndex(block_size=16)
    assert not index.apply(Batch(b"e", 1, [1], []))  # nothing before a snapshot
    index.load(Snapshot(b"e", 3, [1, 2]))
    assert index.apply(Batch(b"e", 2, [9], []))  # already in the snapshot: skipped
    assert index.blocks == {1, 2}
    assert index.apply(Batch(b"e", 4, [3, 4], [1]))
    assert index.blocks == {2, 3, 4} and index.seq == 4
    assert index.match([2, 3, 5, 4], usable=4) == 2
    assert index.match([2, 3, 4], usable=1) == 1  # the prompt's last token is never cached
    assert not index.apply(Batch(b"e", 6, [7], []))  # seq 5 is missing
    assert not index.synced and index.blocks == set() and index.gaps == 1
    index.load(Snapshot(b"e", 6, [7]))
    assert not index.apply(Batch(b"other", 1, [8], []))  # a new publisher (restart)
    assert index.gaps == 2


def test_index_is_bounded() -> None:
    index = ExactIndex(block_size=16, max_blocks=3)
    index.load(Snapshot(b"e", 0, [1, 2]))
    assert index.apply(Batch(b"e", 1, [3], []))
    assert not index.apply(Batch(b"e", 2, [4], []))  # a fourth block: past the bound
    assert not index.synced and index.blocks == set()
    index.load(Snapshot(b"e", 2, [1, 2, 3, 4]))  # a snapshot past it is refused too
    assert not index.synced


class _Engine:
    """The engine's side of the contract: a cache of keys, a snapshot when asked."""

    def __init__(self) -> None:
        self.cached: set[int] = set()
        self.sink: KVEventPublisher | None = None
        self.asked = 0

    def step(self, events: dict[int, bool]) -> None:
        for k, on in events.items():
            (self.cached.add if on else self.cached.discard)(k)
        assert self.sink is not None
        self.sink.changes(events)

    def request_snapshot(self) -> None:
        self.asked += 1
        assert self.sink is not None
        self.sink.snapshot([k.to_bytes(8, "big") + b"rest of the digest" for k in self.cached])


async def _eventually(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        await asyncio.sleep(0.01)
    return condition()


async def test_reader_follows_a_publisher_through_trims_and_drops(
    redis_client: aioredis.Redis, prefix: str
) -> None:
    engine = _Engine()
    publisher = KVEventPublisher(
        redis_client, prefix, "r1", engine.request_snapshot, maxlen=5, max_pending=50,
        flush_s=0.005,
    )  # fmt: skip
    engine.sink = publisher
    engine.cached = {100, 101}
    publisher.start()
    reader = KVEventReader(redis_client, prefix, block_ms=20, resync_s=0.02)
    reader.track("r1", 16)
    reader.start()
    try:
        assert await _eventually(lambda: reader.index("r1") is not None)
        index = reader.index("r1")
        assert index is not None and index.blocks == {100, 101}
        engine.step({1: True, 2: True})
        engine.step({1: False, 3: True})
        assert await _eventually(lambda: index.blocks == engine.cached)
        # A burst past max_pending is dropped: the reader notices the gap and resyncs.
        engine.step({k: True for k in range(1000, 1060)})
        engine.step({4: True})
        assert await _eventually(lambda: publisher.dropped >= 60)
        assert await _eventually(lambda: (i := reader.index("r1")) is not None
                                 and i.blocks == engine.cached)  # fmt: skip
        # A router that joins late, after the stream was trimmed: snapshot, then the rest.
        for k in range(250):
            engine.step({5000 + k: True})
            await asyncio.sleep(0.01)
        assert await _eventually(lambda: index.blocks == engine.cached)
        stream = keys(prefix, "r1").stream
        assert await redis_client.xlen(stream) < publisher.published - 50  # MAXLEN ~ 5: trimmed
        late = KVEventReader(redis_client, prefix, block_ms=20, resync_s=0.02)
        late.track("r1", 16)
        late.start()
        try:
            assert await _eventually(lambda: (i := late.index("r1")) is not None
                                     and i.blocks == engine.cached)  # fmt: skip
        finally:
            await late.stop()
    finally:
        await reader.stop()
        await publisher.stop()


async def test_publisher_survives_redis_down(prefix: str) -> None:
    client = async_client("redis://127.0.0.1:1/0", connect_timeout=0.2)
    engine = _Engine()
    publisher = KVEventPublisher(client, prefix, "r1", engine.request_snapshot, flush_s=0.005)
    engine.sink = publisher
    publisher.start()
    try:
        started = time.perf_counter()
        for k in range(200):
            engine.step({k: True})
        assert time.perf_counter() - started < 0.1  # the engine's side never waits
        assert await _eventually(lambda: publisher.dropped == 200)
        assert publisher.published == 0 and len(publisher._pending) <= 1
    finally:
        await publisher.stop()
        await client.aclose()
