"""Next-token sampling as plain functions, the math beside the code.

For one row with logits z over a vocabulary of V tokens:

    greedy (T = 0):  x = argmax_i z_i                      first index of the maximum, as HF `generate`
    otherwise:       z' = z / T                            temperature
                     top-k: keep i with z'_i >= z'_(k)     z'_(k) is the k-th largest; ties at it stay (HF)
                     top-p: sort z' ascending, c_j = cumsum_j softmax(z'); drop j with c_j <= 1 - p.
                            The kept tail is the smallest top set with mass >= p, and the top token always
                            stays (HF TopPLogitsWarper; top-p sees the top-k-filtered logits, HF's order)
                     p = softmax(z')  over the kept set
                     x = argmax_i p_i / E_i,   E_i ~ Exponential(1)

The last line is the "exponential race": P(argmax_i p_i / E_i = j) = p_j, because E_i / p_i ~ Exp(p_i) and
the smallest of independent exponentials is j with probability p_j / sum(p). Row i draws its E only from
`generators[i]` (one draw of V numbers per sampled step), so a seeded request samples the same tokens whatever
else shares its batch. Rows without a generator share one draw from torch's default generator.

`sample_rows` is what an engine step calls: every row of the pass (plain rows and every draft tree's rows)
in one call, with one transfer of the results to the host, so verification then needs no device at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from specdesk.engine.nucleus import Kept, race
from specdesk.engine.sampling_params import SamplingParams


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """A generator seeded for one request, or None (the request then uses torch's default generator)."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def filter_logits(logits: Tensor, params: list[SamplingParams]) -> Tensor:
    """Temperature-scaled logits with everything outside top-k/top-p/min-p set to -inf."""
    filtered = _filter_top_k_p(logits, params)
    if any(p.min_p > 0.0 for p in params):
        filtered = _filter_min_p(filtered, params)
    return filtered


def _filter_min_p(scaled: Tensor, params: list[SamplingParams]) -> Tensor:
    """min-p after top-k/top-p (transformers' MinPLogitsWarper and its order): drop tokens with
    p < min_p * max p. In logits: z < z_max + log(min_p); the top token always stays."""
    min_p = torch.tensor([p.min_p for p in params], dtype=torch.float32, device=scaled.device).unsqueeze(1)
    top = scaled.max(dim=-1, keepdim=True).values
    # log(0) = -inf keeps every token of a row without min_p.
    return scaled.masked_fill(scaled < top + min_p.log(), float("-inf"))


def _filter_top_k_p(logits: Tensor, params: list[SamplingParams]) -> Tensor:
    """Temperature-scaled logits with everything outside top-k/top-p set to -inf.

    logits: [n, V]; every row must sample (temperature > 0). Returns a new float32 [n, V] tensor.
    """
    assert logits.dim() == 2 and logits.shape[0] == len(params), (tuple(logits.shape), len(params))
    assert all(not p.is_greedy for p in params), "filter_logits is for sampled rows; greedy rows take argmax"
    device, vocab_size = logits.device, logits.shape[1]
    temperatures = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)
    scaled = logits.float() / temperatures.unsqueeze(1)
    need_top_k = any(0 < p.top_k < vocab_size for p in params)
    need_top_p = any(p.top_p < 1.0 for p in params)
    if not (need_top_k or need_top_p):
        return scaled
    fast = _filter_among_top(scaled, params)
    if fast is not None:
        return fast
    # One ascending sort serves both filters: masking the smallest values to -inf keeps the order.
    sorted_logits, order = scaled.sort(dim=-1)
    if need_top_k:
        # k == 0 (off) or k >= V keeps everything: the "k-th largest" is then the smallest value.
        top_ks = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
        kth_index = torch.tensor([vocab_size - k for k in top_ks], device=device).unsqueeze(1)
        kth_largest = sorted_logits.gather(1, kth_index)  # [n, 1]
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth_largest, float("-inf"))
    if need_top_p:
        # Rows with top_p == 1 get threshold -1 so nothing is dropped (HF skips the warper for them).
        thresholds = [1.0 - p.top_p if p.top_p < 1.0 else -1.0 for p in params]
        threshold = torch.tensor(thresholds, dtype=torch.float32, device=device).unsqueeze(1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= threshold
        drop[:, -1] = False  # the top token always survives
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(scaled).scatter_(1, order, sorted_logits)


PREFILTER = 1024  # the fast path filters each row's top this-many tokens only


def _filter_among_top(scaled: Tensor, params: list[SamplingParams]) -> Tensor | None:
    """filter_logits over each row's top PREFILTER tokens (a partial top-k instead of a full sort of the
    vocabulary, a large share of a sampled decode step otherwise); None where the kept set could
    reach past them, and the caller sorts everything.

    In descending order a token survives top-p iff the mass ranked strictly above it is < p (the same rule
    as c_j <= 1 - p ascending). When the top PREFILTER tokens hold mass >= p, every token past them has at
    least that much above it and is dropped, so filtering among them is exact. Top-k needs k < PREFILTER and
    no tie of the k-th value past the prefilter.
    """
    vocab_size = scaled.shape[1]
    if vocab_size <= 2 * PREFILTER:
        return None
    top_ks = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
    has_k_list = [k < PREFILTER for k in top_ks]
    if any(
        not has_k and (p.top_p >= 1.0 or k < vocab_size) for k, has_k, p in zip(top_ks, has_k_list, params, strict=True)
    ):
        return None  # the row keeps (almost) the whole vocabulary, or its top-k reaches past the prefilter
    device = scaled.device
    values, order = _top(scaled, PREFILTER)  # descending
    has_k = torch.tensor(has_k_list, device=device).unsqueeze(1)
    kth = values.gather(1, torch.tensor([min(k, PREFILTER) - 1 for k in top_ks], device=device).unsqueeze(1))
    if bool((has_k & (values[:, -1:] >= kth)).any()):
        return None  # ties at the k-th largest value may continue past the prefilter
    masked = torch.where(has_k & (values < kth), float("-inf"), values)
    # Normalize over what top-k left: the slice for top-k rows, the whole row otherwise.
    if all(has_k_list):  # (each logsumexp of a whole row costs about 60 us on one CPU thread)
        log_norm = masked.logsumexp(-1, keepdim=True)
    elif not any(has_k_list):
        log_norm = scaled.logsumexp(-1, keepdim=True)
    else:
        log_norm = torch.where(has_k, masked.logsumexp(-1, keepdim=True), scaled.logsumexp(-1, keepdim=True))
    probs = (masked - log_norm).exp()
    top_p = torch.tensor([p.top_p if p.top_p < 1.0 else 2.0 for p in params], device=device).unsqueeze(1)
    if bool((~has_k & (probs.sum(-1, keepdim=True) < top_p)).any()):
        return None  # the top-p set reaches past the prefilter
    drop = probs.cumsum(-1) - probs >= top_p
    drop[:, 0] = False  # the top token always survives
    kept = masked.masked_fill(drop, float("-inf"))
    return torch.full_like(scaled, float("-inf")).scatter_(1, order, kept)


def _top(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """x.topk(k, dim=-1) (values and indices, descending); on the CPU by numpy's partition, then a sort of the k:
    torch's topk of 1024 among 49k took 0.65 ms a row on one thread, this about 0.1 ms. Tied values come in
    index order (topk leaves theirs unspecified); the values are the same either way."""
    if x.device.type != "cpu":
        return x.topk(k, dim=-1)
    a = x.float().contiguous().numpy()
    values, indices = np.empty((a.shape[0], k), dtype=np.float32), np.empty((a.shape[0], k), dtype=np.int64)
    for r, row in enumerate(a):
        part = np.sort(np.argpartition(row, row.size - k)[row.size - k :])  # the k largest, in index order
        rank = np.argsort(-row[part], kind="stable")
        indices[r] = part[rank]
        values[r] = row[indices[r]]
    return torch.from_numpy(values), torch.from_numpy(indices)


def probs_from_logits(logits: Tensor, params: list[SamplingParams]) -> Tensor:
    """The target distribution each row samples from, as full [n, V] float32 probabilities.

    Sampled rows: softmax(filter_logits(...)). Greedy rows: one-hot at the argmax (a point mass), so the
    speculative rejection sampler can treat greedy and sampled rows alike.
    """
    assert logits.dim() == 2 and logits.shape[0] == len(params), (tuple(logits.shape), len(params))
    probs = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
    greedy_rows = [i for i, p in enumerate(params) if p.is_greedy]
    sampled_rows = [i for i, p in enumerate(params) if not p.is_greedy]
    if greedy_rows:
        index = torch.tensor(greedy_rows, device=logits.device)
        probs[index, logits[index].argmax(dim=-1)] = 1.0
    if sampled_rows:
        index = torch.tensor(sampled_rows, device=logits.device)
        probs[index] = filter_logits(logits[index], [params[i] for i in sampled_rows]).softmax(dim=-1)
    return probs


def sample_from_probs(probs: Tensor, generators: list[torch.Generator | None]) -> Tensor:
    """Draw one token per row of `probs` [n, V] by the exponential race; row i uses only generators[i].

    Returns int64 [n]. Rows need not be normalized (the race is scale-free per row).
    """
    assert probs.dim() == 2 and probs.shape[0] == len(generators), (tuple(probs.shape), len(generators))
    if probs.device.type == "cpu":
        return _race_on_support(probs, generators)
    race = torch.empty_like(probs, dtype=torch.float32)
    unseeded_rows = [i for i, g in enumerate(generators) if g is None]
    if len(unseeded_rows) == len(generators):
        race.exponential_()
    else:
        for i, generator in enumerate(generators):
            if generator is not None:
                race[i].exponential_(generator=generator)
        if unseeded_rows:
            index = torch.tensor(unseeded_rows, device=probs.device)
            race[index] = torch.empty_like(race[index]).exponential_()
    # A draw of exactly 0 would make p / E inf (or nan for p = 0) and could pick a zero-probability token.
    race.clamp_(min=torch.finfo(torch.float32).tiny)
    return (probs / race).argmax(dim=-1)


def _race_on_support(probs: Tensor, generators: list[torch.Generator | None]) -> Tensor:
    """`sample_from_probs` on the CPU: each row's race among its tokens of nonzero probability only (a token
    of probability 0 never wins it), so a row draws a few hundred exponentials under top-p instead of one per
    vocabulary entry (49k of them took torch 1.1 ms a row on one thread). Same distribution; a row still draws
    only from its own generator."""
    rows = probs.float().contiguous().numpy()
    out = torch.empty(probs.shape[0], dtype=torch.long)
    for i, (row, generator) in enumerate(zip(rows, generators, strict=True)):
        support = np.flatnonzero(row > 0)  # NaN compares false: such a row is reported as not finite anyway
        if support.size == 0:
            support = np.arange(row.size)
        out[i] = race(support, row[support], generator)
    return out


def sample(logits: Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> Tensor:
    """Pick the next token of every row: argmax for greedy rows, a seeded draw for the others.

    logits: [n, V] float32 (other float dtypes are upcast); params, generators: one per row.
    Returns int64 [n]. An all-greedy batch is a single argmax with no per-row work.
    """
    assert logits.dim() == 2 and logits.shape[0] == len(params) == len(generators), (
        tuple(logits.shape),
        len(params),
        len(generators),
    )
    next_ids = logits.argmax(dim=-1)
    sampled_rows = [i for i, p in enumerate(params) if not p.is_greedy]
    if not sampled_rows:
        return next_ids
    index = torch.tensor(sampled_rows, device=logits.device)
    probs = filter_logits(logits[index], [params[i] for i in sampled_rows]).softmax(dim=-1)
    next_ids[index] = sample_from_probs(probs, [generators[i] for i in sampled_rows])
    return next_ids


@dataclass
class RowDraws:
    """Host copies of what `sample_rows` drew for each row of a pass."""

    tokens: list[int]
    is_finite: list[bool]  # False: the row's logits or probabilities hold NaN/inf, it cannot be sampled
    child_probs: list[list[float]]  # p(x) of each of the row's children, in order (sampled rows)
    uniforms: list[list[float]]  # one U(0, 1) draw per child (sampled rows)


def sample_rows(
    logits: Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
    children: list[list[int]],
) -> RowDraws:  # fmt: skip
    """Everything verification needs from a pass's logits [n, V], for all rows at once.

    A greedy row gets its argmax. A sampled row with target p = softmax(filter_logits(z)) gets

        tokens[i]      ~ p without the tokens children[i], renormalized (p itself when children[i] is
                         empty; p if the children hold all its mass, reachable only through rounding)
        child_probs[i] = [p(x) for x in children[i]],   uniforms[i] = one U(0, 1) per child

    drawn by the exponential race with generators[i]. That is the whole of the lossless tree rejection
    sampler's randomness (speculators/acceptance.py `accept_sampled`): child x_j is accepted when
    u_j < p(x_j) / (1 - S_{j-1}) and tokens[i] is the residual draw after all children are rejected.
    A row decoding plainly has no children and gets a plain draw. A seeded request passes no children and
    the generator plain decoding would use at that position: its row's token is then exactly the token plain
    decoding samples there, and verification keeps the child that matches it.

    One argmax over every row, one filter and softmax over the sampled rows, one host transfer.
    """
    n = logits.shape[0]
    assert len(params) == len(generators) == len(children) == n, (n, len(params), len(generators), len(children))
    device = logits.device
    if device.type == "cpu" and all(p.is_greedy for p in params):
        # The CPU console's common step: the argmax by numpy and the lists, with none of the torch ops below;
        # each op cost 20-90 us right after a pass had evicted torch's code.
        a = logits.float().contiguous().numpy()
        best_np, tokens_np = _argmax_rows(a)
        zeros = [[0.0] * len(c) for c in children]  # as below: a greedy row's children get no draw
        return RowDraws(tokens_np.tolist(), np.isfinite(best_np).tolist(), zeros, [list(z) for z in zeros])
    best, tokens = _row_max(logits)  # max propagates NaN: a broken row shows in its maximum
    finite = best.isfinite()
    width = max((len(c) for c in children), default=0)
    child_probs = torch.zeros(n, width, device=device)
    uniforms = torch.zeros(n, width, device=device)
    sampled = [i for i, p in enumerate(params) if not p.is_greedy]
    if sampled and device.type == "cpu":  # on the CPU each row by its nucleus alone, where it can
        nucleus = _Nucleus(tokens, finite, child_probs, uniforms)
        sampled = [i for i in sampled if not nucleus.draw(i, logits[i], params[i], generators[i], children[i])]
    if sampled:
        index = torch.tensor(sampled, device=device)
        probs = filter_logits(logits[index], [params[i] for i in sampled]).softmax(dim=-1)
        finite[index] &= probs.sum(dim=-1).isfinite()
        target = probs
        if width:
            vocab_size = probs.shape[1]
            # Children padded with V, a column past the vocabulary (see without_tokens).
            cols = torch.tensor(
                [children[i] + [vocab_size] * (width - len(children[i])) for i in sampled], device=device
            )
            child_probs[index] = F.pad(probs, (0, 1)).gather(1, cols)
            uniforms[index] = torch.rand(len(sampled), width, device=device)
            target = without_tokens(probs, cols)
        tokens[index] = sample_from_probs(target, [generators[i] for i in sampled])
    if device.type == "cpu":  # on the host already: the lists as they are (the packing below cost ~0.1 ms a step)
        probs_rows, uniform_rows = child_probs.tolist(), uniforms.tolist()
        return RowDraws(
            tokens=tokens.tolist(),
            is_finite=finite.tolist(),
            child_probs=[r[: len(c)] for r, c in zip(probs_rows, children, strict=True)],
            uniforms=[r[: len(c)] for r, c in zip(uniform_rows, children, strict=True)],
        )
    # The step's one device-to-host transfer (token ids are exact in float64).
    packed = torch.cat([tokens[:, None].double(), finite[:, None].double(), child_probs.double(), uniforms.double()], 1)
    rows = packed.tolist()
    return RowDraws(
        tokens=[int(r[0]) for r in rows],
        is_finite=[r[1] > 0 for r in rows],
        child_probs=[r[2 : 2 + len(c)] for r, c in zip(rows, children, strict=True)],
        uniforms=[r[2 + width : 2 + width + len(c)] for r, c in zip(rows, children, strict=True)],
    )


@dataclass
class _Nucleus:
    """`sample_rows`' outputs, which `draw` fills row by row on the CPU."""

    tokens: Tensor
    finite: Tensor
    child_probs: Tensor
    uniforms: Tensor

    def draw(self, i: int, row: Tensor, params: SamplingParams, generator: torch.Generator | None,
             children: list[int]) -> bool:  # fmt: skip
        """One top-p row on the CPU by its nucleus alone (`nucleus.Kept`), plain or a tree's: its token, and its
        children's probabilities and uniforms, drawn into row i (finite[i] cleared for NaN/inf); False where this
        does not apply (top-k or min-p asked, no top-p, or a nucleus wider than the spans) and the caller filters.

        The same kept set as `filter_logits` and, up to rounding, the same probabilities and draws as softmax,
        `without_tokens` and `_race_on_support` (the row's generator races the kept tokens in index order, the
        children's uniforms come from torch's global generator as the general path's)."""
        kept = Kept.of(row, params)
        if kept is None:
            return False
        if kept.broken:
            self.finite[i] = False  # reported, never sampled
            return True
        if children:
            p, kept = kept.judge(children)
            self.child_probs[i, : len(children)] = torch.from_numpy(p.astype(np.float32))
            self.uniforms[i, : len(children)] = torch.rand(len(children))
        self.tokens[i] = kept.draw(generator)
        return True


def _row_max(logits: Tensor) -> tuple[Tensor, Tensor]:
    """logits.max(dim=-1): each row's maximum and the first index holding it (a NaN counts as the maximum);
    on the CPU by numpy's argmax, about 20x faster than torch's reduction of a 49k row on one thread."""
    if logits.device.type != "cpu":
        values, indices = logits.max(dim=-1)
        return values, indices
    best_np, indices_np = _argmax_rows(logits.float().contiguous().numpy())
    return torch.from_numpy(best_np), torch.from_numpy(indices_np)


def _argmax_rows(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's maximum and the first index holding it (a NaN counts as the maximum), by numpy."""
    indices = a.argmax(axis=-1)
    return a[np.arange(a.shape[0]), indices], indices


def without_tokens(probs: Tensor, cols: Tensor) -> Tensor:
    """Each row of probs [n, V] with the tokens cols [n, c] removed (a column index V is padding): the
    residual max(p - q, 0) of point-mass drafts, unnormalized (the race is scale-free). A row that would be
    left with no mass (only through rounding: the drafts then held all of it) stays p."""
    vocab_size = probs.shape[1]
    residual = F.pad(probs, (0, 1)).scatter_(1, cols, 0.0)[:, :vocab_size]
    return torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, probs)
