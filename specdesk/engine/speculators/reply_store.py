"""A frozen store of the base model's own replies: n-gram drafts where a conversation has no match of its own.

A small model phrases support answers alike from one conversation to the next ("I'm sorry to hear that",
"please don't hesitate to reach out"), whatever the customer wrote. Its own replies to the training prompts,
generated under the console's repetition penalty (`specdesk.training.reply_store` makes them), hold those
phrases. The store maps every n-gram of them (n = min_n .. max_n) to the token that followed it most often;
a draft walks that map from a sequence's last tokens, the longest known n-gram first, one token at a time.

Unlike the MLP speculator's heads, the walk knows nothing of the penalty, yet it is right more often under
it: a penalized reply avoids what it already said, and what it says instead is the model's stock phrasing.

The n-grams are keyed by 64-bit hashes in one sorted numpy array per length (a few MB for ~10^5 reply tokens,
where a dict of tuples would take tens). A collision can only make a wrong draft, which verification rejects:
the output never depends on the store. How sure each continuation is (its class, and the file's accuracy
table for the classes) lets the engine leave out drafts that would not pay their verification (`walk`).
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
# An n-gram's class: its continuation's share of the n-gram's continuations (5 buckets of 0.2), and how often the
# n-gram occurred (1, 2, 3 or more). Measured on held-out replies of the default model, a 4-gram's continuation
# was right 26-33 % of the time where the 4-gram occurred once with it, 80-91 % where it occurred 3+ times, always
# with it, and 7-14 % where the top continuation held under a fifth.
SHARE_BUCKETS, SUPPORT_BUCKETS = 5, 3
CLASSES = SHARE_BUCKETS * SUPPORT_BUCKETS


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
    """n-gram -> the continuation seen most often (ties: the smaller token id), over a list of replies.

    Each n-gram also keeps how sure that continuation is: its share of the n-gram's continuations and how often
    the n-gram occurred, in SHARE_BUCKETS x SUPPORT_BUCKETS classes. A store with an `accuracy` table (how
    often each class's continuation was right on replies the store did not hold: `calibrate`) gives every
    draft a probability, and `walk` stops where a chain's falls below what a verified token costs.
    """

    def __init__(self, replies: Sequence[Sequence[int]], max_n: int = 4, min_n: int = 2) -> None:
        lengths = np.array([len(r) for r in replies], dtype=np.int64)
        tokens = np.fromiter((t for r in replies for t in r), dtype=np.int64, count=int(lengths.sum()))
        self._build(tokens, lengths, max_n, min_n)

    def _build(self, tokens: np.ndarray, lengths: np.ndarray, max_n: int, min_n: int) -> None:
        """Per n, the sorted keys, continuations and classes from the replies' tokens end to end and lengths."""
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
        self.max_n, self.min_n = max_n, min_n
        self.num_replies, self.num_tokens = len(lengths), len(tokens)
        self.accuracy: np.ndarray | None = None  # [max_n - min_n + 1, CLASSES]: see calibrate
        self.bits = max(int(tokens.max()).bit_length(), 1) if len(tokens) else 1
        self.keys: dict[int, np.ndarray] = {}
        self.next_tokens: dict[int, np.ndarray] = {}
        self.classes: dict[int, np.ndarray] = {}
        # Position e's reply starts at starts[e]: a window tokens[e - n : e] before the continuation tokens[e]
        # belongs to e's reply where e - n >= starts[e].
        starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
        for n in range(min_n, max_n + 1):
            if len(tokens) <= n:
                self._build_n(n, np.empty(0, np.uint64), np.empty(0, np.int64))
                continue
            e = np.arange(n, len(tokens))
            inside = e - n >= starts[n:]
            windows = np.lib.stride_tricks.sliding_window_view(tokens[:-1], n)[inside]
            self._build_n(n, _hashes(windows), tokens[n:][inside])

    def _build_n(self, n: int, key: np.ndarray, nxt: np.ndarray) -> None:
        # One sort of (n-gram, continuation) pairs packed into a uint64 each: the hash's top 64 - bits bits, then
        # the token (two lexsorts of ~10^6 pairs took ~0.35 s of an engine's start). Runs of equal pairs are
        # counted, and each n-gram keeps the first of its most counted continuations (the smaller id on a tie).
        if not len(key):
            self.keys[n], self.next_tokens[n], self.classes[n] = (
                np.empty(0, np.uint64), np.empty(0, np.int32), np.empty(0, np.uint8))  # fmt: skip
            return
        pairs = np.sort(((key >> np.uint64(self.bits)) << np.uint64(self.bits)) | nxt.astype(np.uint64))
        run = np.flatnonzero(np.append(True, pairs[1:] != pairs[:-1]))
        counts = np.diff(np.append(run, len(pairs)))
        pairs = pairs[run]
        gram = pairs >> np.uint64(self.bits)
        group = np.flatnonzero(np.append(True, gram[1:] != gram[:-1]))
        top, total = np.maximum.reduceat(counts, group), np.add.reduceat(counts, group)
        most = np.repeat(top, np.diff(np.append(group, len(gram))))
        best = np.flatnonzero(counts == most)  # each group's most counted pairs, in token order
        best = best[np.append(True, gram[best][1:] != gram[best][:-1])]
        self.keys[n] = gram[best]
        self.next_tokens[n] = (pairs[best] & np.uint64((1 << self.bits) - 1)).astype(np.int32)
        share = np.minimum((top * SHARE_BUCKETS) // total, SHARE_BUCKETS - 1)
        support = np.minimum(total, SUPPORT_BUCKETS) - 1
        self.classes[n] = (share * SUPPORT_BUCKETS + support).astype(np.uint8)

    def __len__(self) -> int:
        """The number of distinct n-grams stored."""
        return sum(len(k) for k in self.keys.values())

    def lookup(self, tokens: Sequence[int]) -> tuple[int, int, int] | None:
        """(continuation, n, class) of the longest stored n-gram that tokens end with, or None."""
        for n in range(min(self.max_n, len(tokens)), self.min_n - 1, -1):
            keys = self.keys[n]
            h = np.uint64(_hash(tokens[len(tokens) - n :]) >> self.bits)
            i = int(np.searchsorted(keys, h))
            if i < len(keys) and keys[i] == h:
                return int(self.next_tokens[n][i]), n, int(self.classes[n][i])
        return None

    def next_token(self, tokens: Sequence[int]) -> int | None:
        """The continuation of the longest stored n-gram that tokens end with, or None."""
        hit = self.lookup(tokens)
        return None if hit is None else hit[0]

    def walk(self, tokens: Sequence[int], k: int, min_prob: float = 0.0) -> list[int]:
        """Up to k tokens after tokens, each the store's continuation of what precedes it (drafts included).

        With an accuracy table, the walk stops before a draft whose chain (the product of its and the earlier
        drafts' accuracies: the chance that verification reaches and keeps it) falls below min_prob."""
        context = [int(t) for t in tokens[len(tokens) - self.max_n :]]
        draft: list[int] = []
        chance = 1.0
        while len(draft) < k:
            hit = self.lookup(context)
            if hit is None:
                break
            t, n, cls = hit
            if self.accuracy is not None and min_prob > 0.0:
                chance *= float(self.accuracy[n - self.min_n, cls])
                if chance < min_prob:
                    break
            draft.append(t)
            context = [*context[1:], t] if len(context) == self.max_n else [*context, t]
        return draft

    def calibrate(self, held_out: Sequence[Sequence[int]]) -> np.ndarray:
        """[max_n - min_n + 1, CLASSES, 2]: per (n, class), the lookups over every position of held_out replies
        (ones this store does not hold) and how many of them gave the reply's next token.

        A chain's later draft is judged only where the earlier ones were right, i.e. on the reply's own tokens,
        so the first draft's counts at every position are also the later drafts' conditional ones."""
        counts = np.zeros((self.max_n - self.min_n + 1, CLASSES, 2), dtype=np.int64)
        for reply in held_out:
            for p in range(self.min_n, len(reply)):
                hit = self.lookup(reply[max(0, p - self.max_n) : p])
                if hit is not None:
                    counts[hit[1] - self.min_n, hit[2]] += (1, hit[0] == reply[p])
        return counts

    # ---- files ------------------------------------------------------------------------------------
    @staticmethod
    def save(path: str | Path, replies: Sequence[Sequence[int]], accuracy: np.ndarray | None = None) -> None:
        """Write replies (token ids) as concatenated int32 tokens and their offsets, and the accuracy table
        (`accuracy_of`) where there is one."""
        offsets = np.cumsum([0, *(len(r) for r in replies)]).astype(np.int64)
        tokens = np.fromiter((t for r in replies for t in r), dtype=np.int32, count=int(offsets[-1]))
        if accuracy is None:
            np.savez_compressed(path, tokens=tokens, offsets=offsets)
        else:
            np.savez_compressed(path, tokens=tokens, offsets=offsets, accuracy=accuracy.astype(np.float32))

    @staticmethod
    def read(path: str | Path) -> list[list[int]]:
        """The replies a `save` wrote."""
        with np.load(path, allow_pickle=False) as f:
            tokens, offsets = f["tokens"], f["offsets"]
        return [tokens[a:b].tolist() for a, b in pairwise(offsets.tolist())]

    @classmethod
    def load(cls, path: str | Path, max_n: int = 4, min_n: int = 2) -> ReplyStore:
        """The store of the replies a `save` wrote (read as arrays: no list per reply), with its accuracy table
        where the file has one for these n-gram lengths."""
        store = cls.__new__(cls)
        with np.load(path, allow_pickle=False) as f:
            store._build(f["tokens"].astype(np.int64), np.diff(f["offsets"]).astype(np.int64), max_n, min_n)
            accuracy = f["accuracy"] if "accuracy" in f.files else None
        if accuracy is not None and accuracy.shape == (max_n - min_n + 1, CLASSES):
            store.accuracy = accuracy.astype(np.float64)
        return store


def accuracy_of(replies: Sequence[Sequence[int]], folds: Sequence[int], max_n: int = 4, min_n: int = 2) -> np.ndarray:
    """The accuracy table of a store of replies, cross-fitted: each fold's replies are looked up in a store of
    the others (`ReplyStore.calibrate`), the counts summed, and each class's accuracy smoothed toward 1/4 by two
    pseudo-lookups (a class seen a few times says little). folds[i] is reply i's fold; replies of one prompt or
    one conversation belong in one fold, or the table learns their shared wording."""
    counts = np.zeros((max_n - min_n + 1, CLASSES, 2), dtype=np.int64)
    for fold in sorted(set(folds)):
        inside = [r for r, f in zip(replies, folds, strict=True) if f != fold]
        held = [r for r, f in zip(replies, folds, strict=True) if f == fold]
        counts += ReplyStore(inside, max_n, min_n).calibrate(held)
    return (counts[..., 1] + 0.5) / (counts[..., 0] + 2.0)


def find(folder: str | Path | None) -> Path | None:
    """A speculator folder's reply store file, or None."""
    if folder is None:
        return None
    path = Path(folder) / FILE_NAME
    return path if path.is_file() else None
