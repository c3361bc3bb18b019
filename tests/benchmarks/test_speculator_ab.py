"""benchmarks.speculator_ab: speculators side by side with plain decoding on the console's turns."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.speculator_ab import quartiles, settings, table, worker
from tests.tiny_models import make_tiny_model, make_tiny_speculator

pytestmark = pytest.mark.usefixtures("restore_threads")


def test_every_speculator_is_timed_against_plain_decoding_and_gives_its_tokens(tmp_path: Path) -> None:
    model = make_tiny_model("llama", tmp_path, max_position_embeddings=4096)  # room for persona prompts
    mlp = make_tiny_speculator(model, tmp_path / "mlp")
    result = worker(1, ["ngram", str(mlp)], turns=3, n=12, model=str(model))
    assert result["turns"] == 3 and result["prompt_tokens_mean"] > 100  # persona prompt and two turns
    for name in ("ngram", str(mlp)):
        entry = result[name]
        assert entry["identical_to_plain"] == 3  # speculation is exact
        assert entry["tok_s"] > 0 and entry["decode_tok_s"] > 0 and entry["tokens_per_verification"] >= 1.0
        assert entry["reply_store"] is None  # a tiny model's speculators have no store of its replies
        q1, median, q3 = entry["decode_vs_plain_by_turn"]  # the turns' own ratios to plain's, paired by prompt
        assert 0 < q1 <= median <= q3
    assert result["plain"]["tok_s"] > 0
    row = table([result], ["ngram", str(mlp)]).splitlines()[-1]
    assert row.startswith("| 1 | ") and row.count("x (") == 2 and row.count("), ") == 4


def test_the_turns_quartiles_pair_each_turn_with_plains_run_of_it() -> None:
    # Plain took 2 s on every turn; the other engine 1 s on three and 4 s on one: ratios 2, 2, 2 and 0.5.
    q1, median, q3 = quartiles([2.0, 2.0, 2.0, 2.0], [1.0, 1.0, 4.0, 1.0])
    assert median == 2.0 and q3 == 2.0 and q1 < 1.0
    assert quartiles([2.0], [1.0]) == [2.0, 2.0, 2.0]  # one turn: no spread to give


def test_sampled_turns_are_seeded_so_speculation_draws_plains_tokens(tmp_path: Path) -> None:
    model = make_tiny_model("llama", tmp_path, max_position_embeddings=4096)
    result = worker(1, ["ngram"], turns=2, n=12, model=str(model), temperature=0.7, top_p=0.9)
    assert result["temperature"] == 0.7 and result["top_p"] == 0.9
    assert result["ngram"]["identical_to_plain"] == 2  # the same seeded draws with and without speculation


def test_unseeded_turns_draw_as_the_console_does(tmp_path: Path) -> None:
    model = make_tiny_model("llama", tmp_path, max_position_embeddings=4096)
    mlp = make_tiny_speculator(model, tmp_path / "mlp")
    result = worker(1, [str(mlp)], turns=2, n=12, model=str(model), temperature=0.7, top_p=0.9, unseeded=True)
    assert result["seeded"] is False
    entry = result[str(mlp)]
    assert entry["identical_to_plain"] is None  # no coupled draws to compare
    assert entry["tok_s"] > 0 and entry["verifications"] > 0


def test_a_name_may_carry_engine_settings_so_two_settings_run_side_by_side(tmp_path: Path) -> None:
    assert settings("default") == {"speculator": "default"}
    assert settings("ngram@spec_reply_store=False,spec_pool_size=none") == {
        "speculator": "ngram", "spec_reply_store": False, "spec_pool_size": None}  # fmt: skip
    assert settings("ngram@spec_max_ngram_tokens=4,spec_step_cost_prior=0.1,spec_tree=paths") == {
        "speculator": "ngram",
        "spec_max_ngram_tokens": 4,
        "spec_step_cost_prior": 0.1,
        "spec_tree": "paths",
    }
    with pytest.raises(SystemExit, match="key=value"):
        settings("ngram@spec_max_ngram_tokens")
    model = make_tiny_model("llama", tmp_path, max_position_embeddings=4096)
    names = ["ngram@spec_max_ngram_tokens=1", "ngram@spec_max_ngram_tokens=8"]
    result = worker(1, names, turns=2, n=12, model=str(model))
    for name, tokens in zip(names, (1, 8), strict=True):
        assert result[name]["identical_to_plain"] == 2 and result[name]["max_ngram_tokens"] == tokens
    assert result[names[0]]["tokens_per_verification"] <= 2.0  # one draft token at most a verification
