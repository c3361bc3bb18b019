"""The sampler's pass over a row (kernels/cpu_sampling.c) in every build this CPU runs (AVX2 vectors on AVX2 and
AVX-512 machines, portable C) against its numpy twin: the same maximum and candidates, the normalizer to 1e-7,
broken rows flagged; and the sampler takes the twin where no kernel is built."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

from specdesk.kernels import cpu_lib, cpu_sampling
from tests.kernels.builds import build_with

pytestmark = pytest.mark.skipif(
    not cpu_lib.available(), reason="no working C compiler: the CPU kernels are not built and callers use the twins"
)


@pytest.fixture(scope="module", params=["native", "portable"])
def build(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    if request.param == "native":
        lib = cpu_lib.library()
    else:
        lib = build_with("-mno-avx512f -mno-avx2", str(tmp_path_factory.mktemp("sampling-portable")))
    if lib is None:
        pytest.skip("no x86-64 compiler that takes -mno-avx2")
    return lib


@pytest.fixture
def kernel(build: ctypes.CDLL, monkeypatch: pytest.MonkeyPatch) -> ctypes.CDLL:
    monkeypatch.setattr(cpu_lib, "library", lambda: build)
    return build


@pytest.mark.parametrize("size", [49152, 1001, 7, 1])
@pytest.mark.parametrize("temperature", [0.7, 1.0, 0.05])
def test_the_scan_matches_its_numpy_twin(kernel: ctypes.CDLL, size: int, temperature: float) -> None:
    rng = np.random.default_rng(size)
    for spread in (0.3, 3.0, 8.0):
        row = (rng.standard_normal(size) * spread).astype(np.float32)
        row[rng.integers(size)] += 15.0
        for span in (10.0, 20.0):
            got = cpu_sampling.nucleus_scan(row, temperature, span)
            want = cpu_sampling.nucleus_scan_numpy(row, temperature, span)
            assert not got.broken and got.top == want.top
            assert np.array_equal(got.index, want.index) and got.index.dtype == np.int64
            assert got.total == pytest.approx(want.total, rel=1e-7)


def test_masked_tokens_count_for_nothing_and_broken_rows_are_flagged(kernel: ctypes.CDLL) -> None:
    row = np.full(100, -np.inf, dtype=np.float32)
    row[[3, 50]] = [2.0, 1.0]  # a grammar's or a bias's -inf: never candidates, nothing in the normalizer
    scan = cpu_sampling.nucleus_scan(row, 1.0, 20.0)
    assert scan.index.tolist() == [3, 50] and scan.total == pytest.approx(1 + np.exp(-1.0), rel=1e-6)
    for bad in (np.nan, np.inf):
        broken = np.zeros(1001, dtype=np.float32)
        broken[997] = bad  # in the scalar tail
        assert cpu_sampling.nucleus_scan(broken, 0.7, 10.0).broken
        broken[997], broken[8] = 0.0, bad  # in the vector body
        assert cpu_sampling.nucleus_scan(broken, 0.7, 10.0).broken
    assert cpu_sampling.nucleus_scan(np.full(64, -np.inf, dtype=np.float32), 0.7, 10.0).broken


def test_the_sampler_draws_the_same_with_the_twin(monkeypatch: pytest.MonkeyPatch) -> None:
    from specdesk.engine.sampler import make_generator, sample_rows
    from specdesk.engine.sampling_params import SamplingParams

    logits = torch.randn(6, 49152, generator=torch.Generator().manual_seed(3)) * 3
    params = [SamplingParams(temperature=0.7, top_p=0.9, seed=i) for i in range(6)]

    def draw() -> list[int]:
        return sample_rows(logits, params, [make_generator(i, "cpu") for i in range(6)], [[]] * 6).tokens

    with_kernel = draw()
    monkeypatch.setattr(cpu_lib, "library", lambda: None)
    assert draw() == with_kernel
