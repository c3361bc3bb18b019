"""Per-position logit processing before sampling: logit bias, penalties and grammar masks.

Every row of a pass decides one position. Plain rows decide the position after the sequence's verified
tokens; a draft tree's row r decides the position after its path (the verified tokens, then the draft tokens
from the root down to r). Everything here is a function of exactly those tokens, so a row's distribution is
the one plain decoding would use at that position whatever the tree around it: speculation stays lossless.
"""

from __future__ import annotations

import array
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from specdesk.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from specdesk.engine.grammar import GrammarState


def penalize(logits: Tensor, seen: Tensor, penalty: Tensor | float) -> Tensor:
    """transformers' repetition penalty: a seen token's logit z becomes z / r if z > 0 else z * r.

    seen: bool, the shape of logits (or broadcasting to it); penalty a float or one per row ([..., 1])."""
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def needs_processing(params: SamplingParams, grammar: GrammarState | None) -> bool:
    """True when a request's rows need more than the model's raw logits."""
    return params.has_penalties or grammar is not None


def process_rows(
    logits: Tensor, params: SamplingParams, history: list[int], num_prompt_tokens: int, paths: list[list[int]],
    grammar: GrammarState | None, seen: SeenTokens | None = None,
) -> Tensor:  # fmt: skip
    """One request's rows with bias, penalties and grammar applied (a new float32 [len(paths), V] tensor).

    history: the verified tokens (prompt + output); row i decides the position after history + paths[i].
    seen: the request's SeenTokens, kept across its steps (history must extend the previous call's), or None.
    In order (vLLM's): logit_bias, then repetition_penalty over prompt + output (transformers' definition:
    a seen token's logit z becomes z / r if z > 0 else z * r), then OpenAI's frequency and presence penalties
    over the output only, then the grammar mask (-inf where the grammar forbids the token).
    """
    n, vocab_size = logits.shape
    assert n == len(paths), (n, len(paths))
    device = logits.device
    z = logits.float().clone()
    if params.logit_bias:
        ids = [t for t, _ in params.logit_bias if t < vocab_size]
        bias = torch.tensor([b for t, b in params.logit_bias if t < vocab_size], dtype=torch.float32, device=device)
        z[:, ids] += bias
    if params.repetition_penalty != 1.0 or params.frequency_penalty != 0.0 or params.presence_penalty != 0.0:
        if device.type == "cpu" and not (params.frequency_penalty or params.presence_penalty):
            _repetition_penalty_cpu(z, params.repetition_penalty, (seen or SeenTokens()).update(history, z.shape[1]),
                                    paths)  # fmt: skip
        else:
            _penalize(z, params, history, num_prompt_tokens, paths)
    if grammar is not None:
        allowed = grammar.allowed_rows(paths, vocab_size).to(device)
        z = z.masked_fill(~allowed, float("-inf"))
    return z


class SeenTokens:
    """The distinct ids of a growing token history (a request's verified tokens), kept from step to step: a step
    adds only the tokens appended since the previous one. Rebuilding the set from a ~700-token history took
    ~0.2 ms of a ~4.6 ms CPU decode step (`benchmarks.step_profile`, "verify tree")."""

    def __init__(self) -> None:
        self.count, self.last = 0, -1  # how many history tokens are in, and the last of them
        self.mask = np.zeros(0, dtype=bool)  # [vocab]: seen
        self.ids = np.empty(0, dtype=np.int64)  # the seen ids, each once (in no particular order)

    def update(self, history: list[int], vocab_size: int) -> SeenTokens:
        """Take in history, which extends the previous call's; one that does not (shorter, another token where
        the last one was, another vocabulary) starts over. Ids outside [0, vocab_size) are left out."""
        if (
            len(self.mask) != vocab_size
            or len(history) < self.count
            or (self.count and history[self.count - 1] != self.last)
        ):
            self.count, self.last, self.mask = 0, -1, np.zeros(vocab_size, dtype=bool)
            self.ids = np.empty(0, dtype=np.int64)
        if len(history) > self.count:
            new = history[self.count :]
            if len(new) <= 16:  # a step's few tokens: Python, as numpy's calls each cost more on a cold cache
                fresh = []
                for t in new:
                    if 0 <= t < vocab_size and not self.mask[t]:
                        self.mask[t] = True
                        fresh.append(t)
                if fresh:  # appended, not np.flatnonzero(mask): a scan of the vocabulary cost more than the rest
                    self.ids = np.concatenate([self.ids, np.array(fresh, dtype=np.int64)])
            else:
                ids = np.unique(np.frombuffer(array.array("q", new), dtype=np.int64))
                ids = ids[(ids >= 0) & (ids < vocab_size)]
                unseen = ids[~self.mask[ids]]
                self.mask[unseen] = True
                self.ids = np.concatenate([self.ids, unseen])
            self.count, self.last = len(history), history[-1]
        return self


def _repetition_penalty_cpu(z: Tensor, penalty: float, seen: SeenTokens, paths: list[list[int]]) -> None:
    """`penalize` in place on a CPU float32 z [n, V] (contiguous, its own memory), by numpy on the seen columns
    only: every row over the history's ids, and row i over the ids of paths[i] the history lacks. The same
    float32 operations as `penalize` (z / r or z * r, r rounded to float32 as torch rounds a scalar), so the
    same bits; a handful of numpy calls instead of ~15 small torch ops."""
    zn, r = z.numpy(), np.float32(penalty)

    def penalize_at(index: tuple[Any, Any]) -> None:
        v = zn[index]
        zn[index] = np.where(v > 0, v / r, v * r)

    if seen.ids.size:
        penalize_at((slice(None), seen.ids))
    vocab_size = zn.shape[1]
    pairs = [(i, t) for i, path in enumerate(paths) for t in set(path) if 0 <= t < vocab_size and not seen.mask[t]]
    if pairs:
        rows, cols = zip(*pairs, strict=True)
        penalize_at((list(rows), list(cols)))


def _ids(tokens: list[int]) -> Tensor:
    """Token ids as a CPU long tensor, through an array: torch.tensor on a list costs about 0.1 us an item, which
    for an 800-token history was a sixth of a CPU decode step's sampling."""
    if not tokens:
        return torch.empty(0, dtype=torch.long)
    return torch.frombuffer(array.array("q", tokens), dtype=torch.long)


def _penalize(z: Tensor, params: SamplingParams, history: list[int], num_prompt_tokens: int,
              paths: list[list[int]]) -> None:  # fmt: skip
    """The penalties, in place, on the columns of the tokens that occur at all (the history's and the paths'):
    a few hundred columns instead of the whole vocabulary for every row, found by tensor ops on the host (a
    Python set and dict over an 800-token history took most of a millisecond a step; on a GPU the ids are
    then copied, not reduced there)."""
    n, vocab_size = z.shape
    device = z.device
    hist = _ids(history)
    path_tokens = _ids([t for path in paths for t in path])
    path_rows = _ids([i for i, path in enumerate(paths) for _ in path])
    prompt_cols = min(num_prompt_tokens, len(history))  # how many of hist's entries are the prompt's
    lo, hi = torch.aminmax(torch.cat([hist, path_tokens])) if hist.numel() + path_tokens.numel() else (0, 0)
    if lo < 0 or hi >= vocab_size:  # ids the logits have no column for (a smaller output vocabulary)
        hist_ok, path_ok = (hist >= 0) & (hist < vocab_size), (path_tokens >= 0) & (path_tokens < vocab_size)
        prompt_cols = int(hist_ok[:num_prompt_tokens].sum())
        hist, path_tokens, path_rows = hist[hist_ok], path_tokens[path_ok], path_rows[path_ok]
    if hist.numel() + path_tokens.numel() == 0:
        return
    # Column c of the sub-problem is token index[c]; `where` holds every history and path token's column.
    index, where = torch.unique(torch.cat([hist, path_tokens]), sorted=True, return_inverse=True)
    index, where, path_rows = index.to(device), where.to(device), path_rows.to(device)
    hist_cols, path_cols = where[: hist.numel()], where[hist.numel() :]
    sub = z[:, index]
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(n, index.numel(), dtype=torch.bool, device=device)
        seen[:, hist_cols] = True
        seen[path_rows, path_cols] = True
        sub = penalize(sub, seen, params.repetition_penalty)
    if params.frequency_penalty != 0.0 or params.presence_penalty != 0.0:
        counts = torch.zeros(n, index.numel(), dtype=torch.float32, device=device)
        output = hist_cols[prompt_cols:]
        if output.numel():
            counts += torch.bincount(output, minlength=index.numel()).float()
        counts.index_put_((path_rows, path_cols), torch.ones(path_cols.numel(), device=device), accumulate=True)
        sub = sub - (params.frequency_penalty * counts + params.presence_penalty * (counts > 0).float())
    z[:, index] = sub
