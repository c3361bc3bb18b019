"""Small waits shared by the engine, API and console tests (one copy, so they agree on what "idle" means)."""

from __future__ import annotations

import time
from collections.abc import Callable

from specdesk.engine.llm import LLM


def wait_until(condition: Callable[[], bool], timeout_s: float = 15.0, what: str = "condition") -> None:
    """Poll `condition` until it holds; fail the test after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def wait_idle(llm: LLM, timeout_s: float = 15.0) -> None:
    """Wait until nothing runs or waits and every page is free again (cached pages count as free).

    Aborts and client disconnects take effect at the engine's next step boundary, so a test that checks
    "every page is back" waits for this first.
    """

    def idle() -> bool:
        s = llm.stats()
        return s.num_running == 0 and s.num_waiting == 0 and s.num_free_blocks == s.num_blocks

    try:
        wait_until(idle, timeout_s, "the engine to go idle")
    except AssertionError:
        raise AssertionError(f"engine still busy after {timeout_s} s: {llm.stats()}") from None
