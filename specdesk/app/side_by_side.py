"""The side-by-side latency demo: one customer message answered twice, at the same moment, by one engine.

Left: plain decoding (`speculate=False`) with a unique cache salt, so not one prompt page is shared
with anything else. Right: speculation and the shared prefix cache, as every console turn runs.

Before the race, the persona's system prompt is put in the shared cache (a 1-token request) unless
it is there already: that is the console's steady state after its first conversation of the day, and
the state the right side is meant to show. Both requests are then submitted back to back, so the
engine batches them in the same steps. The cached side goes first: its short prefill then fits in
the first step beside the start of the plain side's prefill, which needs the same number of steps
either way — the order shows the cache's effect on time to first token without slowing the baseline.
Nothing here is stored: it is a measurement, not a conversation.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from specdesk import prompts
from specdesk.engine import SamplingParams, StreamDelta

if TYPE_CHECKING:
    from specdesk.engine.llm import LLM

LEFT, RIGHT = "plain", "speculative"
# Yield at most this often while streaming: two sides * every token would flood the browser.
_MIN_YIELD_INTERVAL_S = 0.05


@dataclass(frozen=True)
class SideState:
    """One side's progress. `points` is (seconds since submit, tokens so far) for the chart."""

    label: str
    text: str = ""
    token_ids: tuple[int, ...] = ()
    num_tokens: int = 0
    ttft_s: float | None = None
    total_s: float | None = None
    decode_tokens_per_s: float | None = None
    tokens_per_step: float | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    is_finished: bool = False
    error: str | None = None
    points: tuple[tuple[float, int], ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class Comparison:
    left: SideState
    right: SideState
    elapsed_s: float = 0.0

    @property
    def is_finished(self) -> bool:
        return self.left.is_finished and self.right.is_finished

    @property
    def texts_match(self) -> bool | None:
        """True/False once both sides finished cleanly; None before that."""
        if not self.is_finished or self.left.error or self.right.error:
            return None
        return self.left.token_ids == self.right.token_ids

    @property
    def first_difference(self) -> int | None:
        """Index of the first token where the sides part, or None while they agree."""
        left, right = self.left.token_ids, self.right.token_ids
        for index, (a, b) in enumerate(zip(left, right, strict=False)):
            if a != b:
                return index
        return None if len(left) == len(right) or not self.is_finished else min(len(left), len(right))


def compare(
    llm: LLM,
    text: str,
    *,
    persona: str = "general",
    variables: prompts.PromptVariables | None = None,
    max_tokens: int = 128,
    warm_prefix: bool = True,
    cache_salt: str | None = None,
    repetition_penalty: float = 1.0,
) -> Iterator[Comparison]:
    """Stream both answers to `text` (greedy, so both sides must produce the same tokens).

    `repetition_penalty` is the deployment's (Settings.repetition_penalty): both sides use it, so the speed-up
    is measured on the replies the console would draft, not on a loop that speculation predicts trivially.

    `cache_salt` is the caller's prefix-cache tenant (the console passes the signed-in agent's,
    `auth.console_cache_salt`): the right side shares pages only within it.

    Raises ValueError for an empty message or one too long for the context; closing the iterator
    aborts whatever is still running.
    """
    if not text.strip():
        raise ValueError("type a customer message to compare")
    messages = prompts.build_messages(persona, [{"role": "user", "content": text}], variables=variables)
    ids = llm.apply_chat_template(messages)
    base = SamplingParams(temperature=0.0, max_tokens=max_tokens, repetition_penalty=repetition_penalty)
    if warm_prefix:
        system_only = llm.apply_chat_template(messages[:1])
        for _ in llm.stream(system_only, replace(base, max_tokens=1, speculate=False), cache_salt):
            pass
    right_id = llm.submit(ids, replace(base, speculate=True), cache_salt)
    left_id = llm.submit(ids, replace(base, speculate=False), cache_salt=f"side-by-side-{uuid.uuid4().hex}")
    return _stream(llm, {left_id: LEFT, right_id: RIGHT})


def _stream(llm: LLM, sides: dict[str, str]) -> Iterator[Comparison]:
    start = time.perf_counter()
    inbox: queue.Queue[tuple[str, StreamDelta | None, float]] = queue.Queue()
    for request_id, label in sides.items():
        # One pump per request: llm.deltas blocks, and neither side may wait for the other.
        threading.Thread(target=_pump, args=(llm, request_id, label, inbox), daemon=True).start()
    states = {label: SideState(label) for label in sides.values()}
    running = set(sides.values())
    last_yield = 0.0
    try:
        while running:
            label, delta, now = inbox.get()
            elapsed = now - start
            states[label] = _advance(states[label], delta, elapsed)
            if states[label].is_finished:
                running.discard(label)
            if not running or time.perf_counter() - last_yield >= _MIN_YIELD_INTERVAL_S:
                last_yield = time.perf_counter()
                yield Comparison(states[LEFT], states[RIGHT], elapsed)
    finally:
        for request_id, label in sides.items():
            if label in running:
                llm.abort(request_id)  # the pump sees the final delta and ends


def _pump(llm: LLM, request_id: str, label: str, inbox: queue.Queue[tuple[str, StreamDelta | None, float]]) -> None:
    try:
        for delta in llm.deltas(request_id):
            inbox.put((label, delta, time.perf_counter()))
    except Exception as exc:  # the consumer must always hear that this side ended
        error = StreamDelta(request_id, "", [], True, None, None, f"{type(exc).__name__}: {exc}")
        inbox.put((label, error, time.perf_counter()))


def _advance(state: SideState, delta: StreamDelta | None, elapsed_s: float) -> SideState:
    if delta is None:
        return state
    num_tokens = state.num_tokens + len(delta.token_ids)
    changes: dict[str, object] = {
        "text": state.text + delta.text,
        "token_ids": state.token_ids + tuple(delta.token_ids),
        "num_tokens": num_tokens,
    }
    if delta.token_ids:
        changes["points"] = (*state.points, (round(elapsed_s, 4), num_tokens))
        if state.ttft_s is None:
            changes["ttft_s"] = elapsed_s
    if delta.finished:
        changes.update(is_finished=True, total_s=elapsed_s, error=delta.error)
        m = delta.metrics
        if m is not None:
            changes.update(
                ttft_s=m.ttft_s if m.ttft_s is not None else changes.get("ttft_s", state.ttft_s),
                decode_tokens_per_s=m.decode_tokens_per_s,
                tokens_per_step=m.tokens_per_step,
                num_prompt_tokens=m.num_prompt_tokens,
                num_cached_tokens=m.num_cached_tokens,
            )
    return replace(state, **changes)  # type: ignore[arg-type]
