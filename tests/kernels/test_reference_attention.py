"""The torch reference attention (the CPU serving path) against itself one sequence at a time: its batched
decode groups and its mixed prefill + decode steps must not change any row."""

from __future__ import annotations

import pytest
import torch

from specdesk.kernels import reference
from tests.kernels.paged_batches import make_batch


def test_reference_decode_groups_mixed_lengths_like_one_sequence_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    # 20 decoding sequences, one much longer: the reference sorts them into length groups (less padding);
    # every row must equal the sequence attended alone, whatever group it lands in. Groups of 3 (whatever
    # the thread count) make several groups and a short last one.
    monkeypatch.setattr(reference, "DECODE_GROUP", 3)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    lens = [5, 300, 17, 33, 2, 64, 9, 120, 18, 40, 7, 77, 3, 250, 11, 16, 48, 6, 90, 21]
    batch = make_batch(lens, [1] * len(lens), 4, 2, 32, 16, torch.float32, "cpu", seed=3)
    batch.update({name: batch[name].nan_to_num(0.0) for name in ("k_cache", "v_cache")})  # see _check_attention
    grouped = reference.paged_attention(**batch)
    for i, n in enumerate(lens):
        alone = {**batch, "query": batch["query"][i : i + 1], "block_tables": batch["block_tables"][i : i + 1],
                 "seq_lens": [n], "query_lens": [1]}  # fmt: skip
        torch.testing.assert_close(grouped[i : i + 1], reference.paged_attention(**alone), atol=1e-5, rtol=1e-5)


def test_reference_mixed_prefill_and_decodes_like_one_sequence_at_a_time() -> None:
    # A prefill chunk on a cached prefix among decoding sequences: decodes take the batched path.
    lens, q_lens = [40, 7, 90, 25, 3, 60], [1, 1, 12, 1, 3, 1]
    batch = make_batch(lens, q_lens, 4, 2, 32, 16, torch.float32, "cpu", seed=4)
    batch.update({name: batch[name].nan_to_num(0.0) for name in ("k_cache", "v_cache")})
    mixed = reference.paged_attention(**batch)
    start = 0
    for i, (n, q) in enumerate(zip(lens, q_lens, strict=True)):
        alone = {**batch, "query": batch["query"][start : start + q], "seq_lens": [n], "query_lens": [q],
                 "block_tables": batch["block_tables"][i : i + 1]}  # fmt: skip
        torch.testing.assert_close(mixed[start : start + q], reference.paged_attention(**alone), atol=1e-5, rtol=1e-5)
        start += q
