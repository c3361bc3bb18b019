"""The loop definition behind the loop-rate benchmark row."""

from __future__ import annotations

from benchmarks.loops import loops


def test_a_4gram_four_times_is_a_loop_and_three_is_not() -> None:
    assert loops([9, 1, 2, 3, 4] * 3 + [1, 2, 3, 4])
    assert not loops([9, 1, 2, 3, 4] * 3 + [5, 6, 7, 8])
    assert loops([7] * 7)  # overlapping occurrences count: "support-support-..." as one token
    assert not loops([7] * 6)
    assert not loops(list(range(200)))
