"""The Triton op set (`get_ops("triton")`): same names and signatures as `replica.kernels.reference`.

On CUDA tensors the kernels compile; on CPU tensors they run only under TRITON_INTERPRET=1 set
before this module is first imported (how the CPU tests check them against the reference).
"""

from __future__ import annotations

from replica.kernels.triton_activation import silu_and_mul
from replica.kernels.triton_attention import paged_attention
from replica.kernels.triton_cache import store_kv
from replica.kernels.triton_norm import rms_norm
from replica.kernels.triton_rotary import rotary_embedding

__all__ = ["paged_attention", "rms_norm", "rotary_embedding", "silu_and_mul", "store_kv"]
