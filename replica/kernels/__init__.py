"""The kernel op set the model runs on: torch reference ops or Triton kernels, same signatures.

A backend is a module exposing `store_kv`, `paged_attention`, `rms_norm`, `rotary_embedding` and
`silu_and_mul` (signatures in `replica.kernels.reference`). "triton" is `replica.kernels.triton_ops`.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch

log = logging.getLogger(__name__)

OP_NAMES = ("store_kv", "paged_attention", "rms_norm", "rotary_embedding", "silu_and_mul")
BACKEND_MODULES = {"torch": "replica.kernels.reference", "triton": "replica.kernels.triton_ops"}


@dataclass(frozen=True)
class Ops:
    """One backend's ops; `name` says which backend was picked."""

    name: str
    store_kv: Callable[..., None]
    paged_attention: Callable[..., torch.Tensor]
    rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    rotary_embedding: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    silu_and_mul: Callable[..., torch.Tensor]


def _from_module(name: str, module: ModuleType) -> Ops:
    return Ops(name, **{op: getattr(module, op) for op in OP_NAMES})


def get_ops(backend: str = "auto", device: torch.device | str = "cpu") -> Ops:
    """The op set for `backend` ("auto" | "torch" | "triton") on `device`.

    "auto" means Triton on CUDA and torch elsewhere; if the Triton ops cannot be imported on CUDA,
    "auto" falls back to torch with a warning while an explicit "triton" raises.
    """
    device = torch.device(device)
    if backend not in ("auto", *BACKEND_MODULES):
        raise ValueError(f"unknown kernel backend {backend!r}; choose auto, torch or triton")
    if backend == "auto":
        if device.type != "cuda":
            backend = "torch"
        else:
            try:
                return _from_module("triton", importlib.import_module(BACKEND_MODULES["triton"]))
            except ImportError as exc:
                log.warning("Triton kernels unavailable (%s); using torch ops", exc)
                backend = "torch"
    return _from_module(backend, importlib.import_module(BACKEND_MODULES[backend]))
