"""The CPU W4A8 linear (`cpu_q4.c`): weights on GGUF's Q4_1 grid, int8 activations; and its pure-torch twin.

    from specdesk.kernels import cpu_q4
    w = cpu_q4.exact_weight(weight)          # the weight's own Q4_1 codes, or None if it is not on that grid
    w = cpu_q4.quantize_weight(weight)       # or rounded onto the grid (as llama.cpp's Q4_1)
    y = cpu_q4.linear(x, w, bias)            # x bf16/float32 [m, k] -> [m, n] in x's dtype

A float32 checkpoint converted from a Q4_1 GGUF file (the default model) holds, in each group of 32 inputs of
a channel, the values d * q + m for q in 0..15 with d and m float16, exactly as GGUF dequantizes them (float32
products and sums). `exact_weight` finds d, m and q back and checks that they give every value bit for bit, so
the kernel multiplies by exactly the weights the checkpoint holds, in half the bytes of int8.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specdesk.kernels import cpu_int8, cpu_lib

GROUP = cpu_int8.GROUP  # the activations' groups and the weights' are the same 32 inputs


@dataclass(frozen=True)
class Q4Weight:
    """A linear's weight as the kernel reads it (see cpu_q4.c for the layout)."""

    packed: torch.Tensor  # uint8 [n // 16 * k // 4 * 32]: two 4-bit codes a byte
    dm: torch.Tensor  # float16 [n // 16, k // GROUP, 2, 16]: each block's steps d, then its minimums m, per group
    out_features: int
    in_features: int

    @property
    def d(self) -> torch.Tensor:
        """Each group's step, float32 [k // GROUP, n] (the twin's operand)."""
        return self._plane(0)

    @property
    def m(self) -> torch.Tensor:
        """Each group's minimum (the value of code 0), float32 [k // GROUP, n]."""
        return self._plane(1)

    def _plane(self, i: int) -> torch.Tensor:  # dm's steps (0) or minimums (1) as [k // GROUP, n]
        return self.dm[:, :, i].permute(1, 0, 2).reshape(self.in_features // GROUP, -1).float()

    def codes(self) -> torch.Tensor:
        """The codes, uint8 [n, k] (the twin's operand; unpacked on demand so a model holds half a byte a
        weight)."""
        n, k = self.out_features, self.in_features
        p = self.packed.view(n // 16, k // 4, 8, 4)
        halves = torch.stack([p & 15, p >> 4], dim=1)  # [n // 16, 2, k // 4, 8, 4]
        return halves.permute(0, 1, 3, 2, 4).reshape(n, k)

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [n, k] the codes stand for: d * q + m, rounded as GGUF's dequantization."""
        n, k = self.out_features, self.in_features
        q = self.codes().float().view(n, k // GROUP, GROUP)
        return (self.d.t()[..., None] * q + self.m.t()[..., None]).reshape(n, k)


def supported(in_features: int, out_features: int) -> bool:
    """The packing's shape constraints: output channels in blocks of 16, inputs in whole groups."""
    return cpu_int8.supported(in_features, out_features)


def _pack(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> Q4Weight:
    # q uint8 [n, k] -> [n // 16][k // 4][8 channels][4 inputs], channel c's code low, channel c + 8's high;
    # d, m [n, k // GROUP] (float16 values) -> [n // 16][k // GROUP][d, m][16].
    n, k = q.shape
    blocks = q.view(n // 16, 2, 8, k // 4, 4).permute(0, 1, 3, 2, 4)
    packed = (blocks[:, 0] | (blocks[:, 1] << 4)).contiguous().view(-1)
    dm = torch.stack([d, m]).half().view(2, n // 16, 16, k // GROUP).permute(1, 3, 0, 2).contiguous()
    return Q4Weight(packed, dm, n, k)


def _codes(groups: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    step = torch.where(d > 0, d, 1.0)[..., None]
    return torch.where(d[..., None] > 0, (groups - m[..., None]) / step, 0.0).round().clamp(0, 15)


def exact_weight(weight: torch.Tensor) -> Q4Weight | None:
    """The Q4_1 codes of a float32 weight [n, k] whose every group of GROUP inputs is d * q + m (d and m
    float16, q in 0..15, float32 arithmetic), or None where any group is not (then the caller quantizes).

    It recognizes the groups of GGUF's reference Q4_1 quantizer (gguf-py's, llama.cpp's without an importance
    matrix), where each group's minimum takes code 0 and its maximum code 15. An imatrix-quantized file's
    groups need not use either end, and such a tensor is refused: never a wrong decomposition, since every
    value is checked, but int8 for it under "auto"."""
    n, k = weight.shape
    if weight.dtype != torch.float32 or not supported(k, n):
        return None
    groups = weight.detach().reshape(n, k // GROUP, GROUP)
    m = groups.amin(-1)  # code 0 always occurs in a Q4_1 group: its minimum is quantized to 0
    if not torch.isfinite(m).all() or not torch.equal(m.half().float(), m):
        return None
    # The step is (max - m) / 15 up to float32 rounding; the nearest float16 and its neighbours are tried.
    estimate = ((groups.amax(-1) - m) / 15).half()
    found = torch.zeros_like(m, dtype=torch.bool)
    d, q = torch.zeros_like(m), torch.zeros_like(groups)
    bits = estimate.view(torch.int16)
    for delta in (0, 1, -1):
        candidate = (bits + delta).view(torch.float16).float() if delta else estimate.float()
        candidate = torch.where(estimate == 0, 0.0, candidate)
        codes = _codes(groups, candidate, m)
        ok = ((candidate[..., None] * codes + m[..., None]) == groups).all(-1) & ~found & torch.isfinite(candidate)
        d, q = torch.where(ok, candidate, d), torch.where(ok[..., None], codes, q)
        found |= ok
    if not found.all():
        return None
    return _pack(q.to(torch.uint8).view(n, k), d, m)


def quantize_weight(weight: torch.Tensor) -> Q4Weight:
    """The weight's own codes where it lies on the Q4_1 grid (`exact_weight`), else `round_weight`'s."""
    exact = exact_weight(weight.float())
    return exact if exact is not None else round_weight(weight)


def round_weight(weight: torch.Tensor) -> Q4Weight:
    """Each group of the weight rounded onto the Q4_1 grid as llama.cpp's reference quantizer does: m = min,
    d = (max - min) / 15, both float16, q the nearest code."""
    n, k = weight.shape
    assert supported(k, n), (n, k)
    groups = weight.detach().float().reshape(n, k // GROUP, GROUP)
    m = groups.amin(-1).half().float()
    d = ((groups.amax(-1) - m) / 15).half().float()
    return _pack(_codes(groups, d, m).to(torch.uint8).view(n, k), d, m)


def quantize_rows_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(int8 [m, k], scales [m, k // GROUP], sums [m, k // GROUP]): the activations as the kernel takes them
    (cpu_int8's groups, plus scale * sum(q) of each)."""
    q, xs = cpu_int8.quantize_rows_reference(x)
    sums = xs * q.view(q.shape[0], -1, GROUP).sum(-1, dtype=torch.int32).float()
    return q, xs, sums


def linear_reference(x: torch.Tensor, w: Q4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The kernel's result in torch: each group's exact integer sum (float32 holds it: 32 products of at most
    15 * 127), then f + sum * (scale * d), then + sums * m, group after group, rounded as the kernel does."""
    q, xs, sums = quantize_rows_reference(x)
    m, groups = q.shape[0], q.shape[1] // GROUP
    xq, wq = q.float().view(m, groups, GROUP), w.codes().float().view(-1, groups, GROUP)
    d, mins = w.d, w.m
    out = torch.zeros(m, w.out_features)
    for g in range(groups):
        out = out + (xq[:, g] @ wq[:, g].T) * (xs[:, g, None] * d[g][None, :])
        out = out + sums[:, g, None] * mins[g][None, :]
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def linear(x: torch.Tensor, w: Q4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T (+ bias) for x [m, k] in bfloat16 or float32 (contiguous), in x's dtype."""
    lib = cpu_lib.library()
    if lib is None or x.dtype not in (torch.bfloat16, torch.float32):
        return linear_reference(x, w, bias)
    x = x.contiguous()
    m, k = x.shape
    threads = cpu_lib.num_threads()
    xq = torch.empty(m, k, dtype=torch.int8)
    xs = torch.empty(m, k // GROUP, dtype=torch.float32)
    sums = torch.empty_like(xs)
    is_bf16 = int(x.dtype == torch.bfloat16)
    lib.sd_quantize_rows_q4(x.data_ptr(), is_bf16, m, k, xq.data_ptr(), xs.data_ptr(), sums.data_ptr(), threads)
    out = torch.empty(m, w.out_features, dtype=x.dtype)
    b = bias.float().contiguous() if bias is not None else None
    lib.sd_linear_q4(
        xq.data_ptr(), xs.data_ptr(), sums.data_ptr(), m, k, w.packed.data_ptr(), w.dm.data_ptr(),
        b.data_ptr() if b is not None else None, w.out_features, out.data_ptr(), is_bf16, threads,
    )  # fmt: skip
    return out
