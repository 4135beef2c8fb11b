"""Build our model from a Hugging Face folder: safetensors (single file or sharded with an index),
HF parameter names mapped onto our fused projections, cast to the serving dtype on the device."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from replica.engine.config import ModelConfig
from replica.kernels import Ops
from replica.models.llama import Linear, LlamaForCausalLM

# HF name piece -> (our fused parameter piece, shard index); shards are laid out in this order.
_FUSED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


def load_model(
    path: Path,
    cfg: ModelConfig,
    ops: Ops,
    dtype: torch.dtype,
    device: torch.device,
    max_positions: int,
    linear_dtype: torch.dtype | None = None,
) -> LlamaForCausalLM:
    """The model in `dtype`, its matrix-product weights in `linear_dtype` (default: `dtype`)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg, ops)
    _materialise(model, dtype, linear_dtype or dtype, device)
    params = dict(model.named_parameters())
    if cfg.tie_word_embeddings:
        del params["lm_head.weight"]
    shard_sizes = {
        "qkv_proj": [cfg.num_heads * cfg.head_dim, *[cfg.num_kv_heads * cfg.head_dim] * 2],
        "gate_up_proj": [cfg.intermediate_size] * 2,
    }
    pending = {name: len(shard_sizes.get(name.split(".")[-2], [None])) for name in params}
    for hf_name, tensor in _checkpoint_tensors(path):
        name = hf_name.removeprefix("model.")
        if "rotary_emb" in name or (name == "lm_head.weight" and cfg.tie_word_embeddings):
            continue
        target, start, size = name, 0, None
        for piece, (fused, shard) in _FUSED.items():
            if f".{piece}." in name:
                target = name.replace(piece, fused)
                sizes = shard_sizes[fused]
                start, size = sum(sizes[:shard]), sizes[shard]
                break
        if target not in params:
            raise ValueError(f"unexpected tensor {hf_name!r} in the checkpoint")
        param = params[target].data
        view = param if size is None else param.narrow(0, start, size)
        if view.shape != tensor.shape:
            raise ValueError(
                f"{hf_name}: checkpoint shape {tuple(tensor.shape)} != {tuple(view.shape)}"
            )
        view.copy_(tensor)
        pending[target] -= 1
    missing = sorted(name for name, left in pending.items() if left > 0)
    if missing:
        raise ValueError(f"checkpoint lacks tensors for {missing}")
    if cfg.tie_word_embeddings:
        embed = model.embed_tokens.weight
        head = model.lm_head.weight
        if head.dtype == embed.dtype:
            model.lm_head.weight = embed
        else:
            head.data.copy_(embed.data)
    model.init_rope(max_positions, device)
    return model.eval()


def _materialise(
    model: nn.Module, dtype: torch.dtype, linear_dtype: torch.dtype, device: torch.device
) -> None:
    """Replace meta parameters by empty ones of their final dtype: no float32 copy, no init."""
    for module in model.modules():
        wanted = linear_dtype if isinstance(module, Linear) else dtype
        for name, param in list(module._parameters.items()):
            if param is not None:
                empty = torch.empty(param.shape, dtype=wanted, device=device)
                module._parameters[name] = nn.Parameter(empty, requires_grad=False)


def _checkpoint_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors weights in {path}")
    for file in files:
        with safe_open(str(path / file), framework="pt") as reader:
            for name in reader.keys():  # noqa: SIM118 - safe_open is not a dict
                yield name, reader.get_tensor(name)
