"""W8A8 linears for the CPU: int8 weights and int8 activations, summed exactly in int32.

A CPU decode step of a small model is bound by reading weights and by how much a verification pass of
several tokens costs over a one-token step. `specdesk/kernels/cpu_int8.c` reads each int8 weight (half of
bf16's bytes) once for every token of a pass, with one AVX-512 VNNI instruction per 64 multiply-adds, so the
linears of a 5-token verification cost about 1.25x a one-token step's instead of 5x.

Weights and activations: symmetric int8 with one scale per group of 32 inputs (Q8_0's grid; per-channel and
per-token scales lost 9 points of top-1 agreement with float32), an activation's scales computed from its own
token alone. That keeps a token's result independent of the others in the pass, and each group's int32 sum
does not depend on summation order, so speculation stays exact on this path: greedy output with
a draft tree is identical to greedy output without one (tests/engine/test_int8.py). The cost is a small
quality loss against bf16, measured by `python -m benchmarks.cpu` (agreement of greedy tokens).

`Q4Linear` is the same path with 4-bit weights on GGUF's Q4_1 grid (`specdesk/kernels/cpu_q4.c`): where a
checkpoint's float32 weights are exactly a Q4_1 file's values (the default model), it multiplies by the very
weights the checkpoint holds, reading half the bytes of int8 (quantization "q4_1", or "auto" on AVX2).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn

from specdesk.engine.models.packed_linear import replace_linears
from specdesk.kernels import cpu_int8, cpu_pages, cpu_q4


class Int8Linear(nn.Module):
    """y = x W^T + b with W and x in int8 (see the module doc); y in x's dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight_int8 = cpu_int8.quantize_weight(weight)
        self.bias = None if bias is None else bias.detach().float().contiguous()
        self.out_features = weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = cpu_int8.linear(x.reshape(-1, x.shape[-1]), self.weight_int8, self.bias)
        return out.reshape(*x.shape[:-1], self.out_features)


class Q4Linear(nn.Module):
    """y = x W^T + b with W on the Q4_1 grid and x in int8 (see the module doc); y in x's dtype."""

    def __init__(self, weight: cpu_q4.Q4Weight, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight_q4 = weight
        self.bias = None if bias is None else bias.detach().float().contiguous()
        self.out_features = self.weight_q4.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = cpu_q4.linear(x.reshape(-1, x.shape[-1]), self.weight_q4, self.bias)
        return out.reshape(*x.shape[:-1], self.out_features)


def quantized_linear(weight: torch.Tensor, bias: torch.Tensor | None, weights: str = "int8") -> nn.Module:
    """The C kernels' linear for a weight whose shape they take. weights: "int8" (an Int8Linear), "q4_1" (a
    Q4Linear: the weight's own Q4_1 codes, else rounded onto that grid) or "exact" (a Q4Linear where the
    weight lies on the Q4_1 grid, no rounding at all; an Int8Linear otherwise)."""
    codes = None if weights == "int8" else cpu_q4.exact_weight(weight.detach().float())
    if codes is None and weights == "q4_1":
        codes = cpu_q4.round_weight(weight)
    return Q4Linear(codes, bias) if codes is not None else Int8Linear(weight, bias)


def quantize_linears(model: nn.Module, skip: nn.Module | None = None, weights: str = "int8") -> int:
    """Swap every nn.Linear below model (but `skip`) whose shape the kernels take for `quantized_linear`'s,
    in place; returns how many became Q4Linear."""
    replace_linears(model, lambda w, b: quantized_linear(w, b, weights), skip,
                    lambda lin: cpu_int8.supported(lin.in_features, lin.out_features))  # fmt: skip
    return sum(isinstance(m, Q4Linear) for m in model.modules())


# The kernel operands of each weight kind, in the order its kernel reads them.
_OPERANDS: dict[type, tuple[str, ...]] = {cpu_q4.Q4Weight: ("packed", "dm"),
                                          cpu_int8.Int8Weight: ("packed", "scales", "wsum")}  # fmt: skip


def place_weights(weights: list[Any]) -> list[Any]:
    """Copies of Int8Weight / Q4Weight objects whose kernel operands lie end to end, in this order, in one mapping
    on huge pages (`kernels/cpu_pages.py`: the hardware prefetcher then streams a decode step's weights); the values
    stay the same."""
    fields = [_OPERANDS[type(w)] for w in weights]
    moved = iter(cpu_pages.gather([getattr(w, f) for w, fs in zip(weights, fields, strict=True) for f in fs]))
    return [replace(w, **{f: next(moved) for f in fs}) for w, fs in zip(weights, fields, strict=True)]


def gather_weights(model: nn.Module) -> None:
    """`place_weights` for every quantized linear below model (the output projection's too), in module order: the
    order a step reads them."""
    linears = [m for m in model.modules() if isinstance(m, Int8Linear | Q4Linear)]
    attrs = ["weight_q4" if isinstance(m, Q4Linear) else "weight_int8" for m in linears]
    placed = place_weights([getattr(m, a) for m, a in zip(linears, attrs, strict=True)])
    for m, a, w in zip(linears, attrs, placed, strict=True):
        setattr(m, a, w)
