"""Paged attention on the CPU in C (`cpu_attention.c`), for decode and verification passes over bf16 pages.

Same contract as `specdesk.kernels.reference.paged_attention` (the twin it is tested against), restricted to
what the C file takes: bf16 query and pages, head_dim a multiple of 16 up to 256. `paged_attention` returns
None when it cannot run (no compiler, another dtype or shape), and the caller uses the twin.

The C kernel serves the sequences of a pass with at most MAX_QUERY_LEN new tokens: decode steps, draft-tree
verifications, forced tokens and short prefill chunks. Longer prefill chunks go to the twin (SDPA's flash
kernel on a fresh prompt), one sequence at a time: the rule depends on the sequence alone, so a decoding
sequence computes the same numbers whatever is batched with it.
"""

from __future__ import annotations

import itertools

import torch

from specdesk.kernels import cpu_lib, reference

MAX_QUERY_LEN = 64


def paged_attention(
    query: torch.Tensor,  # bf16 [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # bf16 [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # int32 [num_seqs, max_num_blocks]
    seq_lens: list[int],
    query_lens: list[int],
    scale: float,
    tree_mask: torch.Tensor | None = None,  # bool [num_tokens, max_query_len], see AttentionMetadata
) -> torch.Tensor | None:
    """[num_tokens, num_heads, head_dim] in bf16, or None where the C kernel does not apply."""
    lib = cpu_lib.library()
    dtypes = {query.dtype, k_cache.dtype, v_cache.dtype}
    if lib is None or dtypes != {torch.bfloat16} or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        return None
    if query.stride(2) != 1 or query.stride(1) != query.shape[2]:
        query = query.contiguous()  # heads must be contiguous within a token's row; rows may be apart
    tables = block_tables.to(torch.int32).contiguous()
    starts = list(itertools.accumulate(query_lens, initial=0))
    lens, starts_t = torch.tensor(seq_lens, dtype=torch.int32), torch.tensor(starts, dtype=torch.int32)
    mask = tree_mask.to(torch.uint8).contiguous() if tree_mask is not None else None
    num_tokens, heads, head_dim = query.shape
    out = torch.empty(query.shape, dtype=query.dtype)
    status = lib.sd_paged_attention(
        query.data_ptr(), query.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(), lens.data_ptr(),
        starts_t.data_ptr(), mask.data_ptr() if mask is not None else None, mask.shape[1] if mask is not None else 0,
        len(seq_lens), num_tokens, heads, k_cache.shape[2], head_dim, k_cache.shape[1], tables.shape[1],
        MAX_QUERY_LEN, scale, out.data_ptr(), cpu_lib.num_threads(),
    )  # fmt: skip
    if status != 0:
        return None
    for i, (seq_len, q_len) in enumerate(zip(seq_lens, query_lens, strict=True)):
        if q_len > MAX_QUERY_LEN:  # a prefill chunk, left to the twin by the kernel
            rows = slice(starts[i], starts[i] + q_len)
            sub_mask = tree_mask[rows, :q_len] if tree_mask is not None else None
            out[rows] = reference.paged_attention(
                query[rows], k_cache, v_cache, block_tables[i : i + 1], [seq_len], [q_len], scale, sub_mask
            )
    return out
