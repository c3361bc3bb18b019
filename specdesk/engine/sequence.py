"""One request's state as the scheduler sees it. Plain Python: no torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

from specdesk.engine.outputs import FinishReason, RequestMetrics
from specdesk.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from specdesk.engine.grammar import GrammarState
    from specdesk.engine.logits_processors import SeenTokens


class SequenceStatus(Enum):
    WAITING = "waiting"  # not admitted yet, or preempted and waiting to be recomputed
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    """A request's tokens and KV bookkeeping.

    Invariant: the KV of token_ids[:num_computed_tokens] is in the pages of block_table, in order.
    token_ids holds only verified tokens (prompt + accepted output); speculative drafts never enter it.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    cache_salt: str | None = None  # pages are only shared between requests with the same salt
    token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    # Keys of the full pages at the head of block_table, in order (a SHA-256 chain; see BlockManager).
    block_hashes: list[bytes] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    metrics: RequestMetrics = field(default_factory=RequestMetrics)
    # Set by the speculator for this step: tokens to verify after the last verified one.
    draft_token_ids: list[int] = field(default_factory=list)
    # The request's grammar state (structured output), advanced over verified tokens only; None: free text.
    grammar: GrammarState | None = None
    # The distinct ids of token_ids, kept by the repetition penalty from step to step (logits_processors.py).
    seen_tokens: SeenTokens | None = None

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)
        self.metrics.num_prompt_tokens = len(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED
