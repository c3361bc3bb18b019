"""The CPU path's small ops in C (kernels/cpu_fused.c: RMSNorm with its residual, rotary, SwiGLU) in every build
this CPU runs (AVX-512, AVX2, portable C) against their torch twins, to one bf16 rounding; each row computed
alone gives the bits it gets in a batch; and the builds agree with each other, where SwiGLU's vector exp is
the AVX-512 one on 8 lanes."""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import TypeVar

import pytest
import torch

from specdesk.kernels import cpu_fused, cpu_lib, reference
from tests.kernels.builds import build_with

pytestmark = pytest.mark.skipif(
    not cpu_lib.available(), reason="no working C compiler: the CPU kernels are not built and callers use the twins"
)
BUILDS = {"native": None, "avx2": "-mno-avx512f", "portable": "-mno-avx512f -mno-avx2"}
ONE_ROUNDING = {"rtol": 2**-7, "atol": 1e-6}  # bf16 keeps 8 significant bits
T = TypeVar("T")


def _has_avx2() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return {"avx2", "fma"} <= set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return False


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ctypes.CDLL | str]:
    """Each build of BUILDS, compiled once for the module, or why this machine has none."""
    out: dict[str, ctypes.CDLL | str] = {}
    for name, flag in BUILDS.items():
        if flag is None:
            lib = cpu_lib.library()
            assert lib is not None
            out[name] = lib
        elif name == "avx2" and not _has_avx2():
            out[name] = "this CPU lacks AVX2 and FMA"
        else:
            lib = build_with(flag, str(tmp_path_factory.mktemp(f"fused-{name}")))
            out[name] = lib if lib is not None else f"no x86-64 compiler that takes {flag}"
    return out


@pytest.fixture(scope="module", params=list(BUILDS))
def build(request: pytest.FixtureRequest, builds: dict[str, ctypes.CDLL | str]) -> ctypes.CDLL:
    lib = builds[request.param]
    if isinstance(lib, str):
        pytest.skip(lib)
    return lib


def _on_each_build(builds: dict[str, ctypes.CDLL | str], run: Callable[[], T]) -> dict[str, T]:
    """run() with cpu_lib answering with each build this machine has, by build name."""
    outs = {}
    for name, lib in builds.items():
        if isinstance(lib, str):
            continue
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(cpu_lib, "library", lambda lib=lib: lib)
            outs[name] = run()
    return outs


@pytest.fixture
def kernel(build: ctypes.CDLL, monkeypatch: pytest.MonkeyPatch) -> ctypes.CDLL:
    monkeypatch.setattr(cpu_lib, "library", lambda: build)
    return build


def _gate_up(t: int, inter: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(t * 7 + inter)
    gate_up = torch.randn(t, 2 * inter, generator=g) * 4
    gate_up[0, :6] = torch.tensor([-90.0, -30.0, 0.0, -0.0, 30.0, 1e-20])  # exp's clamp, zeros, a tiny gate
    return gate_up.to(torch.bfloat16)


@pytest.mark.usefixtures("kernel")
@pytest.mark.parametrize("inter", [1536, 44])  # 44: a vector loop and a scalar tail
def test_silu_and_mul_equals_its_twin_and_rows_are_independent(inter: int) -> None:
    gate_up = _gate_up(9, inter)
    out = cpu_fused.silu_and_mul(gate_up)
    assert out is not None
    torch.testing.assert_close(out.float(), reference.silu_and_mul(gate_up).float(), **ONE_ROUNDING)
    for i in (0, 4, 8):
        alone = cpu_fused.silu_and_mul(gate_up[i : i + 1])
        assert alone is not None and torch.equal(alone, out[i : i + 1])


@pytest.mark.usefixtures("kernel")
@pytest.mark.parametrize(("with_residual", "multiplier"), [(False, 1.0), (True, 1.0), (True, 0.22)])
def test_rms_norm_equals_its_twin_and_rows_are_independent(with_residual: bool, multiplier: float) -> None:
    g = torch.Generator().manual_seed(3)
    x, weight = (torch.randn(11, 576, generator=g) * 2).bfloat16(), torch.rand(576, generator=g).bfloat16() + 0.5
    residual = (torch.randn(11, 576, generator=g) * 3).bfloat16() if with_residual else None
    got = cpu_fused.rms_norm(x, weight, 1e-5, residual, multiplier)
    assert got is not None
    want = reference.rms_norm(x, weight, 1e-5, residual, multiplier)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.float(), b.float(), **ONE_ROUNDING)
    alone = cpu_fused.rms_norm(x[5:6], weight, 1e-5, residual[5:6] if residual is not None else None, multiplier)
    assert alone is not None and all(torch.equal(a, b[5:6]) for a, b in zip(alone, got, strict=True))


@pytest.mark.usefixtures("kernel")
def test_rotary_equals_its_twin() -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(7, 9, 64, generator=g).bfloat16()
    angles = torch.rand(7, 1, 32, generator=g) * 6
    cos, sin = angles.cos().bfloat16(), angles.sin().bfloat16()
    got = cpu_fused.rotary(x.clone(), cos, sin)
    assert got is not None
    torch.testing.assert_close(got.float(), reference.rotary(x, cos, sin).float(), **ONE_ROUNDING)


def test_the_builds_agree_on_swiglu(builds: dict[str, ctypes.CDLL | str]) -> None:
    """SwiGLU's vector loops (AVX-512, and AVX2 doing its arithmetic on 8 lanes) give the same bits; the portable
    loop's libm exp differs from theirs by an ulp or two of float32, which bf16 rounding hides but for rare ties."""
    outs = _on_each_build(builds, lambda: cpu_fused.silu_and_mul(_gate_up(64, 1536)[1:]))
    vector = [out for name, out in outs.items() if name != "portable"]
    assert all(out is not None and torch.equal(out, vector[0]) for out in vector)  # inter 1536: no scalar tail
    if "portable" in outs and vector:
        assert (outs["portable"] != vector[0]).float().mean() < 1e-3


def test_the_builds_agree_on_norm_and_rotary_bit_for_bit(builds: dict[str, ctypes.CDLL | str]) -> None:
    """RMSNorm's and rotary's vector loops (on AVX2 and AVX-512 builds alike) repeat the scalar loop's roundings
    in its order, so every build, the portable one included, gives the same bits; 580 and head_dim 40 leave
    scalar tails after the vector loops."""
    g = torch.Generator().manual_seed(5)
    x, res = (torch.randn(5, 580, generator=g) * 2).bfloat16(), (torch.randn(5, 580, generator=g) * 3).bfloat16()
    weight = torch.rand(580, generator=g).bfloat16() + 0.5
    heads = torch.randn(3, 4, 40, generator=g).bfloat16()
    angles = torch.rand(3, 1, 20, generator=g) * 6
    cos, sin = angles.cos().bfloat16(), angles.sin().bfloat16()

    def run() -> list[torch.Tensor | None]:
        norms = [cpu_fused.rms_norm(x, weight, 1e-5, r, m) for r, m in ((None, 1.0), (res, 1.0), (res, 0.22))]
        return [*(t for out in norms if out is not None for t in out), cpu_fused.rotary(heads.clone(), cos, sin)]

    outs = _on_each_build(builds, run)
    assert len(outs) >= 2, "fewer than two builds ran"
    first = next(iter(outs.values()))
    assert len(first) == 7 and all(t is not None for t in first)
    for out in outs.values():
        assert len(out) == len(first) and all(torch.equal(a, b) for a, b in zip(out, first, strict=True))


@pytest.mark.usefixtures("kernel")
@pytest.mark.parametrize("d", [576, 40])  # 40: vector lanes and a scalar tail (libm's erff)
def test_norm_gelu_equals_the_speculators_torch_ops(d: int) -> None:
    """The MLP speculator's LN_i and exact GELU in one call, against torch's ops on float32: within the erf
    polynomial's 1.5e-7 and a few float32 roundings; each row alone gives the bits it gets among others."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(7, d, generator=g) * torch.logspace(-1, 1, 7)[:, None]
    x[3, :6] = torch.tensor([0.0, -0.0, 40.0, -40.0, 1e-20, -3.0])  # exp's clamp, zeros, both signs
    weight, bias = torch.rand(d, generator=g) + 0.5, torch.randn(d, generator=g) * 0.1
    got = cpu_fused.norm_gelu(x, weight, bias, 1e-6)
    assert got is not None
    norm = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight + bias
    torch.testing.assert_close(got, torch.nn.functional.gelu(norm), rtol=1e-5, atol=1e-6)
    alone = cpu_fused.norm_gelu(x[4:5], weight, bias, 1e-6)
    assert alone is not None and torch.equal(alone, got[4:5])
    assert cpu_fused.norm_gelu(x.bfloat16(), weight, bias, 1e-6) is None  # float32 only: the caller's torch ops
