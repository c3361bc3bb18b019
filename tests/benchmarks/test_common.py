"""The benchmark's rate arithmetic: what a stream of requests achieves, not the mean of their rates."""

from __future__ import annotations

import pytest

from benchmarks.common import aggregate_rate


def test_aggregate_rate_is_total_tokens_over_total_time() -> None:
    # 100 tokens at 50 tok/s (2 s) and 100 at 100 tok/s (1 s): 200 tokens in 3 s, not the mean 75 tok/s.
    assert aggregate_rate([50.0, 100.0], [100, 100]) == pytest.approx(200 / 3)
    # Unequal counts weigh by time: 10 tokens at 10 tok/s (1 s) and 90 at 90 tok/s (1 s).
    assert aggregate_rate([10.0, 90.0], [10, 90]) == pytest.approx(50.0)
    assert aggregate_rate([20.0, 40.0]) == pytest.approx(80 / 3)  # equal counts: the harmonic mean


def test_aggregate_rate_skips_requests_that_decoded_nothing() -> None:
    assert aggregate_rate([0.0, 30.0], [0, 60]) == pytest.approx(30.0)
    assert aggregate_rate([]) == 0.0


def test_bench_variants_per_device_and_their_references() -> None:
    from benchmarks import spec as bench_spec

    cpu = bench_spec.select("int4,default-int4", "cpu")
    assert list(cpu) == ["plain", bench_spec.INT4_PLAIN, bench_spec.INT4_DEFAULT]
    assert bench_spec.UNFUSED in bench_spec.select(None, "cuda") and bench_spec.INT4_PLAIN not in bench_spec.select(
        None, "cuda"
    )
    for names, device in (("int4", "cuda"), ("unfused", "cpu"), ("nope", "cpu")):
        with pytest.raises(SystemExit):
            bench_spec.select(names, device)
    # int4 variants are compared with int4 plain decoding when it ran, everything else with plain.
    assert bench_spec._reference(bench_spec.INT4_DEFAULT, cpu) == bench_spec.INT4_PLAIN
    assert bench_spec.INT4_PLAIN in bench_spec.select("default-int4", "cpu")
    assert bench_spec._reference("MLP", cpu) == "plain"
