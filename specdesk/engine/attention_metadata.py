"""The batch description every attention layer reads: where to write new K/V, which pages to read."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """One forward pass over a ragged batch of sequences, flattened to `num_tokens` query tokens.

    Sequence i contributes query_lens[i] tokens (its uncached prompt suffix, one decode token, or
    speculative candidates) whose absolute positions are seq_lens[i] - query_lens[i] ... seq_lens[i] - 1.
    A query token attends causally to every key at a position <= its own; keys of earlier positions
    are already in the pages of block_tables[i] and the new ones are written first through slot_mapping.

    Tensors live on the model's device; the *_list copies let the CPU torch path loop without syncs.
    """

    slot_mapping: torch.Tensor  # int64 [num_tokens]: flat slot (block_id * block_size + offset) per token
    block_tables: torch.Tensor  # int32 [num_seqs, max_num_blocks], padded with 0
    seq_lens: torch.Tensor  # int32 [num_seqs]: context length including this pass's tokens
    query_start_loc: torch.Tensor  # int32 [num_seqs + 1]: cumulative query lengths
    seq_lens_list: list[int]
    query_lens_list: list[int]
    block_size: int
    # Optional tree verification mask: bool [num_tokens, max_query_len]. When set, the query tokens of
    # sequence i see every key before position seq_lens[i] - query_lens[i] (the verified context) and,
    # among the sequence's own new tokens, exactly those j with tree_mask[token, j] True (replacing the
    # plain causal rule there). None = plain causal.
    tree_mask: torch.Tensor | None = None

    @classmethod
    def build(
        cls,
        block_tables: Sequence[Sequence[int]],
        seq_lens: Sequence[int],
        query_lens: Sequence[int],
        block_size: int,
        device: torch.device | str = "cpu",
        tree_mask: torch.Tensor | None = None,
    ) -> AttentionMetadata:
        """The metadata of one pass from plain lists, one entry per sequence.

        Sequence i's query_lens[i] new tokens sit at positions seq_lens[i] - query_lens[i] .. seq_lens[i] - 1
        and are written to those positions' slots in its pages (block_tables[i], enough pages for seq_lens[i]);
        tables are padded with page 0 to the longest. This is the one place that turns a batch into slots.
        """
        assert len(block_tables) == len(seq_lens) == len(query_lens), (block_tables, seq_lens, query_lens)
        slots: list[int] = []
        for table, seq_len, query_len in zip(block_tables, seq_lens, query_lens, strict=True):
            assert 0 <= query_len <= seq_len <= len(table) * block_size, (query_len, seq_len, len(table))
            slots += slot_mapping(table, seq_len - query_len, seq_len, block_size)
        width = max((len(t) for t in block_tables), default=1)
        tables = [[*t, *[0] * (width - len(t))] for t in block_tables]
        return cls(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=device).reshape(len(tables), width),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            query_start_loc=torch.tensor(list(itertools.accumulate(query_lens, initial=0)), dtype=torch.int32,
                                         device=device),
            seq_lens_list=list(seq_lens),
            query_lens_list=list(query_lens),
            block_size=block_size,
            tree_mask=tree_mask,
        )  # fmt: skip

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_list)

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens_list, default=0)

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens_list, default=0)


def slot_mapping(block_table: Sequence[int], start: int, end: int, block_size: int) -> list[int]:
    """Flat slots (page * block_size + offset) of positions start .. end - 1 of a sequence with these pages."""
    return [block_table[p // block_size] * block_size + p % block_size for p in range(start, end)]
