"""`python -m benchmarks.kernels_ab`: the CPU console's engine end to end on the C kernels of a git revision
against the same engine on the working tree's, side by side in one process per thread count.

One engine (`quantization="auto"`, the console's path) runs every turn twice, once on each build of the kernels
(the C sources of `--against`, default HEAD, and of the working tree, each compiled as
`specdesk.kernels.cpu_lib` compiles them, into a folder of its own): `cpu_lib.library()` answers with one build
or the other, and the engine calls the kernels through it on every pass. The turns are `benchmarks.cpu`'s (the
second customer turn of held-out conversations under the console's persona prompt, `--max-tokens` tokens,
repetition penalty 1.1 or `--repetition-penalty`, nothing cached), each first as a prefill alone (one token) and
then whole, plain and with default speculation, the two builds in an order that rotates from turn to turn.
Reported: prefill ms, tokens/s per turn (prefill included) and decoding alone (after the first token), the
ratios, whether both builds gave the same tokens (a kernel change that keeps the arithmetic must; one that
changes it may move a greedy choice), and, per build, on how many turns speculation gave plain decoding's tokens
(all of them, or it is a bug). With `--quality`, each build's logits at every prompt position against the
unquantized float32 model's (top-1 agreement and KL): how a change of the arithmetic moved the quantized path's
accuracy.

    python -m benchmarks.kernels_ab --out docs/bench_kernels_ab.json      # HEAD vs the working tree
    python -m benchmarks.kernels_ab --against HEAD~2 --threads 2 --quality
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks.common import RESULT, add_turn_args, build_kernels, kernel_sources_at, run_workers, write_results
from benchmarks.cpu import PENALTY, hidden_states, second_turns

SIDES = ("old", "new")
RUNS = ("prefill", "plain", "speculation")


class _Switch:
    """`cpu_lib.library` for the benchmark: the build of the side set last."""

    def __init__(self, libs: dict[str, Any]) -> None:
        self.libs, self.side = libs, "new"

    def __call__(self) -> Any:
        return self.libs[self.side]


def prompt_logits(llm: Any, prompts: list[list[int]]) -> list[Any]:
    """The model's float32 logits at every position of each prompt (`benchmarks.cpu.hidden_states`' passes)."""
    import torch

    with torch.inference_mode():
        return [llm.loaded.model.compute_logits(h).float() for h in hidden_states(llm, prompts)]


def against_reference(logits: list[Any], reference: list[Any]) -> dict[str, float]:
    """Top-1 agreement (percent of positions) and mean KL(reference || this) of two models' prompt logits."""
    import torch

    same = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(logits, reference, strict=True))
    positions = sum(a.shape[0] for a in logits)
    kl_div = torch.nn.functional.kl_div
    kl = sum(float(kl_div(a.log_softmax(-1), b.log_softmax(-1), log_target=True, reduction="sum"))
             for a, b in zip(logits, reference, strict=True))  # fmt: skip
    return {"positions": positions, "top1_percent": 100 * same / positions, "kl": kl / positions}


def worker(
    threads: int, against: str, turns: int, n: int, model: str | None = None, quality: bool = False,
    penalty: float = PENALTY,
) -> dict[str, Any]:  # fmt: skip
    """Both builds at one thread count, in this process (model: default, the built-in default model). quality:
    also each build's prompt logits against the model's unquantized float32 ones (top-1 agreement and KL at
    every prompt position): whether a change of the arithmetic moved the quantized path's accuracy. penalty:
    the turns' repetition penalty (1.0: none, where speculation verifies its largest trees)."""
    import torch

    torch.set_num_threads(threads)
    from specdesk.engine.llm import LLM
    from specdesk.engine.sampling_params import SamplingParams
    from specdesk.kernels import cpu_lib

    with tempfile.TemporaryDirectory() as tmp:
        libs = {"old": build_kernels(kernel_sources_at(against, Path(tmp)), Path(tmp) / "old"),
                "new": build_kernels(None, Path(tmp) / "new")}  # fmt: skip
        switch, library = _Switch(libs), cpu_lib.library
        cpu_lib.library = switch  # type: ignore[assignment]  # every kernel call asks it for the library
        llm = None
        try:
            llm = LLM(model, quantization="auto", dtype="auto", num_threads=threads)
            for switch.side in SIDES:  # warm-up on each build
                llm.generate([[1, 2, 3]], SamplingParams(max_tokens=8, ignore_eos=True))
            prompt_ids = [llm.apply_chat_template(m) for m in second_turns(turns)]
            params = SamplingParams(max_tokens=n, ignore_eos=True, repetition_penalty=penalty)
            cases = [(s, run) for run in RUNS for s in SIDES]
            seconds, decoding = dict.fromkeys(cases, 0.0), dict.fromkeys(cases, 0.0)
            tokens: dict[tuple[str, str], list[list[int]]] = {c: [] for c in cases}
            for i, ids in enumerate(prompt_ids):
                for run in RUNS:
                    for switch.side in SIDES[i % 2 :] + SIDES[: i % 2]:
                        llm.reset_prefix_cache()
                        llm.forget_replies()
                        turn = replace(params, max_tokens=1) if run == "prefill" else replace(
                            params, speculate=run == "speculation")  # fmt: skip
                        start = time.perf_counter()
                        out = llm.generate([ids], turn)[0]
                        seconds[switch.side, run] += time.perf_counter() - start
                        decoding[switch.side, run] += out.metrics.decode_s
                        tokens[switch.side, run].append(out.token_ids)
            logits = {}
            for switch.side in SIDES if quality else ():
                logits[switch.side] = prompt_logits(llm, prompt_ids)
        finally:
            if llm is not None:
                llm.shutdown()
            cpu_lib.library = library
    if quality:
        reference = LLM(model, dtype="float32", quantization=None, speculator=None, num_threads=threads)
        try:
            exact = prompt_logits(reference, prompt_ids)
        finally:
            reference.shutdown()
    result: dict[str, Any] = {
        "threads": threads, "against": against, "turns": len(prompt_ids), "max_tokens": n,
        "repetition_penalty": penalty,
        "prompt_tokens": sum(map(len, prompt_ids)) / len(prompt_ids),
        "same_tokens": all(tokens["old", run] == tokens["new", run] for run in RUNS),
        "turns_alike": sum(a == b for a, b in zip(tokens["old", "plain"], tokens["new", "plain"], strict=True)),
        "speculation_exact": {s: sum(a == b for a, b in zip(tokens[s, "plain"], tokens[s, "speculation"], strict=True))
                              for s in SIDES},
    }  # fmt: skip
    if quality:
        result["vs_float32"] = {s: against_reference(logits[s], exact) for s in SIDES}
    for s in SIDES:
        result[f"{s}, prefill ms"] = 1000 * seconds[s, "prefill"] / len(prompt_ids)
        for run in RUNS[1:]:
            result[f"{s}, {run} tok/s"] = n * len(prompt_ids) / seconds[s, run]
            decoded = (n - 1) * len(prompt_ids)  # tokens after each turn's first (none at --max-tokens 1)
            result[f"{s}, {run} decode tok/s"] = decoded / decoding[s, run] if decoded else 0.0
    return result


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| threads | measure | old | new | new vs old | same tokens |", "|---|---|---|---|---|---|"]
    for r in results:
        same = "yes" if r["same_tokens"] else "NO"
        old, new = r["old, prefill ms"], r["new, prefill ms"]
        lines.append(f"| {r['threads']} | prefill ms ({r['prompt_tokens']:.0f} tokens) | {old:.0f} | {new:.0f} | "
                     f"{old / new:.2f}x | {same} |")  # fmt: skip
        for run in RUNS[1:]:
            for measure, what in ((f"{run} tok/s", "per turn"), (f"{run} decode tok/s", "decoding alone")):
                old, new = r[f"old, {measure}"], r[f"new, {measure}"]
                lines.append(f"| {r['threads']} | {run} tok/s {what} | {old:.1f} | {new:.1f} | {new / old:.2f}x | "
                             f"{same} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--against", default="HEAD", help="the git revision whose kernels are the 'old' side")
    ap.add_argument("--model", default=None, help="default: the built-in default model")
    ap.add_argument("--quality", action="store_true", help="also each build's prompt logits against float32's")
    ap.add_argument("--repetition-penalty", type=float, default=PENALTY, help="1.1: the console's; 1.0: none")
    add_turn_args(ap)
    args = ap.parse_args(argv)
    if args.worker is not None:
        result = worker(
            args.worker, args.against, args.turns, args.max_tokens, args.model, args.quality, args.repetition_penalty
        )
        print(RESULT + json.dumps(result), flush=True)
        return
    extra = ["--against", args.against, *(["--model", args.model] if args.model else [])]
    extra += ["--quality"] if args.quality else []
    extra += ["--repetition-penalty", str(args.repetition_penalty)]
    results = run_workers("benchmarks.kernels_ab", args, extra)
    print(table(results))
    for r in results:
        exact = ", ".join(f"{s} {n}/{r['turns']}" for s, n in r["speculation_exact"].items())
        print(f"[{r['threads']} threads] plain turns alike on both builds: {r['turns_alike']}/{r['turns']} (a change "
              f"of the arithmetic may move a greedy choice; one that keeps it may not); speculation gives plain's "
              f"tokens: {exact}")  # fmt: skip
        for s, q in r.get("vs_float32", {}).items():
            print(f"[{r['threads']} threads] {s} build vs float32 on {q['positions']} prompt positions: top-1 "
                  f"{q['top1_percent']:.2f} %, KL {q['kl']:.5f}")  # fmt: skip
        if any(n != r["turns"] for n in r["speculation_exact"].values()):
            print(f"[{r['threads']} threads] speculation changed a reply: a bug", file=sys.stderr)
    write_results("benchmarks.kernels_ab", args.out, results, argv)


if __name__ == "__main__":
    main()
