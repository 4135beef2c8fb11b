"""RMSNorm fused with the residual add: one read of x and residual, one write of each result."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from replica.kernels.triton_common import check_launchable, next_pow2


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    residual_out_ptr,
    stride_x,
    stride_r,
    hidden,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        # Round the sum to the activation dtype first: that is the residual stream the next
        # layer sees, and the norm must be of exactly that value.
        summed = (x + r).to(residual_out_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * hidden + cols, summed, mask=mask)
        x = summed.to(tl.float32)
    variance = tl.sum(x * x, axis=0) / hidden
    # Like transformers: round the normalised value to the output dtype, then scale by the
    # weight; a product of two bf16 values is exact in float32, so this matches it bit for bit.
    normed = (x * tl.rsqrt(variance + eps)).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * hidden + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


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
    if x2.shape[0] > 0:
        block = next_pow2(hidden)
        _rms_norm_kernel[(x2.shape[0],)](
            x2,
            residual_in,
            weight,
            out,
            residual_out,
            x2.stride(0),
            residual_in.stride(0),
            hidden,
            eps,
            HAS_RESIDUAL=residual is not None,
            BLOCK=block,
            num_warps=min(16, max(1, block // 256)),
        )
    new_residual = x if residual is None else residual_out.view(x.shape)
    return out.view(x.shape), new_residual
