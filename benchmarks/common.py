"""What every benchmark suite prints: rows of SpecDesk against a baseline, measured in the same run."""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESULT = "RESULT "  # how a worker process marks its JSON line
ROOT = Path(__file__).resolve().parents[1]


def worker_result(argv: list[str], what: str) -> dict[str, Any]:
    """Run `python -m *argv` in a process of its own (a worker printing `RESULT <json>`) and return that JSON.

    Its other output is echoed, its stderr too when it fails. Benchmarks that set thread counts run one
    worker per count: an engine's thread settings hold for its whole process."""
    proc = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, check=False)
    lines = proc.stdout.splitlines()
    print("\n".join(line for line in lines if not line.startswith(RESULT)), flush=True)
    results = [line for line in lines if line.startswith(RESULT)]
    if proc.returncode or not results:
        sys.stderr.write(proc.stderr[-3000:])
    if not results:
        raise SystemExit(f"{what} failed (exit {proc.returncode})")
    return json.loads(results[-1][len(RESULT) :])


def add_turn_args(ap: argparse.ArgumentParser) -> None:
    """The options of an end-to-end A/B over `benchmarks.cpu`'s turns, one worker process per thread count."""
    ap.add_argument("--threads", type=int, nargs="+", default=None, help="default: 1 and the machine's cores")
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)


def run_workers(module: str, args: argparse.Namespace, extra: list[str]) -> list[dict[str, Any]]:
    """`worker_result` of `python -m module --worker T` for each thread count of `args` (add_turn_args'; default 1
    and the machine's cores): an engine's thread settings hold for its whole process, as in benchmarks.cpu."""
    results = []
    for t in args.threads or sorted({1, os.cpu_count() or 1}):
        argv = [module, "--worker", str(t), "--turns", str(args.turns), "--max-tokens", str(args.max_tokens), *extra]
        results.append(worker_result(argv, f"the {t}-thread run"))
    return results


def write_results(module: str, path: str | None, results: list[dict[str, Any]], argv: list[str] | None = None) -> None:
    """The results as JSON at path (if given), with the command that produced them (argv: main's, else the
    process's)."""
    if path:
        command = f"python -m {module} " + " ".join(argv if argv is not None else sys.argv[1:])
        Path(path).write_text(json.dumps({"command": command, "results": results}, indent=2) + "\n")


@dataclass
class Row:
    name: str
    specdesk: float
    baseline: float | None
    baseline_name: str
    unit: str
    target: str = ""

    @property
    def ratio(self) -> float | None:
        if self.baseline is None or self.baseline == 0:
            return None
        # For latencies lower is better, so the ratio is baseline / ours either way ("x better").
        return self.baseline / self.specdesk if self.unit == "s" else self.specdesk / self.baseline


def print_table(rows: list[Row], header: str) -> str:
    lines = [header, "", "| measurement | SpecDesk | baseline | baseline value | ratio | target |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        base = "n/a" if r.baseline is None else f"{r.baseline:.3f} {r.unit}"
        ratio = "n/a" if r.ratio is None else f"{r.ratio:.2f}x"
        lines.append(f"| {r.name} | {r.specdesk:.3f} {r.unit} | {r.baseline_name} | {base} | {ratio} | {r.target} |")
    text = "\n".join(lines)
    print(text)
    return text


def aggregate_rate(rates: list[float], tokens: list[int] | None = None) -> float:
    """Total tokens / total time of requests with these rates (tokens each, default equal): what a stream
    of them achieves. The mean of per-request rates would favour a speculator whose acceptance varies
    across conversations (a fast request counts as much as a slow one that took twice the time)."""
    pairs = [(n, r) for n, r in zip(tokens or [1] * len(rates), rates, strict=True) if n > 0 and r > 0]
    return sum(n for n, _ in pairs) / sum(n / r for n, r in pairs) if pairs else 0.0


def file_at(rev: str, rel: str) -> bytes | None:
    """The repository file `rel` (a path from the root) as of git revision `rev`; None if the revision lacks it."""
    shown = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{rel}"], capture_output=True)
    return shown.stdout if shown.returncode == 0 else None


def kernel_sources_at(rev: str, folder: Path) -> Path:
    """The CPU kernels' C files as of git revision `rev`, written into folder (a file the revision lacks is left
    empty): what a kernel A/B (attention_ab, linear_ab --against) builds as its "old" side."""
    from specdesk.kernels import cpu_lib

    for path in [*cpu_lib._SOURCES, *cpu_lib._HEADERS]:
        (folder / path.name).write_bytes(file_at(rev, path.relative_to(ROOT).as_posix()) or b"")
    return folder


def build_kernels(sources: Path | None, cache: Path) -> ctypes.CDLL:
    """cpu_lib's build of the C files in `sources` (None: the working tree's) into a cache folder of its own."""
    from specdesk.kernels import cpu_lib

    lib = cpu_lib.build(sources, cache)
    if lib is None:
        raise SystemExit("no C compiler builds the kernels here")
    return lib
