"""One request's grammar: which tokens may come next after its verified output, and after any draft path.

The state always stands after the request's verified tokens (`advance`). Everything else walks forward from
there and rolls back before returning, so it leaves the state as it found it:

    allowed_rows  the mask for each row of a pass (a plain row: path []; tree row r: the drafts root..r)
    prune         drops draft nodes the grammar forbids after their parent (and their subtrees) before the
                  tree is scheduled, so the pass verifies no node that could never be accepted
    forced_tokens jump-forward: while the mask allows exactly one token, that token. Plain decoding, greedy
                  or sampled, could only pick it, so appending it without a model step changes no output.
    prefetch      allowed_rows for the coming pass, computed in a worker thread while the model runs

Since a row's mask is a function of the verified tokens and its own path only, masked speculation is
lossless: each row's distribution is the one constrained plain decoding would use at that position.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, ParamSpec, TypeVar

import numpy as np
import torch
from torch import Tensor

from specdesk.engine.speculators.tree import DraftTree, build_tree, common_prefix

if TYPE_CHECKING:
    import llguidance

MAX_FORCED_TOKENS = 32  # jump-forward per step at most (a long forced run is then computed in chunks)


class Walk(Enum):
    """Where a walk along a path ended."""

    OK = "ok"  # after the whole path
    ENDED = "ended"  # the path closes with an EOS the grammar allows there: only EOS may follow
    REJECTED = "rejected"  # some token of the path is not allowed after the ones before it


@dataclass
class GrammarStats:
    """Totals over every request of one compiler: what the grammar costs and what jump-forward saves."""

    busy_s: float = 0.0  # wall time in masks, pruning, advancing and jump-forward (the engine thread's)
    overlapped_s: float = 0.0  # wall time of masks computed in a worker while the model ran
    num_masked_rows: int = 0
    num_prefetched_rows: int = 0  # of them computed while the model ran
    num_pruned_nodes: int = 0
    num_forced_tokens: int = 0  # jump-forward tokens the engine appended


P = ParamSpec("P")
R = TypeVar("R")


def _timed(method: Callable[P, R]) -> Callable[P, R]:
    """Adds the call's wall time to the state's stats.busy_s (the grammar's overhead per step)."""

    @functools.wraps(method)
    def timed(*args: P.args, **kwargs: P.kwargs) -> R:
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            state = args[0]
            assert isinstance(state, GrammarState), state
            state.stats.busy_s += time.perf_counter() - start

    return timed


@dataclass(frozen=True)
class Vocabulary:
    """The tokenizer as llguidance sees it; `size` ids (the model's vocabulary may be larger)."""

    tokenizer: llguidance.LLTokenizer
    size: int
    eos_token_ids: frozenset[int]


class GrammarState:
    """A request's grammar matcher, standing after its verified output tokens (Sequence.grammar)."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab: Vocabulary, stats: GrammarStats | None = None) -> None:
        self._matcher = matcher
        self._vocab = vocab
        self._walked: list[int] = []  # tokens consumed past the verified state by the current walk
        self.stats = stats if stats is not None else GrammarStats()  # shared by the compiler's states
        self.is_terminated = False  # an EOS was consumed: the output is complete
        self._pending: Future[tuple[list[list[int]], int, np.ndarray]] | None = None  # see prefetch

    # ---- masks for the rows of a pass (logits_processors.process_rows) ---------------------------------
    @_timed
    def allowed_rows(self, paths: list[list[int]], vocab_size: int) -> Tensor:
        """bool [len(paths), vocab_size]: row i allows token t iff the grammar accepts t after paths[i].

        Ids past the tokenizer's vocabulary are never allowed; EOS exactly where the grammar may end, and
        after a path that ends with EOS only EOS (as a matcher past its end). A path the grammar rejects
        somewhere cannot be reached (its parent row forbids the token), so its row allows every token: any
        finite row is right there, and an empty one would poison sampling.
        """
        done = self._settle()
        if done is not None and done[0] == paths and done[1] == vocab_size:
            rows = done[2]
            self.stats.num_prefetched_rows += len(paths)
        else:
            rows = self._rows(paths, vocab_size)
        self.stats.num_masked_rows += len(paths)
        return torch.from_numpy(rows)

    # ---- overlap with the forward pass ----------------------------------------------------------------
    def prefetch(self, tree: DraftTree | None, vocab_size: int, pool: Executor) -> None:
        """Start this pass's rows (the root's, then each node's of `tree`) in `pool` while the model runs:
        they depend on the verified tokens and the tree only, and llguidance computes masks without the GIL.
        `allowed_rows` with the same paths takes the result; every other method first waits for it, so
        the matcher is never used by two threads at once."""
        self._settle()
        paths = tree.row_paths() if tree is not None else [[]]
        self._pending = pool.submit(self._prefetched, paths, vocab_size)

    def _prefetched(self, paths: list[list[int]], vocab_size: int) -> tuple[list[list[int]], int, np.ndarray]:
        start = time.perf_counter()
        try:
            return paths, vocab_size, self._rows(paths, vocab_size)
        finally:
            self.stats.overlapped_s += time.perf_counter() - start

    def _settle(self) -> tuple[list[list[int]], int, np.ndarray] | None:
        """Wait for a prefetch; its result, or None (none, or it failed: the caller computes afresh and so
        raises the error in its own thread)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        try:
            return pending.result()
        except Exception:
            return None

    def _rows(self, paths: list[list[int]], vocab_size: int) -> np.ndarray:
        """allowed_rows as numpy, computed now."""
        bitmask = self._new_bitmask(len(paths))
        walks = []
        try:
            for i, path in enumerate(paths):
                walks.append(self._walk(path))
                if walks[-1] == Walk.OK:
                    self._fill(bitmask, i)
        finally:
            self._unwalk()
        rows = self._to_bool(bitmask, vocab_size)
        for i, walk in enumerate(walks):
            if walk == Walk.ENDED:  # what a matcher past its end allows: EOS again
                rows[i] = False
                rows[i, [t for t in self._vocab.eos_token_ids if t < vocab_size]] = True
            elif walk == Walk.REJECTED:
                rows[i, : min(self._vocab.size, vocab_size)] = True
        empty = np.flatnonzero(~rows.any(axis=1))
        if len(empty):
            raise RuntimeError(f"the grammar allows no token after path {paths[empty[0]]}: {self.error}")
        return rows

    # ---- speculation ----------------------------------------------------------------------------------
    @_timed
    def prune(self, tree: DraftTree) -> DraftTree | None:
        """The tree without the nodes the grammar forbids after their parent, nor their subtrees.

        Returns the same tree when everything is allowed, None when nothing is. Otherwise the surviving
        root-to-leaf paths, in their original order, are merged again with `build_tree`, which keeps the
        tree's invariants (parents before children, the first path in rows 1..len).
        """
        self._settle()
        keep = [True] * (tree.num_nodes + 1)
        try:
            for row in range(1, tree.num_nodes + 1):
                parent = tree.parents[row - 1]
                walk = self._walk([tree.token(r) for r in tree.path_to(row)]) if keep[parent] else Walk.REJECTED
                keep[row] = walk != Walk.REJECTED  # an EOS node stays; its children are rejected walks
        finally:
            self._unwalk()
        if all(keep):
            return tree
        self.stats.num_pruned_nodes += keep.count(False)
        paths = []
        for leaf in range(1, tree.num_nodes + 1):
            if tree.children[leaf]:
                continue
            rows = tree.path_to(leaf)
            alive = next((i for i, r in enumerate(rows) if not keep[r]), len(rows))
            if alive:
                paths.append([tree.token(r) for r in rows[:alive]])
        return build_tree(paths) if paths else None

    # ---- verified tokens ------------------------------------------------------------------------------
    @_timed
    def advance(self, tokens: list[int]) -> None:
        """Move the state past verified tokens (each must be allowed: the sampler masked it)."""
        self._settle()
        assert not self._walked, self._walked
        for token in tokens:
            if self.is_terminated:
                continue  # past the end (ignore_eos): the engine finishes the request
            if not self._matcher.consume_token(token):
                raise ValueError(f"token {token} does not match the grammar: {self.error}")
            self.is_terminated = token in self._vocab.eos_token_ids

    @_timed
    def forced_tokens(self, max_tokens: int = MAX_FORCED_TOKENS) -> list[int]:
        """The tokens the grammar forces next (each the only one its mask allows), at most max_tokens.

        llguidance's own fast-forward tokens say cheaply whether anything is forced; each candidate is then
        checked against the full mask, so only a sole allowed token is ever forced (a grammar that ends
        with a single EOS id forces it, too).
        """
        self._settle()
        m = self._matcher
        if self.is_terminated or m.is_error() or (not m.is_stopped() and not m.compute_ff_tokens()):
            return []
        forced: list[int] = []
        bitmask = self._new_bitmask(1)
        try:
            while len(forced) < max_tokens:
                self._fill(bitmask, 0)
                token = self._sole_token(bitmask)
                if token is None:
                    break
                walk = self._walk([*self._walked, token])
                if walk != Walk.REJECTED:
                    forced.append(token)
                if walk != Walk.OK:  # EOS ends the output (or the matcher disagreed with its own mask)
                    break
        finally:
            self._unwalk()
        return forced

    @property
    def error(self) -> str:
        """The matcher's error, first line (llguidance appends a dump of its whole state)."""
        lines = self._matcher.get_error().strip().splitlines()
        return lines[0][:300] if lines else "no token can follow"

    # ---- walking and masks ----------------------------------------------------------------------------
    def _walk(self, path: list[int]) -> Walk:
        """Stand after `path` (from the verified state), reusing the common prefix of the last walk.

        A token is only consumed once known to be allowed, so the matcher never enters its sticky error
        state. An EOS is never consumed on a walk (llguidance 1.9 cannot take one back: the matcher rejects
        everything after rolling it back); where the grammar may end it is allowed as a path's last token.
        """
        shared = common_prefix(self._walked, path)
        if len(self._walked) > shared:
            ok = self._matcher.rollback(len(self._walked) - shared)
            assert ok, (self._walked, shared, self.error)
            del self._walked[shared:]
        m = self._matcher
        for i in range(shared, len(path)):
            token = path[i]
            if token in self._vocab.eos_token_ids:
                return Walk.ENDED if i == len(path) - 1 and m.is_accepting() else Walk.REJECTED
            if m.try_consume_tokens([token]) != 1:
                return Walk.REJECTED
            self._walked.append(token)
        return Walk.OK

    def _unwalk(self) -> None:
        """Back to the verified state."""
        if self._walked:
            ok = self._matcher.rollback(len(self._walked))
            assert ok, (self._walked, self.error)
            self._walked.clear()

    def _new_bitmask(self, num_rows: int) -> np.ndarray:
        """int32 [num_rows, words]: bit b of word w allows token 32w + b (llguidance's layout).

        numpy, not llguidance.torch: importing that module compiles a torch function (seconds, once), and
        torch would split these small host-side ops across its threads, which on a busy CPU makes each op
        wait for every thread (milliseconds instead of microseconds)."""
        return np.zeros((num_rows, (self._vocab.size + 31) // 32), dtype=np.int32)

    def _fill(self, bitmask: np.ndarray, row: int) -> None:
        target = bitmask[row]
        self._matcher.unsafe_compute_mask_ptr(target.ctypes.data, target.nbytes)

    def _to_bool(self, bitmask: np.ndarray, vocab_size: int) -> np.ndarray:
        """int32 [n, words] -> bool [n, vocab_size] (little-endian words: byte k of word w holds tokens
        32w + 8k ..)."""
        bits = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little").view(bool)
        width = min(self._vocab.size, vocab_size)
        rows = np.zeros((bitmask.shape[0], vocab_size), dtype=bool)
        rows[:, :width] = bits[:, :width]
        return rows

    def _sole_token(self, bitmask: np.ndarray) -> int | None:
        """The one token row 0 allows, or None if it allows several (or none)."""
        words = bitmask[0]
        nonzero = np.flatnonzero(words)
        if len(nonzero) != 1:
            return None
        word = int(words[nonzero[0]]) & 0xFFFFFFFF
        if word & (word - 1):  # more than one bit
            return None
        token = int(nonzero[0]) * 32 + word.bit_length() - 1
        return token if token < self._vocab.size else None
