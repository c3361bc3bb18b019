"""Triton paged attention over block tables: decode, speculative verification (optionally a tree mask) and
prefill of a suffix on cached pages, in one varlen kernel. Twin: `specdesk.kernels.reference.paged_attention`.

Work split. A program takes one KV head and BLOCK_Q consecutive query tokens of one sequence, packed with
the NQPKV query heads that share that KV head into BLOCK_M = BLOCK_Q * NQPKV (+ pad) rows, so GQA reads
each K/V tile once for the whole group and both products are tensor-core `tl.dot`s. It streams the
sequence's keys in TILE_N tiles (a tile may span pages: each key looks its page up in the block table)
with an online softmax in fp32. For decode with few (sequence, KV head) pairs and long contexts the key
range is split over NUM_SPLITS programs (flash-decoding) whose partial (max, sum, acc) a second kernel
merges, so the GPU stays full. Programs find their sequence by binary search over query_start_loc,
so a launch needs no host copy of the lengths (the grid is an upper bound from tensor shapes).

Importing this module imports triton; `specdesk.kernels.ops` imports it lazily.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from specdesk.kernels.triton_common import (
    attention_block_shape,
    check_device,
    is_interpreting,
    next_pow2,
    pick_num_splits,
)

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LOG2E = 1.4426950408889634


@triton.jit
def _find_seq_idx(query_start_loc_ptr, q_block_id, num_seqs, BLOCK_Q: tl.constexpr):
    # Sequence i owns the global query blocks [qsl[i] // BLOCK_Q + i, qsl[i + 1] // BLOCK_Q + i + 1):
    # at least cdiv(query_len, BLOCK_Q) blocks, found without knowing any other sequence's length.
    # Binary search for the last sequence whose first block is <= q_block_id.
    lo: tl.int32 = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_block = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first_block <= q_block_id:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit(do_not_specialize=["num_seqs", "num_splits"])
def _paged_attention_kernel(
    out_ptr,  # [num_tokens, num_heads, head_dim]
    part_acc_ptr,  # fp32 [num_tokens, num_heads, num_splits, HEAD_DIM_PAD] (only when SPLIT)
    part_m_ptr,  # fp32 [num_tokens, num_heads, num_splits]: running max (log2 domain)
    part_l_ptr,  # fp32 [num_tokens, num_heads, num_splits]: running sum of exp2
    q_ptr,  # [num_tokens, num_heads, head_dim]
    k_cache_ptr,  # [num_blocks, PAGE_SIZE, num_kv_heads, head_dim]
    v_cache_ptr,
    block_tables_ptr,  # int32 [>= num_seqs, max_num_blocks]
    seq_lens_ptr,  # int32 [num_seqs]
    query_start_loc_ptr,  # int32 [num_seqs + 1]
    tree_mask_ptr,  # uint8 [num_tokens, >= max_query_len] (only when HAS_TREE)
    qk_scale,  # softmax scale * log2(e): scores live in the exp2 domain
    num_seqs,
    num_heads,
    num_splits,
    stride_q_t,
    stride_q_h,
    stride_o_t,
    stride_o_h,
    stride_k_b,
    stride_k_s,
    stride_k_h,
    stride_v_b,
    stride_v_s,
    stride_v_h,
    stride_bt,
    stride_tm,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    NQPKV: tl.constexpr,  # query heads per KV head
    BLOCK_Q: tl.constexpr,  # query tokens per program
    BLOCK_M: tl.constexpr,  # rows per program: >= BLOCK_Q * NQPKV and >= 16 (tl.dot minimum)
    TILE_N: tl.constexpr,  # keys per inner iteration, >= 16
    HAS_TREE: tl.constexpr,
    SPLIT: tl.constexpr,  # write partials for the split-K reduction instead of the output
    DOT_FP32: tl.constexpr,  # multiply in fp32 (fp32 caches; bf16 under the interpreter)
    DOT_PRECISION: tl.constexpr,  # with DOT_FP32: "tf32x3" (~fp32 on tensor cores) or "ieee"
):
    q_block_id = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    seq = _find_seq_idx(query_start_loc_ptr, q_block_id, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    q_block = q_block_id - (q_start // BLOCK_Q + seq)
    if q_block * BLOCK_Q >= q_len:
        return  # a spare block of the upper-bound grid
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_len = seq_len - q_len  # keys before this pass's tokens: already verified context

    rows = tl.arange(0, BLOCK_M)
    q_local = q_block * BLOCK_Q + rows // NQPKV  # [BLOCK_M] token index within the sequence
    head = kv_head * NQPKV + rows % NQPKV  # [BLOCK_M] query head of each row
    row_valid = (rows < BLOCK_Q * NQPKV) & (q_local < q_len)
    token = (q_start + q_local).to(tl.int64)  # [BLOCK_M] flat token index
    q_pos = ctx_len + q_local  # absolute position of each row's token
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_valid = dims < HEAD_DIM

    q = tl.load(
        q_ptr + token[:, None] * stride_q_t + head[:, None] * stride_q_h + dims[None, :],
        mask=row_valid[:, None] & dim_valid[None, :],
        other=0.0,
    ).to(k_cache_ptr.dtype.element_ty)  # [BLOCK_M, HEAD_DIM_PAD]

    # Causal: the last token of this block sees keys [0, its position]; a tree may look anywhere
    # among the new tokens, so it reads up to seq_len.
    kv_end = seq_len if HAS_TREE else ctx_len + tl.minimum(q_block * BLOCK_Q + BLOCK_Q, q_len)
    num_tiles = (kv_end + TILE_N - 1) // TILE_N
    tiles_per_split = (num_tiles + num_splits - 1) // num_splits
    tile_start = split * tiles_per_split
    tile_end = tl.minimum(tile_start + tiles_per_split, num_tiles)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    block_table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    k_head = k_cache_ptr + kv_head.to(tl.int64) * stride_k_h
    v_head = v_cache_ptr + kv_head.to(tl.int64) * stride_v_h

    for tile in range(tile_start, tile_end):
        keys = tile * TILE_N + tl.arange(0, TILE_N)  # [TILE_N] absolute key positions
        key_valid = keys < kv_end
        page = tl.load(block_table_row + keys // PAGE_SIZE, mask=key_valid, other=0).to(tl.int64)
        in_page = keys % PAGE_SIZE
        kv_mask = key_valid[:, None] & dim_valid[None, :]
        k = tl.load(
            k_head + (page * stride_k_b + in_page * stride_k_s)[:, None] + dims[None, :],
            mask=kv_mask,
            other=0.0,
        )  # [TILE_N, HEAD_DIM_PAD]
        if DOT_FP32:
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision=DOT_PRECISION)
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * qk_scale  # [BLOCK_M, TILE_N]

        if HAS_TREE:
            new_idx = keys - ctx_len  # index among this pass's tokens; < 0 = verified context
            is_new = new_idx >= 0
            tree = tl.load(
                tree_mask_ptr + token[:, None] * stride_tm + new_idx[None, :],
                mask=row_valid[:, None] & (is_new & key_valid)[None, :],
                other=0,
            )
            visible = key_valid[None, :] & ((new_idx < 0)[None, :] | (tree != 0))
        else:
            visible = key_valid[None, :] & (keys[None, :] <= q_pos[:, None])
        s = tl.where(visible, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with no visible key yet keeps max -inf; subtract 0 then so exp2 gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = tl.load(
            v_head + (page * stride_v_b + in_page * stride_v_s)[:, None] + dims[None, :],
            mask=kv_mask,
            other=0.0,
        )  # [TILE_N, HEAD_DIM_PAD]
        if DOT_FP32:
            acc = tl.dot(p, v.to(tl.float32), acc, input_precision=DOT_PRECISION)
        else:
            acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new

    if SPLIT:
        part = (token * num_heads + head) * num_splits + split  # [BLOCK_M]
        tl.store(part_m_ptr + part, m_i, mask=row_valid)
        tl.store(part_l_ptr + part, l_i, mask=row_valid)
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM_PAD + dims[None, :], acc, mask=row_valid[:, None])
    else:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(
            out_ptr + token[:, None] * stride_o_t + head[:, None] * stride_o_h + dims[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=row_valid[:, None] & dim_valid[None, :],
        )


@triton.jit
def _merge_splits_kernel(
    out_ptr,  # [num_tokens, num_heads, head_dim]
    part_acc_ptr,  # fp32 [num_tokens, num_heads, num_splits, HEAD_DIM_PAD]
    part_m_ptr,  # fp32 [num_tokens, num_heads, num_splits]
    part_l_ptr,
    num_heads,
    num_splits,
    stride_o_t,
    stride_o_h,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
):
    # One program per (token, head): out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s.
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    splits = tl.arange(0, SPLITS_PAD)
    split_valid = splits < num_splits
    part = (token * num_heads + head) * num_splits + splits
    m = tl.load(part_m_ptr + part, mask=split_valid, other=float("-inf"))
    l_s = tl.load(part_l_ptr + part, mask=split_valid, other=0.0)
    m_max = tl.max(m, 0)
    # A split whose keys were all masked (or empty) has m = -inf and contributes nothing.
    weight = tl.where(m > float("-inf"), tl.math.exp2(m - m_max), 0.0)
    dims = tl.arange(0, HEAD_DIM_PAD)
    acc = tl.load(part_acc_ptr + part[:, None] * HEAD_DIM_PAD + dims[None, :], mask=split_valid[:, None], other=0.0)
    out = tl.sum(acc * weight[:, None], 0) / tl.sum(l_s * weight, 0)
    tl.store(
        out_ptr + token * stride_o_t + head * stride_o_h + dims,
        out.to(out_ptr.dtype.element_ty),
        mask=dims < HEAD_DIM,
    )


def paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: list[int],
    query_lens: list[int],
    scale: float,
    tree_mask: torch.Tensor | None = None,
    *,
    seq_lens_t: torch.Tensor | None = None,
    query_start_loc: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Causal paged attention; same contract as `specdesk.kernels.reference.paged_attention`.

    seq_lens_t (int32 [num_seqs]) and query_start_loc (int32 [num_seqs + 1]) are device copies of
    seq_lens / cumsum(query_lens); pass them to skip a host-to-device copy per call. The lists are still
    read on the host for block shapes and the split count (no device sync). `out` receives the result
    (shape and dtype of query). `num_splits` forces the split-K count (tests); None picks one.
    """
    assert query.dim() == 3 and k_cache.dim() == 4, (query.shape, k_cache.shape)
    assert v_cache.shape == k_cache.shape, (k_cache.shape, v_cache.shape)
    num_tokens, num_heads, head_dim = query.shape
    _, page_size, num_kv_heads, cache_head_dim = k_cache.shape
    assert head_dim == cache_head_dim, (query.shape, k_cache.shape)
    assert num_heads % num_kv_heads == 0, (num_heads, num_kv_heads)
    assert page_size & (page_size - 1) == 0, f"page size must be a power of 2, got {page_size}"
    assert query.dtype in _DTYPES, query.dtype
    assert k_cache.dtype == v_cache.dtype and k_cache.dtype in _DTYPES, (k_cache.dtype, v_cache.dtype)
    num_seqs = len(seq_lens)
    assert len(query_lens) == num_seqs and sum(query_lens) == num_tokens, (query_lens, num_seqs, num_tokens)
    assert block_tables.dim() == 2 and block_tables.dtype == torch.int32, (
        block_tables.shape,
        block_tables.dtype,
    )
    assert block_tables.shape[0] >= num_seqs and block_tables.stride(1) == 1, (
        block_tables.shape,
        block_tables.stride(),
    )
    for name, t in (("query", query), ("k_cache", k_cache), ("v_cache", v_cache)):
        assert t.stride(-1) == 1, f"{name} must be contiguous in head_dim, got strides {t.stride()}"
    if out is None:
        out = torch.empty_like(query)
    assert out.shape == query.shape and out.dtype == query.dtype and out.stride(-1) == 1, (
        out.shape,
        out.dtype,
        out.stride(),
    )
    device = query.device
    if seq_lens_t is None:
        seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    if query_start_loc is None:
        starts = [0]
        for q_len in query_lens:
            starts.append(starts[-1] + q_len)
        query_start_loc = torch.tensor(starts, dtype=torch.int32, device=device)
    assert seq_lens_t.shape == (num_seqs,) and seq_lens_t.dtype == torch.int32, (
        seq_lens_t.shape,
        seq_lens_t.dtype,
    )
    assert query_start_loc.shape == (num_seqs + 1,) and query_start_loc.dtype == torch.int32, (
        query_start_loc.shape,
        query_start_loc.dtype,
    )
    max_query_len = max(query_lens, default=0)
    tensors = [query, k_cache, v_cache, block_tables, seq_lens_t, query_start_loc, out]
    if tree_mask is not None:
        assert tree_mask.dtype == torch.bool and tree_mask.dim() == 2, (tree_mask.dtype, tree_mask.shape)
        assert tree_mask.shape[0] == num_tokens and tree_mask.shape[1] >= max_query_len, (
            tree_mask.shape,
            num_tokens,
            max_query_len,
        )
        assert tree_mask.stride(1) == 1 or tree_mask.shape[1] <= 1, tree_mask.stride()
        tree_mask = tree_mask.view(torch.uint8)  # same bytes; pointers to bool are awkward in Triton
        tensors.append(tree_mask)
    check_device(*tensors)
    if num_tokens == 0:
        return out

    nqpkv = num_heads // num_kv_heads
    head_dim_pad = max(16, next_pow2(head_dim))
    # fp32 caches multiply as 3xTF32 on tensor cores (fp32-level error; plain tf32 would break greedy
    # parity with float32 references, and exact-fp32 FMA dots spill registers). The interpreter's bf16
    # dot is wrong, so there bf16 tiles are multiplied in exact fp32.
    interpreting = is_interpreting()
    dot_fp32 = k_cache.dtype == torch.float32 or (k_cache.dtype == torch.bfloat16 and interpreting)
    shape = attention_block_shape(nqpkv, max_query_len, head_dim_pad, dot_fp32)
    if num_splits is None:
        num_q_blocks = sum(-(-q_len // shape.block_q) for q_len in query_lens)
        num_splits = pick_num_splits(device, num_q_blocks * num_kv_heads, max(seq_lens))
    assert num_splits >= 1, num_splits
    split = num_splits > 1
    if split:
        part_acc = torch.empty(num_tokens, num_heads, num_splits, head_dim_pad, dtype=torch.float32, device=device)
        part_m = torch.empty(num_tokens, num_heads, num_splits, dtype=torch.float32, device=device)
        part_l = torch.empty_like(part_m)
    else:
        part_acc = part_m = part_l = out  # unused: SPLIT is a constexpr False

    grid = (num_tokens // shape.block_q + num_seqs, num_kv_heads, num_splits)
    _paged_attention_kernel[grid](
        out,
        part_acc,
        part_m,
        part_l,
        query,
        k_cache,
        v_cache,
        block_tables,
        seq_lens_t,
        query_start_loc,
        tree_mask if tree_mask is not None else query,
        scale * _LOG2E,
        num_seqs,
        num_heads,
        num_splits,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        block_tables.stride(0),
        tree_mask.stride(0) if tree_mask is not None else 0,
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=head_dim_pad,
        PAGE_SIZE=page_size,
        NQPKV=nqpkv,
        BLOCK_Q=shape.block_q,
        BLOCK_M=shape.block_m,
        TILE_N=shape.tile_n,
        HAS_TREE=tree_mask is not None,
        SPLIT=split,
        DOT_FP32=dot_fp32,
        DOT_PRECISION="ieee" if interpreting else "tf32x3",
        num_warps=shape.num_warps,
        num_stages=shape.num_stages,
    )
    if split:
        _merge_splits_kernel[(num_tokens, num_heads)](
            out,
            part_acc,
            part_m,
            part_l,
            num_heads,
            num_splits,
            out.stride(0),
            out.stride(1),
            HEAD_DIM=head_dim,
            HEAD_DIM_PAD=head_dim_pad,
            SPLITS_PAD=max(2, next_pow2(num_splits)),
            num_warps=4 if head_dim_pad >= 128 else 2,
        )
    return out
