"""A frozen store of the base model's own replies: n-gram drafts where a conversation has no match of its own.

A small model phrases support answers alike from one conversation to the next ("I'm sorry to hear that",
"please don't hesitate to reach out"), whatever the customer wrote. Its own replies to the training prompts,
generated under the console's repetition penalty (`specdesk.training.reply_store` makes them), hold those
phrases. The store maps every n-gram of them (n = min_n .. max_n) to the token that followed it most often;
a draft walks that map from a sequence's last tokens, the longest known n-gram first, one token at a time.

Unlike the MLP speculator's heads, the walk knows nothing of the penalty, yet it is right more often under
it: a penalized reply avoids what it already said, and what it says instead is the model's stock phrasing.

The n-grams are keyed by 64-bit hashes in one sorted numpy array (a few MB for ~10^5 reply tokens, where a
dict of tuples would take tens). A collision can only make a wrong draft, which verification rejects: the
output never depends on the store.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path

import numpy as np

FILE_NAME = "replies.npz"
_MASK = (1 << 64) - 1
_SEED = 0x9E3779B97F4A7C15  # times n: n-grams of different lengths hash apart
_PRIME = 0x100000001B3  # FNV-1a's 64-bit prime


def _hash(tokens: Sequence[int]) -> int:
    """The key of one n-gram, as `_hashes` computes it for every window (uint64 arithmetic, wrapping)."""
    h = (len(tokens) * _SEED) & _MASK
    for t in tokens:
        h = ((h ^ (t + 1)) * _PRIME) & _MASK
    return h


def _hashes(windows: np.ndarray) -> np.ndarray:
    """Keys of the rows of windows [m, n] (int64 token ids)."""
    h = np.full(windows.shape[0], (windows.shape[1] * _SEED) & _MASK, dtype=np.uint64)
    for j in range(windows.shape[1]):
        h = (h ^ (windows[:, j] + 1).astype(np.uint64)) * np.uint64(_PRIME)
    return h


class ReplyStore:
    """n-gram -> the continuation seen most often (ties: the smaller token id), over a list of replies."""

    def __init__(self, replies: Sequence[Sequence[int]], max_n: int = 4, min_n: int = 2) -> None:
        lengths = np.array([len(r) for r in replies], dtype=np.int64)
        tokens = np.fromiter((t for r in replies for t in r), dtype=np.int64, count=int(lengths.sum()))
        self._build(tokens, lengths, max_n, min_n)

    def _build(self, tokens: np.ndarray, lengths: np.ndarray, max_n: int, min_n: int) -> None:
        """The sorted keys and their continuations from the replies' tokens end to end and their lengths."""
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
        self.max_n, self.min_n = max_n, min_n
        self.num_replies, self.num_tokens = len(lengths), len(tokens)
        # Position e's reply starts at starts[e]: a window tokens[e - n : e] before the continuation tokens[e]
        # belongs to e's reply where e - n >= starts[e].
        starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
        keys, nexts = [], []
        for n in range(min_n, max_n + 1):
            if len(tokens) <= n:
                continue
            e = np.arange(n, len(tokens))
            inside = e - n >= starts[n:]
            keys.append(_hashes(np.lib.stride_tricks.sliding_window_view(tokens[:-1], n)[inside]))
            nexts.append(tokens[n:][inside])
        key = np.concatenate(keys) if keys else np.empty(0, np.uint64)
        nxt = np.concatenate(nexts) if nexts else np.empty(0, np.int64)
        # One sort of (n-gram, continuation) pairs packed into a uint64 each: the hash's top 64 - bits bits, then
        # the token (two lexsorts of ~10^6 pairs took ~0.35 s of an engine's start). Runs of equal pairs are
        # counted, and each n-gram keeps the first of its most counted continuations (the smaller id on a tie).
        if not len(key):
            self.bits, self.keys, self.next_tokens = 1, np.empty(0, np.uint64), np.empty(0, np.int32)
            return
        self.bits = max(int(nxt.max()).bit_length(), 1)
        pairs = np.sort(((key >> np.uint64(self.bits)) << np.uint64(self.bits)) | nxt.astype(np.uint64))
        run = np.flatnonzero(np.append(True, pairs[1:] != pairs[:-1]))
        counts = np.diff(np.append(run, len(pairs)))
        pairs = pairs[run]
        gram = pairs >> np.uint64(self.bits)
        group = np.flatnonzero(np.append(True, gram[1:] != gram[:-1]))
        most = np.repeat(np.maximum.reduceat(counts, group), np.diff(np.append(group, len(gram))))
        best = np.flatnonzero(counts == most)  # each group's most counted pairs, in token order
        best = best[np.append(True, gram[best][1:] != gram[best][:-1])]
        self.keys = gram[best]
        self.next_tokens = (pairs[best] & np.uint64((1 << self.bits) - 1)).astype(np.int32)

    def __len__(self) -> int:
        """The number of distinct n-grams stored."""
        return len(self.keys)

    def next_token(self, tokens: Sequence[int]) -> int | None:
        """The continuation of the longest stored n-gram that tokens end with, or None."""
        for n in range(min(self.max_n, len(tokens)), self.min_n - 1, -1):
            h = np.uint64(_hash(tokens[len(tokens) - n :]) >> self.bits)
            i = int(np.searchsorted(self.keys, h))
            if i < len(self.keys) and self.keys[i] == h:
                return int(self.next_tokens[i])
        return None

    def walk(self, tokens: Sequence[int], k: int) -> list[int]:
        """Up to k tokens after tokens, each the store's continuation of what precedes it (drafts included)."""
        context = [int(t) for t in tokens[len(tokens) - self.max_n :]]
        draft: list[int] = []
        while len(draft) < k:
            t = self.next_token(context)
            if t is None:
                break
            draft.append(t)
            context = [*context[1:], t] if len(context) == self.max_n else [*context, t]
        return draft

    # ---- files ------------------------------------------------------------------------------------
    @staticmethod
    def save(path: str | Path, replies: Sequence[Sequence[int]]) -> None:
        """Write replies (token ids) as concatenated int32 tokens and their offsets."""
        offsets = np.cumsum([0, *(len(r) for r in replies)]).astype(np.int64)
        tokens = np.fromiter((t for r in replies for t in r), dtype=np.int32, count=int(offsets[-1]))
        np.savez_compressed(path, tokens=tokens, offsets=offsets)

    @staticmethod
    def read(path: str | Path) -> list[list[int]]:
        """The replies a `save` wrote."""
        with np.load(path, allow_pickle=False) as f:
            tokens, offsets = f["tokens"], f["offsets"]
        return [tokens[a:b].tolist() for a, b in pairwise(offsets.tolist())]

    @classmethod
    def load(cls, path: str | Path, max_n: int = 4, min_n: int = 2) -> ReplyStore:
        """The store of the replies a `save` wrote (read as arrays: no list per reply)."""
        store = cls.__new__(cls)
        with np.load(path, allow_pickle=False) as f:
            store._build(f["tokens"].astype(np.int64), np.diff(f["offsets"]).astype(np.int64), max_n, min_n)
        return store


def find(folder: str | Path | None) -> Path | None:
    """A speculator folder's reply store file, or None."""
    if folder is None:
        return None
    path = Path(folder) / FILE_NAME
    return path if path.is_file() else None
