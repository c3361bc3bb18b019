"""A speculator folder's draft vocabulary: the heads score only the tokens replies actually use.

Each head's output projection is [vocab, d]: for SmolLM2 (49152 tokens) one head row costs a fifth of the
whole base model, and IBM's [5, 4, 3] beam evaluates 26 rows a step. Support replies use a few thousand
distinct tokens, so the heads rank only the most frequent ones (FR-Spec, Zhao et al. 2025). Verification is
untouched, so output is exactly the same; a token outside the set can only be missed as a draft, never
emitted wrongly. `specdesk.training.draft_vocab` builds the file this module loads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from torch import nn

    from specdesk.engine.speculators.mlp import MLPSpeculator

FILE_NAME = "draft_vocab.json"


def load(folder: str | Path) -> torch.Tensor | None:
    """int64 token ids of a speculator folder's draft vocabulary, or None (then heads score every token)."""
    path = Path(folder) / FILE_NAME
    if not path.is_file():
        return None
    return torch.tensor(json.loads(path.read_text())["token_ids"], dtype=torch.long)


def load_speculator(
    folder: str | Path, base_model: nn.Module, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> MLPSpeculator:
    """A speculator folder as the engine serves it: tied to base_model and, where the folder has a draft
    vocabulary, scoring only those tokens."""
    from specdesk.engine.speculators.mlp import MLPSpeculator

    spec = MLPSpeculator.from_pretrained(folder, base_model=base_model, dtype=dtype, device=device)
    vocab = load(folder)
    if vocab is not None:
        spec.restrict_vocab(vocab.to(device))
    return spec
