"""The base model's decode and verification passes replayed as CUDA graphs, one per padded batch shape.

At a small model's size a GPU decode step is host overhead: Python launches a few hundred kernels (norms,
projections, rotary, attention, MLP for every layer, then the LM head) that each run for microseconds. A
captured graph launches them all at once. A graph has fixed shapes and fixed addresses, so each captured
pass reads its inputs from static buffers and covers a *bucket*: `num_seqs` sequences (the batch padded up
to the bucket) that each bring exactly `query_len` query tokens, 1 for plain decoding and 1 + n for a draft
tree of n nodes (smaller trees padded with dummy nodes).

Padding never touches real K/V and never lengthens a context: a sequence's dummy tokens come *first* in
its q query slots, so the kernel, which places a sequence's q query tokens at the end of its context,
sees the dummies at positions of the real context just before the root (keys it reads from the pages as
usual, visible to the real rows through the tree mask) and reads nothing past the sequence's end. Every
padded token writes its K/V to one reserved scratch slot (`pad_slot`, a page the block manager never
hands out); a padded sequence reads only that page. A bucket needs each context to be at least its query
length long; shorter contexts, prefill chunks and shapes beyond the captured buckets run eagerly, with
the same results.

The attention kernel picks its split-K count from the host-side sequence lengths; a graph is captured with
the longest context the engine serves, so it splits for the worst case and splits past a sequence's end
do no work. `capture=False` runs the same padded static-buffer pass eagerly (CPU tests use it to check that
padding changes no real row).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from specdesk.engine.attention_metadata import AttentionMetadata


@dataclass(frozen=True, order=True)
class Bucket:
    """A captured pass's shape: `num_seqs` sequences of `query_len` query tokens each."""

    num_seqs: int
    query_len: int

    @property
    def num_tokens(self) -> int:
        return self.num_seqs * self.query_len


@dataclass
class _Buffers:
    """One bucket's static inputs (copied into before each replay) and outputs (valid until the next)."""

    input_ids: torch.Tensor  # int64 [num_tokens]
    positions: torch.Tensor  # int64 [num_tokens]
    slot_mapping: torch.Tensor  # int64 [num_tokens]
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks_per_seq]
    seq_lens: torch.Tensor  # int32 [num_seqs]
    query_start_loc: torch.Tensor  # int32 [num_seqs + 1], fixed: i * query_len
    tree_mask: torch.Tensor | None  # bool [num_tokens, query_len] for verification buckets
    meta: AttentionMetadata
    hidden: torch.Tensor | None = None  # [num_tokens, hidden_size]
    logits: torch.Tensor | None = None  # float32 [num_tokens, vocab]
    graph: Any = field(default=None)  # torch.cuda.CUDAGraph once captured


def bucket_sizes(max_size: int) -> list[int]:
    """Padded batch sizes: 1, 2, 4, 8, then every multiple of 8 up to max_size (vLLM's ladder): a batch
    pays for at most 7 padded sequences beyond 8, and few graphs are captured."""
    sizes = [s for s in (1, 2, 4) if s < max_size] + list(range(8, max_size + 8, 8))
    return sorted({min(s, max_size) for s in sizes})


class PassGraphs:
    """`run(...)` computes a decode or verification pass of `model` through a captured bucket.

    model: a CausalLM (forward(ids, positions, kv_caches, meta) -> hidden; compute_logits(hidden)).
    pad_slot: a KV slot outside every page the block manager owns; `pad_block` is its page.
    """

    def __init__(
        self, model: Any, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], block_size: int,
        max_blocks_per_seq: int, max_model_len: int, pad_block: int, buckets: list[Bucket], device: torch.device,
        capture: bool = True,
    ) -> None:  # fmt: skip
        self.model, self.kv_caches = model, kv_caches
        self.block_size, self.max_blocks_per_seq, self.max_model_len = block_size, max_blocks_per_seq, max_model_len
        self.pad_block, self.pad_slot = pad_block, pad_block * block_size
        self.device, self.capture = device, capture
        self.buckets = sorted(set(buckets))
        self._buffers: dict[Bucket, _Buffers] = {}
        self._pool: Any = None
        # Largest first: later (smaller) graphs reuse the memory pool the largest one reserved.
        for bucket in reversed(self.buckets):
            try:
                self._buffers[bucket] = self._prepare(bucket)
            except Exception as exc:
                raise RuntimeError(
                    f"capturing the model's {bucket} pass as a CUDA graph failed ({type(exc).__name__}: {exc}); "
                    "EngineConfig(enforce_eager=True) (specdesk --enforce-eager) runs without graphs"
                ) from exc

    def bucket_for(self, num_seqs: int, query_len: int, min_seq_len: int) -> Bucket | None:
        """The smallest captured bucket that holds num_seqs sequences of at most query_len tokens each, whose
        contexts (this pass's tokens included) are all at least min_seq_len long; or None."""
        # Plain decoding (query_len 1) only uses decode buckets: a tree bucket would multiply its work.
        fits = [
            b for b in self.buckets
            if b.num_seqs >= num_seqs and b.query_len <= min_seq_len
            and (b.query_len == 1 if query_len == 1 else b.query_len >= query_len > 1)
        ]  # fmt: skip
        return min(fits, key=lambda b: (b.num_tokens, b.num_seqs), default=None)

    @torch.inference_mode()
    def run(
        self, bucket: Bucket, input_ids: list[int], positions: list[int], slots: list[int],
        block_tables: list[list[int]], seq_lens: list[int], query_lens: list[int],
        tree_masks: list[torch.Tensor | None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:  # fmt: skip
        """(hidden, logits, rows): the static outputs of the bucket's pass and, per real query token in
        order, its row in them. Sequence i brings query_lens[i] <= bucket.query_len tokens (the flattened
        input_ids/positions/slots), whose context, this pass's tokens included, is seq_lens[i] long.
        tree_masks[i] (bool [q_i, q_i]) replaces the causal rule among sequence i's own tokens (a draft
        tree's ancestor mask); None for plain decoding. Outputs are overwritten by the next run."""
        buf = self._buffers[bucket]
        num_seqs, q = len(seq_lens), bucket.query_len
        assert num_seqs <= bucket.num_seqs and max(query_lens) <= q <= min(seq_lens), (bucket, query_lens, seq_lens)
        assert (buf.tree_mask is not None) == (q > 1), bucket
        # Flat host lists first, one tensor each (a tensor per sequence would cost more than the pass).
        ids: list[int] = []
        pos: list[int] = []
        slot: list[int] = []
        rows: list[int] = []
        start = 0
        for i, q_len in enumerate(query_lens):
            dummies = q - q_len  # first, over the context just before the root; their K/V goes to scratch
            rows += range(i * q + dummies, (i + 1) * q)
            ids += [0] * dummies + input_ids[start : start + q_len]
            pos += [positions[start]] * dummies + positions[start : start + q_len]
            slot += [self.pad_slot] * dummies + slots[start : start + q_len]
            start += q_len
        pad_tokens = (bucket.num_seqs - num_seqs) * q
        ids += [0] * pad_tokens
        pos += [0] * pad_tokens
        slot += [self.pad_slot] * pad_tokens
        # Only the columns this batch uses are rewritten: the kernel reads a row's pages up to its length,
        # so older columns beyond it are never read (a padded row reads its first ceil(q / block) columns).
        width = max(max(len(t) for t in block_tables), -(-q // self.block_size))
        tables = [t + [self.pad_block] * (width - len(t)) for t in block_tables]
        tables += [[self.pad_block] * width] * (bucket.num_seqs - num_seqs)
        lens = [*seq_lens, *[q] * (bucket.num_seqs - num_seqs)]
        buf.input_ids.copy_(torch.tensor(ids, dtype=torch.int64))
        buf.positions.copy_(torch.tensor(pos, dtype=torch.int64))
        buf.slot_mapping.copy_(torch.tensor(slot, dtype=torch.int64))
        buf.block_tables[:, :width].copy_(torch.tensor(tables, dtype=torch.int32))
        buf.seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        if buf.tree_mask is not None:
            buf.tree_mask.copy_(_padded_tree_mask(bucket, query_lens, tree_masks or [None] * num_seqs))
        if buf.graph is not None:
            buf.graph.replay()
        else:
            self._forward(buf)
        assert buf.hidden is not None and buf.logits is not None
        return buf.hidden, buf.logits, rows

    # ---- building ----------------------------------------------------------------------------------
    def _prepare(self, bucket: Bucket) -> _Buffers:
        dev, n, b, q = self.device, bucket.num_tokens, bucket.num_seqs, bucket.query_len
        tables = torch.full((b, self.max_blocks_per_seq), self.pad_block, dtype=torch.int32, device=dev)
        seq_lens = torch.full((b,), q, dtype=torch.int32, device=dev)
        starts = torch.arange(0, n + 1, q, dtype=torch.int32, device=dev)
        causal = torch.ones(q, q, dtype=torch.bool, device=dev).tril()
        tree_mask = causal.repeat(b, 1) if q > 1 else None  # bool [n, q], overwritten before each pass
        slots = torch.full((n,), self.pad_slot, dtype=torch.int64, device=dev)
        meta = AttentionMetadata(
            slot_mapping=slots, block_tables=tables, seq_lens=seq_lens, query_start_loc=starts,
            # Host lengths decide the kernel's split-K count: capture for the longest context served.
            seq_lens_list=[self.max_model_len] * b, query_lens_list=[q] * b, block_size=self.block_size,
            tree_mask=tree_mask,
        )  # fmt: skip
        buf = _Buffers(
            input_ids=torch.zeros(n, dtype=torch.int64, device=dev),
            positions=torch.zeros(n, dtype=torch.int64, device=dev),
            slot_mapping=slots, block_tables=tables, seq_lens=seq_lens, query_start_loc=starts,
            tree_mask=tree_mask, meta=meta,
        )  # fmt: skip
        if not self.capture:
            # Eager: the meta's host lists must tell the CPU path the real lengths (set per run).
            return buf
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side), torch.inference_mode():  # warm-up (compiles Triton) off the main stream
            for _ in range(2):
                self._forward(buf)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.inference_mode(), torch.cuda.graph(graph, pool=self._pool):
            self._forward(buf)
        buf.graph = graph
        return buf

    def _forward(self, buf: _Buffers) -> None:
        meta = buf.meta
        if not self.capture:  # the CPU path reads the true device lengths through its host lists
            meta.seq_lens_list = buf.seq_lens.tolist()
        hidden = self.model(buf.input_ids, buf.positions, self.kv_caches, meta)
        # Under capture these are the graph's static outputs; replays overwrite them in place.
        buf.hidden, buf.logits = hidden, self.model.compute_logits(hidden)


def _padded_tree_mask(bucket: Bucket, query_lens: list[int], masks: list[torch.Tensor | None]) -> torch.Tensor:
    # bool [num_tokens, q]: sequence i's q slots hold d = q - q_i dummies, then its real tokens. Real rows see
    # the dummy columns (they are real context positions, read from the pages) and, among the real tokens,
    # their tree (or causal) mask. A dummy row sees column 0 only; a padded sequence's rows likewise.
    q = bucket.query_len
    out = torch.zeros(bucket.num_seqs, q, q, dtype=torch.bool)
    out[:, :, 0] = True
    for i, (q_len, mask) in enumerate(zip(query_lens, masks, strict=True)):
        d = q - q_len
        out[i, d:, :d] = True
        out[i, d:, d:] = torch.ones(q_len, q_len, dtype=torch.bool).tril() if mask is None else mask.cpu()
    return out.view(bucket.num_tokens, q)
