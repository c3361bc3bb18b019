"""`python -m benchmarks.pages_ab`: the CPU console's engine with its weights and KV pool on huge pages (the
default) against the same engine on 4 KiB pages, end to end, side by side in one process per thread count.

Both engines load the same model the same way (`quantization="auto"`, the console's path; weights gathered end
to end by `int8_linear.gather_weights`); the second is loaded with `SPECDESK_HUGE_PAGES=0`, so its mapping
never asks the OS for huge pages (`kernels/cpu_pages.py`). The turns are `benchmarks.cpu`'s (the second
customer turn of held-out conversations under the console's persona prompt, exactly `--max-tokens` tokens,
repetition penalty 1.1, nothing cached); each turn runs plain decoding and default speculation on both engines,
in an order that rotates from turn to turn. Reported: tokens/s end to end (prefill included), the ratio, and
whether the two engines gave the same tokens (they must: only where the bytes live differs).

    python -m benchmarks.pages_ab --out docs/bench_pages_ab.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from typing import Any

from benchmarks.common import RESULT, add_turn_args, run_workers, write_results
from benchmarks.cpu import PENALTY, second_turns

SIDES = ("4 KiB pages", "huge pages")


def worker(threads: int, turns: int, n: int, temperature: float) -> dict[str, Any]:
    """Both engines at one thread count, in this process."""
    import torch

    torch.set_num_threads(threads)
    from specdesk.engine.llm import LLM
    from specdesk.engine.sampling_params import SamplingParams
    from specdesk.kernels import cpu_pages

    engines: dict[str, Any] = {}
    huge: dict[str, int] = {}
    for side in SIDES:
        os.environ["SPECDESK_HUGE_PAGES"] = "1" if side == "huge pages" else "0"
        before = cpu_pages.huge_bytes()
        engines[side] = LLM(quantization="auto", dtype="auto", num_threads=threads)
        engines[side].generate([[1, 2, 3]], SamplingParams(max_tokens=8, ignore_eos=True))  # warm-up, KV touched
        huge[side] = cpu_pages.huge_bytes() - before
    os.environ.pop("SPECDESK_HUGE_PAGES")
    prompt_ids = [engines[SIDES[0]].apply_chat_template(m) for m in second_turns(turns)]
    params = SamplingParams(max_tokens=n, ignore_eos=True, repetition_penalty=PENALTY, temperature=temperature,
                            top_p=0.9 if temperature else 1.0)  # fmt: skip
    runs = [(side, spec) for spec in (False, True) for side in SIDES]
    seconds = dict.fromkeys(runs, 0.0)
    tokens: dict[tuple[str, bool], list[list[int]]] = {r: [] for r in runs}
    try:
        for i, ids in enumerate(prompt_ids):
            for side, spec in runs[i % len(runs) :] + runs[: i % len(runs)]:
                llm = engines[side]
                llm.reset_prefix_cache()
                llm.forget_replies()
                start = time.perf_counter()
                out = llm.generate([ids], replace(params, speculate=spec, seed=i if temperature else None))[0]
                seconds[side, spec] += time.perf_counter() - start
                tokens[side, spec].append(out.token_ids)
        same = all(tokens[SIDES[0], s] == tokens[SIDES[1], s] for s in (False, True))
        result: dict[str, Any] = {"threads": threads, "turns": len(prompt_ids), "max_tokens": n,
                                  "temperature": temperature, "huge_page_bytes": huge, "same_tokens": same}  # fmt: skip
        for side, spec in runs:
            result[f"{side}, {'speculation' if spec else 'plain'}"] = n * len(prompt_ids) / seconds[side, spec]
        return result
    finally:
        for llm in engines.values():
            llm.shutdown()


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| threads | decoding | 4 KiB pages tok/s | huge pages tok/s | huge / 4 KiB | same tokens |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        for mode in ("plain", "speculation"):
            small, big = r[f"4 KiB pages, {mode}"], r[f"huge pages, {mode}"]
            lines.append(f"| {r['threads']} | {mode} | {small:.1f} | {big:.1f} | {big / small:.2f}x | "
                         f"{'yes' if r['same_tokens'] else 'NO'} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_turn_args(ap)
    ap.add_argument("--temperature", type=float, default=0.0, help="0.7: the console's (with top-p 0.9, seeded)")
    args = ap.parse_args(argv)
    if args.worker is not None:
        print(RESULT + json.dumps(worker(args.worker, args.turns, args.max_tokens, args.temperature)), flush=True)
        return
    results = run_workers("benchmarks.pages_ab", args, ["--temperature", str(args.temperature)])
    print(table(results))
    for r in results:
        print(f"[{r['threads']} threads] bytes on huge pages after loading: {r['huge_page_bytes']}")
        if not r["same_tokens"]:
            print(f"[{r['threads']} threads] the two engines' tokens differ: a bug", file=sys.stderr)
    write_results("benchmarks.pages_ab", args.out, results, argv)


if __name__ == "__main__":
    main()
