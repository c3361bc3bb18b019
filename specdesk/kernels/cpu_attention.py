"""Paged attention on the CPU in C (`cpu_attention.c`) over bf16 pages, for every pass of the int8 path.

Same contract as `specdesk.kernels.reference.paged_attention` (the twin it is tested against), restricted to
what the C file takes: bf16 query and pages, head_dim a multiple of 16 up to 256. `paged_attention` returns
None when it cannot run (no compiler, another dtype or shape), and the caller uses the twin.

It serves every pass, prefill chunks too: on 2 cores it beat the twin at every size measured (per layer of
the default model: a 512-token fresh prefill 8.2 vs 19.8 ms, a 176-token chunk on 512 cached tokens 4.5 vs
6.3 ms, a decode step on 700 tokens ~0.07 vs ~0.2 ms; that was the one-task-per-query path, and the grouped
path of CPUs with AVX-512 BF16 (`cpu_attention_grouped.c`) took 30 layers on 680 tokens from 5.1 to 3.7 ms
for 5 query tokens, 10.2 to 5.6 ms for 11 and 56 to 23 ms for 64), and one kernel for every pass means a
token's numbers never depend on how its prompt was chunked or batched.
"""

from __future__ import annotations

import itertools

import torch

from specdesk.kernels import cpu_lib


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
        scale, out.data_ptr(), cpu_lib.num_threads(),
    )  # fmt: skip
    return out if status == 0 else None
