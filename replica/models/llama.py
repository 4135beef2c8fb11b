"""One Llama-family decoder for Llama 2/3, Mistral, Qwen2 (qkv bias) and Qwen3 (q/k norm).

Projections are fused (q|k|v and gate|up) so a layer is four matrix products; every other op goes
through the kernel op set, so CPU and GPU run this same code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from replica.engine.config import ModelConfig
from replica.kernels import Ops
from replica.models.rope import cos_sin_cache


@dataclass
class AttentionMetadata:
    """Where a step's packed tokens live in the paged KV cache (see replica.kernels contracts)."""

    slot_mapping: torch.Tensor  # [T] int64
    block_tables: torch.Tensor  # [B, max_blocks] int32
    seq_lens: torch.Tensor  # [B] int32, context length after this step
    query_start_loc: torch.Tensor  # [B + 1] int32
    max_seq_len: int
    max_query_len: int


class Linear(nn.Module):
    """A linear layer whose parameters start uninitialised (the checkpoint fills them).

    Its weight may be wider than the activations (see `replica.engine.config.compute_dtype`); the
    output comes back in the input's dtype.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)


class RMSNormWeight(nn.Module):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)


class Embedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: Ops) -> None:
        super().__init__()
        self.ops = ops
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
        )
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        self.eps = cfg.rms_norm_eps
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=cfg.o_bias)
        self.q_norm = RMSNormWeight(cfg.head_dim) if cfg.qk_norm else None
        self.k_norm = RMSNormWeight(cfg.head_dim) if cfg.qk_norm else None
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(
        self,
        positions: torch.Tensor,
        x: torch.Tensor,
        cos_sin: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        ops, tokens = self.ops, x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(tokens, self.num_heads, self.head_dim)
        k = k.reshape(tokens, self.num_kv_heads, self.head_dim)
        v = v.reshape(tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q = ops.rms_norm(q.reshape(-1, self.head_dim), self.q_norm.weight, self.eps)[0].view_as(
                q
            )
            k = ops.rms_norm(k.reshape(-1, self.head_dim), self.k_norm.weight, self.eps)[0].view_as(
                k
            )
        q, k = ops.rotary_embedding(positions, q, k, cos_sin)
        ops.store_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        out = ops.paged_attention(
            q,
            self.k_cache,
            self.v_cache,
            meta.block_tables,
            meta.seq_lens,
            meta.query_start_loc,
            self.scale,
            max_seq_len=meta.max_seq_len,
            max_query_len=meta.max_query_len,
        )
        return self.o_proj(out.reshape(tokens, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: Ops) -> None:
        super().__init__()
        self.ops = ops
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.ops.silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: Ops) -> None:
        super().__init__()
        self.ops, self.eps = ops, cfg.rms_norm_eps
        self.self_attn = Attention(cfg, ops)
        self.mlp = MLP(cfg, ops)
        self.input_layernorm = RMSNormWeight(cfg.hidden_size)
        self.post_attention_layernorm = RMSNormWeight(cfg.hidden_size)

    def forward(
        self,
        positions: torch.Tensor,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        cos_sin: torch.Tensor,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x, residual = self.ops.rms_norm(x, self.input_layernorm.weight, self.eps, residual)
        x = self.self_attn(positions, x, cos_sin, meta)
        x, residual = self.ops.rms_norm(x, self.post_attention_layernorm.weight, self.eps, residual)
        return self.mlp(x), residual


class LlamaForCausalLM(nn.Module):
    """Hidden states for packed tokens, and logits for the rows that need them."""

    def __init__(self, cfg: ModelConfig, ops: Ops) -> None:
        super().__init__()
        self.cfg, self.ops = cfg, ops
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, ops) for _ in range(cfg.num_layers))
        self.norm = RMSNormWeight(cfg.hidden_size)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)  # the embedding's when tied
        self.cos_sin = torch.empty(0)

    def init_rope(self, max_positions: int, device: torch.device) -> None:
        """The float32 [cos | sin] table; kept out of the parameters so it never changes dtype."""
        cfg = self.cfg
        table = cos_sin_cache(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, max_positions)
        self.cos_sin = table.to(device)

    def bind_kv_cache(self, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor]) -> None:
        for layer, k_cache, v_cache in zip(self.layers, k_caches, v_caches, strict=True):
            attention = cast(DecoderLayer, layer).self_attn
            attention.k_cache, attention.v_cache = k_cache, v_cache

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        x = F.embedding(input_ids, self.embed_tokens.weight)
        residual: torch.Tensor | None = None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, self.cos_sin, meta)
        return self.ops.rms_norm(x, self.norm.weight, self.cfg.rms_norm_eps, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
