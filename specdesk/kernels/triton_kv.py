"""Triton kernel that scatters new K/V rows into their KV-cache pages. Twin: `specdesk.kernels.reference.write_kv`.

Importing this module imports triton; `specdesk.kernels.ops` imports it lazily. On CPU it only runs under the
Triton interpreter (TRITON_INTERPRET=1 set before triton is imported).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from specdesk.kernels.triton_common import check_device, next_pow2

_CACHE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _write_kv_kernel(
    key_ptr,  # [num_tokens, num_kv_heads, head_dim], any token/head stride, last dim contiguous
    value_ptr,
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim], last dim contiguous
    v_cache_ptr,
    slot_mapping_ptr,  # int64 [num_tokens]
    stride_key_t,
    stride_key_h,
    stride_value_t,
    stride_value_h,
    stride_kc_b,
    stride_kc_s,
    stride_kc_h,
    stride_vc_b,
    stride_vc_s,
    stride_vc_h,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,  # next power of 2 >= NUM_KV_HEADS
    BLOCK_D: tl.constexpr,  # next power of 2 >= HEAD_DIM
    PAGE_SIZE: tl.constexpr,
):
    # One program per token: copies its [num_kv_heads, head_dim] K and V rows into one slot.
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    # A negative slot marks a padding token (e.g. a CUDA-graph pad): nothing to write.
    if slot >= 0:
        block_id = slot // PAGE_SIZE
        offset = slot % PAGE_SIZE
        heads = tl.arange(0, BLOCK_H)
        dims = tl.arange(0, BLOCK_D)
        mask = (heads[:, None] < NUM_KV_HEADS) & (dims[None, :] < HEAD_DIM)

        key = tl.load(key_ptr + token * stride_key_t + heads[:, None] * stride_key_h + dims[None, :], mask=mask)
        k_dst = k_cache_ptr + block_id * stride_kc_b + offset * stride_kc_s
        tl.store(
            k_dst + heads[:, None] * stride_kc_h + dims[None, :],
            key.to(k_cache_ptr.dtype.element_ty),
            mask=mask,
        )

        value = tl.load(value_ptr + token * stride_value_t + heads[:, None] * stride_value_h + dims[None, :], mask=mask)
        v_dst = v_cache_ptr + block_id * stride_vc_b + offset * stride_vc_s
        tl.store(
            v_dst + heads[:, None] * stride_vc_h + dims[None, :],
            value.to(v_cache_ptr.dtype.element_ty),
            mask=mask,
        )


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Scatter key/value [num_tokens, num_kv_heads, head_dim] into the caches at `slot_mapping` (in place).

    Same contract as `specdesk.kernels.reference.write_kv`; additionally a negative slot skips its token.
    key/value may be strided views (e.g. slices of a fused QKV projection) as long as head_dim is
    contiguous; they are cast to the cache dtype.
    """
    assert key.dim() == 3 and value.shape == key.shape, (key.shape, value.shape)
    assert k_cache.dim() == 4 and v_cache.shape == k_cache.shape, (k_cache.shape, v_cache.shape)
    num_tokens, num_kv_heads, head_dim = key.shape
    _, page_size, cache_kv_heads, cache_head_dim = k_cache.shape
    assert (num_kv_heads, head_dim) == (cache_kv_heads, cache_head_dim), (key.shape, k_cache.shape)
    assert k_cache.dtype == v_cache.dtype and k_cache.dtype in _CACHE_DTYPES, (k_cache.dtype, v_cache.dtype)
    assert key.dtype in _CACHE_DTYPES and value.dtype in _CACHE_DTYPES, (key.dtype, value.dtype)
    assert slot_mapping.dim() == 1 and slot_mapping.shape[0] == num_tokens, (slot_mapping.shape, key.shape)
    assert slot_mapping.dtype in (torch.int64, torch.int32), slot_mapping.dtype
    assert slot_mapping.stride(0) == 1 or num_tokens <= 1, slot_mapping.stride()
    for name, t in (("key", key), ("value", value), ("k_cache", k_cache), ("v_cache", v_cache)):
        assert t.stride(-1) == 1, f"{name} must be contiguous in head_dim, got strides {t.stride()}"
    check_device(key, value, k_cache, v_cache, slot_mapping)
    if num_tokens == 0:
        return

    _write_kv_kernel[(num_tokens,)](
        key,
        value,
        k_cache,
        v_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_H=next_pow2(num_kv_heads),
        BLOCK_D=next_pow2(head_dim),
        PAGE_SIZE=page_size,
        num_warps=4 if num_kv_heads * head_dim >= 1024 else 1,
    )
