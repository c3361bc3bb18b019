"""What the MLP speculator adds, priced on the very steps it ran: each step against itself without the MLP.

On a CPU (where it runs: SpecConfig.rest) a verified node costs a fifth of a plain step (the C kernels, AVX2) and
ranking the MLP's pool a tenth or more, while beside an n-gram draft the MLP's nodes add a few hundredths to a few
tenths of a token a step (`benchmarks.ngram_matches`, steps by what they verified). The decoder's width policy
compares the MLP's steps with *other* steps, those taken while it rests, which draft differently; so it seldom rests
where it does not pay. This ledger compares each MLP step with the same step without the MLP, which is known exactly
after the pass:

* the tokens the MLP added: the step emitted `e` tokens; its n-gram draft alone (verified in the same pass)
  would have emitted its common prefix with them plus the base model's own token;
* what the MLP cost: its proposal's measured seconds plus its nodes off the n-gram draft's path at the fitted
  seconds per verified token (`tree_width.StepCost`).

The MLP pays while the steps' rate E / T is at least the rate without it, (E - A) / (T - C), over moving sums of
its steps (E emitted, A added, T seconds, C its cost). Where it does not, it rests, for twice as long each time
the verdict repeats (from MLP_REST_STEPS up to MAX_REST_STEPS), and its sums start over (as gating.MeasuredRest's
do): when it comes back, min_weight steps of its own judge it afresh, so text that turns predictable gets the MLP
back after one rest.
"""

from __future__ import annotations

from collections.abc import Sequence

from specdesk.engine.speculators.tree import DraftTree, common_prefix

# The longest rest the ledger orders (steps): where the MLP does not pay, ~10 steps of it in every ~250 (about
# a quarter of a step's time lost in each, on the AVX2 CPU), and where the text turns predictable the MLP is
# back within about two replies of 128 tokens.
MAX_REST_STEPS = 240


def tokens_added(emitted: Sequence[int], ngram_draft: Sequence[int]) -> int:
    """Tokens a step emitted beyond what its n-gram draft alone would have: that draft is accepted up to its
    common prefix with the emitted tokens, then the base model's own token follows."""
    return len(emitted) - min(common_prefix(ngram_draft, emitted) + 1, len(emitted))


def nodes_off_draft(tree: DraftTree, ngram_draft: Sequence[int]) -> int:
    """The tree's nodes whose path from the root is not a prefix of the n-gram draft: the MLP's share of the pass
    (a grammar may have pruned some of the draft's nodes, so they are not simply the first len(draft) rows)."""
    row = on = 0  # the draft walked down the trie (a row has at most one child per token)
    for token in ngram_draft:
        row = next((c for c in tree.children[row] if tree.token(c) == token), 0)
        if row == 0:
            break
        on += 1
    return tree.num_nodes - on


class MLPLedger:
    """Moving sums over the MLP's lone decode steps of (seconds, tokens emitted, tokens it added, seconds it
    cost), and the rest it orders when it does not pay."""

    def __init__(self, rest_steps: int, decay: float = 0.95, min_weight: float = 8.0) -> None:
        self.rest_steps, self.decay, self.min_weight = rest_steps, decay, min_weight
        self.sums = [0.0, 0.0, 0.0, 0.0, 0.0]  # steps, seconds, emitted, added, cost
        self._rest = 0  # the last rest ordered (0: none since the MLP last paid)

    def record(self, seconds: float, emitted: int, added: int, cost: float) -> None:
        """One lone step that verified MLP nodes: its wall time, its tokens, the MLP's share and price."""
        d, s = self.decay, self.sums
        for i, x in enumerate((1.0, seconds, float(emitted), float(added), cost)):
            s[i] = d * s[i] + x

    def pays(self) -> bool | None:
        """Whether the MLP's steps beat themselves without it; None until min_weight steps are in (after a rest
        too: its sums start over)."""
        w, t, e, a, c = self.sums
        if w < self.min_weight:
            return None
        # Nothing left without the MLP (a fit gone wrong) is no evidence against it.
        paid = t - c <= 0 or e - a <= 0 or e / t >= (e - a) / (t - c)
        if paid:
            self._rest = 0
        return paid

    def next_rest(self) -> int:
        """The rest to order now that the MLP does not pay: MLP_REST_STEPS, doubled while the verdict repeats."""
        self._rest = min(2 * self._rest, MAX_REST_STEPS) if self._rest else self.rest_steps
        self.sums = [0.0] * len(self.sums)
        return self._rest
