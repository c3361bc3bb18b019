"""Weight-only int4 linears for the CPU: a quarter of the bf16 weight bytes per decode step.

A CPU decode step at batch 1 is bound by reading the weights from memory; the layers' weights in 4 bits read
4x fewer bytes (`torch.ops.aten._weight_int4pack_mm_for_cpu`; docs/benchmarks.md has the measured gain).

Quantization is groupwise along the input dimension, 32 weights a group, asymmetric round-to-nearest:

    w ~ (q - 8) * scale + zero,  q in 0..15,  scale = (max - min) / 15,  zero = min + 8 * scale

which is exactly GGUF's Q4_1 grid (w = d * q + m per block of 32, with the block's min and max at q = 0 and
15). The default model ships as Q4_1, so for it this recovers the shipped 4-bit weights up to the bf16
rounding of their dequantized values: its output stays close to the bf16 path's rather than equal to it.
For other checkpoints it is a lossy quantization. The output projection (Q8_0 in the default model's file)
stays in bf16.

The kernel's cost grows by about a quarter of a step for every extra token in the pass (measured at 1-3
tokens), so speculation pays less here: the engine's measured step cost keeps its trees small.
"""

from __future__ import annotations

import torch
from torch import nn

from specdesk.engine.models.packed_linear import replace_linears

GROUP = 32


def can_quantize(device: torch.device) -> bool:
    """True where the CPU int4 matmul exists (torch >= 2.6 on CPU)."""
    return device.type == "cpu" and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def supported(in_features: int, out_features: int) -> bool:
    """The kernel's shape constraints: whole groups along the input, output rows in tiles of 16."""
    return in_features % GROUP == 0 and out_features % 16 == 0


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int32 [N, K] in 0..15, scales_and_zeros [K // GROUP, N, 2] in the weight's dtype) of w [N, K]."""
    n, k = weight.shape
    groups = weight.detach().float().reshape(n, k // GROUP, GROUP)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = ((high - low) / 15).clamp_min(1e-10)  # a constant group: any scale, every q = 0
    q = ((groups - low) / scale).round().clamp(0, 15).to(torch.int32).reshape(n, k)
    zero = low + 8 * scale
    scales_and_zeros = torch.cat([scale, zero], dim=-1).transpose(0, 1).contiguous()  # [K // GROUP, N, 2]
    return q, scales_and_zeros.to(weight.dtype)


class Int4Linear(nn.Module):
    """y = x W^T + b with W in 4 bits (see the module doc); x in the dtype W had (bf16 or float32)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        q, self.scales_and_zeros = quantize(weight)
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        self.bias = bias
        self.out_features, self.dtype = weight.shape[0], weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(self.dtype).contiguous()  # the kernel reads rows densely
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, GROUP, self.scales_and_zeros)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


def quantize_linears(model: nn.Module, skip: nn.Module | None = None) -> int:
    """Swap every nn.Linear below model (but `skip`) for an Int4Linear in place where the kernel takes its
    shape (input size a multiple of GROUP, output size of 16); returns how many."""
    return replace_linears(model, Int4Linear, skip, lambda lin: supported(lin.in_features, lin.out_features))
