"""Per-position logit processing before sampling: logit bias, penalties and grammar masks.

Every row of a pass decides one position. Plain rows decide the position after the sequence's verified
tokens; a draft tree's row r decides the position after its path (the verified tokens, then the draft tokens
from the root down to r). Everything here is a function of exactly those tokens, so a row's distribution is
the one plain decoding would use at that position whatever the tree around it: speculation stays lossless.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

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
    grammar: GrammarState | None,
) -> Tensor:  # fmt: skip
    """One request's rows with bias, penalties and grammar applied (a new float32 [len(paths), V] tensor).

    history: the verified tokens (prompt + output); row i decides the position after history + paths[i].
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
        _penalize(z, params, history, num_prompt_tokens, paths)
    if grammar is not None:
        allowed = grammar.allowed_rows(paths, vocab_size).to(device)
        z = z.masked_fill(~allowed, float("-inf"))
    return z


def _penalize(z: Tensor, params: SamplingParams, history: list[int], num_prompt_tokens: int,
              paths: list[list[int]]) -> None:  # fmt: skip
    """The penalties, in place, on the columns of the tokens that occur at all (the history's and the paths'):
    a few hundred columns instead of the whole vocabulary for every row."""
    n, vocab_size = z.shape
    device = z.device
    path_tokens = [t for path in paths for t in path]
    # Column c of the sub-problem is token cols[c]; `where` maps every token to its column.
    cols = sorted({t for t in (*history, *path_tokens) if 0 <= t < vocab_size})
    if not cols:
        return
    where = {t: c for c, t in enumerate(cols)}
    index = torch.tensor(cols, dtype=torch.long, device=device)
    sub = z[:, index]
    # Row-major (row, column) pairs of the tokens each row's path adds to the verified history.
    path_rows = torch.tensor([i for i, path in enumerate(paths) for _ in path], dtype=torch.long, device=device)
    path_cols = torch.tensor([where[t] for t in path_tokens], dtype=torch.long, device=device)
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(n, len(cols), dtype=torch.bool, device=device)
        seen[:, [where[t] for t in set(history) if t in where]] = True
        seen[path_rows, path_cols] = True
        sub = penalize(sub, seen, params.repetition_penalty)
    if params.frequency_penalty != 0.0 or params.presence_penalty != 0.0:
        counts = torch.zeros(n, len(cols), dtype=torch.float32, device=device)
        output = [where[t] for t in history[num_prompt_tokens:] if t in where]
        if output:
            counts += torch.bincount(torch.tensor(output, device=device), minlength=len(cols)).float()
        counts.index_put_((path_rows, path_cols), torch.ones(len(path_tokens), device=device), accumulate=True)
        sub = sub - (params.frequency_penalty * counts + params.presence_penalty * (counts > 0).float())
    z[:, index] = sub
