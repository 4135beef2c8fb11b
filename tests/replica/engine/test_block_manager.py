"""The block pool's bookkeeping: reference counts, chained hashes, LRU reuse of cached blocks."""

from __future__ import annotations

from replica.engine.block_manager import BlockManager, block_hash
from replica.engine.detokenizer import IncrementalDetokenizer
from replica.engine.sampling_params import SamplingParams
from replica.engine.sequence import Request


def _seq(tokens: list[int], salt: str | None = None):
    def detok(prompt, params):
        return IncrementalDetokenizer(lambda ids, skip: "", prompt, [], False, True)

    return Request("r", None, tokens, SamplingParams(), detok, salt).seqs[0]


def test_chained_hash_names_the_whole_prefix() -> None:
    a = block_hash(b"", [1, 2, 3, 4], None)
    assert a == block_hash(b"", [1, 2, 3, 4], None)
    assert block_hash(a, [5, 6, 7, 8], None) != block_hash(b"", [5, 6, 7, 8], None)
    assert block_hash(b"", [1, 2, 3, 4], "salt") != a


def test_allocate_share_free_and_lru_reuse() -> None:
    blocks = BlockManager(num_blocks=6, block_size=4, enable_prefix_caching=True)
    first = _seq(list(range(10)))  # 2 full blocks + 2 tokens
    assert blocks.find_cached_prefix(first) == []
    assert blocks.allocate(first, 10)
    assert len(first.block_table) == 3 and blocks.num_free_blocks == 3

    twin = _seq(list(range(10)))
    hits = blocks.find_cached_prefix(twin)
    assert hits == first.block_table[:2]
    assert blocks.allocate(twin, 2, hits)
    assert twin.num_computed_tokens == 8 and twin.num_cached_tokens == 8
    assert blocks.ref_counts[hits[0]] == 2 and blocks.num_free_blocks == 2

    blocks.free_sequence(first)
    blocks.free_sequence(twin)
    assert blocks.num_free_blocks == 6
    # The uncached tail blocks are reused first; the cached prefix survives a small allocation.
    other = _seq([9] * 8)
    assert blocks.allocate(other, 8)
    again = _seq(list(range(10)))
    assert blocks.find_cached_prefix(again) == hits
    blocks.free_sequence(other)

    # A big allocation evicts the cached blocks; their hashes are forgotten.
    big = _seq([7] * 24)
    assert blocks.allocate(big, 24)
    assert blocks.find_cached_prefix(_seq(list(range(10)))) == []
    assert not blocks.allocate(_seq([1] * 4), 4)
    blocks.free_sequence(big)
    assert blocks.num_free_blocks == 6 and blocks.usage == 0.0


def test_no_caching_when_disabled() -> None:
    blocks = BlockManager(num_blocks=4, block_size=4, enable_prefix_caching=False)
    seq = _seq(list(range(9)))
    assert blocks.allocate(seq, 9)
    assert blocks.find_cached_prefix(_seq(list(range(9)))) == []
    assert not blocks.cached
