"""Host-side helpers of the Triton launchers: checks, padding, block shapes, split-K. No triton import."""

from __future__ import annotations

import functools
import os

import torch


def next_pow2(n: int) -> int:
    """Smallest power of 2 >= n (1 for n <= 1); Triton block shapes must be powers of 2."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def is_interpreting() -> bool:
    """True when triton.jit builds interpreted kernels (the env var is read when a kernel is decorated)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def check_device(*tensors: torch.Tensor) -> None:
    """Assert every tensor sits on one device that Triton can launch on (CUDA, or CPU when interpreting)."""
    devices = {t.device for t in tensors}
    assert len(devices) == 1, f"all tensors must share one device, got {sorted(map(str, devices))}"
    device = tensors[0].device
    if device.type != "cuda" and not is_interpreting():
        raise RuntimeError(
            f"Triton kernels need CUDA tensors (got {device}); on CPU set TRITON_INTERPRET=1 before "
            "importing triton, or use backend='torch'"
        )


@functools.cache
def num_sms(device_index: int) -> int:
    """Streaming multiprocessors of a CUDA device (cached: the property query is not free)."""
    return int(torch.cuda.get_device_properties(device_index).multi_processor_count)


def attention_block_shape(
    num_queries_per_kv: int, max_query_len: int, head_dim_pad: int, is_fp32: bool
) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_Q, TILE_N, num_warps) of the attention kernel for a batch's longest query."""
    # Rows cover all of a sequence's query heads x tokens when few (decode/verify: K/V read once per
    # group), up to 128 for prefill. tl.dot needs every dim >= 16.
    rows = max(1, max_query_len) * num_queries_per_kv
    block_m = max(16, min(128, next_pow2(rows)), next_pow2(num_queries_per_kv))
    tile_n = 64 if head_dim_pad <= 128 else 32
    if is_fp32 or head_dim_pad > 128:  # fp32 tiles are twice the registers
        block_m = max(min(block_m, 64), next_pow2(num_queries_per_kv))
        tile_n = 32
    num_warps = 8 if block_m >= 128 else 4
    return block_m, block_m // num_queries_per_kv, tile_n, num_warps


def pick_num_splits(device: torch.device, num_programs: int, max_seq_len: int) -> int:
    """How many programs share one (query block, KV head)'s key range (flash-decoding split-K)."""
    # Split only when the programs cannot fill ~2 waves of SMs and each split still streams >= 512
    # keys; a power of 2 keeps the merge kernel's compiled variants (SPLITS_PAD) few.
    if device.type != "cuda" or max_seq_len < 1024:
        return 1
    target = 2 * num_sms(device.index if device.index is not None else torch.cuda.current_device())
    if num_programs >= target:
        return 1
    splits = min(-(-target // max(1, num_programs)), max_seq_len // 512, 32)
    return 1 << (splits.bit_length() - 1) if splits > 1 else 1
