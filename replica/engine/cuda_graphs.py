"""CUDA graphs for decode-only steps: one captured forward pass per batch size of a ladder.

At small batch a decode step is a few hundred short kernels, and launching them from Python costs
more than running them; replaying a captured graph launches them all at once. A step with B
sequences runs the graph of the smallest ladder size >= B: its inputs are copied into static
buffers, and the padding rows write no KV (slot -1) and attend one key of block 0, so they cost
almost nothing and touch no real sequence. Anything else (prefill, mixed, too large) runs eagerly.

Capture happens only on CUDA with the Triton ops (the torch reference ops synchronise with the
host, which a graph cannot hold); set FLEET_CUDA_GRAPHS=0 to run every step eagerly.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import torch

from replica.kernels import Ops
from replica.models import AttentionMetadata, LlamaForCausalLM

log = logging.getLogger(__name__)


def batch_size_ladder(max_batch: int) -> list[int]:
    """1, 2, 4, then every multiple of 8, up to and including max_batch."""
    sizes = {b for b in (1, 2, 4) if b <= max_batch}
    sizes.update(range(8, max_batch + 1, 8))
    sizes.add(max_batch)
    return sorted(sizes)


def padded_batch_size(num_seqs: int, ladder: list[int]) -> int | None:
    """The smallest ladder size that holds num_seqs, or None when none does."""
    return next((size for size in ladder if size >= num_seqs), None)


@dataclass
class DecodeBuffers:
    """The static inputs a captured decode graph reads: one row per sequence, max_batch rows."""

    input_ids: torch.Tensor  # [max_batch] int64
    positions: torch.Tensor  # [max_batch] int64
    slot_mapping: torch.Tensor  # [max_batch] int64
    block_tables: torch.Tensor  # [max_batch, max_blocks] int32
    seq_lens: torch.Tensor  # [max_batch] int32
    query_start_loc: torch.Tensor  # [max_batch + 1] int32: one query per sequence
    max_model_len: int

    @classmethod
    def allocate(
        cls, max_batch: int, max_model_len: int, block_size: int, device: torch.device
    ) -> DecodeBuffers:
        max_blocks = -(-max_model_len // block_size)
        buffers = cls(
            input_ids=torch.zeros(max_batch, dtype=torch.int64, device=device),
            positions=torch.zeros(max_batch, dtype=torch.int64, device=device),
            slot_mapping=torch.full((max_batch,), -1, dtype=torch.int64, device=device),
            block_tables=torch.zeros(max_batch, max_blocks, dtype=torch.int32, device=device),
            seq_lens=torch.ones(max_batch, dtype=torch.int32, device=device),
            query_start_loc=torch.arange(max_batch + 1, dtype=torch.int32, device=device),
            max_model_len=max_model_len,
        )
        return buffers

    @property
    def max_batch(self) -> int:
        return self.input_ids.shape[0]

    def fits(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> bool:
        """A decode step (one token per sequence) small enough for these buffers."""
        num_seqs = meta.seq_lens.shape[0]
        return (
            meta.max_query_len == 1
            and input_ids.shape[0] == num_seqs <= self.max_batch
            and meta.block_tables.shape[1] <= self.block_tables.shape[1]
            and meta.max_seq_len <= self.max_model_len
        )

    def view(self, size: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """The first `size` rows as model inputs; a graph captured on them reads these rows."""
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping[:size],
            block_tables=self.block_tables[:size],
            seq_lens=self.seq_lens[:size],
            query_start_loc=self.query_start_loc[: size + 1],
            max_seq_len=self.max_model_len,
            max_query_len=1,
        )
        return self.input_ids[:size], self.positions[:size], meta

    def load(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, size: int
    ) -> None:
        """Copy a step's inputs into the first rows; rows up to `size` become padding."""
        n = input_ids.shape[0]
        width = meta.block_tables.shape[1]
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.block_tables[:n, :width].copy_(meta.block_tables)
        self.seq_lens[:n].copy_(meta.seq_lens)
        if size > n:
            self.input_ids[n:size].zero_()
            self.positions[n:size].zero_()
            self.slot_mapping[n:size].fill_(-1)
            self.block_tables[n:size, 0].zero_()
            self.seq_lens[n:size].fill_(1)


class DecodeGraphs:
    """Captured decode forward passes, one per ladder size, sharing one memory pool."""

    def __init__(self, model: LlamaForCausalLM, buffers: DecodeBuffers) -> None:
        self.model, self.buffers = model, buffers
        self.ladder = batch_size_ladder(buffers.max_batch)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        pool = torch.cuda.graph_pool_handle()
        with torch.inference_mode():
            # Largest first: smaller graphs then reuse the pool's blocks.
            for size in reversed(self.ladder):
                ids, positions, meta = buffers.view(size)
                model(ids, positions, meta)  # compiles this size's kernels outside the capture
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    hidden = model(ids, positions, meta)
                self.graphs[size] = (graph, hidden)

    @classmethod
    def build(
        cls,
        model: LlamaForCausalLM,
        ops: Ops,
        device: torch.device,
        max_num_seqs: int,
        max_model_len: int,
        block_size: int,
    ) -> DecodeGraphs | None:
        """Capture on CUDA with the Triton ops; None (run eagerly) anywhere else."""
        if device.type != "cuda" or ops.name != "triton":
            return None
        if os.environ.get("FLEET_CUDA_GRAPHS", "1") == "0":
            log.info("CUDA graphs disabled by FLEET_CUDA_GRAPHS=0")
            return None
        start = time.perf_counter()
        buffers = DecodeBuffers.allocate(max_num_seqs, max_model_len, block_size, device)
        try:
            graphs = cls(model, buffers)
        except RuntimeError:  # a capture failing must cost speed, not the engine
            log.warning("CUDA graph capture failed; decode steps run eagerly", exc_info=True)
            return None
        log.info(
            "captured %d decode CUDA graphs (batch sizes up to %d) in %.1f s",
            len(graphs.ladder),
            max_num_seqs,
            time.perf_counter() - start,
        )
        return graphs

    def can_run(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> bool:
        return self.buffers.fits(input_ids, meta)

    def run(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """Hidden states of a decode step, [num_seqs, hidden], valid until the next replay."""
        num_seqs = input_ids.shape[0]
        size = padded_batch_size(num_seqs, self.ladder)
        assert size is not None, "can_run() must be checked first"
        self.buffers.load(input_ids, positions, meta, size)
        graph, hidden = self.graphs[size]
        graph.replay()
        return hidden[:num_seqs]
