"""A frequency-ranked draft vocabulary: the speculator's heads score only the tokens replies actually use.

Each head's output projection is [vocab, d]: for SmolLM2 (49152 tokens) one head row costs a fifth of the
whole base model, and IBM's [5, 4, 3] beam evaluates 26 rows a step. Support replies use a few thousand
distinct tokens (the 2048 most frequent cover over 99 % of the base model's own greedy replies), so the
heads rank only the most frequent ones (FR-Spec, Zhao et al. 2025). Verification is untouched, so output is
exactly the same; a token outside the set can only be missed as a draft, never emitted wrongly.

The training run builds it from the stage-2 text, trains the heads' softmax over it and ships it with the
speculator; this command only rebuilds it (e.g. another --size) from the run's cached replies:

    python -m engine.speculators.draft_vocab
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from torch import nn

    from engine.speculators.mlp import MLPSpeculator

FILE_NAME = "draft_vocab.json"


def build(token_lists: Iterable[list[int]], size: int, always: Iterable[int] = ()) -> list[int]:
    """The `size` most frequent token ids (ties by id), plus `always` (e.g. EOS), most frequent first."""
    counts = Counter(t for tokens in token_lists for t in tokens)
    ranked = [t for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    keep = list(dict.fromkeys([*always, *ranked]))
    return keep[: max(size, len(list(always)))]


def save(folder: Path, token_ids: list[int]) -> Path:
    path = Path(folder) / FILE_NAME
    path.write_text(json.dumps({"token_ids": token_ids}) + "\n")
    return path


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
    from engine.speculators.mlp import MLPSpeculator

    spec = MLPSpeculator.from_pretrained(folder, base_model=base_model, dtype=dtype, device=device)
    vocab = load(folder)
    if vocab is not None:
        spec.restrict_vocab(vocab.to(device))
    return spec


def main(argv: list[str] | None = None) -> None:
    from engine.speculators.train import DEFAULT_OUT, TrainConfig

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replies", type=Path, default=Path(TrainConfig().work_dir) / "replies.json")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--size", type=int, default=4096)
    args = ap.parse_args(argv)
    replies = json.loads(args.replies.read_text())["replies"]
    from engine.models.loader import load_model
    from prompts.loader import load_conversations

    loaded = load_model(None, "float32", "cpu")
    # The base model's own replies first, then the training conversations' text to fill the set.
    texts = [m["content"] for conv in load_conversations("train") for m in conv]
    ranked = build(replies, args.size, always=loaded.eos_token_ids)
    filler = build([loaded.tokenizer.encode(t) for t in texts], args.size)
    ids = list(dict.fromkeys(ranked + filler))[: args.size]
    print(f"wrote {save(args.out, ids)}: {len(ids)} tokens from {len(replies)} replies and {len(texts)} messages")


if __name__ == "__main__":
    main()
