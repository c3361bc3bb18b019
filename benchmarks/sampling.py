"""`python -m benchmarks.sampling`: the sampler of a git revision against the working tree's, on the CPU.

What an engine step spends after the logits, for the shapes a console step has: `sample_rows` (the step's one
call) over a pass's rows of the default model's vocabulary, greedy and with the console's sampling
(temperature 0.7, top-p 0.9), for a plain step (1 row), a batch's or a draft tree's rows (5), and a tree's
rows that judge children by rejection sampling, as the console's unseeded requests do (3). Both
versions of `specdesk/engine/sampler.py` (the revision's loaded from git into a module of its own) run on
the same logits, peaked as a model's are, alternating, each keeping its fastest of several rounds; torch on
one thread, as while an engine on the C kernels lives. Tokens are not compared (a faster draw may consume its
random numbers differently); `tests/engine/test_sampler.py` checks the distribution.

    python -m benchmarks.sampling --against HEAD~1 --out docs/bench_sampling.json
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from benchmarks.common import file_at, write_results
from specdesk.engine import sampler
from specdesk.engine.sampling_params import SamplingParams

VOCAB = 49152  # the default model's
SAMPLED = "console (T 0.7, top-p 0.9)"
CASES = {"greedy": SamplingParams(temperature=0.0), SAMPLED: SamplingParams(temperature=0.7, top_p=0.9)}


def sampler_at(rev: str, folder: Path) -> ModuleType:
    """specdesk/engine/sampler.py as of `rev`, imported as a module of its own."""
    source = file_at(rev, "specdesk/engine/sampler.py")
    if source is None:
        raise SystemExit(f"{rev} has no specdesk/engine/sampler.py")
    path = folder / "sampler_at_rev.py"
    path.write_bytes(source)
    spec = importlib.util.spec_from_file_location("sampler_at_rev", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the module's annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def compare(modules: dict[str, Any], rounds: int = 7, calls: int = 20) -> list[dict[str, Any]]:
    """ms per sample_rows call of each module, per case and row count (fastest round)."""
    gen = torch.Generator().manual_seed(0)
    out = []
    shapes = [(name, rows, False) for name in CASES for rows in (1, 5)] + [(SAMPLED, 3, True)]
    for name, rows, tree in shapes:
        params = CASES[name]
        logits = torch.randn(rows, VOCAB, generator=gen) * 4  # a model's logits are peaked
        # A tree's rows: every row but the last judges one child, its row's likeliest token (unseeded).
        children = [[int(logits[r].argmax())] if tree and r < rows - 1 else [] for r in range(rows)]
        args: tuple[Any, ...] = (logits, [params] * rows, [None] * rows, children)
        best = dict.fromkeys(modules, float("inf"))
        for _ in range(rounds):
            for key, module in modules.items():
                start = time.perf_counter()
                for _ in range(calls):
                    module.sample_rows(*args)
                best[key] = min(best[key], (time.perf_counter() - start) / calls * 1e3)
        case = f"{name}, a tree's {rows} rows" if tree else f"{name}, {rows} row{'s' if rows > 1 else ''}"
        out.append({"case": case, **{f"{k}_ms": v for k, v in best.items()}})
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--against", default="HEAD", help="the git revision whose sampler is the baseline")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        rows = compare({"old": sampler_at(args.against, Path(tmp)), "new": sampler}, args.rounds)
    print(f"benchmarks.sampling: {args.against} (old) vs the working tree (new), ms per sample_rows call, "
          f"vocabulary {VOCAB}, torch on 1 thread\n\n| rows | old | new | old / new |\n|---|---|---|---|")  # fmt: skip
    for r in rows:
        print(f"| {r['case']} | {r['old_ms']:.3f} | {r['new_ms']:.3f} | {r['old_ms'] / r['new_ms']:.2f}x |")
    write_results("benchmarks.sampling", args.out, rows, argv)


if __name__ == "__main__":
    main()
