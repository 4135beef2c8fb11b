"""Helpers shared by the Triton kernel modules: launch checks and block-size arithmetic.

Triton decides between compiling and interpreting when a kernel is *decorated*, so CPU tensors
only work when `TRITON_INTERPRET=1` was set before these modules were imported; we check at
launch and say so plainly instead of letting the driver lookup fail deep inside Triton.
"""

from __future__ import annotations

import torch


def is_interpreted(kernel: object) -> bool:
    """Whether `kernel` runs in Triton's CPU interpreter (decided when it was decorated)."""
    return type(kernel).__name__ == "InterpretedFunction"


def check_launchable(kernel: object, *tensors: torch.Tensor) -> bool:
    """Raise a clear error for CPU tensors on a compiled kernel; return whether interpreted."""
    interpreted = is_interpreted(kernel)
    if not interpreted and any(not t.is_cuda for t in tensors):
        raise RuntimeError(
            "Triton kernels on CPU tensors need TRITON_INTERPRET=1 set before "
            "replica.kernels.triton_* is imported; use the torch backend on CPU otherwise"
        )
    return interpreted


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (Triton tile sizes must be powers of two)."""
    return 1 << max(0, (n - 1).bit_length())


def rows_per_program(row_width: int, max_rows: int = 32, tile_elements: int = 4096) -> int:
    """Rows a row-wise kernel handles per program: narrow rows (a head's q/k norm, small models)
    share one tile instead of launching a program each; wide rows keep one row per program."""
    return max(1, min(max_rows, tile_elements // next_pow2(row_width)))
