"""Kernel tests run the Triton kernels on CPU in Triton's interpreter.

Triton picks interpreter or compiler when a kernel is decorated, so TRITON_INTERPRET must be set
before `replica.kernels.triton_*` is imported; if another test area imported them first, they are
re-imported here so that they interpret.
"""

from __future__ import annotations

import importlib
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

_TRITON_MODULES = (
    "replica.kernels.triton_common",
    "replica.kernels.triton_cache",
    "replica.kernels.triton_norm",
    "replica.kernels.triton_rotary",
    "replica.kernels.triton_activation",
    "replica.kernels.triton_attention",
    "replica.kernels.triton_ops",
)
for _name in _TRITON_MODULES:
    if _name in sys.modules:
        importlib.reload(sys.modules[_name])
