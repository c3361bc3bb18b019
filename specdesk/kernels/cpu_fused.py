"""The layer's small ops in C for the CPU path (`cpu_fused.c`): RMSNorm with its residual add, rotary, SwiGLU;
and the MLP speculator's norm and GELU (`norm_gelu`).

Same contracts as their twins in `specdesk.kernels.reference`, for bf16 tensors; each returns None where it
cannot run (no C compiler, another dtype), and `specdesk.kernels.ops` then calls the twin.
"""

from __future__ import annotations

import torch

from specdesk.kernels import cpu_lib


def _ready(*tensors: torch.Tensor) -> bool:
    return all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in tensors)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None, multiplier: float
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(norm(s), s) for s = residual + x * multiplier, or s = x without a residual; x [T, N] bf16."""
    lib = cpu_lib.library()
    if lib is None or not _ready(x, weight, *([residual] if residual is not None else [])):
        return None
    x, weight = x.contiguous(), weight.contiguous()
    res = residual.contiguous() if residual is not None else None
    m, n = x.shape
    out, res_out = torch.empty_like(x), torch.empty_like(x)
    lib.sd_rms_norm(x.data_ptr(), res.data_ptr() if res is not None else None, weight.data_ptr(), eps, multiplier,
                    m, n, out.data_ptr(), res_out.data_ptr(), cpu_lib.num_threads())  # fmt: skip
    return out, res_out


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """x [T, H, D] (heads contiguous within a row; rows may be a wider tensor's, as the q/k part of a fused qkv
    output) rotated in place by cos, sin [T, 1, D // 2] and returned."""
    lib = cpu_lib.library()
    t, heads, d = x.shape
    if lib is None or not _ready(x, cos, sin) or x.stride(2) != 1 or x.stride(1) != d:
        return None
    cos, sin = cos.contiguous(), sin.contiguous()
    lib.sd_rotary(x.data_ptr(), x.stride(0), cos.data_ptr(), sin.data_ptr(), t, heads, d)
    return x


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor | None:
    """silu(gate) * up for gate_up = [gate | up], [T, 2 * I] -> [T, I]."""
    lib = cpu_lib.library()
    if lib is None or not _ready(gate_up):
        return None
    gate_up = gate_up.contiguous()
    t, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = gate_up.new_empty(t, inter)
    lib.sd_silu_mul(gate_up.data_ptr(), t, inter, out.data_ptr(), cpu_lib.num_threads())
    return out


def norm_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor | None:
    """GELU(weight * x / sqrt(mean(x^2) + eps) + bias) over the last dim of float32 x (the MLP speculator's LN_i
    and activation, `MLPSpeculator.norm_act`), erf by a polynomial within 1.5e-7; None where it cannot run."""
    lib = cpu_lib.library()
    ready = all(t.dtype == torch.float32 and t.device.type == "cpu" for t in (x, weight, bias))
    if lib is None or not ready or not hasattr(lib, "sd_norm_gelu"):  # a build of an earlier revision's sources
        return None
    x, weight, bias = x.contiguous(), weight.contiguous(), bias.contiguous()
    out = torch.empty_like(x)
    d = x.shape[-1]
    lib.sd_norm_gelu(x.data_ptr(), x.numel() // d, d, weight.data_ptr(), bias.data_ptr(), eps, out.data_ptr())
    return out
