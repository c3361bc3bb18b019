"""Speculative decoding in the engine loop: propose draft trees before a step, take in the verdicts after it.

One step for a speculating sequence (the algorithms are the other modules of this package):

    propose   the MLP speculator (IBM's, reading the hidden state that produced the last token) and/or the
              n-gram lookup give draft paths; they are merged into one trie (`DraftTree`), best path first.
              How the MLP's candidates are ranked and chosen is the tree kind's (tree_kind.py).
    schedule  the root (the last sampled token, KV not yet computed) plus every tree node is one query
              token; the nodes' KV goes to private slots after the sequence's verified tokens.
    verify    one base-model pass with the tree mask gives logits after every node; verifier.py accepts a
              path plus one token of the base model's own, for the whole batch at once.
    accept    (`accept`, here) accepted nodes off the first branch have their KV moved down to the path's
              positions; everything past them is garbage that the next step overwrites or
              `BlockManager.trim` reclaims. Only verified tokens ever get hashed. The hidden state after the
              last verified token is kept per request: the MLP speculator's next input.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from specdesk.engine.config import SpecConfig
from specdesk.engine.grammar.state import MAX_FORCED_TOKENS
from specdesk.engine.model_runner import ForwardOutput, ModelRunner
from specdesk.engine.models.loader import CPU_KERNELS, LoadedModel
from specdesk.engine.sampling_params import SamplingParams
from specdesk.engine.scheduler import ScheduledSeq
from specdesk.engine.sequence import Sequence
from specdesk.engine.speculators import draft_vocab, reply_store
from specdesk.engine.speculators.acceptance import Acceptance
from specdesk.engine.speculators.draft_penalty import DraftPenalty
from specdesk.engine.speculators.gating import GatingConfig, MeasuredRest, SpeculationPolicy
from specdesk.engine.speculators.mlp import MLPSpeculator
from specdesk.engine.speculators.mlp_ledger import MLPLedger, nodes_off_draft, tokens_added
from specdesk.engine.speculators.ngram import NgramSpeculator
from specdesk.engine.speculators.tree import DraftTree, build_tree, truncate
from specdesk.engine.speculators.tree_kind import TreeKind, make_tree_kind
from specdesk.engine.speculators.tree_width import StepCost, TreeWidth
from specdesk.engine.speculators.verifier import Verdict

# Steps the MLP speculator rests once no candidate width pays, before it proposes (and is measured) again.
MLP_REST_STEPS = 15
# Proposals the n-gram drafts rest where they are measured not to pay (gating.MeasuredRest; on a CPU,
# SpecConfig.rest): under the console's sampling a draft of the reply store is accepted about a fifth of the time.
NGRAM_REST_STEPS = 30
# An n-gram draft's length at most, unless its match reaches far back (ngram.LONG_MATCH) in a request that does
# not penalize repeats: then up to SpecConfig.max_ngram_tokens. Every draft up to 12 by the request's depth ran
# 3-5 % slower under the console's penalty, for no more tokens a verification (docs/benchmarks.md).
NGRAM_TOKENS = 4
# A draft of the reply store is proposed while its chain's estimated chance of acceptance is at least this many
# times what one more verified token costs (in plain steps). A draft that pays its own verification needs a chance
# above the cost; walked over held-out replies with the engine's step costs (0.15-0.2 of a step on a 2-core CPU),
# 1.5 gave the most tokens per unit of time, 1 and 2 within 1-2 % of it. No verified token is free (a fitted cost
# of 0 is a noisy fit): the cost is taken as at least MIN_TOKEN_COST.
STORE_CHANCE_PER_COST, MIN_TOKEN_COST = 1.5, 0.01
# Where the MLP may rest (on a CPU: SpecConfig.rest) its steps run a cadence of MEASURE_EVERY: one ranks the whole
# pool, so that TreeWidth measures every width; one verifies a neighbour of the best width, so that StepCost sees
# steps of different sizes and fits what a token costs; the others rank and verify the best width alone (the C
# kernels' int8 ranker: its pool of 12 nodes runs all three heads, ~0.9 ms; one node the first head alone, ~0.45
# ms, against a ~4.5 ms plain step; the torch path ranks the whole pool regardless, measured on the cadence too).
MEASURE_EVERY = 4
# The least spread of verified tokens (std over the recent steps) from which StepCost fits a slope on that path:
# the neighbour steps alone give ~0.4, and a wrong prior costs more than a noisy fit.
CADENCE_MIN_SPREAD = 0.3
# The cost of one more verified token in plain steps on the C kernels' CPU path (int8 or Q4_1 weights) until
# measured (a 5-token pass costs ~1.4x a one-token step in the default model's layers on 2 cores: the matmuls
# turn compute-bound).
C_KERNELS_STEP_COST_PRIOR = 0.1


@dataclass
class SpecStats:
    """Engine-wide speculation counters (vLLM's names: drafts, draft tokens, accepted tokens)."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)
    num_tree_nodes: int = 0


class SpeculativeDecoder:
    """Owns the speculators, the gating policy, the current step's draft trees and each request's last
    hidden state (what the MLP speculator reads)."""

    def __init__(self, config: SpecConfig, loaded: LoadedModel, runner: ModelRunner) -> None:
        self.config = config
        self.runner = runner
        self.mlp: MLPSpeculator | None = None
        self.mlp_dtype = torch.float32  # the speculator's dtype, kept: next(parameters()) took ~50 us a step
        self.tree_kind: TreeKind | None = None
        c_kernels = loaded.quantization in CPU_KERNELS  # the C kernels' CPU path (int8 or Q4_1 weights)
        if config.mlp_dir:
            # On CPU the tiny speculator runs in float32: unpacked bf16 matmuls are the slow path there.
            self.mlp_dtype = torch.float32 if loaded.device.type == "cpu" else loaded.dtype
            self.mlp = draft_vocab.load_speculator(config.mlp_dir, loaded.model, self.mlp_dtype, loaded.device)
            if loaded.device.type == "cpu":  # the C kernels' path runs its speculator on them too
                draft_vocab.pack_for_cpu(self.mlp, int8=c_kernels)
            self.tree_kind = make_tree_kind(self.mlp, config, loaded.device)
        # The frozen store of the base model's own replies (reply_store.py; SpecConfig says whose).
        store = reply_store.ReplyStore.load(config.reply_store) if config.reply_store else None
        self.ngram = NgramSpeculator(store=store) if config.use_ngram else None
        self.ngram_rest = MeasuredRest(NGRAM_REST_STEPS) if self.ngram is not None and config.rest else None
        max_tokens = max(self.mlp.n_predict if self.mlp else 0, config.max_ngram_tokens if self.ngram else 0)
        pool = self.tree_kind.pool if self.tree_kind is not None else 1
        gating = GatingConfig(
            max_batch_size=config.max_batch_size, max_kv_usage=config.max_kv_usage, max_tokens=max_tokens,
            max_candidates=pool,
        )  # fmt: skip
        self.policy = SpeculationPolicy(gating)
        # The tree's width from measured step costs and retrospective acceptance (tree_width.py).
        # On a CPU a verified token costs a sizeable part of a step, and no candidate at all is a choice
        # (config.rest): speculation then rests, and looks again every MLP_REST_STEPS steps.
        prior = max(config.step_cost_prior, C_KERNELS_STEP_COST_PRIOR) if c_kernels else config.step_cost_prior
        self.step_cost = StepCost(prior=prior, min_spread=CADENCE_MIN_SPREAD) if config.rest else StepCost(prior=prior)
        self.width = TreeWidth(pool, allow_none=config.rest)
        self._mlp_rest, self._mlp_ran = 0, False
        self._mlp_steps, self._measuring, self._explore_up = 0, False, False  # the cadence (MEASURE_EVERY)
        # Emitted tokens and seconds of lone decode steps without the MLP (moving sums): where resting is
        # allowed, the MLP rests whenever its best width's predicted tokens per second fall below these steps'.
        self._plain_tokens = self._plain_seconds = self._plain_steps = 0.0
        # Where the MLP may rest, it also rests where its steps lose against themselves without it (mlp_ledger.py):
        # this step's n-gram drafts beside the MLP's, the MLP's proposal seconds and (tokens added, nodes beyond
        # the n-gram draft) of a lone step, after its pass.
        self.ledger = MLPLedger(MLP_REST_STEPS) if config.rest and self.mlp is not None and config.mlp_ledger else None
        self._fixed: dict[str, list[list[int]]] = {}
        self._proposal = 0.0
        self._ledger_step: tuple[int, int] | None = None
        self.trees: dict[str, DraftTree] = {}
        self.paths: dict[str, tuple[list[list[int]], list[list[int]]]] = {}  # (n-gram, ranked MLP) per tree
        self.hidden: dict[str, torch.Tensor] = {}  # request id -> [hidden]: the state after its last token
        self.stats = SpecStats(accepted_per_position=[0] * max_tokens)
        # The largest tree a step can verify: the n-gram draft plus the MLP's ranked pool (a node tree's top
        # nodes are closed under ancestors, so m nodes make an m-node trie; IBM's paths are n_predict deep).
        mlp_nodes = 0 if self.tree_kind is None or self.mlp is None else self.tree_kind.pool
        if config.tree == "paths" and self.mlp is not None:
            mlp_nodes *= self.mlp.n_predict
        self.max_tree_nodes = mlp_nodes + (config.max_ngram_tokens if self.ngram is not None else 0)

    # ---- before the step --------------------------------------------------------------------------

    def _mlp_due(self) -> bool:
        """False while the MLP rests (see MLP_REST_STEPS)."""
        self._mlp_ran = self._mlp_rest == 0
        if self._mlp_rest > 0:
            self._mlp_rest -= 1
        return self._mlp_ran

    def _mlp_pays(self, width: int) -> bool:
        """Whether the MLP's steps at `width` would make at least as many tokens per second as steps without it:
        the width's measured tokens per step over StepCost's fitted time for its measured tree size, against
        the measured steps without (always True where resting is not allowed). Until StepCost has steps to fit
        the MLP runs; then steps without it are tried once."""
        tokens, nodes = self.width.tokens_per_step(width), self.width.nodes_per_step(width)
        if not self.width.allow_none or tokens is None or nodes is None or self.step_cost.weight < 8:
            return True
        if self._plain_tokens == 0:
            return False  # measure the other side once
        seconds = self.step_cost.seconds(1 + nodes)
        assert seconds is not None
        return tokens / seconds >= self._plain_tokens / self._plain_seconds

    def _token_cost(self) -> float:
        """What one more verified token costs in plain steps, for the drafts' depth (gating.py): c = b / a, except
        where the MLP may rest: there a is the intercept of the MLP's own steps (its proposal included, ~1.2
        plain steps), so StepCost's slope is taken over the measured steps without the MLP, or the prior until
        those are measured."""
        if not self.width.allow_none:
            return self.step_cost.cost_per_token
        fitted = self.step_cost.fitted()
        if fitted is None or self._plain_steps == 0:
            return self.step_cost.prior
        return min(fitted[1] / (self._plain_seconds / self._plain_steps), 1.0)

    def _mlp_fits(self) -> bool:
        """False where the ledger finds that the MLP's steps lose against themselves without it: then it rests
        (longer each time), ranking nothing this step."""
        if self.ledger is None or self.config.tree_width is not None or self.ledger.pays() is not False:
            return True
        self._mlp_rest, self._mlp_ran = self.ledger.next_rest(), False
        return False

    def _choose_width(self, limit: int) -> int:
        """The measured policy's width this step (0: rest the MLP); on the resting path, by the cadence."""
        if not self.width.allow_none:
            return self.width.choose(self.step_cost.cost_per_token, limit)
        # c = b / a ranks the widths (E_m / (a + b N_m)), but a is the fitted intercept of the MLP's steps, not a
        # plain step: whether the best width beats a plain step is _mlp_pays', from the two measured sides.
        best = self.width.choose(self.step_cost.cost_per_token, limit, allow_none=False)
        phase, self._mlp_steps = self._mlp_steps % MEASURE_EVERY, self._mlp_steps + 1
        self._measuring = phase == 0 or self.width.tokens_per_step(1) is None
        if best == 0 or not self._mlp_pays(best):
            # The step that decides to rest still ranks the pool, verifying none of it: the widths' acceptance
            # is then measured again every MLP_REST_STEPS steps, so speculation comes back when it pays.
            self._measuring = True
            return 0
        if phase == MEASURE_EVERY // 2 and limit > 1:  # a neighbour, up and down in turn, within [1, limit]
            self._explore_up = not self._explore_up
            return best + 1 if best == 1 or (self._explore_up and best < limit) else best - 1
        return best

    def record_lone_step(self, verified: int, emitted: int, seconds: float) -> None:
        """A lone decode step's query tokens (its root and draft nodes), emitted tokens and wall time, proposal
        included. Where the MLP may rest, StepCost fits the MLP's steps (the cadence's measuring ones too: their
        share of the pool's ranking is part of what speculating costs) and the steps without it are
        `_mlp_pays`' other side, and also `ngram_rest`'s two sides (n-gram drafts alone, or no draft); the step
        that decided to rest verified no MLP node and counts for none. A step that verified MLP nodes also goes
        into the ledger, with the MLP's share of it (`accept`) and price."""
        if not self.width.allow_none or (self._mlp_ran and self._mlp_rest == 0):
            self.step_cost.record(verified, seconds)
            if self.ledger is not None and self._ledger_step is not None and (fit := self.step_cost.fit()):
                added, extra = self._ledger_step  # and the ledger prices the MLP's share of this step
                self.ledger.record(seconds, emitted, added, self._proposal + fit[1] * extra)
        elif not self._mlp_ran:
            if self.ngram_rest is not None:  # the n-gram's drafts alone, or no draft at all
                self.ngram_rest.record(verified > 1, emitted, seconds)
            self._plain_tokens = 0.9 * self._plain_tokens + emitted
            self._plain_seconds = 0.9 * self._plain_seconds + seconds
            self._plain_steps = 0.9 * self._plain_steps + 1

    def propose(self, running: list[Sequence], kv_usage: float) -> None:
        """Attach a draft tree to each running sequence worth speculating on this step."""
        self.trees.clear()
        self.paths.clear()
        self._mlp_ran = self._measuring = False  # until _mlp_due and _choose_width say otherwise (per step)
        self._fixed, self._ledger_step = {}, None
        for s in running:  # last step's drafts of a sequence the budget left out must not be scheduled now
            s.draft_token_ids = []
        if not self.policy.should_speculate(len(running), kv_usage):
            return
        # Decoding sequences only: a prefill chunk has nothing to speculate from yet. A sequence whose
        # grammar forced tokens last step (jump-forward) computes them in this pass, the tree after them.
        eligible = [s for s in running if s.params.speculate and s.num_output_tokens and _after_verified(s)]
        depth = {s.request_id: self.policy.num_tokens(s.request_id) for s in eligible}
        eligible = [s for s in eligible if depth[s.request_id] > 0]
        if not eligible:
            return
        self.policy.cost_per_token = self._token_cost()
        paths: dict[str, list[list[int]]] = {s.request_id: [] for s in eligible}
        if self.ngram is not None and (self.ngram_rest is None or self.ngram_rest.due()):
            min_prob = STORE_CHANCE_PER_COST * max(self.policy.cost_per_token, MIN_TOKEN_COST)
            for s in eligible:
                # The request's depth, within NGRAM_TOKENS; a match reaching far back may run to max_ngram_tokens,
                # unless the request penalizes repeats (then the model is pushed off exactly such copies): k.
                k = min(depth[s.request_id] + 1, NGRAM_TOKENS, self.config.max_ngram_tokens)
                longest = self.config.max_ngram_tokens if _repeats_freely(s.params) else k
                draft = self.ngram.propose(s.request_id, s.token_ids, k, min_prob, longest, s.cache_salt)
                if draft:
                    paths[s.request_id].append(draft)
        # The MLP reads the hidden state after the last token: stale while forced tokens await their pass.
        with_hidden = [s for s in eligible if s.request_id in self.hidden and s.num_uncomputed_tokens == 1]
        if self.mlp is not None and self.tree_kind is not None and with_hidden and self._mlp_due() and self._mlp_fits():
            started = time.perf_counter()
            fixed = self._fixed = {s.request_id: list(paths[s.request_id]) for s in with_hidden}
            kind = self.tree_kind
            depths = [depth[s.request_id] for s in with_hidden]
            heads = min(self.mlp.n_predict, max(depths))
            width = max(self.policy.num_candidates(len(running)), kind.min_width(heads))
            if self.config.tree_width is None:
                width = self._choose_width(width)
                if width == 0:  # rest the MLP (its proposal costs ~0.1-0.2 of a CPU step)
                    self._mlp_rest = MLP_REST_STEPS
            else:
                width = min(width, self.config.tree_width)
            states = [self.hidden[s.request_id] for s in with_hidden]  # alone, a view instead of a stack
            hidden = (states[0][None] if len(states) == 1 else torch.stack(states)).to(self.mlp_dtype)
            last = torch.tensor([s.token_ids[-1] for s in with_hidden], device=hidden.device)
            penalty = None
            if kind.penalized:  # the heads were trained under the requests' penalties
                penalties = [s.params.repetition_penalty for s in with_hidden]
                penalty = DraftPenalty.of([s.token_ids for s in with_hidden], penalties, self.mlp.columns())
            # The whole pool is ranked (the top `width` are verified) so that every width gets measured; on the
            # resting path only on the cadence's measuring steps, the others rank what they verify.
            measure = self._measuring or not self.width.allow_none
            # Where a node costs a sizeable part of a step, only nodes as likely as they cost (the pool TreeWidth
            # measures is then these too): for the MLP alone 5-6 % faster than the top of the chosen width, as a
            # walk over held-out replies said; beside the n-gram no gain, so off there by default (config.py).
            sure = self.policy.cost_per_token if self.width.allow_none and self.config.confident_nodes else 0.0
            ranks = kind.rank(hidden, last, heads, depths, penalty, None if measure else max(width, 1), sure)
            for s, ranked in zip(with_hidden, ranks, strict=True):
                paths[s.request_id] += kind.select(ranked, width)
                if measure:
                    self.paths[s.request_id] = (fixed[s.request_id], ranked)
            self._proposal = time.perf_counter() - started
        for s in eligible:
            if paths[s.request_id]:
                tree = build_tree(paths[s.request_id])
                if s.grammar is not None:
                    # Nodes the grammar forbids could never be accepted: don't spend the pass on them.
                    try:
                        pruned = s.grammar.prune(tree)
                    except Exception:  # a broken grammar fails its request in the masks, alone; no tree
                        continue
                    if pruned is None:
                        continue
                    tree = pruned
                self.trees[s.request_id] = tree
                s.draft_token_ids = list(tree.tokens)

    def tree_for(self, sched: ScheduledSeq) -> DraftTree | None:
        """The (possibly cut) tree the scheduler let this sequence verify, or None."""
        tree = self.trees.get(sched.seq.request_id)
        if tree is None or sched.num_draft_tokens == 0:
            return None
        return truncate(tree, sched.num_draft_tokens)

    # ---- after the pass ---------------------------------------------------------------------------
    def accept(
        self, batch: list[ScheduledSeq], trees: list[DraftTree | None], verdicts: list[Verdict], out: ForwardOutput
    ) -> None:
        """Take in a pass's verdicts: move accepted KV, count, and keep each request's next MLP input."""
        src: list[int] = []
        dst: list[int] = []
        hidden_rows: list[int] = []
        keep: list[str] = []
        for i, (s, tree, verdict) in enumerate(zip(batch, trees, verdicts, strict=True)):
            if verdict.error is not None or not s.samples:
                continue
            if tree is not None and verdict.acceptance is not None:
                self._moves(s, verdict.acceptance, src, dst)
                self._record(s.seq, tree, verdict.acceptance)
                fixed = self._fixed.get(s.seq.request_id) if self.ledger is not None else None
                if fixed is not None:  # the MLP's share of this step, for the ledger (lone steps take it)
                    draft = fixed[0] if fixed else []
                    self._ledger_step = (tokens_added(verdict.tokens, draft), nodes_off_draft(tree, draft))
            elif tree is None and self.ledger is not None and s.seq.request_id in self._fixed:
                self._ledger_step = (0, 0)  # the MLP ranked and left every node out: its proposal bought nothing
            if s.seq.request_id in self.paths:  # a ranking that left every node out verified no tree: 1 token
                self.width.record(*self.paths[s.seq.request_id], verdict.tokens)
            if self.mlp is not None:
                hidden_rows.append(out.row_starts[i] + verdict.last_row)
                keep.append(s.seq.request_id)
        if src:
            self.runner.move_kv(src, dst)  # one copy for the whole batch
        if keep:
            # One gather: each request's hidden state after its last verified token.
            rows = out.hidden[hidden_rows]
            for j, request_id in enumerate(keep):
                self.hidden[request_id] = rows[j]

    def _moves(self, s: ScheduledSeq, acc: Acceptance, src: list[int], dst: list[int]) -> None:
        # Node row r sits at position p + r in the pages; its path position is p + depth.
        seq = s.seq
        p = seq.num_computed_tokens + s.num_new_tokens - 1  # the root's position (KV computed this pass)
        for i, r in enumerate(acc.accepted_rows):
            if r != i + 1:
                src.append(self.runner.slot_of(seq, p + r))
                dst.append(self.runner.slot_of(seq, p + i + 1))

    def _record(self, seq: Sequence, tree: DraftTree, acc: Acceptance) -> None:
        n, depth = acc.num_accepted, tree.max_depth
        m = seq.metrics
        m.num_spec_steps += 1
        m.num_draft_tokens += depth
        m.num_accepted_tokens += n
        if len(m.accepted_per_position) < depth:
            m.accepted_per_position += [0] * (depth - len(m.accepted_per_position))
        for i in range(n):
            m.accepted_per_position[i] += 1
            if i < len(self.stats.accepted_per_position):
                self.stats.accepted_per_position[i] += 1
        self.stats.num_drafts += 1
        self.stats.num_draft_tokens += depth
        self.stats.num_accepted_tokens += n
        self.stats.num_tree_nodes += tree.num_nodes
        self.policy.record(seq.request_id, depth, n)

    # ---- request lifetime -------------------------------------------------------------------------
    def preempted(self, seq: Sequence) -> None:
        """A preempted request recomputes its KV, and its hidden state with it: drop the stale one."""
        self.hidden.pop(seq.request_id, None)

    def finish(self, seq: Sequence) -> None:
        """A request ended (finished, stopped, aborted or failed): drop everything kept for it."""
        self.hidden.pop(seq.request_id, None)
        self.policy.release(seq.request_id)
        if self.ngram is not None:
            self.ngram.release(seq.request_id)
            if seq.num_output_tokens > 0:
                self.ngram.observe_reply(seq.output_token_ids, seq.cache_salt)  # drafted within its tenant only


def _repeats_freely(params: SamplingParams) -> bool:
    """Whether nothing in the request's sampling penalizes tokens it has seen."""
    return params.repetition_penalty <= 1.0 and params.frequency_penalty <= 0.0 and params.presence_penalty <= 0.0


def _after_verified(seq: Sequence) -> bool:
    """Whether a draft tree can follow seq's uncomputed tokens this step: its last sampled token alone, or
    that token plus the ones its grammar forced after it (at most MAX_FORCED_TOKENS, see engine/grammar/)."""
    n = seq.num_uncomputed_tokens
    return n == 1 or (seq.grammar is not None and 1 <= n <= MAX_FORCED_TOKENS + 1)
