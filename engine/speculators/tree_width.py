"""How wide a draft tree pays, measured while serving.

IBM's candidate tree (top-k [5, 4, 3], 5 paths) is sized for a GPU, where verifying 15 extra query tokens
costs about as much as verifying one. On a CPU every verified token costs compute: for SmolLM2-135M on one
core a 16-token pass takes about 1.6x a plain step, so the fifth candidate path rarely earns its nodes.
Rather than fixing a width per device, the engine measures both sides of the trade:

* `StepCost` fits the wall time of single-sequence steps against the query tokens they verify,
  t = a + b (tokens - 1), giving c = b / a: the cost of one extra verified token relative to a plain step.
* `TreeWidth` knows, after every verification, how many tokens the top-m candidates alone would have
  accepted for every m up to the number verified (the accepted path plus the base model's own token is the
  true continuation up to the first mismatch, so any path's accepted prefix is its common prefix with it).
  A candidate is a whole path (IBM's tree) or one draft node given as its path (`propose_nodes`, where the
  top m nodes are themselves the best m-node tree), so m counts paths or nodes.
  It keeps moving averages of tokens per step E_m and tree size N_m, and picks the m maximizing
  E_m / (1 + c N_m); every `probe_interval`-th step verifies the full width so wider trees stay measured.

Output never depends on this: every candidate is verified exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.speculators.tree import common_prefix


class StepCost:
    """Online least squares of step seconds against verified tokens, with exponential forgetting."""

    def __init__(self, prior: float, decay: float = 0.98, min_spread: float = 2.0):
        self.prior, self.decay, self.min_spread = prior, decay, min_spread
        self._w = self._x = self._y = self._xx = self._xy = 0.0

    def record(self, tokens: int, seconds: float) -> None:
        d, x = self.decay, float(tokens - 1)
        self._w, self._x, self._y = d * self._w + 1, d * self._x + x, d * self._y + seconds
        self._xx, self._xy = d * self._xx + x * x, d * self._xy + x * seconds

    @property
    def cost_per_token(self) -> float:
        """c = b / a; the prior until the recent steps vary enough in size (std >= min_spread tokens)."""
        if self._w < 10:
            return self.prior
        mx, my = self._x / self._w, self._y / self._w
        var = self._xx / self._w - mx * mx
        if var < self.min_spread**2:
            return self.prior
        b = (self._xy / self._w - mx * my) / var
        a = my - b * mx
        return self.prior if a <= 0 else min(max(b / a, 0.0), 1.0)


class TreeWidth:
    """Chooses how many MLP candidates (paths or nodes) to verify from retrospective acceptance (module doc)."""

    def __init__(self, max_candidates: int, probe_interval: int = 8, decay: float = 0.95):
        self.max_candidates, self.probe_interval, self.decay = max_candidates, probe_interval, decay
        self._tokens = [0.0] * (max_candidates + 1)  # index m: moving sums for the top-m tree
        self._nodes = [0.0] * (max_candidates + 1)
        self._weight = [0.0] * (max_candidates + 1)
        self._steps = 0

    def choose(self, cost_per_token: float, limit: int) -> int:
        """Candidates to verify this step (<= limit, e.g. the load-based width)."""
        self._steps += 1
        limit = min(limit, self.max_candidates)
        if limit <= 1 or self._steps % self.probe_interval == 0:
            return limit
        best, best_gain = limit, -1.0
        for m in range(1, limit + 1):
            w = self._weight[m]
            if w == 0:
                return limit  # not measured yet: explore at full width
            gain = (self._tokens[m] / w) / (1 + cost_per_token * self._nodes[m] / w)
            if gain > best_gain + 1e-9:
                best, best_gain = m, gain
        return best

    def record(self, fixed: Sequence[Sequence[int]], ranked: Sequence[Sequence[int]], emitted: Sequence[int]) -> None:
        """After a verification: `fixed` paths always in the tree (the n-gram draft), `ranked` MLP candidates best
        first (the top len(ranked) were verified), `emitted` the accepted tokens plus the base model's own."""
        d = self.decay
        # The top-m tree grows by one path per m: keep its best match and node set incrementally (a 64-path
        # tree would otherwise rebuild 64 sets per step).
        best = max((common_prefix(p, emitted) for p in fixed), default=0)
        seen = {tuple(p[: i + 1]) for p in fixed for i in range(len(p))}
        for m, path in enumerate(ranked[: self.max_candidates], start=1):
            best = max(best, common_prefix(path, emitted))
            seen.update(tuple(path[: i + 1]) for i in range(len(path)))
            # Capped: a path matching past the verified part of a tree the scheduler cut proves nothing.
            accepted, nodes = min(best, len(emitted) - 1), len(seen)
            self._tokens[m] = d * self._tokens[m] + accepted + 1
            self._nodes[m] = d * self._nodes[m] + nodes
            self._weight[m] = d * self._weight[m] + 1

    def tokens_per_step(self, m: int) -> float | None:
        """Measured mean tokens per step with the top-m tree (None before any measurement)."""
        w = self._weight[m] if 0 < m <= self.max_candidates else 0.0
        return self._tokens[m] / w if w else None
