"""Memory for what a CPU decode step streams (the quantized weights, the KV pool) on 2 MiB pages.

Why: a CPU decode step reads every weight of the model once, and on 4 KiB pages the hardware prefetcher stops at
each page's end and the TLB misses every few kilobytes. On the 2-core Zen 2 machine a plain read of 64 MB ran at
25 GB/s on 4 KiB pages and 32 GB/s on 2 MiB pages (2 threads; 13 and 17 GB/s on one). Linux gives an anonymous
mapping huge pages where `madvise(MADV_HUGEPAGE)` asks for them before the pages are first touched and
transparent huge pages are not off (`/sys/kernel/mm/transparent_hugepage/enabled` "always" or "madvise", the
usual default). torch's allocator does not ask, and small tensors such as one layer's weights could not fill a
huge page anyway: `gather` lays a model's weights end to end, in the order a step reads them, in one mapping.

Elsewhere (another OS, huge pages off) the mapping is ordinary memory: the same bytes, only slower to stream.
The numbers never change, only where they live. `SPECDESK_HUGE_PAGES=0` leaves out the request (the layout
stays): what `benchmarks.pages_ab` compares against.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Sequence

import torch

HUGE_PAGE = 2 << 20
_ALIGN = 64  # a cache line: every tensor starts on its own


def zeros(nbytes: int) -> torch.Tensor:
    """A zeroed uint8 tensor of nbytes in a fresh anonymous mapping, on huge pages where the OS gives them (the
    pages come zeroed and are only backed as they are touched)."""
    if not hasattr(mmap, "MAP_PRIVATE"):  # Windows: no mapping flags, no transparent huge pages
        return torch.zeros(nbytes, dtype=torch.uint8)
    # Private: a shared anonymous mapping is shmem, which takes huge pages only where shmem_enabled says so.
    buf = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    raw = torch.frombuffer(buf, dtype=torch.uint8)  # holds a reference to the mapping: it lives while the tensor does
    start = -raw.data_ptr() % HUGE_PAGE  # huge pages need 2 MiB-aligned addresses
    if hasattr(mmap, "MADV_HUGEPAGE") and nbytes >= HUGE_PAGE and os.environ.get("SPECDESK_HUGE_PAGES") != "0":
        with contextlib.suppress(OSError):  # a kernel without transparent huge pages: plain pages, same bytes
            buf.madvise(mmap.MADV_HUGEPAGE, start, nbytes - nbytes % mmap.PAGESIZE)
    return raw[start : start + nbytes]


def gather(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of `tensors` (same dtypes, shapes, values), end to end in this order in one `zeros` mapping."""
    offsets, total = [], 0
    for t in tensors:
        offsets.append(total)
        total += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
    arena = zeros(max(total, 1))
    out = []
    for t, off in zip(tensors, offsets, strict=True):
        nbytes = t.numel() * t.element_size()
        copy = arena[off : off + nbytes].view(t.dtype).view(t.shape)
        copy.copy_(t)
        out.append(copy)
    return out


def huge_bytes() -> int:
    """Bytes of this process's memory on transparent huge pages (0 where the OS does not say)."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
