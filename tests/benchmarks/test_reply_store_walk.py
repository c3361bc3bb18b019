"""benchmarks.reply_store: held-out replies walked with the n-gram drafts, with and without the store."""

from __future__ import annotations

import numpy as np

from benchmarks.reply_store import walk
from specdesk.engine.speculators.reply_store import ReplyStore


def test_a_walk_moves_accepted_drafts_plus_one_token_a_step() -> None:
    prompt, reply = [1, 2], [10, 11, 12, 13, 14, 15]
    assert walk([prompt], [reply], None, 3) == 1.0  # nothing to draft from: one token a step
    # The store holds the reply, but neither [1, 2] nor [2, 10] is one of its n-grams: the first two steps move
    # one token each; from [10, 11] on the store continues it: 10 | 11 | 12 13 14 15 (three drafts and one).
    store = ReplyStore([[10, 11, 12, 13, 14, 15]])
    assert walk([prompt], [reply], store, 3) == 6 / 3
    assert walk([prompt], [reply], store, 1) == 6 / 4  # 10 | 11 | 12 13 | 14 15
    wrong = ReplyStore([[10, 11, 99, 98, 97]])
    assert walk([prompt], [reply], wrong, 3) == 1.0  # drafted but never accepted


def test_a_priced_walk_charges_every_draft_and_a_calibrated_cut_drafts_less() -> None:
    prompt, reply = [1, 2], [10, 11, 12, 13, 14, 15]
    store = ReplyStore([[10, 11, 12, 13, 14, 15]])
    # 10 | 11 | 12 13 14 15: 3 steps, 3 drafts, 6 tokens.
    assert walk([prompt], [reply], store, 3, cost=0.5) == 6 / (3 + 0.5 * 3)
    wrong = ReplyStore([[10, 11, 99, 98, 97]])
    assert walk([prompt], [reply], wrong, 3, cost=0.5) < 1.0  # drafts that never land cost time
    wrong.accuracy = np.full((3, 15), 0.1)
    assert walk([prompt], [reply], wrong, 3, cost=0.5, min_prob=0.2) == 1.0  # the cut leaves them out
