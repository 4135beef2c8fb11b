"""RMSNorm fused with the residual add: one read of x and residual, one write of each result."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from replica.kernels.triton_common import check_launchable, next_pow2, rows_per_program


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    residual_out_ptr,
    num_rows,
    stride_x,
    stride_r,
    hidden,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)[:, None]
    cols = tl.arange(0, BLOCK)[None, :]
    mask = (rows < num_rows) & (cols < hidden)
    rows = rows.to(tl.int64)
    x = tl.load(x_ptr + rows * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + rows * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        # Round the sum to the activation dtype first: that is the residual stream the next
        # layer sees, and the norm must be of exactly that value.
        summed = (x + r).to(residual_out_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + rows * hidden + cols, summed, mask=mask)
        x = summed.to(tl.float32)
    variance = tl.sum(x * x, axis=1)[:, None] / hidden
    # Like transformers: round the normalised value to the output dtype, then scale by the
    # weight; a product of two bf16 values is exact in float32, so this matches it bit for bit.
    normed = (x * tl.rsqrt(variance + eps)).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(weight_ptr + cols, mask=cols < hidden, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows * hidden + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def launch_shape(hidden: int) -> dict[str, int]:
    """Tile constants for a row width (shared with the GPU compile check)."""
    block = next_pow2(hidden)
    rows = rows_per_program(hidden)
    return {"ROWS": rows, "BLOCK": block, "num_warps": min(16, max(4, rows * block // 256))}


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rmsnorm(x + residual) * weight, x + residual); without residual, (rmsnorm(x) * weight, x)."""
    check_launchable(_rms_norm_kernel, x)
    hidden = x.shape[-1]
    x2 = x.reshape(-1, hidden)
    assert x2.stride(-1) == 1, "hidden dim must be contiguous"
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if residual is None:
        residual_in = residual_out = x2
    else:
        residual_in = residual.reshape(-1, hidden)
        assert residual_in.stride(-1) == 1
        residual_out = torch.empty_like(out)
    num_rows = x2.shape[0]
    if num_rows > 0:
        shape = launch_shape(hidden)
        _rms_norm_kernel[(triton.cdiv(num_rows, shape["ROWS"]),)](
            x2,
            residual_in,
            weight,
            out,
            residual_out,
            num_rows,
            x2.stride(0),
            residual_in.stride(0),
            hidden,
            eps,
            HAS_RESIDUAL=residual is not None,
            **shape,
        )
    new_residual = x if residual is None else residual_out.view(x.shape)
    return out.view(x.shape), new_residual
