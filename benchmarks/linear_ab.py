"""`python -m benchmarks.linear_ab`: the CPU path's two matmuls side by side, int8 weights (cpu_int8.c) against
Q4_1 weights (W4A8, cpu_q4.c), on a pass of the default model's 30 layers.

Each kernel runs the 120 linears of the stack (q/k/v, o, gate/up, down; the default model's shapes), each
linear's activations quantized first, as `cpu_model.c` chains them, for a pass of 1 to 512 tokens: decode
steps, draft-tree verifications and prefill chunks. The weights are random (timing does not depend on their
values) and distinct per layer, 30 layers of them, so a pass reads them from memory as a model's step does.
The two alternate, seven rounds, each keeping its fastest; ms per pass, the ratio, and the weight bytes per
pass. Each call goes through ctypes (a few microseconds, the same for both).

    python -m benchmarks.linear_ab                      # the machine's threads
    python -m benchmarks.linear_ab --threads 1 --out docs/bench_linear_ab.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from specdesk.kernels import cpu_int8, cpu_lib, cpu_q4

# The default model's layer: (in_features, out_features) of q/k/v fused, o, gate/up fused, down.
SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576)]
LAYERS = 30
ROWS = [1, 2, 4, 6, 8, 13, 64, 512]


def _weights(seed: int) -> tuple[list[cpu_int8.Int8Weight], list[cpu_q4.Q4Weight]]:
    gen = torch.Generator().manual_seed(seed)
    int8, q4 = [], []
    for _ in range(LAYERS):
        for k, n in SHAPES:
            w = torch.randn(n, k, generator=gen) * 0.05
            int8.append(cpu_int8.quantize_weight(w))
            q4.append(cpu_q4.quantize_weight(w))
    return int8, q4


def _pass(lib: Any, kind: str, weights: list[Any], x: dict[int, torch.Tensor], threads: int) -> float:
    m = next(iter(x.values())).shape[0]
    widest = max(k for k, _ in SHAPES)
    xu = torch.empty(m, widest, dtype=torch.uint8)
    xs, sums = torch.empty(m, widest // 32), torch.empty(m, widest // 32)
    out = torch.empty(m, max(n for _, n in SHAPES), dtype=torch.bfloat16)
    bufs = (xu.data_ptr(), xs.data_ptr(), sums.data_ptr(), out.data_ptr())
    # Every argument ready before the clock starts: the loop times the kernels and ctypes alone.
    calls: list[tuple[Any, tuple[Any, ...]]] = []
    for w in weights:
        k, n, src = w.in_features, w.out_features, x[w.in_features].data_ptr()
        if kind == "int8":
            calls.append((lib.sd_quantize_rows, (src, 1, m, k, bufs[0], bufs[1], threads)))
            calls.append((lib.sd_linear, (bufs[0], bufs[1], m, k, w.packed.data_ptr(), w.wsum.data_ptr(),
                                          w.scales.data_ptr(), None, n, bufs[3], 1, threads)))  # fmt: skip
        else:
            calls.append((lib.sd_quantize_rows_q4, (src, 1, m, k, bufs[0], bufs[1], bufs[2], threads)))
            calls.append((lib.sd_linear_q4, (bufs[0], bufs[1], bufs[2], m, k, w.packed.data_ptr(),
                                             w.dm.data_ptr(), None, n, bufs[3], 1, threads)))  # fmt: skip
    start = time.perf_counter()
    for fn, args in calls:
        fn(*args)
    return time.perf_counter() - start


def run(threads: int, rounds: int = 7) -> list[dict[str, Any]]:
    lib = cpu_lib.library()
    if lib is None:
        raise SystemExit("no C compiler: the CPU kernels did not build")
    int8, q4 = _weights(0)
    nbytes = {
        "int8": sum(w.packed.numel() + w.scales.numel() * 4 for w in int8),  # what the AVX2 tile reads
        "q4_1": sum(w.packed.numel() + w.dm.numel() * 2 for w in q4),
    }
    rows = []
    for m in ROWS:
        gen = torch.Generator().manual_seed(m)
        x = {k: torch.randn(m, k, generator=gen).bfloat16() for k, _ in SHAPES}
        best = {"int8": float("inf"), "q4_1": float("inf")}
        for _ in range(rounds):
            for kind, weights in (("int8", int8), ("q4_1", q4)):
                best[kind] = min(best[kind], _pass(lib, kind, weights, x, threads))
        rows.append({"rows": m, "int8_ms": best["int8"] * 1e3, "q4_1_ms": best["q4_1"] * 1e3,
                     "ratio": best["int8"] / best["q4_1"], "int8_MB": nbytes["int8"] / 1e6,
                     "q4_1_MB": nbytes["q4_1"] / 1e6})  # fmt: skip
        print(f"{m:4d} rows: int8 {best['int8'] * 1e3:7.2f} ms, q4_1 {best['q4_1'] * 1e3:7.2f} ms, "
              f"{best['int8'] / best['q4_1']:.2f}x", flush=True)  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=None, help="default: torch's (the machine's cores)")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    threads = args.threads or torch.get_num_threads()
    print(f"int8 path: {cpu_lib.int8_path()}, {threads} threads, ms per pass of {LAYERS} layers' linears")
    rows = run(threads)
    print("| tokens in the pass | int8 weights | Q4_1 weights (W4A8) | ratio |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['rows']} | {r['int8_ms']:.2f} | {r['q4_1_ms']:.2f} | {r['ratio']:.2f}x |")
    print(f"weights read per pass: int8 {rows[0]['int8_MB']:.0f} MB, q4_1 {rows[0]['q4_1_MB']:.0f} MB")
    if args.out:
        Path(args.out).write_text(json.dumps({"threads": threads, "path": cpu_lib.int8_path(), "rows": rows},
                                             indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
