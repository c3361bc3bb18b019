"""The draft tree: candidate paths merged into a trie, laid out for one verification pass.

Rows of the verification pass for one sequence (row r is query token r):

    row 0      the root: the base model's own last sampled token t at position p (KV not yet computed)
    row r >= 1 draft node r, token tokens[r - 1], at position p + depths[r - 1], parent row parents[r - 1]

Paths that share a prefix share its nodes, so the pass verifies each distinct prefix once. The first path
(the best one) occupies rows 1..len(path) in depth order: when it wins, its K/V already sits in the first
slots after p and nothing has to be moved. Row r may attend to exactly its ancestors and itself:

    mask[r, c] = (c == r) or c is an ancestor of r        (bool [num_nodes + 1, num_nodes + 1])

which is `AttentionMetadata.tree_mask` for this sequence's rows (every row also sees all verified context).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class DraftTree:
    """A trie of draft tokens under the root token. Per-node lists skip the root: row r is index r - 1."""

    tokens: list[int]  # draft token of rows 1..num_nodes
    parents: list[int]  # parent row of rows 1..num_nodes (0 = the root)
    depths: list[int]  # depth of rows 1..num_nodes (children of the root have depth 1)
    children: list[list[int]] = field(default_factory=list)  # child rows of every row 0..num_nodes, in order

    @property
    def num_nodes(self) -> int:
        """Draft nodes, root excluded; the pass verifies num_nodes + 1 query tokens."""
        return len(self.tokens)

    @property
    def max_depth(self) -> int:
        return max(self.depths, default=0)

    @property
    def position_offsets(self) -> list[int]:
        """Position of row r minus the root's position p: [0] + depths."""
        return [0, *self.depths]

    def token(self, row: int) -> int:
        """Draft token of a row >= 1."""
        assert 1 <= row <= self.num_nodes, (row, self.num_nodes)
        return self.tokens[row - 1]

    def path_to(self, row: int) -> list[int]:
        """Rows from depth 1 down to `row` (empty for the root)."""
        rows: list[int] = []
        while row != 0:
            rows.append(row)
            row = self.parents[row - 1]
        return rows[::-1]

    def row_paths(self) -> list[list[int]]:
        """The draft tokens each row adds after the root: [] for the root, then each node's root-to-node path
        (row r decides the position after them)."""
        return [[]] + [[self.token(r) for r in self.path_to(row)] for row in range(1, self.num_nodes + 1)]

    def mask_array(self) -> np.ndarray:
        """bool [num_nodes + 1, num_nodes + 1]: row r sees itself and its ancestors (root row included)."""
        size = self.num_nodes + 1
        m = np.eye(size, dtype=bool)
        rows = np.arange(size)
        parent = np.array([0, *self.parents])  # the root is its own parent
        ancestor = rows
        # One vectorised hop per level instead of a row copy per node (a GPU tree has many); in numpy, since on
        # arrays this small each torch op's dispatch costs more than its work, and a CPU step builds one a step.
        for _ in range(self.max_depth):
            ancestor = parent[ancestor]
            m[rows, ancestor] = True
        return m

    def mask(self, device: torch.device | str | None = None) -> torch.Tensor:
        """`mask_array` as a torch tensor (on `device` if given)."""
        m = torch.from_numpy(self.mask_array())
        return m.to(device) if device is not None else m


def build_tree(paths: Sequence[Sequence[int]], max_nodes: int | None = None) -> DraftTree:
    """Merge draft paths (each the tokens after the root, best path first) into a trie.

    Paths may differ in length (an n-gram proposal next to MLP candidates) and may repeat prefixes;
    only new suffixes add nodes. max_nodes caps the tree: a path that does not fit is cut.
    """
    tokens: list[int] = []
    parents: list[int] = []
    depths: list[int] = []
    children: list[list[int]] = [[]]
    # (parent row, token) -> row: the trie edges.
    edges: dict[tuple[int, int], int] = {}
    for path in paths:
        row = 0
        for depth, token in enumerate(path, start=1):
            child = edges.get((row, int(token)))
            if child is None:
                if max_nodes is not None and len(tokens) >= max_nodes:
                    break
                tokens.append(int(token))
                parents.append(row)
                depths.append(depth)
                children.append([])
                child = len(tokens)
                edges[(row, int(token))] = child
                children[row].append(child)
            row = child
    return DraftTree(tokens, parents, depths, children)


def truncate(tree: DraftTree, num_nodes: int) -> DraftTree:
    """The first num_nodes nodes of a tree (parents always precede children, so this is a tree)."""
    if num_nodes == tree.num_nodes:
        return tree
    children = [[c for c in row if c <= num_nodes] for row in tree.children[: num_nodes + 1]]
    return DraftTree(tree.tokens[:num_nodes], tree.parents[:num_nodes], tree.depths[:num_nodes], children)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
