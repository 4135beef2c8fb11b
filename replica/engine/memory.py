"""How many KV blocks the engine gets: exact (`kv_cache_tokens`), a CPU memory budget, or on CUDA
what `gpu_memory_utilization` leaves after the weights and a profiled peak forward pass."""

from __future__ import annotations

import logging

import torch

from replica.engine.config import EngineArgs, ModelConfig
from replica.models import AttentionMetadata, LlamaForCausalLM

log = logging.getLogger(__name__)

DEFAULT_CPU_KV_MEMORY = 1 << 30


def plan_kv_blocks(
    args: EngineArgs,
    cfg: ModelConfig,
    model: LlamaForCausalLM,
    dtype: torch.dtype,
    device: torch.device,
    max_model_len: int,
    max_num_batched_tokens: int,
) -> int:
    block_size = args.block_size
    if args.kv_cache_tokens is not None:
        return -(-args.kv_cache_tokens // block_size)
    per_block = cfg.kv_bytes_per_token(dtype) * block_size
    if device.type == "cuda":
        budget = _cuda_kv_budget(
            args, cfg, model, dtype, device, max_model_len, max_num_batched_tokens
        )
    else:
        budget = args.kv_cache_memory or DEFAULT_CPU_KV_MEMORY
    blocks = budget // per_block
    # More blocks than every sequence at full length could use only pad the prefix cache; on CPU
    # that is memory other processes need.
    if device.type == "cpu" and args.kv_cache_memory is None:
        blocks = min(blocks, args.max_num_seqs * -(-max_model_len // block_size))
    return int(max(blocks, 0))


def _cuda_kv_budget(
    args: EngineArgs,
    cfg: ModelConfig,
    model: LlamaForCausalLM,
    dtype: torch.dtype,
    device: torch.device,
    max_model_len: int,
    max_num_batched_tokens: int,
) -> int:
    torch.cuda.synchronize(device)
    free, total = torch.cuda.mem_get_info(device)
    used_before = total - free
    torch.cuda.reset_peak_memory_stats(device)
    allocated_before = torch.cuda.memory_allocated(device)
    _profile_forward(
        cfg, model, dtype, device, max_model_len, max_num_batched_tokens, args.block_size
    )
    torch.cuda.synchronize(device)
    activations = torch.cuda.max_memory_allocated(device) - allocated_before
    torch.cuda.empty_cache()
    budget = int(total * args.gpu_memory_utilization) - used_before - activations
    log.info(
        "GPU memory: total %.1f GiB, in use %.1f GiB, peak activations %.2f GiB, KV budget %.1f GiB",
        total / 2**30,
        used_before / 2**30,
        activations / 2**30,
        budget / 2**30,
    )
    return max(budget, 0)


@torch.inference_mode()
def _profile_forward(
    cfg: ModelConfig,
    model: LlamaForCausalLM,
    dtype: torch.dtype,
    device: torch.device,
    max_model_len: int,
    num_tokens: int,
    block_size: int,
) -> None:
    """One prefill of a full token budget (as sequences of up to max_model_len) through a throwaway
    KV cache, to measure peak activation memory; the logits of every sequence are computed too."""
    seq_len = min(num_tokens, max_model_len)
    num_seqs = -(-num_tokens // seq_len)
    blocks_per_seq = -(-seq_len // block_size)
    shape = (num_seqs * blocks_per_seq, block_size, cfg.num_kv_heads, cfg.head_dim)
    caches = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(2 * cfg.num_layers)]
    model.bind_kv_cache(caches[: cfg.num_layers], caches[cfg.num_layers :])
    total = num_seqs * seq_len
    positions = torch.arange(seq_len, device=device).repeat(num_seqs)
    tables = torch.arange(num_seqs * blocks_per_seq, dtype=torch.int32, device=device).view(
        num_seqs, -1
    )
    owner = torch.arange(num_seqs, device=device).repeat_interleave(seq_len)
    slots = tables[owner, positions // block_size].long() * block_size + positions % block_size
    meta = AttentionMetadata(
        slot_mapping=slots,
        block_tables=tables,
        seq_lens=torch.full((num_seqs,), seq_len, dtype=torch.int32, device=device),
        query_start_loc=torch.arange(0, total + 1, seq_len, dtype=torch.int32, device=device),
        max_seq_len=seq_len,
        max_query_len=seq_len,
    )
    input_ids = torch.zeros(total, dtype=torch.int64, device=device)
    hidden = model(input_ids, positions, meta)
    model.compute_logits(hidden[meta.query_start_loc[1:].long() - 1])
    del caches, hidden
