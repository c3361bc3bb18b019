"""Linear layers with weights prepacked for oneDNN: the fast bf16 matmul on CPUs with AVX-512 BF16 / AMX.

torch's plain bf16 `F.linear` on CPU reorders the weight on every call, which at decode batch sizes costs
more than the matmul itself; packing once at load time gives the same numbers several times faster.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def can_pack(dtype: torch.dtype, device: torch.device) -> bool:
    """True where prepacked oneDNN bf16 linears exist and the CPU runs bf16 natively."""
    if device.type != "cpu" or dtype != torch.bfloat16 or not torch.backends.mkldnn.is_available():
        return False
    ops = torch.ops.mkldnn
    return hasattr(ops, "_reorder_linear_weight") and bool(ops._is_mkldnn_bf16_supported())


class PackedLinear(nn.Module):
    """y = x W^T + b with W held in oneDNN's blocked layout. Keeps `weight` for tied users (speculators)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight = weight  # the original, shared with whoever else reads it (e.g. a tied embedding)
        self.bias = bias
        self.out_features = weight.shape[0]
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        out = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none", [], "")
        return out.reshape(*x.shape[:-1], self.out_features)


def replace_linears(
    model: nn.Module,
    make: Callable[[torch.Tensor, torch.Tensor | None], nn.Module],
    skip: nn.Module | None = None,
    where: Callable[[nn.Linear], bool] = lambda _: True,
) -> int:
    """Swap every nn.Linear below model (but `skip`, and only those `where` accepts) for make(weight, bias)
    in place; returns how many."""
    swaps = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.Linear) and child is not skip and where(child)
    ]
    for parent, name, child in swaps:
        setattr(parent, name, make(child.weight, child.bias))
    return len(swaps)


def pack_linears(model: nn.Module, skip: nn.Module | None = None) -> int:
    """Swap every nn.Linear below model (but `skip`) for a PackedLinear in place; returns how many."""
    return replace_linears(model, PackedLinear, skip)
