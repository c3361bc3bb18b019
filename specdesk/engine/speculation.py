"""Speculative decoding in the engine loop: propose draft trees before a step, verify them after it.

One step for a speculating sequence (see engine/speculators/ for the algorithms):

    propose   MLP speculator (IBM's, reading the hidden state that produced the last token) and/or the
              n-gram lookup give draft paths; they are merged into one trie (`DraftTree`), best path first.
    schedule  the root (the last sampled token, KV not yet computed) plus every tree node is one query
              token; the nodes' KV goes to private slots after the sequence's verified tokens.
    verify    one base-model pass with the tree mask gives logits after every node; the accepted path
              plus one token of the base model's own is appended. Accepted nodes off the first branch
              have their KV moved down to the path's positions; everything past them is garbage that the
              next step overwrites or `BlockManager.trim` reclaims. Only verified tokens ever get hashed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from specdesk.engine.config import SpecTree
from specdesk.engine.model_runner import ModelRunner
from specdesk.engine.models.loader import LoadedModel
from specdesk.engine.sampler import probs_from_logits, sample
from specdesk.engine.scheduler import ScheduledSeq
from specdesk.engine.sequence import Sequence
from specdesk.engine.speculators import DEFAULT_SPECULATOR_DIR, draft_vocab
from specdesk.engine.speculators.acceptance import Acceptance, accept_greedy, accept_sampled, accepted_tokens
from specdesk.engine.speculators.candidates import beam_top_k, propose_nodes
from specdesk.engine.speculators.candidates import propose as propose_paths
from specdesk.engine.speculators.cuda_graph import GraphedNodeRanker
from specdesk.engine.speculators.gating import GatingConfig, SpeculationPolicy
from specdesk.engine.speculators.mlp import MLPSpeculator
from specdesk.engine.speculators.ngram import NgramSpeculator
from specdesk.engine.speculators.tree import DraftTree, build_tree
from specdesk.engine.speculators.tree_width import StepCost, TreeWidth


@dataclass
class SpecStats:
    """Engine-wide speculation counters (vLLM's names: drafts, draft tokens, accepted tokens)."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)
    num_tree_nodes: int = 0


def resolve_speculator(name: str | None, is_default_model: bool) -> tuple[str | None, bool]:
    """(MLP speculator folder or None, use n-gram) for an EngineConfig.speculator value.

    "auto": the shipped speculator + n-gram for the default model, n-gram alone otherwise; "default":
    the shipped one (+ n-gram); "ngram": n-gram alone; "mlp:<dir>" or "<dir>": that MLP speculator alone;
    "<dir>+ngram": both; None / "none": off.
    """
    if name is None or name == "none":
        return None, False
    if name == "auto":
        return (str(DEFAULT_SPECULATOR_DIR), True) if is_default_model and _has_default() else (None, True)
    if name == "default":
        if not _has_default():
            raise FileNotFoundError(f"no shipped speculator in {DEFAULT_SPECULATOR_DIR}")
        return str(DEFAULT_SPECULATOR_DIR), True
    if name == "ngram":
        return None, True
    with_ngram = name.endswith("+ngram")
    path = name.removesuffix("+ngram").removeprefix("mlp:")
    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(
            f"speculator {name!r}: expected 'auto', 'default', 'ngram', None, or a folder with an "
            f"mlp_speculator config.json (optionally suffixed '+ngram')"
        )
    return path, with_ngram


def _has_default() -> bool:
    return (DEFAULT_SPECULATOR_DIR / "config.json").is_file()


class SpeculativeDecoder:
    """Owns the speculators, the gating policy and the current step's draft trees."""

    def __init__(
        self, mlp_dir: str | None, use_ngram: bool, loaded: LoadedModel, runner: ModelRunner,
        max_batch_size: int | None = None, tree_width: int | None = None, max_ngram_tokens: int = 4,
        tree: SpecTree = "nodes", cuda_graphs: bool = True,
    ) -> None:  # fmt: skip
        self.runner = runner
        self.mlp: MLPSpeculator | None = None
        if mlp_dir:
            # On CPU the tiny speculator runs in float32: unpacked bf16 matmuls are the slow path there.
            dtype = torch.float32 if loaded.device.type == "cpu" else loaded.dtype
            self.mlp = draft_vocab.load_speculator(mlp_dir, loaded.model, dtype, loaded.device)
            if loaded.device.type == "cpu":
                self.mlp.pack_for_cpu()
        self.ngram = NgramSpeculator() if use_ngram else None
        self.max_ngram_tokens = max_ngram_tokens
        max_tokens = max(self.mlp.n_predict if self.mlp else 0, max_ngram_tokens if use_ngram else 0)
        # IBM's gate (batch <= 16) assumes a GPU, where verifying extra tokens is nearly free until the
        # batch fills the card. On CPU a step's cost grows with every verified token: measured with
        # `python -m benchmarks.bench`, speculation pays at batch 1-2 and costs throughput from batch 8 on.
        max_batch = max_batch_size or (16 if loaded.device.type == "cuda" else 2)
        # The widest tree: IBM's n_candidates paths (or a fixed width beyond, a wider beam), or in draft nodes
        # a fixed width or what pays where verified tokens are nearly free (GPU) or cost ~4 % each (CPU).
        self.tree = tree
        if not self.mlp:
            pool = 1
        elif tree == "paths":
            pool = max(self.mlp.config.n_candidates, tree_width or 0)
        else:
            pool = tree_width or (64 if loaded.device.type == "cuda" else 12)
        self.pool = pool
        # On CUDA the node proposal replays as one graph (launching its ~100 kernels from Python costs more).
        self.graphed = None
        if self.mlp is not None and tree == "nodes" and loaded.device.type == "cuda" and cuda_graphs:
            dtype = next(self.mlp.parameters()).dtype
            self.graphed = GraphedNodeRanker(self.mlp, pool, range(1, max_batch + 1), loaded.device, dtype)
        gating = GatingConfig(max_tokens=max_tokens, max_batch_size=max_batch, max_candidates=pool)
        self.policy = SpeculationPolicy(gating)
        # Tree width from measured step costs (CPU: each verified token costs ~4 % of a step at 135M; GPU:
        # nearly free) and retrospective acceptance; see tree_width.py.
        self.step_cost = StepCost(prior=0.04 if loaded.device.type == "cpu" else 0.002)
        self.width = TreeWidth(pool)
        self.fixed_width = tree_width
        self.trees: dict[str, DraftTree] = {}
        self.paths: dict[str, tuple[list[list[int]], list[list[int]]]] = {}  # (n-gram, ranked MLP) per tree
        self.stats = SpecStats(accepted_per_position=[0] * max_tokens)
        runner.keep_hidden = self.mlp is not None

    # ---- before the step --------------------------------------------------------------------------
    def propose(self, running: list[Sequence], kv_usage: float) -> None:
        """Attach a draft tree to each running sequence worth speculating on this step."""
        self.trees.clear()
        self.paths.clear()
        if not self.policy.should_speculate(len(running), kv_usage):
            return
        # Decoding sequences only: a prefill chunk has nothing to speculate from yet.
        eligible = [s for s in running if s.params.speculate and s.num_uncomputed_tokens == 1 and s.num_output_tokens]
        depth = {s.request_id: self.policy.num_tokens(s.request_id) for s in eligible}
        eligible = [s for s in eligible if depth[s.request_id] > 0]
        if not eligible:
            return
        self.policy.cost_per_token = self.step_cost.cost_per_token
        paths: dict[str, list[list[int]]] = {s.request_id: [] for s in eligible}
        if self.ngram is not None:
            for s in eligible:
                k = min(depth[s.request_id] + 1, self.max_ngram_tokens)
                draft = self.ngram.propose(s.request_id, s.token_ids, k)
                if draft:
                    paths[s.request_id].append(draft)
        fixed = {rid: list(p) for rid, p in paths.items()}
        if self.mlp is not None:
            with_hidden = [s for s in eligible if s.request_id in self.runner.last_hidden]
            if with_hidden:
                heads = min(self.mlp.n_predict, max(depth[s.request_id] for s in with_hidden))
                dtype = next(self.mlp.parameters()).dtype
                hidden = torch.stack([self.runner.last_hidden[s.request_id] for s in with_hidden]).to(dtype)
                last = torch.tensor([s.token_ids[-1] for s in with_hidden], device=hidden.device)
                n_cand = self.policy.num_candidates(len(running))
                if self.tree == "nodes":
                    # The load-based width shrinks to one path under load; in nodes, one chain of full depth.
                    n_cand = max(n_cand, heads)
                if self.fixed_width is None:
                    n_cand = self.width.choose(self.step_cost.cost_per_token, n_cand)
                else:
                    n_cand = min(n_cand, self.fixed_width)
                depths = [depth[s.request_id] for s in with_hidden]
                # The whole pool is ranked (the top n_cand are verified) so that every width gets measured.
                for s, candidates in zip(with_hidden, self._mlp_ranked(hidden, last, heads, depths), strict=True):
                    if self.tree == "paths":
                        candidates = [r[: depth[s.request_id]] for r in candidates]
                    ranked = candidates[:n_cand]
                    if self.tree == "nodes" and ranked:  # already within the request's depth
                        # The best deepest node's path first: it takes the slots right after the root.
                        paths[s.request_id].append(max(ranked, key=len))
                    paths[s.request_id] += ranked
                    self.paths[s.request_id] = (fixed[s.request_id], candidates)
        for s in eligible:
            if paths[s.request_id]:
                tree = build_tree(paths[s.request_id])
                self.trees[s.request_id] = tree
                s.draft_token_ids = list(tree.tokens)

    def _mlp_ranked(
        self, hidden: torch.Tensor, last: torch.Tensor, heads: int, depths: list[int]
    ) -> list[list[list[int]]]:
        # Per sequence, the MLP's pool of draft paths best first: whole paths (IBM) or single nodes as paths.
        assert self.mlp is not None
        if self.tree == "nodes":
            if self.graphed is not None:
                return self.graphed(hidden, last, depths)
            return propose_nodes(self.mlp, hidden, last, self.pool, num_heads=heads, max_depth=depths)
        top_k = beam_top_k(self.mlp.config.top_k_tokens_per_head, self.mlp.config.n_candidates, self.pool)
        return propose_paths(self.mlp, hidden, last, top_k, n_candidates=self.pool, num_heads=heads)[0].tolist()

    def tree_for(self, sched: ScheduledSeq) -> DraftTree | None:
        """The (possibly cut) tree the scheduler let this sequence verify, or None."""
        tree = self.trees.get(sched.seq.request_id)
        if tree is None or sched.num_draft_tokens == 0:
            return None
        return tree if sched.num_draft_tokens == tree.num_nodes else truncate(tree, sched.num_draft_tokens)

    # ---- after the pass ---------------------------------------------------------------------------
    def verify(self, sched: ScheduledSeq, tree: DraftTree, logits: torch.Tensor) -> tuple[list[int], int]:
        """Accept a path of the tree from logits [num_nodes + 1, vocab].

        Returns the tokens to append (accepted drafts + the base model's own) and the tree row of the last
        accepted node (0 = the root), whose hidden state feeds the next proposal.
        """
        seq = sched.seq
        if seq.params.is_greedy:
            acc = accept_greedy(tree, logits.argmax(-1).tolist())
        elif seq.params.seed is not None:
            # Seeded: sample every row with the generator plain decoding would use for that position and
            # keep the child that matches. For point-mass drafts this is rejection sampling in coupled form
            # (accept x with probability p(x); on a miss the token is distributed as p without x), and the
            # output equals the non-speculative one token for token.
            p = seq.num_tokens  # the position the root's successor will take
            gens = [self.runner.generator_for(seq, p + d) for d in tree.position_offsets]
            targets = [int(sample(logits[r : r + 1], [seq.params], [g])) for r, g in enumerate(gens)]
            acc = accept_greedy(tree, targets)
        else:
            probs = probs_from_logits(logits, [seq.params] * logits.shape[0])
            acc = accept_sampled(tree, probs, None)
        self._move_accepted_kv(seq, tree, acc)
        self._record(seq, tree, acc)
        emitted = accepted_tokens(tree, acc)
        if seq.request_id in self.paths:
            self.width.record(*self.paths[seq.request_id], emitted)
        return emitted, acc.accepted_rows[-1] if acc.accepted_rows else 0

    def _move_accepted_kv(self, seq: Sequence, tree: DraftTree, acc: Acceptance) -> None:
        # Node row r sits at position p + r in the pages; its path position is p + depth.
        p = seq.num_computed_tokens  # the root's position (KV computed this pass)
        moves = [(p + r, p + i + 1) for i, r in enumerate(acc.accepted_rows) if r != i + 1]
        if moves:
            slot = self.runner.slot_of
            self.runner.move_kv([slot(seq, a) for a, _ in moves], [slot(seq, b) for _, b in moves])

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

    def finish(self, seq: Sequence) -> None:
        self.policy.release(seq.request_id)
        if self.ngram is not None:
            self.ngram.release(seq.request_id)
            if seq.num_output_tokens > 0:
                self.ngram.observe_reply(seq.output_token_ids)


def truncate(tree: DraftTree, num_nodes: int) -> DraftTree:
    """The first num_nodes nodes of a tree (parents always precede children, so this is a tree)."""
    children = [[c for c in row if c <= num_nodes] for row in tree.children[: num_nodes + 1]]
    return DraftTree(tree.tokens[:num_nodes], tree.parents[:num_nodes], tree.depths[:num_nodes], children)
