"""`python -m benchmarks.kernels_e2e_ab`: the CPU kernels of a git revision against the working tree's, end to end.

`attention_ab` and `linear_ab` time one kernel; this times what a user gets from a kernel change: the turns of
`benchmarks.cpu` (the second customer turn of held-out conversations under the console's persona prompt, exactly
`--max-tokens` tokens, greedy under the console's repetition penalty unless told otherwise, nothing cached) on one
engine of the CPU console's path (`quantization="auto"`), in one process. Both builds (the C sources of
`--against`, default HEAD, and of the working tree, each compiled as `specdesk.kernels.cpu_lib` compiles them) are
loaded side by side, and the engine calls one or the other (every kernel call goes through `cpu_lib.library()`; the
weights' layout is the same). Each turn runs plain decoding and speculation under each build, in an order that
rotates from turn to turn. The one engine's speculation policy measures step costs under both builds alike (its
widths and rests are the engine's, not a build's): a change in what a node costs shows less in speculation's ratio
here than it would with one engine per build. Reported per build: tokens/s end to end (submit to last token,
prefill included) and from the first token to the last, plain and speculative, and tokens per verification; whether
speculation gave plain decoding's tokens (it must, under either build).

A kernel change that moves the arithmetic changes the text, so with `--reference float32` the run also reports
each build's quality against the float32 path (the torch twins, exact to transformers): teacher-forced top-1
agreement with the float32 greedy replies (`benchmarks.cpu`'s measure) and how many replies match whole.

    python -m benchmarks.kernels_e2e_ab --reference float32 --out docs/bench_kernels_e2e_ab.json
    python -m benchmarks.kernels_e2e_ab --against HEAD~2 --threads 1 --repetition-penalty 1.0
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks.common import build_kernels, kernel_sources_at
from benchmarks.cpu import PENALTY, second_turns, teacher_forced_top1


@contextlib.contextmanager
def using(lib: ctypes.CDLL) -> Iterator[None]:
    """Every kernel call made inside goes to `lib` (they all look the library up through cpu_lib.library())."""
    from specdesk.kernels import cpu_lib

    saved = cpu_lib.library
    setattr(cpu_lib, "library", lambda: lib)  # noqa: B010 (mypy: a module's function is not assignable)
    try:
        yield
    finally:
        setattr(cpu_lib, "library", saved)  # noqa: B010


def reference_replies(model: str | None, prompt_ids: list[list[int]], n: int, penalty: float) -> list[list[int]]:
    """Greedy replies of the float32 path (no quantization, the torch twins: transformers' numbers)."""
    from specdesk.engine.llm import LLM
    from specdesk.engine.sampling_params import SamplingParams

    llm = LLM(model, dtype="float32", quantization=None, speculator=None)
    try:
        params = SamplingParams(max_tokens=n, ignore_eos=True, repetition_penalty=penalty)
        return [out.token_ids for out in llm.generate(prompt_ids, params)]
    finally:
        llm.shutdown()


def run(libs: dict[str, ctypes.CDLL], threads: int, turns: int, n: int, penalty: float,
        reference: str | None = None, model: str | None = None,
        speculator: str = "auto") -> dict[str, Any]:  # fmt: skip
    """Both builds (libs: exactly two, old first) on one engine of `model` (None: the default), side by side."""
    import torch

    torch.set_num_threads(threads)
    from specdesk.engine.llm import LLM
    from specdesk.engine.sampling_params import SamplingParams

    llm = LLM(model, quantization="auto", dtype="auto", speculator=speculator, spec_max_batch_size=32,
              num_threads=threads)  # fmt: skip
    prompt_ids = [llm.apply_chat_template(m) for m in second_turns(turns)]
    turns = len(prompt_ids)  # the held-out conversations with a second turn may be fewer than asked for
    params = SamplingParams(max_tokens=n, ignore_eos=True, repetition_penalty=penalty)
    names = list(libs)
    runs = [(name, spec) for name in names for spec in (False, True)]
    seconds = {r: 0.0 for r in runs}
    decode = {r: 0.0 for r in runs}
    outputs: dict[tuple[str, bool], list[list[int]]] = {r: [] for r in runs}
    verifications = dict.fromkeys(names, 0)
    accepted = dict.fromkeys(names, 0)
    try:
        for name in names:  # warm-up, each build
            with using(libs[name]):
                llm.generate(prompt_ids[:1], replace(params, max_tokens=8))
        for i, ids in enumerate(prompt_ids):
            k = i % len(runs)
            for name, spec in runs[k:] + runs[:k]:
                llm.reset_prefix_cache()
                llm.forget_replies()
                before = llm.stats()
                with using(libs[name]):
                    start = time.perf_counter()
                    out = llm.generate([ids], replace(params, speculate=spec))[0]
                    seconds[name, spec] += time.perf_counter() - start
                after = llm.stats()
                decode[name, spec] += out.metrics.decode_s
                outputs[name, spec].append(out.token_ids)
                if spec:
                    verifications[name] += after.spec_num_drafts - before.spec_num_drafts
                    accepted[name] += after.spec_num_accepted_tokens - before.spec_num_accepted_tokens
        result: dict[str, Any] = {"threads": threads, "turns": turns, "max_tokens": n, "repetition_penalty": penalty,
                                  "quantization": llm.loaded.quantization}  # fmt: skip
        ref = reference_replies(model, prompt_ids, n, penalty) if reference else None
        for name in names:
            steps = verifications[name]
            row: dict[str, Any] = {
                "attention_path": libs[name].sd_attention_path(),  # which kernel the CPU ran (cpu_attention.c)
                "plain_tok_s": n * turns / seconds[name, False],
                "spec_tok_s": n * turns / seconds[name, True],
                "plain_decode_tok_s": (n - 1) * turns / decode[name, False],
                "spec_decode_tok_s": (n - 1) * turns / decode[name, True],
                "tokens_per_verification": (steps + accepted[name]) / steps if steps else None,
                "identical_with_speculation": sum(
                    a == b for a, b in zip(outputs[name, False], outputs[name, True], strict=True)
                ),
            }
            if ref is not None:
                with using(libs[name]):
                    row["teacher_forced_top1_vs_float32_percent"] = teacher_forced_top1(llm, prompt_ids, ref, penalty)
                row["replies_equal_to_float32"] = sum(a == b for a, b in zip(outputs[name, False], ref, strict=True))
            result[name] = row
        result["replies_equal_between_builds"] = sum(
            a == b for a, b in zip(outputs[names[0], False], outputs[names[1], False], strict=True)
        )
        return result
    finally:
        llm.shutdown()


RATIOS = ("plain_tok_s", "spec_tok_s", "plain_decode_tok_s", "spec_decode_tok_s")


def table(r: dict[str, Any], against: str) -> str:
    """The run as a markdown table, one row per build, and the new build's ratios to the old one's."""
    lines = [
        f"benchmarks.kernels_e2e_ab: {against} (old) vs the working tree (new), {r['threads']} threads, "
        f"{r['turns']} turns of {r['max_tokens']} tokens, penalty {r['repetition_penalty']}, {r['quantization']}",
        "",
        "| build | plain tok/s | speculation tok/s | plain decode tok/s | speculation decode tok/s "
        "| tokens/verification | speculation = plain | top-1 vs float32 | replies = float32 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ("old", "new"):
        row = r[name]
        tpv, top1 = row["tokens_per_verification"], row.get("teacher_forced_top1_vs_float32_percent")
        cells = [f"{row[k]:.1f}" for k in RATIOS] + ["" if tpv is None else f"{tpv:.2f}"]
        cells += [f"{row['identical_with_speculation']}/{r['turns']}", "" if top1 is None else f"{top1:.1f} %"]
        equal = row.get("replies_equal_to_float32")
        lines.append(f"| {name} | " + " | ".join([*cells, "" if equal is None else f"{equal}/{r['turns']}"]) + " |")
    x = {k: r["new"][k] / r["old"][k] for k in RATIOS}
    lines.append(
        f"\nnew / old: plain {x['plain_tok_s']:.3f}x, speculation {x['spec_tok_s']:.3f}x end to end; decode "
        f"{x['plain_decode_tok_s']:.3f}x, {x['spec_decode_tok_s']:.3f}x; plain replies equal between builds "
        f"{r['replies_equal_between_builds']}/{r['turns']}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import os

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", default="HEAD", help="the git revision whose kernels are the old side")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="default: the machine's cores")
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repetition-penalty", type=float, default=PENALTY)
    ap.add_argument("--reference", choices=["float32"], default=None, help="also each build's quality against it")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "old-src").mkdir()
        old = kernel_sources_at(args.against, Path(tmp, "old-src"))
        libs = {"old": build_kernels(old, Path(tmp, "old")), "new": build_kernels(None, Path(tmp, "new"))}
        r = run(libs, args.threads, args.turns, args.max_tokens, args.repetition_penalty, args.reference)
    print(table(r, args.against))
    if args.out:
        import json
        import sys

        r["command"] = "python -m benchmarks.kernels_e2e_ab " + " ".join(sys.argv[1:] if argv is None else argv)
        Path(args.out).write_text(json.dumps(r, indent=1) + "\n")


if __name__ == "__main__":
    main()
