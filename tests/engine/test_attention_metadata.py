"""AttentionMetadata.build: the one place a batch of block tables and lengths becomes slots and offsets."""

from __future__ import annotations

import pytest
import torch

from specdesk.engine.attention_metadata import AttentionMetadata, slot_mapping


def test_build_writes_each_query_token_to_its_position_slot() -> None:
    # A decode on a cached prefix (positions 16..19 on its second page), a fresh prefill, an idle sequence.
    meta = AttentionMetadata.build([[3, 1], [2], [5]], [20, 5, 7], [4, 5, 0], block_size=16)
    assert meta.slot_mapping.tolist() == [16, 17, 18, 19, 32, 33, 34, 35, 36]
    assert meta.slot_mapping.dtype == torch.int64
    assert meta.block_tables.tolist() == [[3, 1], [2, 0], [5, 0]] and meta.block_tables.dtype == torch.int32
    assert meta.seq_lens.tolist() == [20, 5, 7] and meta.query_start_loc.tolist() == [0, 4, 9, 9]
    assert meta.seq_lens_list == [20, 5, 7] and meta.query_lens_list == [4, 5, 0]
    assert meta.max_query_len == 5 and meta.max_seq_len == 20


def test_build_of_an_empty_batch_and_a_batch_short_of_pages() -> None:
    empty = AttentionMetadata.build([], [], [], block_size=16)
    assert empty.num_seqs == 0 and empty.block_tables.shape == (0, 1) and empty.query_start_loc.tolist() == [0]
    with pytest.raises(AssertionError):
        AttentionMetadata.build([[4]], [17], [1], block_size=16)  # position 16 needs a second page


def test_slot_mapping_crosses_pages() -> None:
    assert slot_mapping([7, 2], 2, 6, block_size=4) == [30, 31, 8, 9]
