"""benchmarks.kernels_ab: the engine end to end on two builds of the C kernels, switched under it turn by turn."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.kernels_ab import table, worker
from specdesk.kernels import cpu_lib
from tests.tiny_models import make_tiny_model

pytestmark = [
    pytest.mark.usefixtures("restore_threads"),
    pytest.mark.skipif(not cpu_lib.available(), reason="no working C compiler: the CPU kernels are not built"),
]


def test_both_builds_run_every_turn_and_the_library_is_given_back(tmp_path: Path) -> None:
    model = make_tiny_model("llama", tmp_path, max_position_embeddings=4096)  # room for persona prompts
    library = cpu_lib.library
    result = worker(1, "HEAD", turns=2, n=8, model=str(model), quality=True)
    assert cpu_lib.library is library  # the switch is undone
    assert result["turns"] == 2 and result["prompt_tokens"] > 100  # persona prompt and two turns
    for side in ("old", "new"):
        assert result[f"{side}, prefill ms"] > 0
        assert result[f"{side}, plain tok/s"] > 0 and result[f"{side}, speculation tok/s"] > 0
        assert result[f"{side}, plain decode tok/s"] > 0 and result[f"{side}, speculation decode tok/s"] > 0
        assert result["speculation_exact"][side] == 2  # speculation is exact on either build
    for q in result["vs_float32"].values():  # the int8 path against the same model in float32
        assert q["positions"] == 2 * result["prompt_tokens"] and 0 <= q["top1_percent"] <= 100 and q["kl"] >= 0
    assert 0 <= result["turns_alike"] <= 2
    rows = table([result]).splitlines()
    assert result["repetition_penalty"] == 1.1  # the console's, unless asked otherwise
    assert len(rows) == 7 and rows[2].startswith("| 1 | prefill ms") and "decoding alone" in rows[4]
