"""The side-by-side race: both requests stream at once from one engine; greedy texts are identical."""

from __future__ import annotations

from collections.abc import Generator, Iterator
from pathlib import Path
from typing import cast

import pytest

from specdesk.app.side_by_side import LEFT, RIGHT, Comparison, SideState, compare
from specdesk.engine.llm import LLM
from tests.app.console_fixtures import tiny_console_llm, wait_engine_idle


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LLM]:
    engine = tiny_console_llm(tmp_path_factory.mktemp("side-by-side"))
    yield engine
    engine.shutdown()


def test_both_sides_stream_concurrently_and_match(llm: LLM) -> None:
    snapshots = list(compare(llm, "Where is my parcel?", persona="retail", max_tokens=48))
    final = snapshots[-1]
    assert final.is_finished and final.texts_match is True and final.first_difference is None
    left, right = final.left, final.right
    assert left.num_tokens == right.num_tokens == 48
    # Left shares nothing (unique salt); right finds the persona's system prompt already cached.
    assert left.num_cached_tokens == 0
    assert right.num_cached_tokens > 0.8 * right.num_prompt_tokens
    assert left.ttft_s is not None and right.ttft_s is not None and right.total_s is not None
    # Concurrency: each side had tokens before the other finished.
    assert left.points[0][0] < right.total_s and right.points[0][0] < (left.total_s or 0)
    assert left.points[-1][1] == 48 and [n for _, n in right.points] == sorted(n for _, n in right.points)
    wait_engine_idle(llm)


def test_closing_the_race_aborts_both(llm: LLM) -> None:
    race = cast(Generator[Comparison], compare(llm, "Tell me a long story about refunds", max_tokens=4000))
    next(race)
    race.close()
    wait_engine_idle(llm)


def test_bad_input_is_refused_before_submitting(llm: LLM, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="type a customer message"):
        compare(llm, "  ")
    with pytest.raises(KeyError):
        compare(llm, "hi", persona="nope")


def test_first_difference_finds_where_the_sides_part() -> None:
    left = SideState(LEFT, token_ids=(1, 2, 3, 4), is_finished=True)
    assert Comparison(left, SideState(RIGHT, token_ids=(1, 2, 9, 4), is_finished=True)).first_difference == 2
    assert Comparison(left, SideState(RIGHT, token_ids=(1, 2), is_finished=True)).first_difference == 2
    same = Comparison(left, SideState(RIGHT, token_ids=(1, 2, 3, 4), is_finished=True))
    assert same.first_difference is None and same.texts_match is True


def test_the_cached_side_shares_only_within_its_tenant(llm: LLM) -> None:
    """The console passes the agent's cache salt: the right side reuses that agent's pages, never another's."""
    text = "My tenant test parcel 31337 is late"
    first = list(compare(llm, text, max_tokens=4, cache_salt="console:tenant-a"))[-1]
    assert first.right.num_cached_tokens > 0.8 * first.right.num_prompt_tokens  # warmed within tenant a
    other = list(compare(llm, text, max_tokens=4, warm_prefix=False, cache_salt="console:tenant-b"))[-1]
    assert other.right.num_cached_tokens == 0  # tenant a's pages (same prompt) are not tenant b's
    wait_engine_idle(llm)


def test_both_sides_use_the_deployments_repetition_penalty(llm: LLM) -> None:
    plain = list(compare(llm, "Where is my parcel?", persona="retail", max_tokens=32))[-1]
    penalized = list(compare(llm, "Where is my parcel?", persona="retail", max_tokens=32, repetition_penalty=1.5))[-1]
    assert penalized.texts_match is True
    assert penalized.left.token_ids != plain.left.token_ids, "the penalty must reach the requests"
    wait_engine_idle(llm)
