"""Runs one scheduled step: packs the batch into tensors, runs the model over the paged KV cache,
computes logits only for the rows that need them and samples.

Inputs are built from a few Python lists per step and expanded with tensor ops, so the Python cost
per step grows with the number of sequences, not tokens. `forward` is the seam where a decode-only
step with fixed-size inputs can be replaced by a captured CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from replica.engine.config import ModelConfig
from replica.engine.cuda_graphs import DecodeGraphs
from replica.engine.outputs import TokenLogprob
from replica.engine.sampler import Sampler, SampleResult, top_logprobs
from replica.engine.scheduler import ScheduledBatch
from replica.engine.sequence import Sequence
from replica.models import AttentionMetadata, LlamaForCausalLM


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    sample_rows: list[int]  # row of each sampling sequence's last token
    sample_seqs: list[Sequence]
    prompt_spans: list[tuple[Sequence, int, int, int]]  # (seq, first row, rows, first position)
    is_decode: bool  # every sequence computes exactly one token


@dataclass
class StepResult:
    seqs: list[Sequence]  # the sequences that sampled, in order
    sampled: SampleResult
    prompt_logprobs: dict[Sequence, list[TokenLogprob | None]]


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        cfg: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
        eos_token_ids: list[int],
        seed: int,
    ) -> None:
        self.model, self.cfg, self.device = model, cfg, device
        self.block_size = block_size
        shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        self.k_caches = [
            torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)
        ]
        self.v_caches = [
            torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)
        ]
        model.bind_kv_cache(self.k_caches, self.v_caches)
        self.sampler = Sampler(device, eos_token_ids, seed)
        self.graphs: DecodeGraphs | None = None  # set by the engine where graphs apply

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> StepResult:
        inputs = self.prepare(batch)
        hidden = self.forward(inputs)
        rows = list(inputs.sample_rows)
        for _, first, count, _ in inputs.prompt_spans:
            rows.extend(range(first, first + count))
        if not rows:  # every sequence is mid-prompt
            return StepResult([], SampleResult([], []), {})
        index = torch.tensor(rows, dtype=torch.int64, device=self.device)
        logits = self.model.compute_logits(hidden[index])
        num_sampled = len(inputs.sample_rows)
        sampled = (
            self.sampler(logits[:num_sampled], inputs.sample_seqs)
            if num_sampled
            else SampleResult([], [])
        )
        prompt_logprobs = self._prompt_logprobs(inputs, logits[num_sampled:])
        return StepResult(inputs.sample_seqs, sampled, prompt_logprobs)

    @torch.inference_mode()
    def hidden_states(self, batch: ScheduledBatch) -> torch.Tensor:
        """The final hidden states (after the model's last norm, no LM head) of every token the
        step computes, in row order: what an embedding pools."""
        return self.forward(self.prepare(batch))

    def forward(self, inputs: StepInputs) -> torch.Tensor:
        if self.graphs is not None and self.graphs.can_run(inputs.input_ids, inputs.meta):
            return self.graphs.run(inputs.input_ids, inputs.positions, inputs.meta)
        return self.model(inputs.input_ids, inputs.positions, inputs.meta)

    def prepare(self, batch: ScheduledBatch) -> StepInputs:
        seqs, counts = batch.seqs, batch.num_new_tokens
        starts = [seq.num_computed_tokens for seq in seqs]
        is_decode = all(n == 1 for n in counts)
        if is_decode:  # also a prompt chunk of one token: take the token at `start`
            token_list = [seq.token_ids[start] for seq, start in zip(seqs, starts, strict=True)]
        else:
            token_list = []
            for seq, start, n in zip(seqs, starts, counts, strict=True):
                token_list.extend(seq.token_ids[start : start + n])
        seq_lens_list = [s + n for s, n in zip(starts, counts, strict=True)]
        max_seq_len = max(seq_lens_list)
        width = -(-max_seq_len // self.block_size)
        tables = [seq.block_table + [0] * (width - len(seq.block_table)) for seq in seqs]

        device = self.device
        input_ids = torch.tensor(token_list, dtype=torch.int64)
        block_tables = torch.tensor(tables, dtype=torch.int32)
        seq_lens = torch.tensor(seq_lens_list, dtype=torch.int32)
        if is_decode:
            positions = seq_lens.long() - 1
            query_start_loc = torch.arange(len(seqs) + 1, dtype=torch.int32)
            slot_blocks = block_tables.gather(1, (positions // self.block_size)[:, None])[:, 0]
        else:
            num_new = torch.tensor(counts, dtype=torch.int64)
            query_start_loc = torch.zeros(len(seqs) + 1, dtype=torch.int32)
            query_start_loc[1:] = num_new.cumsum(0)
            owner = torch.repeat_interleave(torch.arange(len(seqs)), num_new)
            offsets = torch.arange(len(token_list)) - query_start_loc[:-1].long()[owner]
            positions = torch.tensor(starts, dtype=torch.int64)[owner] + offsets
            slot_blocks = block_tables[owner, positions // self.block_size]
        slot_mapping = slot_blocks.long() * self.block_size + positions % self.block_size

        sample_rows, sample_seqs, prompt_spans = [], [], []
        row = 0
        for seq, start, n in zip(seqs, starts, counts, strict=True):
            if start + n == seq.num_tokens:
                sample_rows.append(row + n - 1)
                sample_seqs.append(seq)
            done = seq.request.prompt_logprobs
            if seq.index == 0 and done is not None:
                # Row p's logits score prompt token p + 1; `done` covers tokens 0..len(done)-1
                # (a chunk recomputed after preemption skips what is already there).
                first = len(done) - 1
                end = min(start + n, seq.num_prompt_tokens - 1)
                if start <= first < end:
                    prompt_spans.append((seq, row + first - start, end - first, first))
            row += n

        meta = AttentionMetadata(
            slot_mapping=slot_mapping.to(device, non_blocking=True),
            block_tables=block_tables.to(device, non_blocking=True),
            seq_lens=seq_lens.to(device, non_blocking=True),
            query_start_loc=query_start_loc.to(device, non_blocking=True),
            max_seq_len=max_seq_len,
            max_query_len=max(counts),
        )
        return StepInputs(
            input_ids.to(device, non_blocking=True),
            positions.to(device, non_blocking=True),
            meta,
            sample_rows,
            sample_seqs,
            prompt_spans,
            is_decode,
        )

    def _prompt_logprobs(
        self, inputs: StepInputs, logits: torch.Tensor
    ) -> dict[Sequence, list[TokenLogprob | None]]:
        """Logprob of each prompt token given the ones before it (rows predict the next token)."""
        out: dict[Sequence, list[TokenLogprob | None]] = {}
        offset = 0
        for seq, _, count, first_pos in inputs.prompt_spans:
            targets = seq.token_ids[first_pos + 1 : first_pos + 1 + count]
            logprobs = torch.log_softmax(logits[offset : offset + count], dim=-1)
            tokens = torch.tensor(targets, device=self.device)
            out[seq] = top_logprobs(logprobs, tokens, [seq.params.prompt_logprobs] * count)
            offset += count
        return out
