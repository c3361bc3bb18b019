"""Random paged-attention batches shared by the kernel and reference-attention tests."""

from __future__ import annotations

import math
from typing import Any

import torch

from specdesk.engine.attention_metadata import slot_mapping
from specdesk.kernels import reference


def blocks_needed(seq_len: int, page_size: int) -> int:
    return -(-seq_len // page_size)


def make_batch(
    seq_lens: list[int],
    query_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    dtype: torch.dtype,
    device: str,
    with_tree: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Random query + paged caches holding exactly seq_len written positions per sequence.

    Block 0 is never written (all NaN) and pads every block table; the other block ids are shuffled.
    The query is a strided slice of a fused QKV tensor, as the model produces it.
    """
    gen = torch.Generator().manual_seed(seed)
    num_blocks = 1 + sum(blocks_needed(s, page_size) for s in seq_lens) + 2
    max_blocks = max([blocks_needed(s, page_size) for s in seq_lens] + [1])
    shape = (num_blocks, page_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, math.nan, dtype=dtype)
    v_cache = torch.full(shape, math.nan, dtype=dtype)
    block_tables = torch.zeros(max(len(seq_lens), 1), max_blocks, dtype=torch.int32)
    free = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    for i, seq_len in enumerate(seq_lens):
        pages = [free.pop() for _ in range(blocks_needed(seq_len, page_size))]
        block_tables[i, : len(pages)] = torch.tensor(pages, dtype=torch.int32)
        slots = torch.tensor(slot_mapping(pages, 0, seq_len, page_size))
        kv = torch.randn(2, seq_len, num_kv_heads, head_dim, generator=gen).to(dtype)
        reference.write_kv(kv[0], kv[1], k_cache, v_cache, slots)
    num_tokens = sum(query_lens)
    qkv = torch.randn(num_tokens, num_heads + 2 * num_kv_heads, head_dim, generator=gen).to(dtype)
    tree_mask = None
    if with_tree:
        # Random trees: token j sees itself and a random subset of earlier new tokens.
        tree_mask = torch.zeros(num_tokens, max(query_lens, default=1), dtype=torch.bool)
        start = 0
        for q_len in query_lens:
            sub = torch.rand(q_len, q_len, generator=gen) < 0.5
            tree_mask[start : start + q_len, :q_len] = sub.tril(-1) | torch.eye(q_len, dtype=torch.bool)
            start += q_len
        tree_mask = tree_mask.to(device)
    return {
        "query": qkv.to(device)[:, :num_heads],  # non-contiguous token stride
        "k_cache": k_cache.to(device),
        "v_cache": v_cache.to(device),
        "block_tables": block_tables.to(device),
        "seq_lens": seq_lens,
        "query_lens": query_lens,
        "scale": head_dim**-0.5,
        "tree_mask": tree_mask,
    }
