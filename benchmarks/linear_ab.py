"""`python -m benchmarks.linear_ab`: the CPU path's two matmuls side by side, int8 weights (cpu_int8.c) against
Q4_1 weights (W4A8, cpu_q4.c), on a pass of the default model's 30 layers, and the int8 output projection.

Each kernel runs the 120 linears of the stack (q/k/v, o, gate/up, down; the default model's shapes), each
linear's activations quantized first, as `cpu_model.c` chains them, for a pass of 1 to 512 tokens: decode
steps, draft-tree verifications and prefill chunks. The weights are random (timing does not depend on their
values) and distinct per layer, 30 layers of them, so a pass reads them from memory as a model's step does,
laid out as the engine lays them (`int8_linear.place_weights`: end to end, on huge pages where the OS gives them). The
"head" column is the default model's output projection (576 -> 49152, Q8_0 in its file, so int8 here), timed
right after the Q4_1 pass as a decode step runs it. The kinds alternate, seven rounds, each keeping its
fastest; ms per pass, the ratio, and the weight bytes per pass. Each call goes through ctypes (a few
microseconds, the same for both).

    python -m benchmarks.linear_ab                      # the machine's threads
    python -m benchmarks.linear_ab --out docs/bench_linear_ab.json

With `--against REV`, each kernel of the working tree runs against its build at git revision REV instead (both
compiled as cpu_lib compiles them, each into a folder of its own; all alternate), and every linear's output
of the two builds is compared bit for bit (a change that keeps the arithmetic keeps them):

    python -m benchmarks.linear_ab --against HEAD~1
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import build_kernels, kernel_sources_at
from specdesk.engine.models.int8_linear import place_weights
from specdesk.kernels import cpu_int8, cpu_lib, cpu_q4

# The default model's layer: (in_features, out_features) of q/k/v fused, o, gate/up fused, down.
SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576)]
LAYERS = 30
HEAD = (576, 49152)  # the default model's output projection
ROWS = [1, 2, 4, 6, 8, 13, 64, 512]
KINDS = ("int8", "q4_1", "head")


def _weights(seed: int) -> dict[str, list[Any]]:
    """Each kind's weights, placed as the engine places them (one mapping per kind, in pass order)."""
    gen = torch.Generator().manual_seed(seed)
    int8, q4 = [], []
    for _ in range(LAYERS):
        for k, n in SHAPES:
            w = torch.randn(n, k, generator=gen) * 0.05
            int8.append(cpu_int8.quantize_weight(w))
            q4.append(cpu_q4.quantize_weight(w))
    head = [cpu_int8.quantize_weight(torch.randn(HEAD[1], HEAD[0], generator=gen) * 0.05)]
    return {"int8": place_weights(int8), "q4_1": place_weights(q4), "head": place_weights(head)}


def _calls(lib: Any, kind: str, weights: list[Any], x: dict[int, torch.Tensor], threads: int,
           outs: list[torch.Tensor], scratch: list[torch.Tensor]) -> list[tuple[Any, tuple[Any, ...]]]:  # fmt: skip
    """The pass's kernel calls, every argument ready; linear i writes outs[i % len(outs)]. scratch: the
    quantized activations' buffers (`_scratch`), which the caller keeps alive."""
    m = next(iter(x.values())).shape[0]
    bufs = tuple(t.data_ptr() for t in scratch)
    calls: list[tuple[Any, tuple[Any, ...]]] = []
    for i, w in enumerate(weights):
        k, n, src, out = w.in_features, w.out_features, x[w.in_features].data_ptr(), outs[i % len(outs)].data_ptr()
        if kind != "q4_1":
            calls.append((lib.sd_quantize_rows, (src, 1, m, k, bufs[0], bufs[1], threads)))
            calls.append((lib.sd_linear, (bufs[0], bufs[1], m, k, w.packed.data_ptr(), w.wsum.data_ptr(),
                                          w.scales.data_ptr(), None, n, out, 1, threads)))  # fmt: skip
        else:
            calls.append((lib.sd_quantize_rows_q4, (src, 1, m, k, bufs[0], bufs[1], bufs[2], threads)))
            calls.append((lib.sd_linear_q4, (bufs[0], bufs[1], bufs[2], m, k, w.packed.data_ptr(),
                                             w.dm.data_ptr(), None, n, out, 1, threads)))  # fmt: skip
    return calls


def _scratch(m: int) -> list[torch.Tensor]:
    widest = max(k for k, _ in [*SHAPES, HEAD])  # codes, scales and sums of m tokens
    return [torch.empty(m, widest, dtype=torch.uint8), torch.empty(m, widest // 32), torch.empty(m, widest // 32)]


def _pass(lib: Any, kind: str, weights: list[Any], x: dict[int, torch.Tensor], threads: int) -> float:
    m = next(iter(x.values())).shape[0]
    out = torch.empty(m, max(w.out_features for w in weights), dtype=torch.bfloat16)
    scratch = _scratch(m)
    calls = _calls(lib, kind, weights, x, threads, [out], scratch)
    # Every argument ready before the clock starts: the loop times the kernels and ctypes alone.
    start = time.perf_counter()
    for fn, args in calls:
        fn(*args)
    return time.perf_counter() - start


def _outputs(lib: Any, kind: str, weights: list[Any], x: dict[int, torch.Tensor], threads: int) -> list[torch.Tensor]:
    """Every linear's output of one pass (untimed)."""
    m = next(iter(x.values())).shape[0]
    outs, scratch = [torch.empty(m, w.out_features, dtype=torch.bfloat16) for w in weights], _scratch(m)
    for fn, args in _calls(lib, kind, weights, x, threads, outs, scratch):
        fn(*args)
    return outs


def run(threads: int, rounds: int = 7) -> list[dict[str, Any]]:
    lib = cpu_lib.library()
    if lib is None:
        raise SystemExit("no C compiler: the CPU kernels did not build")
    kinds = _weights(0)
    nbytes = {  # what the AVX2 tiles read
        kind: sum(w.packed.numel() + (w.dm.numel() * 2 if kind == "q4_1" else w.scales.numel() * 4) for w in ws)
        for kind, ws in kinds.items()
    }
    rows = []
    for m in ROWS:
        gen = torch.Generator().manual_seed(m)
        x = {k: torch.randn(m, k, generator=gen).bfloat16() for k, _ in SHAPES}
        best = dict.fromkeys(kinds, float("inf"))
        for _ in range(rounds):
            for kind, weights in kinds.items():
                best[kind] = min(best[kind], _pass(lib, kind, weights, x, threads))
        rows.append({"rows": m, "int8_ms": best["int8"] * 1e3, "q4_1_ms": best["q4_1"] * 1e3,
                     "ratio": best["int8"] / best["q4_1"], "head_ms": best["head"] * 1e3,
                     **{f"{kind}_MB": nbytes[kind] / 1e6 for kind in kinds}})  # fmt: skip
        print(f"{m:4d} rows: int8 {best['int8'] * 1e3:7.2f} ms, q4_1 {best['q4_1'] * 1e3:7.2f} ms, "
              f"{best['int8'] / best['q4_1']:.2f}x, head {best['head'] * 1e3:.2f} ms", flush=True)  # fmt: skip
    return rows


def against(rev: str, threads: int, rounds: int = 7) -> list[dict[str, Any]]:
    """Each kernel of the working tree against its build at `rev`: per pass size, each one's fastest round (ms)
    and whether every linear's output is the same bits."""
    kinds = _weights(0)
    with tempfile.TemporaryDirectory() as tmp:
        sources = Path(tmp) / "sources"
        sources.mkdir()
        libs = {"old": build_kernels(kernel_sources_at(rev, sources), Path(tmp) / "old"),
                "new": build_kernels(None, Path(tmp) / "new")}  # fmt: skip
        rows = []
        for m in ROWS:
            gen = torch.Generator().manual_seed(m)
            x = {k: torch.randn(m, k, generator=gen).bfloat16() for k, _ in SHAPES}
            best = {(side, kind): float("inf") for side in libs for kind in kinds}
            for _ in range(rounds):
                for side, lib in libs.items():
                    for kind, weights in kinds.items():
                        best[side, kind] = min(best[side, kind], _pass(lib, kind, weights, x, threads))
            row: dict[str, Any] = {"rows": m}
            for kind, weights in kinds.items():
                old, new = (_outputs(libs[side], kind, weights, x, threads) for side in ("old", "new"))
                row[kind] = {"old_ms": best["old", kind] * 1e3, "new_ms": best["new", kind] * 1e3,
                             "same_bits": all(torch.equal(a, b) for a, b in zip(old, new, strict=True))}  # fmt: skip
            rows.append(row)
            done = (f"{k} {row[k]['old_ms']:.2f} -> {row[k]['new_ms']:.2f} ms" for k in kinds)
            print(f"{m:4d} rows: " + ", ".join(done), flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=None, help="default: torch's (the machine's cores)")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument("--against", default=None, help="a git revision: its kernels (old) against the working tree's")
    args = ap.parse_args(argv)
    threads = args.threads or torch.get_num_threads()
    if args.against:
        print(f"{args.against} (old) vs the working tree (new), {cpu_lib.int8_path()}, {threads} threads, "
              f"ms per pass of {LAYERS} layers' linears")  # fmt: skip
        ab = against(args.against, threads)
        print("| tokens in the pass | " + " | ".join(f"{k} old | {k} new | old / new | same bits" for k in KINDS)
              + " |\n|---|" + "---|---|---|---|" * len(KINDS))  # fmt: skip
        for r in ab:
            cells = [f"{r[k]['old_ms']:.2f} | {r[k]['new_ms']:.2f} | {r[k]['old_ms'] / r[k]['new_ms']:.2f}x | "
                     f"{'yes' if r[k]['same_bits'] else 'no'}" for k in KINDS]  # fmt: skip
            print(f"| {r['rows']} | " + " | ".join(cells) + " |")
        if args.out:
            Path(args.out).write_text(json.dumps({"threads": threads, "against": args.against, "rows": ab},
                                                 indent=2) + "\n")  # fmt: skip
        return
    print(f"int8 path: {cpu_lib.int8_path()}, {threads} threads, ms per pass of {LAYERS} layers' linears")
    rows = run(threads)
    print("| tokens in the pass | int8 weights | Q4_1 weights (W4A8) | ratio | output projection (int8) |\n"
          "|---|---|---|---|---|")  # fmt: skip
    for r in rows:
        print(f"| {r['rows']} | {r['int8_ms']:.2f} | {r['q4_1_ms']:.2f} | {r['ratio']:.2f}x | {r['head_ms']:.2f} |")
    print(f"weights read per pass: int8 {rows[0]['int8_MB']:.0f} MB, q4_1 {rows[0]['q4_1_MB']:.0f} MB, "
          f"head {rows[0]['head_MB']:.0f} MB")  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps({"threads": threads, "path": cpu_lib.int8_path(), "rows": rows},
                                             indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
