"""The CPU W8A8 linear (`cpu_int8.c`) behind plain functions, and its pure-torch twin.

    from specdesk.kernels import cpu_int8
    w = cpu_int8.quantize_weight(weight)            # once, at load: int8 per output channel, packed
    y = cpu_int8.linear(x, w, bias)                 # x bf16/float32 [m, k] -> [m, n] in x's dtype

`cpu_lib` compiles the C file on first use (the VNNI path where the CPU has AVX-512 VNNI, a portable loop
elsewhere). Without a C compiler the twin computes the same numbers (both sum exactly in int32), only slower.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specdesk.kernels import cpu_lib

GROUP = 32  # inputs per quantization group, of weights and activations alike (cpu_int8.c)


@dataclass(frozen=True)
class Int8Weight:
    """A linear's weight as the kernel reads it (see cpu_int8.c for the layout)."""

    packed: torch.Tensor  # int8 [n // 16 * k // 4 * 64]
    wsum: torch.Tensor  # int32 [k // GROUP, n]: each group's sum of the int8 weights of each output channel
    scales: torch.Tensor  # float32 [k // GROUP, n]
    q: torch.Tensor  # int8 [n, k] row-major: the twin's operand (and what was packed)

    @property
    def out_features(self) -> int:
        return self.q.shape[0]

    @property
    def in_features(self) -> int:
        return self.q.shape[1]


def supported(in_features: int, out_features: int) -> bool:
    """The packing's shape constraints: output channels in blocks of 16, inputs in whole groups."""
    return out_features % 16 == 0 and in_features % GROUP == 0


def _quantize_groups(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Symmetric int8 per group of GROUP along the last dim: (q [..., k], scales [..., k // GROUP]).
    groups = x.float().reshape(*x.shape[:-1], -1, GROUP)
    scales = groups.abs().amax(-1) / 127
    q = torch.where(scales[..., None] > 0, groups / scales[..., None], 0).round().clamp(-127, 127)
    return q.to(torch.int8).reshape(x.shape), scales


def quantize_weight(weight: torch.Tensor) -> Int8Weight:
    """Symmetric int8 per group of GROUP inputs of each output channel: scale = max|w| / 127 of the group,
    q = round(w / scale) (round half to even)."""
    n, k = weight.shape
    assert supported(k, n), (n, k)
    q, scales = _quantize_groups(weight.detach())
    q = q.contiguous()
    # The kernel's layout: [n // 16][k // 4][16][4].
    packed = q.view(n // 16, 16, k // 4, 4).permute(0, 2, 1, 3).contiguous().view(-1)
    wsum = q.view(n, k // GROUP, GROUP).sum(-1, dtype=torch.int32).t().contiguous()
    return Int8Weight(packed, wsum, scales.t().contiguous(), q)


def quantize_rows_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 [m, k], float32 scales [m, k // GROUP]): the kernel's quantization of activations in torch."""
    return _quantize_groups(x)


def linear_reference(x: torch.Tensor, w: Int8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The kernel's result in torch: each group's exact integer sum (float32 holds it exactly: 32 products of
    at most 127 * 127), then the same float sum over groups, in the same order, with the same roundings."""
    q, xs = quantize_rows_reference(x)
    m, groups = q.shape[0], q.shape[1] // GROUP
    xq, wq = q.float().view(m, groups, GROUP), w.q.float().view(-1, groups, GROUP)
    out = torch.zeros(m, w.out_features)
    for g in range(groups):
        out = out + (xq[:, g] @ wq[:, g].T) * (xs[:, g, None] * w.scales[g][None, :])
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def linear(x: torch.Tensor, w: Int8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T (+ bias) for x [m, k] in bfloat16 or float32 (contiguous), in x's dtype."""
    lib = cpu_lib.library()
    if lib is None or x.dtype not in (torch.bfloat16, torch.float32):
        return linear_reference(x, w, bias)
    x = x.contiguous()
    m, k = x.shape
    n = w.out_features
    threads = cpu_lib.num_threads()
    xu = torch.empty(m, k, dtype=torch.uint8)
    xs = torch.empty(m, k // GROUP, dtype=torch.float32)
    is_bf16 = int(x.dtype == torch.bfloat16)
    lib.sd_quantize_rows(x.data_ptr(), is_bf16, m, k, xu.data_ptr(), xs.data_ptr(), threads)
    out = torch.empty(m, n, dtype=x.dtype)
    b = bias.float().contiguous() if bias is not None else None  # the kernel reads it densely, as float32
    lib.sd_linear(
        xu.data_ptr(), xs.data_ptr(), m, k, w.packed.data_ptr(), w.wsum.data_ptr(), w.scales.data_ptr(),
        b.data_ptr() if b is not None else None, n, out.data_ptr(), is_bf16, threads,
    )  # fmt: skip
    return out
