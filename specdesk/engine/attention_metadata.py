"""The batch description every attention layer reads: where to write new K/V, which pages to read."""

from __future__ import annotations

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

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_list)

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens_list, default=0)

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens_list, default=0)

    @property
    def is_decode_only(self) -> bool:
        return all(q == 1 for q in self.query_lens_list)
