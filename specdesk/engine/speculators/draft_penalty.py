"""The repetition penalty on the speculator's own logits, for speculators trained with it (`draft_penalty`).

The console verifies drafts against penalized text: a token the sequence has already seen has its logit z
turned into z / r (z > 0) or z * r (z < 0), transformers' definition. A head trained on unpenalized text keeps
proposing the tokens the penalty has just pushed down; a head can't learn which tokens its sequence has seen
from one hidden state either. So a speculator trained with `draft_penalty` has the same rule applied to its own
logits, over the same seen tokens (the sequence so far plus the draft path above the head), in training and at
inference; its heads learn logits on which the rule gives the penalized distribution.

Seen sets are masks over the logits' columns: token ids, or draft-vocabulary columns (`columns`: token id ->
column, `IGNORE` = -100 outside the draft vocabulary).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specdesk.engine.logits_processors import penalize

OUTSIDE = -100  # a column map's value for a token outside the draft vocabulary (train_data.IGNORE)


def column_map(spec_vocab_size: int, draft_vocab: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """token id -> logits column ([vocab_size] int64 on device; OUTSIDE where a draft vocabulary leaves the token
    out)."""
    if draft_vocab is None:
        return torch.arange(spec_vocab_size, device=device)
    columns = torch.full((spec_vocab_size,), OUTSIDE, dtype=torch.long, device=device)
    columns[draft_vocab.to(device)] = torch.arange(len(draft_vocab), device=device)
    return columns


def mark(seen: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """seen with seen[rows[k], columns[k]] set, OUTSIDE columns skipped (a copy)."""
    keep = columns >= 0
    out = seen.clone()
    out[rows[keep], columns[keep]] = True
    return out


@dataclass
class DraftPenalty:
    """What the heads' logits are penalized by for one batch: per sequence, its seen columns [b, width] and
    its repetition penalty [b] (1.0 where a request has none: its row is left as it is)."""

    seen: torch.Tensor
    penalty: torch.Tensor

    @classmethod
    def of(cls, token_ids: list[list[int]], penalties: list[float], columns: torch.Tensor) -> DraftPenalty | None:
        """From each sequence's tokens so far (prompt and output) and penalty; None when no row has one."""
        if all(p == 1.0 for p in penalties):
            return None
        width, device = int(columns.max()) + 1, columns.device
        seen = torch.zeros(len(token_ids), width + 1, dtype=torch.bool, device=device)
        for r, (ids, p) in enumerate(zip(token_ids, penalties, strict=True)):
            if p != 1.0:  # ids past the speculator's vocabulary (a larger tokenizer's) can't be drafted: skipped
                known = torch.tensor(ids, dtype=torch.long, device=device)
                cols = columns[known[known < len(columns)]]
                seen[r, torch.where(cols >= 0, cols, width)] = True  # the spare last column collects the rest
        return cls(seen[:, :width], torch.tensor(penalties, dtype=torch.float32, device=device))

    def apply(self, logits: torch.Tensor, rows: torch.Tensor, path_columns: torch.Tensor | None) -> torch.Tensor:
        """Penalize logits [n, width] whose row k belongs to sequence rows[k] and whose head reads the draft
        path path_columns[k] ([n, depth] columns, OUTSIDE for none): those tokens are seen too."""
        seen = self.seen[rows]
        if path_columns is not None and path_columns.numel():
            depth = path_columns.shape[1]
            seen = mark(
                seen, torch.arange(len(rows), device=rows.device).repeat_interleave(depth), path_columns.reshape(-1)
            )
        return penalize(logits, seen, self.penalty[rows][:, None])
