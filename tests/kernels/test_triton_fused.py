"""The fused elementwise Triton kernels (kernels/triton_fused.py) against their torch twins.

Without CUDA they run under the Triton interpreter (set before triton is imported, as in
test_triton_kernels.py); with a GPU they compile and run for real. Ahead-of-time compilation for sm_90 is
checked in test_triton_kernels.py.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterator

import pytest
import torch

_CUDA = torch.cuda.is_available()
_PREV = os.environ.get("TRITON_INTERPRET")
_WAS_IMPORTED = "triton" in sys.modules
if not _CUDA:
    os.environ["TRITON_INTERPRET"] = "1"


def _restore_env() -> None:
    if _PREV is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _PREV


try:
    import triton.language as tl
except ImportError:
    _restore_env()
    pytest.skip("triton is not installed", allow_module_level=True)

from specdesk.kernels import ops, reference, triton_fused  # noqa: E402

if not _CUDA:
    if type(tl.zeros).__name__ != "InterpretedFunction":
        _restore_env()
        pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set", allow_module_level=True)
    if _WAS_IMPORTED:  # kernels/ may hold compiled kernels: rebuild them interpreted
        triton_fused = importlib.reload(triton_fused)
_restore_env()

DEVICE = "cuda" if _CUDA else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _interpret_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    if not _CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


def _randn(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * 2).to(dtype).to(DEVICE)


def _exact(dtype: torch.dtype) -> float:
    # Where kernel and twin round the same values the same way the results are bit-identical, except that
    # the interpreter's float32 -> bfloat16 conversion does not round to nearest even as CUDA does.
    return 8e-3 if dtype == torch.bfloat16 and not _CUDA else 0.0


def _contracted(dtype: torch.dtype) -> float:
    # A rounded product that feeds a sum, (a * b).to(dtype) + c: the kernel rounds it as torch does, but
    # compiled for a GPU the product may still be contracted into an FMA (seen on an H100: 22 % of bf16
    # rotary outputs one unit off). One unit in the last place at the tests' magnitudes (|x| < 8).
    return {torch.float32: 2e-6, torch.bfloat16: 6.3e-2, torch.float16: 7.9e-3}[dtype]


def _ulps(dtype: torch.dtype) -> float:
    # Kernel and twin round the same intermediates; only sums (norm) and exp/rsqrt approximations may move a
    # result by one unit in the last place of the activation dtype.
    if dtype == torch.bfloat16 and not _CUDA:
        return 3.2e-2  # the interpreter's truncations (see _exact) compound over the norm's two roundings
    return {torch.float32: 2e-6, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[dtype]


def _mostly_identical(out: torch.Tensor, ref: torch.Tensor) -> None:
    # fp16, where the interpreter rounds like CUDA: the kernel rounds every intermediate that torch rounds,
    # so almost every element is bit-identical (a skipped rounding would move about half of them). Compiled
    # for a GPU, FMA contraction (see _contracted) may move more, so this holds under the interpreter.
    if out.dtype == torch.float16 and not _CUDA:
        assert (out != ref).float().mean().item() <= 0.02


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_cols", [64, 576, 80])
@pytest.mark.parametrize("multiplier", [1.0, 0.22])
def test_rms_norm_with_residual(dtype: torch.dtype, n_cols: int, multiplier: float) -> None:
    x = _randn(7, n_cols, dtype=dtype, seed=1)
    res = _randn(7, 2 * n_cols, dtype=dtype, seed=2)[:, 1 : n_cols + 1]  # its own row stride and offset
    weight = _randn(n_cols, dtype=dtype, seed=3)
    out, new_res = ops.rms_norm(x, weight, 1e-5, res, multiplier, backend="triton")
    ref_out, ref_res = reference.rms_norm(x, weight, 1e-5, res, multiplier)
    assert out.dtype == dtype and new_res.dtype == dtype
    # The same roundings, except that in float32 CUDA contracts residual + x * multiplier into one FMA
    # (seen on an H100: 1 unit in the last place).
    exact = _contracted(dtype) if multiplier != 1.0 and (_CUDA or dtype == torch.float32) else _exact(dtype)
    torch.testing.assert_close(new_res, ref_res, atol=exact, rtol=exact)
    tol = _ulps(dtype)
    torch.testing.assert_close(out.float(), ref_out.float(), atol=tol, rtol=tol)
    _mostly_identical(out, ref_out)
    assert x.equal(_randn(7, n_cols, dtype=dtype, seed=1))
    assert res.equal(_randn(7, 2 * n_cols, dtype=dtype, seed=2)[:, 1 : n_cols + 1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_without_residual_of_a_strided_view(dtype: torch.dtype) -> None:
    wide = _randn(5, 100, dtype=dtype, seed=4)
    x = wide[:, :64]  # rows 100 apart: the kernel must honour the row stride
    weight = _randn(64, dtype=dtype, seed=5)
    out, same = ops.rms_norm(x, weight, 1e-6, backend="triton")
    assert same is x
    tol = _ulps(dtype)
    torch.testing.assert_close(out.float(), reference.rms_norm(x, weight, 1e-6)[0].float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads,head_dim", [((4, 2), 64), ((9, 3), 64), ((3, 1), 80)])
def test_rotary_in_place_on_the_fused_qkv_output(dtype: torch.dtype, heads: tuple[int, int], head_dim: int) -> None:
    num_heads, num_kv_heads = heads
    num_tokens, num_qk = 6, num_heads + num_kv_heads
    qkv = _randn(num_tokens, (num_qk + num_kv_heads) * head_dim, dtype=dtype, seed=6)
    before = qkv.clone()
    angles = _randn(num_tokens, 1, head_dim // 2, dtype=torch.float32, seed=7)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    qk = qkv[:, : num_qk * head_dim].view(num_tokens, num_qk, head_dim)
    expected = reference.rotary(qk.clone(), cos, sin)
    result = ops.rotary(qk, cos, sin, backend="triton")
    assert result.data_ptr() == qkv.data_ptr()  # rotated in place, in the qkv buffer
    # A product may be contracted into an FMA (fp32; any dtype compiled for a GPU). Interpreted bf16: its
    # truncations (see _exact) go through a difference of two rounded products: 2 units of magnitude ~4.
    atol = _contracted(dtype) if _CUDA or dtype == torch.float32 else 6.3e-2 if _exact(dtype) else 0.0
    torch.testing.assert_close(result, expected, atol=atol, rtol=atol and 1e-6)
    assert qkv[:, num_qk * head_dim :].equal(before[:, num_qk * head_dim :])  # v untouched


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("inter", [128, 1536, 100])
def test_silu_and_mul(dtype: torch.dtype, inter: int) -> None:
    gate_up = _randn(3, 2 * inter, dtype=dtype, seed=8)
    out = ops.silu_and_mul(gate_up, backend="triton")
    tol = _ulps(dtype)
    expected = reference.silu_and_mul(gate_up)
    torch.testing.assert_close(out.float(), expected.float(), atol=tol, rtol=tol)
    _mostly_identical(out, expected)


def test_no_tokens() -> None:
    empty = torch.empty(0, 64, device=DEVICE)
    assert ops.rms_norm(empty, torch.ones(64, device=DEVICE), 1e-5, empty, backend="triton")[0].shape == (0, 64)
    assert ops.silu_and_mul(torch.empty(0, 64, device=DEVICE), backend="triton").shape == (0, 32)
    qk, angles = torch.empty(0, 3, 16, device=DEVICE), torch.empty(0, 1, 8, device=DEVICE)
    assert ops.rotary(qk, angles, angles, backend="triton") is qk


def test_gpu_script_checks_the_fused_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    # `python -m benchmarks.kernels_gpu` (the prepared GPU script) checks these kernels too; its check passes here.
    from benchmarks import kernels_gpu as bench

    monkeypatch.setattr(bench, "DEVICE", DEVICE)
    rows = bench._check_fused()
    assert [r["kernel"] for r in rows] == ["rms_norm + residual", "rotary", "silu_and_mul"]
    assert all(r["ok"] for r in rows), rows
