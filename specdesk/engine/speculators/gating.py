"""When speculation pays, and how far ahead: IBM's load thresholds plus a per-request adaptive length.

IBM's server (TGIS) speculates only when the batch holds at most 16 sequences and at most 75 % of the KV
memory is in use: at high load the base model is busy anyway and verifying drafts costs throughput.

Per request we keep a running estimate of the per-token acceptance rate alpha. Under the usual geometric
model (draft i is accepted only if drafts 0..i-1 were, each with probability alpha) a chain of k drafts
yields on average

    E_k = 1 + alpha + ... + alpha^k = (1 - alpha^(k+1)) / (1 - alpha)      tokens per base step

(the last term counts the bonus token), while the verify pass costs about 1 + c * k plain decode steps,
c being the relative cost of one extra query token. We pick k in [0, max_tokens] maximizing E_k / (1 + c k);
k = 0 means plain decoding. alpha is estimated from what verification saw: a step that drafted k and
accepted a observed a successes in a + [a < k] trials, and exponential moving sums of both give
alpha = successes / trials. A request whose speculation was switched off is probed with one draft every
`probe_interval` steps so that it can switch back on when its text becomes predictable again.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GatingConfig:
    """Knobs of the speculation policy (defaults: IBM's thresholds, 3 MLP heads, 5 candidates)."""

    max_batch_size: int = 16  # speculate only when the running batch is at most this large
    max_kv_usage: float = 0.75  # ... and at most this fraction of KV pages is in use
    max_tokens: int = 3  # drafts per step at most (the speculator's n_predict)
    max_candidates: int = 5
    verify_cost_per_token: float = 0.05  # c: an extra verified token costs this fraction of a decode step
    decay: float = 0.9  # weight of the past in the moving sums (about the last 10 steps count)
    prior_alpha: float = 0.6  # optimistic start: a new request speculates at full length
    prior_trials: float = 2.0  # how many trials the prior is worth
    probe_interval: int = 8

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_tokens < 0 or self.max_candidates < 1 or self.probe_interval < 1:
            raise ValueError(f"invalid gating config {self}")
        if not 0.0 <= self.max_kv_usage <= 1.0 or not 0.0 <= self.prior_alpha < 1.0 or not 0 < self.decay < 1:
            raise ValueError(f"invalid gating config {self}")


@dataclass
class _RequestStats:
    successes: float
    trials: float
    steps_off: int = 0


class SpeculationPolicy:
    """Per-step decisions: `should_speculate` for the batch, `num_tokens` and `num_candidates` per request.

    The engine reports each verification with `record(request_id, num_drafted, num_accepted)` and calls
    `release(request_id)` when a request ends. Pure Python; no locks (the engine thread owns it).
    """

    def __init__(self, config: GatingConfig | None = None):
        self.config = config or GatingConfig()
        self._stats: dict[str, _RequestStats] = {}
        # c in the depth choice; the engine overwrites it with the measured value (tree_width.StepCost).
        self.cost_per_token = self.config.verify_cost_per_token

    def should_speculate(self, batch_size: int, kv_usage: float) -> bool:
        """IBM's gate: small batch and KV memory not under pressure (kv_usage in [0, 1])."""
        return batch_size <= self.config.max_batch_size and kv_usage <= self.config.max_kv_usage

    def num_candidates(self, batch_size: int) -> int:
        """Tree width: full at batch 1, shrinking linearly to 1 at max_batch_size (verify tokens add up)."""
        c = self.config
        if batch_size <= 1:
            return c.max_candidates
        frac = min(1.0, (batch_size - 1) / max(1, c.max_batch_size - 1))
        return max(1, round(c.max_candidates - frac * (c.max_candidates - 1)))

    def num_tokens(self, request_id: str) -> int:
        """Drafts to propose for this request this step; 0 = decode plainly."""
        k = best_num_tokens(self.acceptance_rate(request_id), self.config.max_tokens, self.cost_per_token)
        if k > 0:
            if request_id in self._stats:
                self._stats[request_id].steps_off = 0
            return k
        stats = self._get(request_id)
        stats.steps_off += 1
        if stats.steps_off >= self.config.probe_interval:
            stats.steps_off = 0
            return 1  # probe: one cheap draft to keep the estimate alive
        return 0

    def record(self, request_id: str, num_drafted: int, num_accepted: int) -> None:
        """Update the acceptance estimate after a verification that drafted `num_drafted` deep."""
        assert 0 <= num_accepted <= num_drafted, (num_accepted, num_drafted)
        if num_drafted == 0:
            return
        stats = self._get(request_id)
        d = self.config.decay
        stats.successes = d * stats.successes + num_accepted
        stats.trials = d * stats.trials + num_accepted + (1 if num_accepted < num_drafted else 0)

    def acceptance_rate(self, request_id: str) -> float:
        """The running per-token acceptance estimate alpha of a request (the prior for a new one)."""
        stats = self._stats.get(request_id)
        if stats is None:
            return self.config.prior_alpha
        return stats.successes / stats.trials if stats.trials > 0 else self.config.prior_alpha

    def release(self, request_id: str) -> None:
        self._stats.pop(request_id, None)

    def _get(self, request_id: str) -> _RequestStats:
        stats = self._stats.get(request_id)
        if stats is None:
            c = self.config
            stats = self._stats[request_id] = _RequestStats(c.prior_alpha * c.prior_trials, c.prior_trials)
        return stats


def expected_tokens(alpha: float, k: int) -> float:
    """E_k = sum_{i=0..k} alpha^i: mean tokens per base step with k chained drafts (bonus included)."""
    return float(sum(alpha**i for i in range(k + 1)))


def best_num_tokens(alpha: float, max_tokens: int, cost_per_token: float) -> int:
    """argmax over k in [0, max_tokens] of E_k / (1 + c k); ties go to the shorter chain."""
    best_k, best_gain = 0, 1.0
    for k in range(1, max_tokens + 1):
        gain = expected_tokens(alpha, k) / (1 + cost_per_token * k)
        if gain > best_gain + 1e-9:
            best_k, best_gain = k, gain
    return best_k


class MeasuredRest:
    """Rests a draft source whose steps make fewer tokens per second than the steps that verify no draft.

    Both kinds of steps feed moving sums (tokens and seconds, `decay` per step of that kind); once each holds
    `min_weight` steps, a drafted step that leaves the drafted rate below the undrafted one starts a rest of
    `rest_steps` proposals, and the drafted sums start over, so the source is measured afresh when it returns.
    The speculative decoder rests the n-gram drafts by it on a CPU (SpecConfig.rest): there a verified token
    costs a sizeable part of a step, and under the console's sampling the drafts are accepted too rarely.
    """

    def __init__(self, rest_steps: int, min_weight: float = 8.0, decay: float = 0.95) -> None:
        self.rest_steps, self.min_weight, self.decay = rest_steps, min_weight, decay
        self.resting = 0  # proposals left to skip
        self.drafted = [0.0, 0.0, 0.0]  # moving sums: tokens, seconds, steps
        self.bare = [0.0, 0.0, 0.0]

    def due(self) -> bool:
        """Whether the source proposes this step (a resting one counts its rest down instead)."""
        if self.resting > 0:
            self.resting -= 1
            return False
        return True

    def record(self, drafted: bool, tokens: int, seconds: float) -> None:
        """One lone decode step: whether it verified the source's drafts (and nothing else), what it emitted."""
        sums = self.drafted if drafted else self.bare
        d = self.decay
        sums[0], sums[1], sums[2] = d * sums[0] + tokens, d * sums[1] + seconds, d * sums[2] + 1
        if not drafted or min(self.drafted[2], self.bare[2]) < self.min_weight:
            return
        if self.drafted[0] / self.drafted[1] < self.bare[0] / self.bare[1]:
            self.resting = self.rest_steps
            self.drafted = [0.0, 0.0, 0.0]
