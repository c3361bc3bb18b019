"""Turns a scheduled batch into tensors and runs the model over the paged KV cache.

It returns logits and hidden states and keeps no per-request state: sampling and verification happen in
speculators/verifier.py, the speculator's hidden states live in its decoder. The only engine module besides
models/sampler/speculators that touches torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specdesk.engine.attention_metadata import AttentionMetadata
from specdesk.engine.config import EngineConfig
from specdesk.engine.models.loader import LoadedModel
from specdesk.engine.sampler import make_generator
from specdesk.engine.scheduler import ScheduledSeq
from specdesk.engine.sequence import Sequence
from specdesk.engine.speculators.tree import DraftTree


@dataclass
class ForwardOutput:
    """What one pass yields, for the rows that decide tokens only (a prefill chunk that samples nothing has
    none): per sampling sequence, one row after its last token, or the root and every node of its draft tree.

    Sequence i of the batch owns rows row_starts[i] : row_starts[i + 1] of both tensors, in tree-row order.
    """

    logits: torch.Tensor  # float32 [num_rows, vocab]
    hidden: torch.Tensor  # [num_rows, hidden]: the final hidden states the logits were computed from
    row_starts: list[int]  # len(batch) + 1 cumulative row counts

    def rows_of(self, i: int) -> slice:
        return slice(self.row_starts[i], self.row_starts[i + 1])


class ModelRunner:
    """Owns the model and the KV pool (one [2, num_blocks, block_size, kv_heads, head_dim] per layer)."""

    def __init__(self, config: EngineConfig, loaded: LoadedModel) -> None:
        self.config = config
        self.model = loaded.model
        self.device = loaded.device
        self.dtype = loaded.dtype
        self.block_size = config.block_size
        bytes_per_block = 2 * loaded.num_layers * self.block_size * loaded.num_kv_heads * loaded.head_dim
        bytes_per_block *= torch.tensor([], dtype=self.dtype).element_size()
        self.num_blocks = config.num_blocks or max(2, int(config.kv_cache_memory_gib * 2**30) // bytes_per_block)
        # One allocation for every layer keeps a page copy (accepted tree nodes) a single indexing op.
        self.kv_pool = torch.zeros(
            loaded.num_layers, 2, self.num_blocks, self.block_size, loaded.num_kv_heads, loaded.head_dim,
            dtype=self.dtype, device=self.device,
        )  # fmt: skip
        self.kv_caches = [(self.kv_pool[i, 0], self.kv_pool[i, 1]) for i in range(loaded.num_layers)]

    def generator_for(self, seq: Sequence, position: int | None = None) -> torch.Generator | None:
        """The RNG that samples the token at `position` (default: the next one) of a request.

        A seeded request gets a generator keyed by (seed, position): every token's randomness is fixed in
        advance, so the output is the same whatever is batched with it and whether or not it speculates
        (verification samples each position with the same generator plain decoding would use).
        Unseeded requests share the process-wide RNG.
        """
        seed = seq.params.seed
        if seed is None:
            return None
        position = seq.num_tokens if position is None else position
        return make_generator((seed * 1_000_003 + position) % 2**63, self.device)

    def slot_of(self, seq: Sequence, position: int) -> int:
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size

    def move_kv(self, src_slots: list[int], dst_slots: list[int]) -> None:
        """Copy K/V of some slots to others in every layer (accepted tree nodes to their path positions).

        Every copy reads the values from before the call, so a source may be another copy's destination."""
        flat = self.kv_pool.view(*self.kv_pool.shape[:2], -1, *self.kv_pool.shape[-2:])
        src = torch.tensor(src_slots, device=self.device)
        flat[:, :, dst_slots] = flat[:, :, src]

    def prepare(
        self, batch: list[ScheduledSeq], trees: list[DraftTree | None]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Flatten the ragged batch: input ids, positions and the attention metadata.

        A sequence with a draft tree contributes its root (last verified token) then the tree's nodes;
        node r is written to the slot of position p + r but rotated as position p + depth(r).
        """
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seq_lens: list[int] = []
        query_lens: list[int] = []
        bs = self.block_size
        for s, tree in zip(batch, trees, strict=True):
            seq, start = s.seq, s.seq.num_computed_tokens
            tokens = seq.token_ids[start : start + s.num_new_tokens]
            pos = list(range(start, start + len(tokens)))
            if tree is not None:
                tokens = tokens + tree.tokens
                pos += [start + d for d in tree.depths]
            end = start + len(tokens)
            input_ids += tokens
            positions += pos
            table = seq.block_table
            slots += [table[p // bs] * bs + p % bs for p in range(start, end)]
            seq_lens.append(end)
            query_lens.append(len(tokens))
        max_blocks = max(len(s.seq.block_table) for s in batch)
        tables = [s.seq.block_table + [0] * (max_blocks - len(s.seq.block_table)) for s in batch]
        dev = self.device
        starts = [0]
        for q in query_lens:
            starts.append(starts[-1] + q)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=dev),
            seq_lens_list=seq_lens,
            query_lens_list=query_lens,
            block_size=bs,
            tree_mask=_tree_mask(query_lens, trees, dev) if any(t is not None for t in trees) else None,
        )
        ids = torch.tensor(input_ids, dtype=torch.int64, device=dev)
        pos_t = torch.tensor(positions, dtype=torch.int64, device=dev)
        return ids, pos_t, meta

    @torch.inference_mode()
    def execute(self, batch: list[ScheduledSeq], trees: list[DraftTree | None]) -> ForwardOutput:
        """Run the base model over the batch; see ForwardOutput for what comes back."""
        ids, pos, meta = self.prepare(batch, trees)
        hidden = self.model(ids, pos, self.kv_caches, meta)
        rows: list[int] = []
        row_starts = [0]
        token = 0  # the sequence's first query token in the flattened batch
        for s, tree, q_len in zip(batch, trees, meta.query_lens_list, strict=True):
            if s.samples and tree is not None:
                first = token + s.num_new_tokens - 1  # the root: the last verified token
                rows += range(first, first + tree.num_nodes + 1)
            elif s.samples:
                rows.append(token + q_len - 1)
            row_starts.append(len(rows))
            token += q_len
        # The rows that decide tokens: gathered once, for the logits and for the speculator's next input.
        kept = hidden[rows] if rows else hidden[:0]
        logits = self.model.compute_logits(kept) if rows else kept.new_empty(0, 0, dtype=torch.float32)
        return ForwardOutput(logits, kept, row_starts)


def _tree_mask(query_lens: list[int], trees: list[DraftTree | None], device: torch.device) -> torch.Tensor:
    # bool [num_tokens, max_query_len]: causal among a sequence's own new tokens, the tree's ancestor mask
    # for the root and draft rows of a speculating sequence (see AttentionMetadata.tree_mask).
    width = max(query_lens)
    mask = torch.zeros(sum(query_lens), width, dtype=torch.bool)
    row = 0
    for q_len, tree in zip(query_lens, trees, strict=True):
        n = 0 if tree is None else tree.num_nodes + 1
        if q_len > n:  # the causal part (a decoding sequence's tree covers all its rows)
            mask[row : row + q_len, :q_len] = torch.ones(q_len, q_len, dtype=torch.bool).tril()
        if tree is not None:
            mask[row + q_len - n : row + q_len, q_len - n : q_len] = tree.mask()
        row += q_len
    return mask.to(device)
