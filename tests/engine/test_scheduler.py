"""Scheduler: continuous batching, chunked prefill in a token budget, preemption, abort. No model needed."""

from specdesk.engine.block_manager import BlockManager
from specdesk.engine.outputs import FinishReason
from specdesk.engine.sampling_params import SamplingParams
from specdesk.engine.scheduler import Scheduler, SchedulerOutput
from specdesk.engine.sequence import Sequence, SequenceStatus


def make(num_blocks: int = 64, budget: int = 32, max_seqs: int = 8, bs: int = 4) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, bs), max_seqs, budget, max_model_len=1000)


def seq(rid: str, n_prompt: int, max_tokens: int = 5) -> Sequence:
    return Sequence(rid, [1 + (i * 7 + len(rid)) % 50 for i in range(n_prompt)], SamplingParams(max_tokens=max_tokens))


def fake_step(s: Scheduler) -> SchedulerOutput:
    """Schedule, then 'sample' token = position (deterministic, so recompute gives the same stream)."""
    out = s.schedule()
    for sched in out.scheduled:
        token = [sched.seq.num_tokens % 97 + 100] if sched.samples else []
        s.append_tokens(sched, token)
    return out


def test_chunked_prefill_respects_budget_and_keeps_decodes_running() -> None:
    s = make(budget=16)
    short = seq("short", 3, max_tokens=50)
    s.add(short)
    fake_step(s)  # prefill short, first token
    s.add(seq("long", 40))
    for _ in range(3):
        out = fake_step(s)
        assert out.num_tokens <= 16
        # The running stream decodes every step while the long prompt is prefilled in chunks.
        assert out.scheduled[0].seq is short and out.scheduled[0].num_new_tokens == 1
    long_seq = s.running[1]
    assert long_seq.num_computed_tokens == 40 and long_seq.num_output_tokens == 1  # 15 + 15 + 10


def test_requests_join_and_leave_every_step() -> None:
    s = make()
    a, b = seq("a", 4, max_tokens=2), seq("b", 4, max_tokens=6)
    s.add(a)
    s.add(b)
    fake_step(s)
    fake_step(s)
    assert a.is_finished and a.finish_reason == FinishReason.LENGTH and a.num_output_tokens == 2
    assert s.running == [b]
    c = seq("c", 4)
    s.add(c)
    out = fake_step(s)
    assert [x.seq for x in out.scheduled] == [b, c]


def test_preemption_by_recompute_never_crashes_and_keeps_output() -> None:
    def run(num_blocks: int) -> tuple[dict[str, list[int]], int]:
        s = make(num_blocks=num_blocks, bs=4)
        seqs = [seq(f"r{i}", 6 + i, max_tokens=12) for i in range(4)]
        for x in seqs:
            s.add(x)
        for _ in range(500):
            if not s.has_work:
                break
            fake_step(s)
        assert not s.has_work, "scheduler hung"
        return {x.request_id: x.output_token_ids for x in seqs}, s.num_preemptions

    roomy, n0 = run(64)
    tight, n1 = run(8)  # 8 pages of 4 tokens cannot hold 4 sequences of ~20 tokens at once
    assert n0 == 0 and n1 > 0
    assert tight == roomy
    assert all(len(v) == 12 for v in tight.values())


def test_preempted_sequence_frees_pages_and_goes_first() -> None:
    s = make(num_blocks=6, bs=4)
    a, b = seq("a", 8, max_tokens=20), seq("b", 8, max_tokens=20)
    s.add(a)
    s.add(b)
    out = fake_step(s)  # 4 pages used by two 8-token prompts + their first tokens
    for _ in range(20):
        out = fake_step(s)
        if out.preempted:
            break
    assert out.preempted == [b]  # the newest is preempted
    assert b.status == SequenceStatus.WAITING and b.block_table == [] and s.waiting[0] is b


def test_abort_frees_pages_at_once() -> None:
    s = make(num_blocks=16)
    a = seq("a", 10, max_tokens=100)
    s.add(a)
    fake_step(s)
    free_before = s.block_manager.num_free_blocks
    assert s.abort("a") is a
    assert a.finish_reason == FinishReason.ABORT and not s.has_work
    assert s.block_manager.num_free_blocks > free_before
    assert all(b.ref_count == 0 for b in s.block_manager.blocks)
    assert s.abort("missing") is None


def test_eos_and_stop_token_ids_finish() -> None:
    s = make()
    a = Sequence("a", [1, 2, 3], SamplingParams(max_tokens=50), eos_token_ids=frozenset({104}))
    b = Sequence("b", [1, 2, 3], SamplingParams(max_tokens=50, stop_token_ids=(104,)))
    c = Sequence("c", [1, 2, 3], SamplingParams(max_tokens=3, ignore_eos=True), eos_token_ids=frozenset({104}))
    for x in (a, b, c):
        s.add(x)
    while s.has_work:
        fake_step(s)
    assert a.output_token_ids == [103, 104] and a.finish_reason == FinishReason.STOP
    assert b.output_token_ids == [103, 104] and b.finish_reason == FinishReason.STOP
    assert c.output_token_ids == [103, 104, 105] and c.finish_reason == FinishReason.LENGTH


def test_accepted_run_is_cut_at_stop_and_max_tokens() -> None:
    s = make()
    a = Sequence("a", [1, 2, 3], SamplingParams(max_tokens=4), eos_token_ids=frozenset({9}))
    s.add(a)
    out = s.schedule()
    s.append_tokens(out.scheduled[0], [5])
    out = s.schedule()
    # A speculative pass verified several tokens at once; max_tokens=4 keeps only three of them.
    kept = s.append_tokens(out.scheduled[0], [6, 7, 8, 10])
    assert kept == [6, 7, 8] and a.finish_reason == FinishReason.LENGTH
    assert a.output_token_ids == [5, 6, 7, 8]
