"""The W4A8 linear (kernels/cpu_q4.c) in every build this CPU runs, against its torch twin bit for bit; its rows
independent of the batch (what keeps speculation exact); and the Q4_1 codes found back from a GGUF file's
dequantized weights exactly as gguf-py wrote them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from specdesk.kernels import cpu_lib, cpu_q4
from tests.kernels.test_cpu_kernels import kernels  # noqa: F401 (the fixture: native and lower builds)

pytestmark = pytest.mark.skipif(
    not cpu_lib.available(), reason="no working C compiler: the CPU kernels are not built and callers use the twins"
)
GROUP = cpu_q4.GROUP


def _gguf_q4_1(w: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
    """(w as a Q4_1 GGUF file holds it after dequantization (float32), gguf-py's raw Q4_1 blocks)."""
    from gguf import GGMLQuantizationType, quants

    raw = quants.quantize(w.numpy(), GGMLQuantizationType.Q4_1)
    back = quants.dequantize(raw, GGMLQuantizationType.Q4_1).reshape(w.shape)
    return torch.from_numpy(np.ascontiguousarray(back, dtype=np.float32)), raw


def _weight(n: int, k: int, seed: int) -> torch.Tensor:
    # Groups at very different scales, a constant group (step 0) and a nearly constant one (a float16
    # subnormal step), as a Q4_1 file holds them.
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * torch.logspace(-3, 0, n)[:, None]
    w[1, :GROUP] = 0.25
    w[2, :GROUP] = 0.5 + torch.arange(GROUP) * 1e-7
    return _gguf_q4_1(w)[0]


def _x(m: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen) * torch.logspace(-2, 1, max(m, 1))[:m, None]
    if m > 2:
        x[m // 2] = 0
    return x.to(dtype)


@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize(("n", "k"), [(16, 32), (48, 96), (80, 160)])
def test_q4_linear_equals_its_twin_bit_for_bit(dtype: torch.dtype, with_bias: bool, n: int, k: int) -> None:
    """Guards the tile at every row count (1-4 and its splits), the odd 16-channel tail block, one or an odd
    number of groups, the float16 scales (a subnormal step included), the two float sums and the epilogue."""
    w = cpu_q4.exact_weight(_weight(n, k, seed=n + k))
    assert w is not None
    for m in (1, 2, 3, 4, 5, 7, 13, 64):
        x = _x(m, k, dtype, seed=m)
        bias = torch.randn(n).to(dtype) if with_bias else None
        out = cpu_q4.linear(x, w, bias)
        assert out.shape == (m, n) and out.dtype == dtype
        assert torch.equal(out, cpu_q4.linear_reference(x, w, bias)), (m, n, k)


@pytest.mark.usefixtures("kernels")
def test_q4_rows_do_not_depend_on_the_batch() -> None:
    """Each row alone gives the bits it gets among 13 (a verification pass computes every token as a one-token
    step would); an all-zero row gives exactly the bias."""
    w = cpu_q4.exact_weight(_weight(48, 192, seed=3))
    assert w is not None
    x, bias = _x(13, 192, torch.bfloat16, seed=4), torch.randn(48)
    out = cpu_q4.linear(x, w, bias)
    assert torch.equal(out[6], bias.bfloat16())
    for i in range(13):
        assert torch.equal(cpu_q4.linear(x[i : i + 1], w, bias), out[i : i + 1]), i


def test_exact_weight_finds_gguf_codes_back() -> None:
    """From a GGUF file's dequantized float32 weight: the very codes, steps and minimums of its Q4_1 blocks
    (block: float16 d, float16 m, 16 bytes of codes, element i low and i + 16 high), and the packed layout."""
    n, k = 32, 3 * GROUP
    gen = torch.Generator().manual_seed(5)
    source = torch.randn(n, k, generator=gen) * 0.05
    source[3, GROUP : 2 * GROUP] = -1.5  # a constant group: step 0
    weight, raw = _gguf_q4_1(source)
    got = cpu_q4.exact_weight(weight)
    assert got is not None
    blocks = raw.reshape(n, k // GROUP, 20)
    d = torch.from_numpy(blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32))
    m = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32))
    qs = torch.from_numpy(blocks[..., 4:].copy()).to(torch.uint8)
    codes = torch.cat([qs & 15, qs >> 4], dim=-1).reshape(n, k)
    assert torch.equal(got.codes(), codes)
    assert torch.equal(got.m, m.t().contiguous())
    live = d.t() != 0  # a constant group's step is free: any d gives m with code 0
    assert torch.equal(got.d[live], d.t()[live])
    assert torch.equal(got.dequantize(), weight)
    packed = got.packed.view(n // 16, k // 4, 8, 4)
    assert int(packed[1, 5, 3, 2]) == int(codes[16 + 3, 22]) | int(codes[16 + 8 + 3, 22]) << 4


def test_exact_weight_refuses_weights_off_the_grid() -> None:
    """One value moved by one float32 ulp, a random weight, a bf16 weight or a shape the kernel does not take:
    None (the caller then quantizes, and says so)."""
    weight = _weight(32, 64, seed=6)
    assert cpu_q4.exact_weight(weight) is not None
    moved = weight.clone()
    moved[7, 9] = torch.nextafter(moved[7, 9], torch.tensor(1.0))
    assert cpu_q4.exact_weight(moved) is None
    assert cpu_q4.exact_weight(torch.randn(32, 64)) is None
    assert cpu_q4.exact_weight(weight.bfloat16()) is None
    assert cpu_q4.exact_weight(weight[:24]) is None
    wide = torch.cat([weight, weight], dim=1)[:, :64]  # a strided view of grid values: found all the same
    assert not wide.is_contiguous() and cpu_q4.exact_weight(wide) is not None


def test_quantize_weight_rounds_onto_the_grid() -> None:
    """Off the grid, each weight lands within half a step (plus float16's rounding of d and m) of its value,
    and the result is on the grid: exact_weight finds the same codes back."""
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(48, 128, generator=gen) * torch.logspace(-2, 0, 48)[:, None]
    q = cpu_q4.quantize_weight(w)
    step = q.d.t().repeat_interleave(GROUP, 1)
    err = (q.dequantize() - w).abs()
    assert bool((err <= step * 0.5 + w.abs() * 2e-3 + 1e-6).all()), float((err - step * 0.5).max())
    again = cpu_q4.exact_weight(q.dequantize())
    assert again is not None and torch.equal(again.codes(), q.codes()) and torch.equal(again.dm, q.dm)


def test_q4_linear_is_close_to_the_float_matmul() -> None:
    """On weights that are on the grid, the only error is the activations' int8 rounding: within 1 %."""
    weight = _weight(256, 512, seed=8)
    x = torch.randn(16, 512, generator=torch.Generator().manual_seed(9))
    exact = x @ weight.T
    w = cpu_q4.exact_weight(weight)
    assert w is not None
    for dtype in (torch.float32, torch.bfloat16):
        got = cpu_q4.linear(x.to(dtype), w).float()
        rel = float((got - exact).norm() / exact.norm())
        assert rel < 0.01, (dtype, rel)
