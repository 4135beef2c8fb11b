"""Engine arguments (what users pass) and the model facts read from a Hugging Face folder."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
TASKS = ("generate", "embed")
POOLING_METHODS = ("last", "mean")  # replica.engine.pooling implements them


@dataclass
class EngineArgs:
    """Everything that shapes one engine; field names match the replica's command-line flags."""

    model: str
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    block_size: int = 16
    kv_cache_tokens: int | None = None
    kv_cache_memory: int | None = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    kernel_backend: str = "auto"
    seed: int = 0
    # One name or several (vLLM's `--served-model-name a b`): the first is reported in answers.
    served_model_name: str | list[str] | None = None
    tokenizer: str | None = None
    # `embed`: the engine returns pooled hidden states (embeddings) instead of generating.
    task: str = "generate"
    pooling: str = "last"  # how `embed` pools a prompt's hidden states: last token or mean

    def __post_init__(self) -> None:
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be auto, {', '.join(DTYPES)}; got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu or cuda; got {self.device!r}")
        if self.kernel_backend not in ("auto", "torch", "triton"):
            raise ValueError(
                f"kernel_backend must be auto, torch or triton; got {self.kernel_backend!r}"
            )
        if self.task not in TASKS:
            raise ValueError(f"task must be {' or '.join(TASKS)}; got {self.task!r}")
        if self.pooling not in POOLING_METHODS:
            raise ValueError(
                f"pooling must be {' or '.join(POOLING_METHODS)}; got {self.pooling!r}"
            )
        for name in ("max_num_seqs", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        for name in (
            "max_model_len",
            "max_num_batched_tokens",
            "kv_cache_tokens",
            "kv_cache_memory",
        ):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 when given")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")

    def served_names(self) -> list[str]:
        """The names clients may use, the primary first; the model as given when none is set."""
        names = self.served_model_name or self.model
        return list(dict.fromkeys([names] if isinstance(names, str) else names))

    def resolve_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


@dataclass
class ModelConfig:
    """The architecture facts our Llama-family implementation needs, from config.json."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    dtype: torch.dtype
    eos_token_ids: list[int] = field(default_factory=list)
    sliding_window: int | None = None  # attention window in use (we serve at most this context)

    @classmethod
    def from_folder(cls, path: Path) -> ModelConfig:
        raw = json.loads((path / "config.json").read_text())
        model_type = raw.get("model_type", "")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        num_heads = raw["num_attention_heads"]
        # transformers 5 writes rope settings as `rope_parameters`; older folders use
        # top-level `rope_theta` plus `rope_scaling`.
        rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
        rope_theta = float(rope.pop("rope_theta", raw.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        attention_bias = bool(raw.get("attention_bias", False))
        return cls(
            model_type=model_type,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=raw.get("num_key_value_heads") or num_heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // num_heads,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=None if rope_type == "default" else {**rope, "rope_type": rope_type},
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=attention_bias and model_type != "qwen2",
            mlp_bias=bool(raw.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            dtype=DTYPES.get(str(raw.get("dtype") or raw.get("torch_dtype")), torch.bfloat16),
            eos_token_ids=_eos_ids(path, raw),
            sliding_window=_sliding_window(model_type, raw),
        )

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        elem = torch.tensor([], dtype=dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * elem


def _sliding_window(model_type: str, raw: dict[str, Any]) -> int | None:
    """Mistral applies `sliding_window` when set; Qwen2/3 only with `use_sliding_window`."""
    window = raw.get("sliding_window")
    if model_type in ("qwen2", "qwen3") and not raw.get("use_sliding_window", False):
        return None
    return int(window) if window else None


def _eos_ids(path: Path, raw: dict[str, Any]) -> list[int]:
    """EOS ids from config.json and generation_config.json (the latter often lists several)."""
    ids: list[int] = []
    sources = [raw.get("eos_token_id")]
    gen = path / "generation_config.json"
    if gen.exists():
        sources.append(json.loads(gen.read_text()).get("eos_token_id"))
    for value in sources:
        for token in value if isinstance(value, list) else [value]:
            if isinstance(token, int) and token not in ids:
                ids.append(token)
    return ids


def resolve_model_path(model: str) -> Path:
    """A local folder as is; otherwise a Hugging Face Hub id fetched (or found) in the HF cache."""
    if os.path.isdir(model):
        return Path(model)
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(
            model, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
        )
    )


def half_matmul_is_fast(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies bf16/fp16 matrices natively (oneDNN says so for AVX-512 and AMX
    parts); elsewhere torch falls back to a scalar path ~50x slower than float32."""
    probe = {
        torch.bfloat16: "_is_mkldnn_bf16_supported",
        torch.float16: "_is_mkldnn_fp16_supported",
    }.get(dtype)
    if probe is None:
        return True
    try:
        return bool(getattr(torch.ops.mkldnn, probe)())
    except (AttributeError, RuntimeError):
        return False


def compute_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype of matrix-product weights and of the KV cache.

    The serving dtype, except half precision on CPUs without half-precision units: there float32
    weights and cache are several times faster, and numerically equivalent to a half-precision
    GEMM (half values are exact in float32, products accumulate in float32 either way, and every
    layer's output is rounded back to the serving dtype).
    """
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        return dtype if half_matmul_is_fast(dtype) else torch.float32
    return dtype


def pick_dtype(requested: str, model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """`auto` keeps the checkpoint's dtype, except float16 on CPU which runs far faster as bf16."""
    if requested != "auto":
        return DTYPES[requested]
    if model_dtype == torch.float16 and device.type == "cpu":
        return torch.bfloat16
    return model_dtype
