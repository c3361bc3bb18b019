"""A top-p row on the CPU by its nucleus alone, and a tree's rows drawn only where verification reaches them.

`Kept.of` finds a row's kept set (`filter_logits`' top-p set) without sorting the vocabulary: only the normalizer
reads the whole row, in the pass that also finds the candidates (`cpu_sampling.nucleus_scan`, C or numpy), the
tokens whose scaled logit lies within NUCLEUS_SPAN of the maximum. When they hold mass >= top_p every other token
has at least that much ranked above it, so top-p drops it (as `sampler._filter_among_top` argues). The general
path's dozen torch ops over a 49k row took ~1.8 ms of a sampled step, and ~2 ms more for a tree.

`LazyRows` serves the verification walk (`acceptance.accept_sampled`, `accept_greedy`) a tree's rows one at a
time: a row is drawn when the walk reaches it, and its residual token only when the walk rejects every child
there. A walk visits accepted drafts plus one row, so the rows past the first rejection, which an eager draw
samples for nothing (~0.2 ms each on the CPU), are never drawn. The tokens are the same as an eager draw's for a
seeded request (each row has its position's own generator); an unseeded request's draws come from torch's global
generator in another order, with the same distribution.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from specdesk.engine.sampling_params import SamplingParams
from specdesk.kernels import cpu_sampling

NUCLEUS_SPAN = (10.0, 20.0)  # candidates: scaled logits within this of the maximum (e^-10, e^-20 of its mass)


class BrokenRow(ValueError):
    """A row plain decoding could not sample either (NaN or infinite scores)."""


def broken_row(r: int) -> str:
    """The error of a request whose row r cannot be sampled."""
    return f"the model's next-token scores are NaN or infinite (row {r}): cannot sample"


def race(support: np.ndarray, p: np.ndarray, generator: torch.Generator | None) -> int:
    """The exponential race among tokens `support` (in index order) of probabilities p (float32, unnormalized):
    one Exp(1) draw per token from generator, the winner's id."""
    draws = torch.empty(support.size, dtype=torch.float32).exponential_(generator=generator)
    draws.clamp_(min=torch.finfo(torch.float32).tiny)  # a draw of 0 would make p / E inf
    return int(support[int((torch.from_numpy(p) / draws).argmax())])


@dataclass
class Kept:
    """A row's kept set: ids (ascending) and their e^(z / T - top) (float32), over the whole row's total; or a
    row that cannot be sampled (broken: NaN, or no finite maximum or normalizer)."""

    ids: np.ndarray
    weights: np.ndarray
    total: np.float64
    broken: bool = False

    @staticmethod
    def applies(params: SamplingParams) -> bool:
        """A sampled top-p row without top-k or min-p: the rows `of` can take (up to a nucleus too wide)."""
        return not params.is_greedy and params.top_p < 1.0 and params.top_k == 0 and params.min_p == 0.0

    @classmethod
    def of(cls, row: Tensor, params: SamplingParams) -> Kept | None:
        """The kept set of a top-p row; None where this does not apply (not `applies`, or a nucleus wider than
        the widest span), and the caller filters the row in full."""
        if not cls.applies(params):
            return None
        z = row.float().contiguous().numpy()
        for span in NUCLEUS_SPAN:
            scan = cpu_sampling.nucleus_scan(z, params.temperature, span)
            if scan.broken:
                return cls(scan.index, scan.index.astype(np.float32), np.float64("nan"), broken=True)
            candidates, total = scan.index, np.float64(scan.total)  # ascending ids; float64 keeps probs in it
            scaled = z[candidates] / np.float32(params.temperature)  # as filter_logits: logits / T in float32
            exp = np.exp(scaled - np.float32(scan.top))  # numpy's: a flat row's race can turn on an ulp of these
            if exp.sum(dtype=np.float64) >= params.top_p * total:
                break
        else:
            return None
        order = np.argsort(-scaled, kind="stable")  # descending, ties in index order
        probs = exp[order] / total
        kept = np.sort(order[np.cumsum(probs) - probs < params.top_p])  # the top token always stays (0 above it)
        return cls(candidates[kept], exp[kept], total)

    def judge(self, children: Sequence[int]) -> tuple[np.ndarray, Kept]:
        """Each child's probability, softmax over the kept set (filter_logits' -inf elsewhere: 0 outside it), and
        the residual to draw from should every child be rejected: the kept set without the children (itself
        where they hold all of it, reachable only through rounding, as sampler.without_tokens)."""
        at = np.minimum(np.searchsorted(self.ids, children), len(self.ids) - 1)
        p = np.where(self.ids[at] == children, self.weights[at] / self.weights.sum(dtype=np.float64), 0.0)
        rest = ~np.isin(self.ids, children)
        return p, (Kept(self.ids[rest], self.weights[rest], self.total) if rest.any() else self)

    def draw(self, generator: torch.Generator | None) -> int:
        """A token of the kept set, by the race with generator (the kept tokens in index order)."""
        return race(self.ids, self.weights / np.float32(self.total), generator)


@dataclass
class _Row:
    child_probs: list[float]
    uniforms: list[float]
    residual: Kept | None  # what the token is drawn from; None where it was drawn with the rest (a wide row)
    token: int | None = None
    broken: bool = False


class LazyRows:
    """One sequence's rows, each drawn when the walk first reads it (see the module doc), for rows that take the
    nucleus path (`applies`). A broken row raises BrokenRow when read."""

    def __init__(self, logits: Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
                 children: list[list[int]], full_draw: Callable[..., Any]) -> None:  # fmt: skip
        """full_draw: `sampler.sample_rows`, for a row whose nucleus is wider than the spans (this module is below
        the sampler's)."""
        self.logits, self.params, self.generators, self.children = logits, params, generators, children
        self.full_draw = full_draw
        self._rows: dict[int, _Row] = {}
        self.tokens = _Field(self, self.token)
        self.child_probs = _Field(self, lambda r: self.row(r).child_probs)
        self.uniforms = _Field(self, lambda r: self.row(r).uniforms)

    @staticmethod
    def applies(logits: Tensor, params: list[SamplingParams]) -> bool:
        """True where every row would take the nucleus path: sampled, top-p without top-k or min-p, on the CPU."""
        return logits.device.type == "cpu" and all(Kept.applies(p) for p in params)

    def __len__(self) -> int:
        return len(self.params)

    def row(self, r: int) -> _Row:
        got = self._rows.get(r)
        if got is None:
            got = self._rows[r] = self._draw(r)
        if got.broken:
            raise BrokenRow(broken_row(r))
        return got

    def _draw(self, r: int) -> _Row:
        kept = Kept.of(self.logits[r], self.params[r])
        if kept is None:  # a nucleus wider than the spans (rare): the full filter, all of the row at once
            one = self.full_draw(self.logits[r : r + 1], [self.params[r]], [self.generators[r]], [self.children[r]])
            return _Row(one.child_probs[0], one.uniforms[0], None, one.tokens[0], broken=not one.is_finite[0])
        if kept.broken:
            return _Row([], [], None, broken=True)
        if not self.children[r]:
            return _Row([], [], kept)
        probs, residual = kept.judge(self.children[r])
        return _Row(probs.tolist(), torch.rand(len(probs)).tolist(), residual)

    def token(self, r: int) -> int:
        """Row r's residual token (its draw where it has no children), drawn on first read."""
        got = self.row(r)
        if got.token is None:
            assert got.residual is not None  # set wherever no token was drawn with the row
            got.token = got.residual.draw(self.generators[r])
        return got.token


class _Field(Sequence[Any]):
    """One of LazyRows' per-row values (tokens, child_probs or uniforms), as the walk indexes it."""

    def __init__(self, rows: LazyRows, get: Callable[[int], Any]) -> None:
        self.rows, self.get = rows, get

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, r: int) -> Any:  # type: ignore[override]  # rows by index only, never slices
        return self.get(r)
