"""`python -m benchmarks.attention_ab`: the CPU attention kernel of a git revision against the working tree's.

Both builds (the kernels' C sources of `--against`, default HEAD, and of the working tree, each compiled as
`specdesk.kernels.cpu_lib` compiles them, into a folder of their own) run the same passes, shaped as the
default model's (9 query heads, 3 KV heads, head_dim 64, pages of 16) on a console turn's context: prefill
chunks, a decode step, draft-tree verifications and a batch of decodes; the last cases run 30 layers with pages
of their own, so each layer reads them from memory as a model step does (the others repeat one layer's call,
its pages warm in the cache). They alternate, five rounds, taking turns at going first (so that neither
always runs right after the other), and each keeps its fastest round; the table gives ms per layer (a pass
runs it 30 times), the ratio of the fastest rounds, the median over the rounds of each round's own ratio (its two
runs back to back: on a shared machine whose speed drifts, the steadier of the two; with `--rounds 21` it held
unchanged code within 2 %, where the fastest rounds' ratio strayed by up to 25 %), and whether the two outputs are
the same bits (a kernel change that keeps the arithmetic keeps them). A tree of 2 prices one draft node; trees
of 11 and 17 (the n-gram's long drafts) are among the cold cases.

    python -m benchmarks.attention_ab                  # HEAD vs the working tree, 2 threads
    python -m benchmarks.attention_ab --against HEAD~3 --threads 1 --rounds 21
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import build_kernels, kernel_sources_at
from specdesk.kernels import cpu_attention, cpu_lib

HEADS, KV_HEADS, HEAD_DIM, PAGE = 9, 3, 64, 16
# name: (context + new tokens per sequence, new tokens per sequence, draft tree)
CASES: dict[str, tuple[list[int], list[int], bool]] = {
    "prefill, 512 new tokens": ([512], [512], False),
    "prefill, 168 new on 512 cached": ([680], [168], False),
    "decode, 1 on 680": ([680], [1], False),
    "verify a tree of 2 on 680 (one draft node)": ([680], [2], True),
    "verify a tree of 5 on 680": ([680], [5], True),
    "verify a tree of 11 on 680": ([680], [11], True),
    "decode 8 sequences, 1 on 700 each": ([700] * 8, [1] * 8, False),
    "decode, 1 on 3000 (a long conversation)": ([3000], [1], False),
}
# The same kinds of pass as a model step runs them: 30 layers, each with pages of its own, so that every layer
# reads its keys and values from memory rather than from a cache the previous call warmed.
LAYERS = 30
COLD_CASES: dict[str, tuple[list[int], list[int], bool]] = {
    "decode, 1 on 1000, 30 layers' pages": ([1000], [1], False),
    "verify a tree of 5 on 1000, 30 layers' pages": ([1000], [5], True),
    "decode, 1 on 1500, 30 layers' pages": ([1500], [1], False),
    "verify a tree of 5 on 1500, 30 layers' pages": ([1500], [5], True),
    "verify a tree of 11 on 1000, 30 layers' pages": ([1000], [11], True),
    "verify a tree of 17 on 1000, 30 layers' pages": ([1000], [17], True),
}


def batch(seq_lens: list[int], query_lens: list[int], tree: bool, seed: int = 0) -> dict[str, Any]:
    """A random pass over shuffled pages: paged_attention's arguments."""
    gen = torch.Generator().manual_seed(seed)
    pages = [-(-n // PAGE) for n in seq_lens]
    order = (torch.randperm(sum(pages), generator=gen)).tolist()
    tables = torch.zeros(len(seq_lens), max(pages), dtype=torch.int32)
    for i, n in enumerate(pages):
        tables[i, :n] = torch.tensor(order[sum(pages[:i]) : sum(pages[: i + 1])], dtype=torch.int32)
    shape = (sum(pages), PAGE, KV_HEADS, HEAD_DIM)
    k, v = (torch.randn(shape, generator=gen).to(torch.bfloat16) for _ in range(2))
    tokens = sum(query_lens)
    mask = None
    if tree:  # each new token sees itself and a random half of the new tokens before it
        mask = torch.zeros(tokens, max(query_lens), dtype=torch.bool)
        start = 0
        for q in query_lens:
            sub = torch.rand(q, q, generator=gen) < 0.5
            mask[start : start + q, :q] = sub.tril(-1) | torch.eye(q, dtype=torch.bool)
            start += q
    query = torch.randn(tokens, HEADS, HEAD_DIM, generator=gen).to(torch.bfloat16)
    return {"query": query, "k_cache": k, "v_cache": v, "block_tables": tables, "seq_lens": seq_lens,
            "query_lens": query_lens, "scale": HEAD_DIM**-0.5, "tree_mask": mask}  # fmt: skip


def compare(libs: dict[str, ctypes.CDLL], threads: int, rounds: int = 5) -> list[dict[str, Any]]:
    """Per case: each build's fastest round (ms per call) and whether their outputs are the same bits."""
    rows = []
    cpu_lib.set_num_threads(threads)
    real = cpu_lib.library
    try:
        cases = [(name, case, 1) for name, case in CASES.items()]
        cases += [(name, case, LAYERS) for name, case in COLD_CASES.items()]
        for name, (lens, q_lens, tree), layers in cases:
            passes = [batch(lens, q_lens, tree, seed=layer) for layer in range(layers)]
            reps = max(2, int(2e6 / (sum(lens) * sum(q_lens) * layers)))
            times: dict[str, list[float]] = {k: [] for k in libs}
            outs: dict[str, torch.Tensor | None] = {}
            for r in range(rounds):  # the builds take turns going first: neither gets the warmer machine
                for key, lib in list(libs.items())[:: 1 if r % 2 == 0 else -1]:
                    cpu_lib.library = lambda lib=lib: lib  # type: ignore[assignment]
                    start = time.perf_counter()
                    for _ in range(reps):
                        for args in passes:
                            outs[key] = cpu_attention.paged_attention(**args)
                    times[key].append((time.perf_counter() - start) / (reps * layers) * 1e3)
            a, b = outs.values()
            same = a is not None and b is not None and torch.equal(a, b)
            # Each round's ratio of its two runs, back to back: the machine's drift (10-20 % within minutes here)
            # moves both, where the fastest rounds of each may come from different minutes.
            first, second = times.values()
            paired = statistics.median(x / y for x, y in zip(first, second, strict=True))
            rows.append({"case": name, **{f"{k}_ms": min(v) for k, v in times.items()}, "paired_ratio": paired,
                         "same_bits": same})  # fmt: skip
    finally:
        cpu_lib.library = real
        cpu_lib.set_num_threads(None)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--against", default="HEAD", help="the git revision to compare the working tree with")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        sources = Path(tmp) / "sources"
        sources.mkdir()
        libs = {
            "old": build_kernels(kernel_sources_at(args.against, sources), Path(tmp) / "old"),
            "new": build_kernels(None, Path(tmp) / "new"),
        }
        rows = compare(libs, args.threads, args.rounds)
    print(f"benchmarks.attention_ab: {args.against} (old) vs the working tree (new), {args.threads} threads, "
          f"ms per layer (each build's fastest round; the median of the rounds' own ratios beside it)\n\n"
          f"| pass | old | new | old / new | median round, old / new | same bits |\n"
          f"|---|---|---|---|---|---|")  # fmt: skip
    for r in rows:
        print(
            f"| {r['case']} | {r['old_ms']:.3f} | {r['new_ms']:.3f} | {r['old_ms'] / r['new_ms']:.2f}x | "
            f"{r['paired_ratio']:.2f}x | {'yes' if r['same_bits'] else 'no'} |"
        )


if __name__ == "__main__":
    main()
