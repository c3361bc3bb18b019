"""The two shapes of the MLP speculator's draft tree, each a small strategy chosen once per engine.

* `NodeTree` (spec_tree="nodes", the default): the best draft nodes of the whole tree by path probability
  (EAGLE-2's selection; `candidates.propose_nodes`). The first m of its ranking are the best m-node tree.
* `PathTree` (spec_tree="paths"): IBM's best whole paths from a top-k-per-head beam (`candidates.propose`).

Both rank a fixed pool of candidates every step (so `TreeWidth` can measure every width from one
verification) and the decoder verifies the top `width` of them; what differs is how the pool is ranked,
how narrow a tree may get under load, and how the chosen candidates are ordered into the tree.
"""

from __future__ import annotations

import math

import torch

from specdesk.engine.config import SpecConfig
from specdesk.engine.speculators.candidates import Int8NodeRanker, beam_top_k, propose, propose_nodes
from specdesk.engine.speculators.cuda_graph import GraphedNodeRanker
from specdesk.engine.speculators.draft_penalty import DraftPenalty
from specdesk.engine.speculators.mlp import MLPSpeculator

Paths = list[list[int]]  # draft paths: the tokens after the root


class NodeTree:
    """Single draft nodes, each given as its path; `pool` nodes are ranked per step."""

    def __init__(self, mlp: MLPSpeculator, config: SpecConfig, device: torch.device) -> None:
        self.mlp, self.pool = mlp, config.node_pool_size
        # On the CPU int8 path the same ranking in fewer ops, with fused int8 weights (candidates.py).
        self.int8 = Int8NodeRanker(mlp, self.pool) if Int8NodeRanker.fits(mlp) else None
        # On CUDA the proposal replays as one graph per batch size (launching its kernels one by one from
        # Python costs more than running them); every batch size the gate admits is captured now.
        self.graphed: GraphedNodeRanker | None = None
        if config.cuda_graphs and device.type == "cuda":
            dtype = next(mlp.parameters()).dtype
            self.graphed = GraphedNodeRanker(mlp, self.pool, range(1, config.max_batch_size + 1), device, dtype)
        # Whether rank() applies a draft_penalty speculator's penalty (the CUDA graphs do not take one).
        self.penalized = mlp.config.draft_penalty and self.graphed is None

    def rank(self, hidden: torch.Tensor, last: torch.Tensor, heads: int, depths: list[int],
             penalty: DraftPenalty | None = None, nodes: int | None = None,
             min_prob: float = 0.0) -> list[Paths]:  # fmt: skip
        """Per sequence, the pool best first, every node within that sequence's depth. The CUDA graphs rank
        without the penalty (a draft_penalty speculator then proposes as if it had been trained without).
        nodes: rank only the best that many, the top of the pool's ranking; min_prob: leave out the nodes
        whose path probability under the speculator is below it (both the CPU int8 path's; the others rank
        the pool regardless)."""
        if self.graphed is not None:
            return self.graphed(hidden, last, depths)
        if self.int8 is not None:
            m = None if nodes is None else min(nodes, self.pool)
            return self.int8(hidden, last, heads, depths, penalty, m, math.log(min_prob) if min_prob > 0 else -math.inf)
        return propose_nodes(self.mlp, hidden, last, self.pool, num_heads=heads, max_depth=depths, penalty=penalty)

    def min_width(self, heads: int) -> int:
        """The load-based width shrinks to one path under load: in nodes, one chain of full depth."""
        return heads

    def select(self, ranked: Paths, width: int) -> Paths:
        """The top `width` nodes, the best deepest one's path first: it takes the slots right after the
        root, so when it is accepted no KV has to move."""
        top = ranked[:width]
        return [max(top, key=len), *top] if top else []


class PathTree:
    """IBM's whole candidate paths; `pool` = max(n_candidates, a fixed width) paths are ranked per step."""

    def __init__(self, mlp: MLPSpeculator, config: SpecConfig) -> None:
        self.mlp = mlp
        n_candidates = mlp.config.n_candidates
        self.pool = max(n_candidates, config.tree_width or 0)
        # A fixed width beyond n_candidates widens the beam, so the paths are picked from enough leaves.
        self.top_k = beam_top_k(mlp.config.top_k_tokens_per_head, n_candidates, self.pool)
        self.penalized = mlp.config.draft_penalty

    def rank(self, hidden: torch.Tensor, last: torch.Tensor, heads: int, depths: list[int],
             penalty: DraftPenalty | None = None, nodes: int | None = None,
             min_prob: float = 0.0) -> list[Paths]:  # fmt: skip
        """Per sequence, the pool best first, every path cut to that sequence's depth (always the whole pool)."""
        paths = propose(self.mlp, hidden, last, self.top_k, self.pool, heads, penalty)[0].tolist()
        return [[p[:depth] for p in row] for row, depth in zip(paths, depths, strict=True)]

    def min_width(self, heads: int) -> int:
        return 1

    def select(self, ranked: Paths, width: int) -> Paths:
        return ranked[:width]


TreeKind = NodeTree | PathTree


def make_tree_kind(mlp: MLPSpeculator, config: SpecConfig, device: torch.device) -> TreeKind:
    return NodeTree(mlp, config, device) if config.tree == "nodes" else PathTree(mlp, config)
