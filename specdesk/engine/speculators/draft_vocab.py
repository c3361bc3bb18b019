"""A speculator folder's draft vocabulary: the heads score only the tokens replies actually use.

Each head's output projection is [vocab, d]: for SmolLM2 (49152 tokens) one head row costs a fifth of the
whole base model, and IBM's [5, 4, 3] beam evaluates 26 rows a step. Support replies use a few thousand
distinct tokens, so the heads rank only the most frequent ones (FR-Spec, Zhao et al. 2025). Verification is
untouched, so output is exactly the same; a token outside the set can only be missed as a draft, never
emitted wrongly. `specdesk.training.draft_vocab` builds the file this module loads.

On a CPU the engine then packs the speculator's projections and draft heads (`pack_for_cpu`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from specdesk.engine.models.int8_linear import Int8Linear
from specdesk.engine.models.packed_linear import PackedLinear, can_pack
from specdesk.kernels import cpu_int8

if TYPE_CHECKING:
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


def pack_for_cpu(spec: MLPSpeculator, int8: bool = False) -> bool:
    """Inference on a CPU: the projections and draft-vocabulary heads prepacked for oneDNN in bf16 or, with
    int8 (the engine's int8 path) where every shape fits that kernel, as W8A8 `Int8Linear`s. Returns whether
    it packed (False where neither is available).

    Proposing reads every weight once per step at 1-20 rows, where float32 matmuls are bound by that read:
    packed bf16 is several times faster for the heads, and int8 reads half of bf16's bytes on the C kernels'
    thread pool (and sums each row exactly, which `candidates.Int8NodeRanker` builds on). Drafts may differ
    in the last bits (verification, hence output, does not).
    """
    weights = [p.weight for p in spec.proj if isinstance(p, nn.Linear)] + spec.draft_heads
    if int8 and all(cpu_int8.supported(w.shape[1], w.shape[0]) for w in weights):
        make: type[Int8LinearKeepingWeight | _CastingPackedLinear] = Int8LinearKeepingWeight
    elif can_pack(torch.bfloat16, next(spec.parameters()).device):
        make = _CastingPackedLinear
    else:
        return False
    packed: dict[int, nn.Module] = {}  # tied weights keep one packed copy
    for i, proj in enumerate(spec.proj):
        if isinstance(proj, nn.Linear):
            spec.proj[i] = packed.setdefault(id(proj), make(proj.weight.detach()))
    spec.packed_heads = [packed.setdefault(id(h), make(h.detach())) for h in spec.draft_heads]
    # The norm and GELU in one C call too: at a few rows per head, torch's 8 small ops cost more than the int8
    # matmul they feed (benchmarks.step_profile, "propose drafts").
    spec.fused_norm_act = make is Int8LinearKeepingWeight
    return True


class _CastingPackedLinear(PackedLinear):
    """A packed bf16 linear inside a float32 recurrence: casts in and back."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__(weight.bfloat16(), None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.to(torch.bfloat16)).to(x.dtype)


class Int8LinearKeepingWeight(Int8Linear):
    """An Int8Linear that keeps its float weight, as PackedLinear does (`Int8NodeRanker` fuses weights from it)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__(weight, None)
        self.weight = weight
