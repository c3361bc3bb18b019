"""benchmarks.draft_calibration: the first head's top-1 against the penalized greedy token, as is and shifted."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.draft_calibration import measure, penalize
from tests.tiny_models import make_tiny_model, make_tiny_speculator

pytestmark = pytest.mark.usefixtures("restore_threads")


def test_penalize_is_the_repetition_penalty_on_the_seen_columns() -> None:
    import torch

    z = torch.tensor([2.0, -2.0, 3.0, -1.0])
    seen = torch.tensor([True, True, False, False])
    assert penalize(z, seen, 2.0).tolist() == [1.0, -4.0, 3.0, -1.0]


def test_every_drafted_position_is_scored_and_without_a_penalty_the_shift_changes_nothing(tmp_path: Path) -> None:
    model = make_tiny_model("llama", tmp_path, max_position_embeddings=4096)  # room for persona prompts
    mlp = make_tiny_speculator(model, tmp_path / "mlp")
    plain = measure(2, 6, 1.0, model, mlp)
    assert plain["positions"] == 2 * (6 - 2)  # each reply's drafted tokens but its first (no previous constant)
    # Penalty 1: the rule is the identity and a constant shift keeps the argmax.
    assert plain["as_is_top1_percent"] == plain["oracle_constant_top1_percent"]
    assert plain["as_is_top1_percent"] == plain["previous_constant_top1_percent"]
    penalized = measure(2, 6, 1.5, model, mlp)
    assert penalized["positions"] == 8
    assert all(0.0 <= float(v) <= 100.0 for k, v in penalized.items() if k.endswith("_percent"))
