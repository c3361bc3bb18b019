"""Continuous batching with chunked prefill and preemption by recompute. Plain Python: no torch.

Every step spends one token budget (max_num_batched_tokens) across sequences:
running sequences first (each decode costs 1 token plus its speculative drafts; an unfinished prefill
takes a chunk), then waiting sequences in arrival order, each prefilling only its uncached suffix.
When pages run out, the newest running sequence is preempted: its pages are freed and it goes back to
the front of the queue to be recomputed later (its own pages are usually still cached, so the
recompute is mostly prefix hits). Output is unchanged by preemption.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from specdesk.engine.block_manager import BlockManager
from specdesk.engine.outputs import FinishReason
from specdesk.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # verified tokens whose KV this pass computes
    num_draft_tokens: int = 0  # speculative tokens appended after them (decode only)

    @property
    def samples(self) -> bool:
        """Whether this pass reaches the sequence's last token and so yields a next token."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens + s.num_draft_tokens for s in self.scheduled)


class Scheduler:
    """Decides, each step, which sequences run and how many tokens each computes."""

    def __init__(
        self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int
    ) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        for seq in list(self.running):
            if seq not in self.running:  # preempted below to make room for an older sequence
                continue
            num_new = min(seq.num_uncomputed_tokens, budget)
            num_draft = len(seq.draft_token_ids) if num_new == seq.num_uncomputed_tokens else 0
            num_draft = min(num_draft, budget - num_new, self.max_model_len - seq.num_tokens)
            if num_new == 0:
                continue
            while not self.block_manager.append_slots(seq, num_new + num_draft):
                if num_draft:  # give up speculation before preempting anybody
                    num_draft = 0
                    continue
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status != SequenceStatus.RUNNING:
                continue
            out.scheduled.append(ScheduledSeq(seq, num_new, num_draft))
            budget -= num_new + num_draft
            if budget == 0:
                break
        # Admit waiting sequences only when nobody was preempted this step (else they would thrash).
        while self.waiting and budget > 0 and not out.preempted and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not seq.block_table:
                self.block_manager.allocate_prefix(seq)
                if seq.metrics.num_preemptions == 0:
                    seq.metrics.num_cached_tokens = seq.num_computed_tokens
            num_new = min(seq.num_uncomputed_tokens, budget)
            if not self.block_manager.append_slots(seq, num_new):
                if not self.running:
                    # Nothing will ever free pages for it: fail it rather than hang.
                    self.waiting.popleft()
                    self.block_manager.free(seq)
                    self.finish(seq, FinishReason.ERROR)
                    out.preempted.append(seq)
                    continue
                self.block_manager.free(seq)  # drop the prefix references; retry next step
                break
            self.waiting.popleft()
            self.block_manager.record_admission(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
        return out

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.draft_token_ids = []
        seq.status = SequenceStatus.WAITING
        seq.metrics.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Mark finished and free its pages at once (full pages stay cached for later turns)."""
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.draft_token_ids = []
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)

    def abort(self, request_id: str) -> Sequence | None:
        for seq in [*self.running, *self.waiting]:
            if seq.request_id == request_id:
                self.finish(seq, FinishReason.ABORT)
                return seq
        return None

    def append_tokens(self, sched: ScheduledSeq, new_token_ids: list[int], num_forced: int = 0) -> list[int]:
        """Record a pass's result: KV computed, accepted tokens appended. Returns the tokens kept.

        new_token_ids are the verified tokens this pass produced (accepted drafts + one sampled token), then
        num_forced jump-forward tokens that the request's grammar forces after them without a model step
        (engine/grammar/): their KV is not computed, so the next step computes it as a short chunk.
        They are cut at EOS, a stop token id, max_tokens or the context window, which finishes the sequence.
        """
        assert 0 <= num_forced < max(len(new_token_ids), 1), (num_forced, new_token_ids)
        seq = sched.seq
        if not sched.samples:  # a prefill chunk: no token yet
            seq.num_computed_tokens += sched.num_new_tokens
            self.block_manager.cache_full_blocks(seq)
            return []
        # The accepted drafts' KV was computed in this pass too; the last new token's KV is not yet.
        seq.num_computed_tokens += sched.num_new_tokens + len(new_token_ids) - num_forced - 1
        kept: list[int] = []
        reason: FinishReason | None = None
        p = seq.params
        for tok in new_token_ids:
            kept.append(tok)
            seq.token_ids.append(tok)
            if (tok in seq.eos_token_ids and not p.ignore_eos) or tok in p.stop_token_ids:
                reason = FinishReason.STOP
            elif seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len:
                reason = FinishReason.LENGTH
            if reason is not None:
                break
        # Tokens cut after a stop were never appended, so their KV must not count as computed.
        seq.num_computed_tokens = min(seq.num_computed_tokens, seq.num_tokens - 1)
        seq.draft_token_ids = []
        self.block_manager.cache_full_blocks(seq)
        self.block_manager.trim(seq)
        if reason is not None:
            self.finish(seq, reason)
        return kept
