"""SiLU-and-mul for gated MLPs: reads the fused gate/up projection once, writes half of it."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from replica.kernels.triton_common import check_launchable, next_pow2, rows_per_program


@triton.jit
def _silu_and_mul_kernel(
    x_ptr, out_ptr, num_rows, stride_x, inter, ROWS: tl.constexpr, BLOCK: tl.constexpr
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)[:, None]
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)[None, :]
    mask = (rows < num_rows) & (cols < inter)
    rows = rows.to(tl.int64)
    gate = tl.load(x_ptr + rows * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + rows * stride_x + inter + cols, mask=mask, other=0.0).to(tl.float32)
    y = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + rows * inter + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def launch_shape(inter: int) -> dict[str, int]:
    """Tile constants for an intermediate size (shared with the GPU compile check)."""
    block = min(1024, next_pow2(inter))
    return {"ROWS": rows_per_program(block, max_rows=8), "BLOCK": block, "num_warps": 4}


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2*I] -> silu(x[:, :I]) * x[:, I:] as [T, I]."""
    check_launchable(_silu_and_mul_kernel, x)
    inter = x.shape[-1] // 2
    x2 = x.reshape(-1, x.shape[-1])
    assert x2.stride(-1) == 1, "last dim must be contiguous"
    num_rows = x2.shape[0]
    out = torch.empty((num_rows, inter), dtype=x.dtype, device=x.device)
    if num_rows > 0:
        shape = launch_shape(inter)
        grid = (triton.cdiv(num_rows, shape["ROWS"]), triton.cdiv(inter, shape["BLOCK"]))
        _silu_and_mul_kernel[grid](x2, out, num_rows, x2.stride(0), inter, **shape)
    return out.view(*x.shape[:-1], inter)
