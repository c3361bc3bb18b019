"""Host-side helpers of the Triton launchers: checks, padding, block shapes, split-K. No triton import."""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

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


class AttentionBlockShape(NamedTuple):
    """Compile-time tiling of the attention kernel (see kernels/triton_attention.py)."""

    block_m: int  # rows per program: block_q tokens x query heads per KV head, padded to >= 16
    block_q: int  # query tokens per program
    tile_n: int  # keys per inner iteration
    num_warps: int
    num_stages: int


def attention_block_shape(
    num_queries_per_kv: int, max_query_len: int, head_dim_pad: int, is_fp32: bool
) -> AttentionBlockShape:
    """Tiling for a batch whose longest query has max_query_len tokens. Compiled for sm_90, fp16/bf16
    need no register spills at head_dim 64-256; fp32 spills a few bytes at 256 (or with a tree)."""
    # Rows cover all of a sequence's query heads x tokens when few (decode/verify: K/V read once per
    # group), up to 128 for prefill. tl.dot needs every dim >= 16.
    rows = max(1, max_query_len) * num_queries_per_kv
    block_m, tile_n, num_stages = max(16, min(128, next_pow2(rows))), 64, 3
    if head_dim_pad > 128:
        block_m, tile_n, num_stages = min(block_m, 64), 32, 2
    if is_fp32:  # fp32 tiles take twice the registers and shared memory: 64 rows at d64 ... 16 at d256
        block_m, tile_n, num_stages = min(block_m, max(16, 4096 // head_dim_pad)), 32, 2
    block_m = max(block_m, next_pow2(num_queries_per_kv))  # one token's whole query-head group
    num_warps = 8 if block_m >= 64 else 4  # 4 warps spill 64 rows of fp32 accumulator at head_dim 128
    return AttentionBlockShape(block_m, block_m // num_queries_per_kv, tile_n, num_warps, num_stages)


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
