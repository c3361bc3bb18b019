"""Pure-torch twins of every kernel: the CPU serving path and the oracle the Triton kernels are tested against.

KV cache layout (one tensor each for K and V, per layer): [num_blocks, block_size, num_kv_heads, head_dim].
A flat slot is block_id * block_size + offset; page `block_tables[i][j]` holds positions
j*block_size ... (j+1)*block_size - 1 of sequence i.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F


def write_kv(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # int64 [num_tokens]
) -> None:
    """Scatter new K/V rows into their page slots (in place)."""
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, key.to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, value.to(v_cache.dtype))


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The first seq_len positions of one sequence as a contiguous [seq_len, num_kv_heads, head_dim]."""
    num_blocks = (seq_len + cache.shape[1] - 1) // cache.shape[1]
    pages = cache.index_select(0, block_table[:num_blocks].long())
    return pages.flatten(0, 1)[:seq_len]


def paged_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # int32 [num_seqs, max_num_blocks]
    seq_lens: list[int],  # context length of each sequence including its query tokens
    query_lens: list[int],  # sum(query_lens) == num_tokens
    scale: float,
    tree_mask: torch.Tensor | None = None,  # bool [num_tokens, max_query_len], see AttentionMetadata
) -> torch.Tensor:
    """Causal attention of each sequence's query tokens over its paged context -> [num_tokens, num_heads, head_dim].

    Handles decode (query_len 1), speculative verification (several tokens) and prefill of a suffix
    on top of cached pages alike: query token j of sequence i sits at position seq_len - query_len + j.
    GQA/MQA: query head h reads kv head h // (num_heads // num_kv_heads).
    """
    num_heads, num_kv_heads = query.shape[1], k_cache.shape[2]
    assert num_heads % num_kv_heads == 0, (num_heads, num_kv_heads)
    assert sum(query_lens) == query.shape[0], (query_lens, query.shape)
    if tree_mask is None and seq_lens and all(q == 1 for q in query_lens):
        return _decode_batched(query, k_cache, v_cache, block_tables, seq_lens, scale)
    out = torch.empty_like(query)
    starts = [0, *itertools.accumulate(query_lens)]
    # A step that mixes a prefill chunk with many decodes: the decodes still go through the batched path
    # (one SDPA call per decoding sequence would dominate the step).
    decodes = [i for i, q in enumerate(query_lens) if q == 1] if tree_mask is None else []
    if len(decodes) > 1:
        rows = torch.tensor([starts[i] for i in decodes], device=query.device)
        index = torch.tensor(decodes, device=query.device)
        lens = [seq_lens[i] for i in decodes]
        out[rows] = _decode_batched(query[rows], k_cache, v_cache, block_tables[index], lens, scale)
    batched = set(decodes) if len(decodes) > 1 else set()
    for i, (seq_len, q_len) in enumerate(zip(seq_lens, query_lens, strict=True)):
        start = starts[i]
        if q_len == 0 or i in batched:
            continue
        q = query[start : start + q_len].transpose(0, 1)  # [h, q, d]
        k = gather_kv(k_cache, block_tables[i], seq_len).transpose(0, 1)  # [kvh, s, d]
        v = gather_kv(v_cache, block_tables[i], seq_len).transpose(0, 1)
        mask: torch.Tensor | None = None
        is_causal = False
        if tree_mask is not None:
            mask = _causal_mask(seq_len, q_len, query.device)
            mask[:, seq_len - q_len :] = tree_mask[start : start + q_len, :q_len]
        elif q_len == seq_len:
            is_causal = True  # a fresh prefill: SDPA's own causal path, no mask tensor
        elif q_len > 1:
            mask = _causal_mask(seq_len, q_len, query.device)
        # q_len == 1 without a tree sees every key: no mask at all.
        if mask is not None and q_len <= SMALL_QUERY:
            out[start : start + q_len] = _attend_small(q, k, v, mask, scale).to(out.dtype)
            continue
        o = F.scaled_dot_product_attention(
            q.to(k.dtype), k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
            enable_gqa=num_heads != num_kv_heads,
        )  # fmt: skip
        out[start : start + q_len] = o.transpose(0, 1).to(out.dtype)
    return out


SMALL_QUERY = 32


def _attend_small(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    # A speculative verification: a few query tokens under a tree mask. Same float32 batched matmuls as the
    # decode path (SDPA's masked CPU kernel costs several times more at these sizes); every query row of a
    # kv head's group is one more row of that head's matmul. q [h, q, d], k/v [kvh, s, d], mask [q, s]
    # (True = attend) -> [q, h, d].
    num_heads, q_len, head_dim = q.shape
    num_kv_heads, seq_len = k.shape[0], k.shape[1]
    group = num_heads // num_kv_heads
    qf = q.float().reshape(num_kv_heads, group * q_len, head_dim)  # head h = kv head h // group
    scores = torch.bmm(qf, k.float().transpose(1, 2)) * scale  # [kvh, group * q, s]
    scores = scores.view(num_kv_heads, group, q_len, seq_len).masked_fill_(~mask, float("-inf"))
    probs = scores.softmax(-1).view(num_kv_heads, group * q_len, seq_len)
    o = torch.bmm(probs, v.float())  # [kvh, group * q, d]
    return o.view(num_heads, q_len, head_dim).transpose(0, 1)


def _causal_mask(seq_len: int, q_len: int, device: torch.device) -> torch.Tensor:
    # bool [q_len, seq_len]: query j (position seq_len - q_len + j) sees keys at positions <= its own.
    q_pos = torch.arange(seq_len - q_len, seq_len, device=device)[:, None]
    return torch.arange(seq_len, device=device)[None, :] <= q_pos


DECODE_GROUP = 4


def _decode_batched(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: list[int],
    scale: float,
) -> torch.Tensor:
    # One query per sequence: gather every sequence's pages (padded to the longest) with one index_select
    # on the page dim and attend with two batched matmuls, each kv head serving its group of query heads.
    # On CPU this beats both advanced indexing (cache[table]) and SDPA's masked kernels by several times.
    n, group_size = len(seq_lens), DECODE_GROUP * torch.get_num_threads()
    if n > group_size and query.device.type == "cpu":
        # A few sequences per thread at a time, sorted by length: each group pads only to its own longest
        # (with mixed lengths, a long persona prompt among short chats, one padded gather is mostly padding),
        # and its gathered float32 K/V stay in cache between the copies and the two matmuls. The group size
        # scales with threads: fewer sequences per thread leave too little work to split
        # (docs/benchmarks.md, "Measurements behind design choices").
        order = sorted(range(n), key=seq_lens.__getitem__)
        out = torch.empty_like(query)
        for g in range(0, n, group_size):
            rows = order[g : g + group_size]
            index = torch.tensor(rows, device=query.device)
            group_lens = [seq_lens[i] for i in rows]
            out[index] = _decode_batched(query[index], k_cache, v_cache, block_tables[index], group_lens, scale)
        return out
    if n == 1:
        return _decode_one(query, k_cache, v_cache, block_tables[0], seq_lens[0], scale)
    num_seqs, block_size, num_kv_heads, head_dim = len(seq_lens), *k_cache.shape[1:]
    max_blocks = (max(seq_lens) + block_size - 1) // block_size
    table = block_tables[:num_seqs, :max_blocks].reshape(-1).long()
    span = max_blocks * block_size
    k = k_cache.view(k_cache.shape[0], -1).index_select(0, table).view(num_seqs, span, num_kv_heads, head_dim)
    v = v_cache.view(v_cache.shape[0], -1).index_select(0, table).view(num_seqs, span, num_kv_heads, head_dim)
    # float32 throughout: CPU bf16 batched matmuls at these sizes are slower than converting first.
    k, v = k.float(), v.float()
    group = query.shape[1] // num_kv_heads
    q = query.view(num_seqs, num_kv_heads, group, head_dim).float()
    scores = torch.matmul(q, k.permute(0, 2, 3, 1)) * scale  # [b, kvh, group, span]
    lens = torch.tensor(seq_lens, device=query.device)
    padding = torch.arange(span, device=query.device)[None, :] >= lens[:, None]  # [b, span]
    scores.masked_fill_(padding[:, None, None, :], float("-inf"))
    probs = scores.softmax(-1)
    out = torch.matmul(probs, v.transpose(1, 2))  # [b, kvh, group, head_dim]
    return out.reshape(num_seqs, query.shape[1], head_dim).to(query.dtype)


def _decode_one(
    query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int,
    scale: float,
) -> torch.Tensor:  # fmt: skip
    # The single-stream step: the sequence's keys sliced to its length need no padding mask (a third less
    # time per layer than the batched path at ~300 tokens of context on CPU).
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    k, v = gather_kv(k_cache, block_table, seq_len).float(), gather_kv(v_cache, block_table, seq_len).float()
    q = query.view(num_kv_heads, -1, head_dim).float()  # [kvh, group, d]: kv head h serves its group
    probs = (torch.matmul(q, k.permute(1, 2, 0)) * scale).softmax(-1)  # [kvh, group, seq_len]
    return torch.matmul(probs, v.transpose(0, 1)).reshape(query.shape).to(query.dtype)


# ---------------------------------------------------------------- fused elementwise ops (Triton twins)


def rms_norm(
    x: torch.Tensor,  # [T, N]
    weight: torch.Tensor,  # [N]
    eps: float,
    residual: torch.Tensor | None = None,  # [T, N]: the residual stream that x (a sublayer's output) joins
    multiplier: float = 1.0,  # Granite's residual_multiplier on x
) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(s), s) for s = residual + x * multiplier, or s = x without a residual.

    Llama's RMSNorm as transformers computes it: in float32 F.rms_norm is one fused kernel; otherwise
    normalise in float32, cast back, then scale (the order transformers uses, so bf16 rounds alike).
    """
    if residual is not None:
        x = residual + (x * multiplier if multiplier != 1.0 else x)
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps), x
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype), x


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, heads, head_dim] by cos, sin [T, 1, head_dim // 2] in transformers' rotate-half layout."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's activation: silu(gate) * up for gate_up = [gate | up], [T, 2 * I] -> [T, I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
