"""kernels/cpu_pages.py: the mapping that holds what a CPU step streams (weights, the KV pool) keeps every value,
dtype and shape, lays tensors end to end in order, and is backed by huge pages where the OS gives them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from specdesk.kernels import cpu_pages

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def test_gather_keeps_values_in_order_on_cache_lines() -> None:
    gen = torch.Generator().manual_seed(0)
    tensors = [
        torch.randint(0, 255, (3, 5), dtype=torch.uint8, generator=gen),  # 15 bytes: the next starts 64 on
        torch.randn(7, 16, generator=gen).half(),
        torch.randint(-(2**31), 2**31 - 1, (33,), dtype=torch.int32, generator=gen),
        torch.randn(2, 3, 4, generator=gen),
    ]
    placed = cpu_pages.gather(tensors)
    for t, p in zip(tensors, placed, strict=True):
        assert p.dtype == t.dtype and p.shape == t.shape and torch.equal(p, t)
        assert p.data_ptr() % 64 == 0 and p.data_ptr() != t.data_ptr()
    starts = [p.data_ptr() for p in placed]
    assert starts == sorted(starts) and starts[1] - starts[0] == 64
    assert len({p.untyped_storage().data_ptr() for p in placed}) == 1
    placed[0].fill_(7)  # a copy: writable, and the original keeps its values
    assert (placed[0] == 7).all() and (tensors[0] != 7).any()


def test_zeros_is_zero_and_writable() -> None:
    t = cpu_pages.zeros(5 << 20)
    assert t.dtype == torch.uint8 and t.numel() == 5 << 20 and not t.any()
    t.view(torch.bfloat16)[-1] = 1.5
    assert t.view(torch.bfloat16)[-1].item() == 1.5


@pytest.mark.skipif(
    not THP.exists() or "[never]" in THP.read_text() or not Path("/proc/self/smaps_rollup").exists(),
    reason="no transparent huge pages on this OS",
)
def test_zeros_takes_huge_pages_where_the_os_gives_them() -> None:
    """Where transparent huge pages are on ("always" or "madvise"), the mapping is backed by them once touched."""
    before = cpu_pages.huge_bytes()
    t = cpu_pages.zeros(16 << 20)
    t.fill_(1)
    assert cpu_pages.huge_bytes() - before >= cpu_pages.HUGE_PAGE
