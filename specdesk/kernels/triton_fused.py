"""Triton kernels that fuse a decoder layer's small elementwise ops. Twins: `specdesk.kernels.reference.rms_norm`,
`.rotary` and `.silu_and_mul`.

At 135M parameters a GPU decode step is host overhead: each torch op is a Python call, a dispatch and a
kernel launch, ~33 of them per layer (an RMSNorm in bf16 alone is 8). These three kernels turn the
residual add + norm, the rotary embedding of q and k, and SwiGLU's activation into one launch each.

Numerics follow the torch twins op for op, roundings included: every intermediate that torch rounds to the
activation dtype (bf16/fp16) is rounded here too, and the arithmetic between roundings is float32 as in
torch's kernels. What still differs: the order of the norm's sum of squares (one tree reduction), the
compiled exp / rsqrt / division (approximate instructions on CUDA), and, in float32, products that the
compiler contracts into FMAs (a*cos - b*sin, residual + x*multiplier). Results agree to a unit or so in
the last place, which the tests bound.

Importing this module imports triton; `specdesk.kernels.ops` imports it lazily. On CPU it only runs under the
Triton interpreter (TRITON_INTERPRET=1 set before triton is imported).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from specdesk.kernels.triton_common import check_device, next_pow2


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # [T, N]: the layer's input, or the sublayer output to add to the residual
    res_ptr,  # [T, N] residual stream (HAS_RES)
    w_ptr,  # [N]
    out_ptr,  # [T, N] normalised
    res_out_ptr,  # [T, N] updated residual stream (HAS_RES)
    stride_x,
    stride_res,
    stride_out,
    stride_res_out,
    n_cols,
    eps,
    multiplier,
    HAS_RES: tl.constexpr,
    HAS_MULT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # One program per token row.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    dtype = x.dtype
    if HAS_RES:
        if HAS_MULT:
            x = (x.to(tl.float32) * multiplier).to(dtype)  # torch rounds h * multiplier first
        res = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0)
        x = (res.to(tl.float32) + x.to(tl.float32)).to(dtype)
        tl.store(res_out_ptr + row * stride_res_out + cols, x, mask=mask)
    h = x.to(tl.float32)
    var = tl.sum(h * h, axis=0) / n_cols
    h = (h * tl.rsqrt(var + eps)).to(dtype)  # normalised in float32, cast back, then scaled
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * stride_out + cols, (w.to(tl.float32) * h.to(tl.float32)).to(dtype), mask=mask)


def rms_norm(
    x: torch.Tensor,  # [T, N], last dim contiguous
    weight: torch.Tensor,  # [N]
    eps: float,
    residual: torch.Tensor | None = None,
    multiplier: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(residual + x * multiplier), residual + x * multiplier), or (norm(x), x) without a residual."""
    check_device(x, weight, *([] if residual is None else [residual]))
    assert x.dim() == 2 and x.stride(-1) == 1, (x.shape, x.stride())
    if residual is not None:
        assert residual.shape == x.shape and residual.stride(-1) == 1, (residual.shape, residual.stride())
    num_tokens, n_cols = x.shape
    out = torch.empty_like(x)
    res_out = out if residual is None else torch.empty_like(x)
    res = x if residual is None else residual
    if num_tokens:
        _rms_norm_kernel[(num_tokens,)](
            x, res, weight, out, res_out, x.stride(0), res.stride(0), out.stride(0), res_out.stride(0),
            n_cols, eps, multiplier, HAS_RES=residual is not None, HAS_MULT=multiplier != 1.0,
            BLOCK=next_pow2(n_cols), num_warps=4,
        )  # fmt: skip
    return out, (x if residual is None else res_out)


@triton.jit
def _rotary_kernel(
    x_ptr,  # [T, H, D] rotated in place (a view into the fused qkv output)
    cos_ptr,  # [T, D // 2]
    sin_ptr,
    stride_x_t,
    stride_x_h,
    stride_cs_t,
    num_heads,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    # One program per token, all its heads: transformers' rotate-half layout.
    token = tl.program_id(0).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_HALF)
    mask = (heads[:, None] < num_heads) & (dims[None, :] < HALF)
    first = x_ptr + token * stride_x_t + heads[:, None] * stride_x_h + dims[None, :]
    x1 = tl.load(first, mask=mask, other=0.0)
    x2 = tl.load(first + HALF, mask=mask, other=0.0)
    dtype = x1.dtype
    cos = tl.load(cos_ptr + token * stride_cs_t + dims, mask=dims < HALF, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + token * stride_cs_t + dims, mask=dims < HALF, other=0.0).to(tl.float32)[None, :]
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    # torch: cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin)), each product and sum rounded to dtype.
    o1 = ((a * cos).to(dtype).to(tl.float32) - (b * sin).to(dtype).to(tl.float32)).to(dtype)
    o2 = ((b * cos).to(dtype).to(tl.float32) + (a * sin).to(dtype).to(tl.float32)).to(dtype)
    tl.store(first, o1, mask=mask)
    tl.store(first + HALF, o2, mask=mask)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, H, D] by cos, sin [T, 1, D // 2] IN PLACE and return x (the torch twin returns a copy)."""
    check_device(x, cos, sin)
    num_tokens, num_heads, head_dim = x.shape
    assert x.stride(-1) == 1 and head_dim % 2 == 0, (x.shape, x.stride())
    cos2, sin2 = cos.reshape(num_tokens, head_dim // 2), sin.reshape(num_tokens, head_dim // 2)
    assert cos2.stride() == sin2.stride() and cos2.stride(-1) == 1, (cos2.stride(), sin2.stride())
    if num_tokens:
        _rotary_kernel[(num_tokens,)](
            x, cos2, sin2, x.stride(0), x.stride(1), cos2.stride(0), num_heads, HALF=head_dim // 2,
            BLOCK_H=next_pow2(num_heads), BLOCK_HALF=next_pow2(head_dim // 2), num_warps=4,
        )  # fmt: skip
    return x


@triton.jit
def _silu_and_mul_kernel(
    gate_up_ptr,  # [T, 2 * I]: gate then up
    out_ptr,  # [T, I]
    stride_in,
    stride_out,
    inter,
    BLOCK: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(gate_up_ptr + token * stride_in + cols, mask=mask, other=0.0)
    up = tl.load(gate_up_ptr + token * stride_in + inter + cols, mask=mask, other=0.0)
    dtype = gate.dtype
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(dtype)  # F.silu, rounded as torch rounds it
    tl.store(out_ptr + token * stride_out + cols, (act.to(tl.float32) * up.to(tl.float32)).to(dtype), mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate | up] of shape [T, 2 * I] -> [T, I]."""
    check_device(gate_up)
    assert gate_up.dim() == 2 and gate_up.stride(-1) == 1 and gate_up.shape[1] % 2 == 0, gate_up.shape
    num_tokens, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty((num_tokens, inter), dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, next_pow2(inter))
    if num_tokens:
        _silu_and_mul_kernel[(num_tokens, triton.cdiv(inter, block))](
            gate_up, out, gate_up.stride(0), out.stride(0), inter, BLOCK=block, num_warps=4
        )
    return out
