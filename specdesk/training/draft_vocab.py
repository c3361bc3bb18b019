"""Build a speculator's draft vocabulary: the most frequent tokens of the base model's own replies.

The training run builds it from the stage-2 text, trains the heads' softmax over it and ships it with the
speculator (`specdesk.engine.speculators.draft_vocab` loads it); this command only rebuilds it (e.g. another
--size) from the run's cached replies:

    python -m specdesk.training.draft_vocab
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from specdesk.engine.speculators.draft_vocab import FILE_NAME


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


def main(argv: list[str] | None = None) -> None:
    from specdesk.training.config import DEFAULT_OUT, TrainConfig

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replies", type=Path, default=Path(TrainConfig().work_dir) / "replies.json")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--size", type=int, default=4096)
    args = ap.parse_args(argv)
    replies = json.loads(args.replies.read_text())["replies"]
    from specdesk.engine.models.loader import load_model
    from specdesk.prompts.loader import load_conversations

    loaded = load_model(None, "float32", "cpu")
    # The base model's own replies first, then the training conversations' text to fill the set.
    texts = [m["content"] for conv in load_conversations("train") for m in conv]
    ranked = build(replies, args.size, always=loaded.eos_token_ids)
    filler = build([loaded.tokenizer.encode(t) for t in texts], args.size)
    ids = list(dict.fromkeys(ranked + filler))[: args.size]
    print(f"wrote {save(args.out, ids)}: {len(ids)} tokens from {len(replies)} replies and {len(texts)} messages")


if __name__ == "__main__":
    main()
