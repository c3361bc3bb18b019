"""How wide a draft tree pays, measured while serving.

IBM's candidate tree (top-k [5, 4, 3], 5 paths) is sized for a GPU, where verifying 15 extra query tokens
costs about as much as verifying one. On a CPU every verified token costs compute, so a 16-token pass
costs clearly more than a plain step and the last candidate paths rarely earn their nodes.
Rather than fixing a width per device, the engine measures both sides of the trade:

* `StepCost` fits the wall time of single-sequence steps against the query tokens they verify,
  t = a + b (tokens - 1), giving c = b / a: the cost of one extra verified token relative to a plain step.
* `TreeWidth` knows, after every verification, how many tokens the top-m candidates alone would have
  accepted for every m (the accepted path plus the base model's own token is the true continuation up to
  the first mismatch, so any path's accepted prefix is its common prefix with it). The engine ranks the full
  pool of candidates and verifies the top m, so the wider trees it did not verify are measured too: a path
  matching the whole known continuation is credited that much, a lower bound. (On a CPU, where the MLP may
  rest, it records the pool on one MLP step in four, `decoder.MEASURE_EVERY`; the C kernels' ranker ranks only
  what it verifies on the others.)
  A candidate is a whole path (IBM's tree) or one draft node given as its path (`propose_nodes`, where the
  top m nodes are themselves the best m-node tree), so m counts paths or nodes.
  It keeps moving averages of tokens per step E_m and tree size N_m, and picks the m maximizing
  E_m / (1 + c N_m). Where no candidate at all is a choice (the CPU path), the decoder compares that m's
  predicted rate, E_m over StepCost's fitted seconds for 1 + N_m tokens, with the measured steps without the
  MLP: a is then the intercept of the MLP's own steps, not a plain step, so 1 / (1 + 0) is no baseline.

Output never depends on this: every candidate is verified exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

from specdesk.engine.speculators.tree import common_prefix


class StepCost:
    """Online least squares of step seconds against verified tokens, with exponential forgetting."""

    def __init__(
        self, prior: float, decay: float = 0.98, min_spread: float = 2.0, outlier_factor: float = 4.0,
        burn_in: int = 3, max_outliers: int = 5,
    ) -> None:  # fmt: skip
        self.prior, self.decay, self.min_spread, self.outlier_factor = prior, decay, min_spread, outlier_factor
        self.burn_in, self.max_outliers = burn_in, max_outliers
        self._w = self._x = self._y = self._xx = self._xy = 0.0
        self._seen = self._outliers = 0

    def record(self, tokens: int, seconds: float) -> None:
        # A step several times the mean is not the tokens' cost: a Triton kernel compiling for a new tree
        # size (on a GPU, far longer than a step), a garbage collection. One such step would set the fitted slope
        # for hundreds of steps (it decays by 0.98 a step), so it is left out; the first few steps (where
        # compiles cluster) are not fitted at all. A cost that really rose (a busier machine) shows as
        # outliers in a row: after `max_outliers` of them the fit starts over from the new level.
        self._seen += 1
        if self._seen <= self.burn_in:
            return
        if self._w >= 5 and seconds > self.outlier_factor * self._y / self._w:
            self._outliers += 1
            if self._outliers < self.max_outliers:
                return
            self._w = self._x = self._y = self._xx = self._xy = 0.0
        self._outliers = 0
        d, x = self.decay, float(tokens - 1)
        self._w, self._x, self._y = d * self._w + 1, d * self._x + x, d * self._y + seconds
        self._xx, self._xy = d * self._xx + x * x, d * self._xy + x * seconds

    @property
    def weight(self) -> float:
        """The fitted steps' total weight (older steps count less)."""
        return self._w

    def fitted(self) -> tuple[float, float] | None:
        """(a, b) by least squares, or None until the recent steps vary enough in size (std >= min_spread tokens)."""
        if self._w < 10:
            return None
        mx, my = self._x / self._w, self._y / self._w
        var = self._xx / self._w - mx * mx
        if var < self.min_spread**2:
            return None
        b = (self._xy / self._w - mx * my) / var
        a = my - b * mx
        return (a, min(max(b, 0.0), a)) if a > 0 else None

    def fit(self) -> tuple[float, float] | None:
        """(a, b): the fitted seconds of a one-token step and of each token more; None before any step is fitted.
        Until `fitted` has a slope, b is the prior's share of a."""
        if self._w == 0:
            return None
        fitted = self.fitted()
        if fitted is not None:
            return fitted
        a = self._y / self._w / (1 + self.prior * self._x / self._w)
        return a, self.prior * a

    def seconds(self, tokens: float) -> float | None:
        """The fitted seconds of a step verifying `tokens` query tokens (None before any step is fitted)."""
        fit = self.fit()
        return None if fit is None else fit[0] + fit[1] * (tokens - 1)

    @property
    def cost_per_token(self) -> float:
        """c = b / a; the prior until the recent steps vary enough in size (std >= min_spread tokens)."""
        fit = self.fit()
        return self.prior if fit is None else fit[1] / fit[0]


class TreeWidth:
    """Chooses how many MLP candidates (paths or nodes) to verify from retrospective acceptance (module doc).

    allow_none: width 0 (no MLP candidate: a plain step unless the n-gram drafts) is a choice too, taken when
    no measured width beats a plain step's one token per unit cost. The engine allows it on a CPU (SpecConfig.rest),
    where a verified token costs a sizeable part of a step; candidates are still ranked every step, so acceptance keeps
    being measured and speculation comes back when it pays again.
    """

    def __init__(self, max_candidates: int, decay: float = 0.95, allow_none: bool = False):
        self.max_candidates, self.decay, self.allow_none = max_candidates, decay, allow_none
        self._tokens = [0.0] * (max_candidates + 1)  # index m: moving sums for the top-m tree
        self._nodes = [0.0] * (max_candidates + 1)
        self._weight = [0.0] * (max_candidates + 1)

    def choose(self, cost_per_token: float, limit: int, allow_none: bool | None = None) -> int:
        """Candidates to verify this step (<= limit, e.g. the load-based width); allow_none overrides the
        instance's (False: the best width of at least one, however poor)."""
        limit = min(limit, self.max_candidates)
        if limit <= 1:
            return limit
        none = self.allow_none if allow_none is None else allow_none
        best, best_gain = (0, 1.0) if none else (limit, -1.0)
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
        first (verified or not), `emitted` the accepted tokens plus the base model's own."""
        d = self.decay
        # The top-m tree grows by one path per m: keep its best match and node set incrementally (a 64-path
        # tree would otherwise rebuild 64 sets per step).
        best = max((common_prefix(p, emitted) for p in fixed), default=0)
        seen = {tuple(p[: i + 1]) for p in fixed for i in range(len(p))}
        for m in range(1, self.max_candidates + 1):
            # A pool of fewer than m candidates (a ranking that left the unlikely ones out) is its own top-m tree.
            path = ranked[m - 1] if m <= len(ranked) else []
            best = max(best, common_prefix(path, emitted))
            seen.update(tuple(path[: i + 1]) for i in range(len(path)))
            # emitted is all that is known of the continuation: a path matching all of it (one the tree did
            # not hold) would accept at least that much and is credited exactly that, a lower bound.
            accepted, nodes = min(best, len(emitted)), len(seen)
            self._tokens[m] = d * self._tokens[m] + accepted + 1
            self._nodes[m] = d * self._nodes[m] + nodes
            self._weight[m] = d * self._weight[m] + 1

    def tokens_per_step(self, m: int) -> float | None:
        """Measured mean tokens per step with the top-m tree (None before any measurement)."""
        w = self._weight[m] if 0 < m <= self.max_candidates else 0.0
        return self._tokens[m] / w if w else None

    def nodes_per_step(self, m: int) -> float | None:
        """Measured mean draft nodes of the top-m tree, the n-gram draft's included (None before any measurement)."""
        w = self._weight[m] if 0 < m <= self.max_candidates else 0.0
        return self._nodes[m] / w if w else None
