"""One step's sampling and verification, for the whole batch at once (vLLM's rejection sampler, for trees).

The pass yields one flattened logits tensor: one row per plainly decoding sequence, the root and every
node for each draft tree (`ModelRunner.execute`). All rows are sampled in a single call
(`sampler.sample_rows`: one argmax, the sampled rows' probabilities once, one transfer to the host); each
tree is then walked on those host numbers:

    greedy             accept_greedy over the rows' argmax
    seeded             accept_greedy over tokens each row drew with the generator plain decoding would use
                       at that row's position (`ModelRunner.generator_for`): the coupled form of rejection
                       sampling for point-mass drafts, so seeded output equals the non-speculative one
    sampled, unseeded  accept_sampled: lossless multi-draft rejection sampling (acceptance.py)

Before sampling, a request with penalties, logit bias or a grammar has its rows processed
(logits_processors.py), each row against the tokens before its own position (its tree path included), so
every row is judged against exactly the distribution plain decoding would use there. Logprobs of the emitted
tokens come from the raw logits of the rows that decided them, gathered in one more transfer only when some
request asks for them.

On the CPU a sampled tree's rows are drawn as its walk reaches them (`nucleus.LazyRows`): the rows past the
first rejection are never sampled.

A row plain decoding cannot sample (NaN or infinite logits or probabilities) and any error in one
sequence's walk fail that request alone; if the batched draw itself raises, each sequence is drawn on its
own so that only the ones that fail alone fail.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from specdesk.engine.logits_processors import SeenTokens, needs_processing, process_rows
from specdesk.engine.model_runner import ForwardOutput
from specdesk.engine.nucleus import BrokenRow, LazyRows, broken_row
from specdesk.engine.outputs import TokenLogprob
from specdesk.engine.sampler import RowDraws, sample_rows
from specdesk.engine.sampling_params import SamplingParams
from specdesk.engine.scheduler import ScheduledSeq
from specdesk.engine.sequence import Sequence
from specdesk.engine.speculators.acceptance import Acceptance, accept_greedy, accept_sampled, accepted_tokens
from specdesk.engine.speculators.tree import DraftTree

GeneratorFor = Callable[[Sequence, int], torch.Generator | None]


class Verdict(NamedTuple):
    """What one pass decided for one scheduled sequence."""

    tokens: list[int]  # to append: accepted drafts + the base model's own token ([] for a prefill chunk)
    acceptance: Acceptance | None = None  # the tree walk's outcome, for a sequence that verified a tree
    error: str | None = None  # set: this request failed (and only this one)
    logprobs: list[TokenLogprob] | None = None  # one per token, when the request asks for logprobs

    @property
    def last_row(self) -> int:
        """The sequence's row whose hidden state produced its last token (0: the root or its only row)."""
        rows = self.acceptance.accepted_rows if self.acceptance is not None else []
        return rows[-1] if rows else 0


@dataclass
class _Rows:
    """The sampler's inputs for one sampling sequence's rows."""

    index: int  # the sequence's position in the batch
    seq: Sequence
    tree: DraftTree | None
    params: list[SamplingParams] = field(default_factory=list)
    generators: list[torch.Generator | None] = field(default_factory=list)
    children: list[list[int]] = field(default_factory=list)


def verify_step(
    batch: list[ScheduledSeq], trees: list[DraftTree | None], out: ForwardOutput, generator_for: GeneratorFor
) -> list[Verdict]:
    """A verdict for every scheduled sequence, from the pass's logits (see the module doc)."""
    jobs = [_rows(i, s.seq, tree, generator_for) for i, (s, tree) in enumerate(zip(batch, trees, strict=True))
            if s.samples]  # fmt: skip
    verdicts = [Verdict([]) for _ in batch]
    logits, failed = _process(out, jobs)
    try:
        draws = _draw(logits, jobs)
    except Exception as exc:
        if len(jobs) == 1:
            verdicts[jobs[0].index] = Verdict([], error=f"sampling failed: {type(exc).__name__}: {exc}")
            return verdicts
        # Find the culprit: draw each sequence alone, so that one request's bad input fails it alone.
        for job in jobs:
            try:
                (alone,) = _draw(logits[out.rows_of(job.index)], [job])
                verdicts[job.index] = _walk(job, alone)
            except Exception as exc:
                verdicts[job.index] = Verdict([], error=f"sampling failed: {type(exc).__name__}: {exc}")
    else:
        for job, job_draws in zip(jobs, draws, strict=True):
            try:
                verdicts[job.index] = _walk(job, job_draws)
            except Exception as exc:
                verdicts[job.index] = Verdict([], error=f"verification failed: {type(exc).__name__}: {exc}")
    for index, error in failed.items():
        verdicts[index] = Verdict([], error=error)
    _attach_logprobs(verdicts, jobs, out)
    return verdicts


def _process(out: ForwardOutput, jobs: list[_Rows]) -> tuple[torch.Tensor, dict[int, str]]:
    """The pass's logits with each processed request's rows replaced, and the requests whose processing
    failed (batch index -> error; their rows stay raw, so the others still draw in one call)."""
    todo = [job for job in jobs if needs_processing(job.seq.params, job.seq.grammar)]
    if not todo:
        return out.logits, {}
    # A lone request (the CPU console's common step) gets process_rows' new tensor as it is: no copy of the
    # batch's logits to write it into.
    alone = len(todo) == 1 and out.rows_of(todo[0].index) == slice(0, out.logits.shape[0])
    logits = out.logits if alone else out.logits.clone()
    failed: dict[int, str] = {}
    for job in todo:
        seq = job.seq
        try:
            rows = out.rows_of(job.index)
            paths = job.tree.row_paths() if job.tree is not None else [[]]
            if seq.seen_tokens is None:
                seq.seen_tokens = SeenTokens()
            processed = process_rows(
                out.logits[rows], seq.params, seq.token_ids, seq.num_prompt_tokens, paths, seq.grammar, seq.seen_tokens
            )
            if alone:  # in the logits' dtype, as the copy below would hold it
                return processed.to(out.logits.dtype), failed
            logits[rows] = processed
        except Exception as exc:
            failed[job.index] = f"logit processing failed: {type(exc).__name__}: {exc}"
    return logits, failed


def _attach_logprobs(verdicts: list[Verdict], jobs: list[_Rows], out: ForwardOutput) -> None:
    """Fill Verdict.logprobs for the requests that ask: log_softmax of the raw logits of the row that decided
    each emitted token (the root for the first, then each accepted node), the token's own and the top k."""
    wanted = [j for j in jobs if j.seq.params.logprobs is not None and verdicts[j.index].error is None]
    if not wanted:
        return
    rows: list[int] = []
    tokens: list[int] = []
    for job in wanted:
        verdict = verdicts[job.index]
        decided_at = [0] + (verdict.acceptance.accepted_rows if verdict.acceptance is not None else [])
        rows += [out.row_starts[job.index] + r for r in decided_at[: len(verdict.tokens)]]
        tokens += verdict.tokens
    k = max(j.seq.params.logprobs or 0 for j in wanted)
    device = out.logits.device
    logprobs = out.logits[torch.tensor(rows, device=device)].float().log_softmax(dim=-1)
    own = logprobs.gather(1, torch.tensor(tokens, device=device).unsqueeze(1))
    top_values, top_ids = logprobs.topk(k, dim=-1) if k else (own[:, :0], own[:, :0].long())
    # One transfer for every request's logprobs.
    packed = torch.cat([own.double(), top_values.double(), top_ids.double()], dim=1).tolist()
    start = 0
    for job in wanted:
        verdict = verdicts[job.index]
        kj = job.seq.params.logprobs or 0
        entries = []
        for token, row in zip(verdict.tokens, packed[start : start + len(verdict.tokens)], strict=True):
            top = tuple((int(row[1 + k + i]), row[1 + i]) for i in range(kj))
            entries.append(TokenLogprob(token, row[0], top))
        start += len(verdict.tokens)
        verdicts[job.index] = verdict._replace(logprobs=entries)


def _rows(index: int, seq: Sequence, tree: DraftTree | None, generator_for: GeneratorFor) -> _Rows:
    params = seq.params
    p = seq.num_tokens  # the position the first row's token takes; tree row r decides p + depth(r)
    offsets = tree.position_offsets if tree is not None else [0]
    rows = _Rows(index, seq, tree, [params] * len(offsets))
    if params.seed is not None:
        rows.generators = [generator_for(seq, p + d) for d in offsets]
    else:
        rows.generators = [None] * len(offsets)
    if tree is not None and not params.is_greedy and params.seed is None:
        rows.children = [[tree.token(c) for c in row] for row in tree.children]
    else:
        rows.children = [[] for _ in offsets]
    return rows


def _draw(logits: torch.Tensor, jobs: list[_Rows]) -> list[RowDraws | LazyRows]:
    """sample_rows over the jobs' rows (consecutive in logits, in job order), split back per job; a sampled tree
    on the CPU's nucleus path gets its rows drawn as its walk reaches them instead (nucleus.LazyRows)."""
    if not jobs:
        return []
    assert logits.shape[0] == sum(len(j.params) for j in jobs), (logits.shape, [len(j.params) for j in jobs])
    starts = [0]
    for job in jobs:
        starts.append(starts[-1] + len(job.params))
    lazy = [job.tree is not None and LazyRows.applies(logits, job.params) for job in jobs]
    eager = [j for j, is_lazy in enumerate(lazy) if not is_lazy]
    if eager:
        rows = [r for j in eager for r in range(starts[j], starts[j + 1])]
        draws = sample_rows(
            logits if len(rows) == logits.shape[0] else logits[rows],
            [p for j in eager for p in jobs[j].params],
            [g for j in eager for g in jobs[j].generators],
            [c for j in eager for c in jobs[j].children],
        )
    out: list[RowDraws | LazyRows] = []
    start = 0
    for j, job in enumerate(jobs):
        if lazy[j]:
            out.append(
                LazyRows(logits[starts[j] : starts[j + 1]], job.params, job.generators, job.children, sample_rows)
            )
            continue
        end = start + len(job.params)
        out.append(RowDraws(draws.tokens[start:end], draws.is_finite[start:end],
                            draws.child_probs[start:end], draws.uniforms[start:end]))  # fmt: skip
        start = end
    return out


def _walk(job: _Rows, draws: RowDraws | LazyRows) -> Verdict:
    if isinstance(draws, RowDraws) and not all(draws.is_finite):
        return Verdict([], error=broken_row(draws.is_finite.index(False)))
    tree = job.tree
    try:
        if tree is None:
            return Verdict([draws.tokens[0]])
        if job.params[0].is_greedy or job.params[0].seed is not None:
            acc = accept_greedy(tree, draws.tokens)
        else:
            acc = accept_sampled(tree, draws.child_probs, draws.uniforms, draws.tokens)
    except BrokenRow as exc:  # a lazily drawn row the walk reached
        return Verdict([], error=str(exc))
    return Verdict(accepted_tokens(tree, acc), acc)
