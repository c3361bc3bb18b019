"""`python -m benchmarks.speculator_ab A B ...`: speculators side by side on the CPU console's path, end to end.

The turns and settings of `benchmarks.cpu` (the second customer turn of held-out conversations under the
console's persona prompt, exactly `--max-tokens` greedy tokens, repetition penalty 1.1 unless
`--repetition-penalty` says otherwise, nothing cached; `--temperature 0.7 --top-p 0.9` samples as the console
does, seeded per turn, so every engine draws the same tokens; `--unseeded` draws as the console does, without
a seed: a tree's drafts are then judged by rejection sampling, not against a coupled draw), on
the engine the console runs on a CPU (`quantization="auto"`: int8 wherever the kernels have a vector path). One
engine per speculator, all alive in one process per thread count; each turn runs plain decoding and every
speculator in an order that rotates from turn to turn. Reported per speculator: tokens/s end to end (submit to
last token, prefill included) and from the first token to the last, their ratio to plain decoding, the
quartiles over its turns of each turn's decoding ratio to plain's run of the same prompt, tokens per
verification, and whether its output equals plain decoding's (it must: speculation is exact). Two engines of
the same settings in one process (`ngram@spec_reply_store=true ngram`, an A/A run) differed by up to 8 % on a
shared 2-core machine: read a smaller difference as none.

    python -m benchmarks.speculator_ab default /path/to/other/speculator --out docs/bench_speculator_ab.json
    python -m benchmarks.speculator_ab default mlp:specdesk/engine/speculators/default ngram --threads 2
    python -m benchmarks.speculator_ab default@spec_max_ngram_tokens=4 default --threads 2

A speculator's name may end in `@key=value[,key=value]`: EngineConfig settings for its engine alone (true,
false, none, an int, a float or a string), so that two settings of one speculator run side by side.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from typing import Any

from benchmarks.common import RESULT, add_turn_args, run_workers, write_results
from benchmarks.cpu import PENALTY, second_turns


def worker(
    threads: int, speculators: list[str], turns: int, n: int, model: str | None = None, penalty: float = PENALTY,
    temperature: float = 0.0, top_p: float = 1.0, unseeded: bool = False, quantization: str = "auto",
    dtype: str = "auto",
) -> dict[str, Any]:  # fmt: skip
    """Plain decoding and every speculator at one thread count, in this process (model: the default's)."""
    import torch

    torch.set_num_threads(threads)
    from specdesk.engine.llm import LLM
    from specdesk.engine.sampling_params import SamplingParams

    # num_threads for each: the engines live side by side, and every one's kernels split over `threads`.
    quant = None if quantization == "none" else quantization
    engines = {
        s: LLM(model, quantization=quant, dtype=dtype, spec_max_batch_size=32, num_threads=threads, **settings(s))
        for s in speculators
    }
    first = engines[speculators[0]]
    prompt_ids = [first.apply_chat_template(m) for m in second_turns(turns)]
    params = SamplingParams(max_tokens=n, ignore_eos=True, repetition_penalty=penalty, temperature=temperature,
                            top_p=top_p if temperature else 1.0)  # fmt: skip
    names = ["plain", *speculators]
    seconds = dict.fromkeys(names, 0.0)
    decode = dict.fromkeys(names, 0.0)
    turn_decode: dict[str, list[float]] = {k: [] for k in names}  # each turn's decoding seconds
    tokens: dict[str, list[list[int]]] = {k: [] for k in names}
    try:
        for llm in engines.values():
            llm.generate(prompt_ids[:1], replace(params, max_tokens=8))  # warm-up (and the kernels' build)
        before = {s: llm.stats() for s, llm in engines.items()}
        for i, ids in enumerate(prompt_ids):
            for name in names[i % len(names) :] + names[: i % len(names)]:
                llm = first if name == "plain" else engines[name]
                llm.reset_prefix_cache()
                llm.forget_replies()
                start = time.perf_counter()
                seed = None if unseeded else i
                out = llm.generate([ids], replace(params, speculate=name != "plain", seed=seed))[0]
                seconds[name] += time.perf_counter() - start
                decode[name] += out.metrics.decode_s
                turn_decode[name].append(out.metrics.decode_s)
                tokens[name].append(out.token_ids)
        result: dict[str, Any] = {"threads": threads, "turns": len(prompt_ids), "max_tokens": n,
                                  "prompt_tokens_mean": sum(map(len, prompt_ids)) / len(prompt_ids),
                                  "quantization": first.loaded.quantization, "repetition_penalty": penalty,
                                  "temperature": temperature, "top_p": params.top_p,
                                  "seeded": not unseeded}  # fmt: skip
        for name in names:
            entry: dict[str, Any] = {"tok_s": n * len(prompt_ids) / seconds[name],
                                     "decode_tok_s": (n - 1) * len(prompt_ids) / decode[name]}  # fmt: skip
            if name != "plain":
                stats, old = engines[name].stats(), before[name]
                steps = (stats.spec_num_drafts - old.spec_num_drafts) or 1
                accepted = stats.spec_num_accepted_tokens - old.spec_num_accepted_tokens
                # Unseeded sampled turns draw differently from run to run: nothing to compare.
                same = (
                    None
                    if unseeded and temperature
                    else sum(a == b for a, b in zip(tokens[name], tokens["plain"], strict=True))
                )
                spec = engines[name].engine.spec_config  # which reply store the n-gram drafted from, if any
                entry |= {"tokens_per_verification": (accepted + steps) / steps, "identical_to_plain": same,
                          "verifications": steps, "accepted_drafts": accepted,
                          "reply_store": spec.reply_store if spec else None,
                          "max_ngram_tokens": spec.max_ngram_tokens if spec else None,
                          "decode_vs_plain_by_turn": quartiles(turn_decode["plain"], turn_decode[name])}  # fmt: skip
            result[name] = entry
        return result
    finally:
        for llm in engines.values():
            llm.shutdown()


def quartiles(plain: list[float], other: list[float]) -> list[float]:
    """[q1, median, q3] of the turns' decoding speed against plain's (plain's seconds over the other's), each turn
    paired with plain's run of the same prompt: how far one turn's ratio strays from another's, so that a
    difference between two engines' totals can be set against it."""
    ratios = [p / o for p, o in zip(plain, other, strict=True) if o > 0]
    if len(ratios) < 2:
        return ratios * 3
    q1, median, q3 = statistics.quantiles(ratios, n=4)
    return [q1, median, q3]


def settings(name: str) -> dict[str, Any]:
    """A speculator's name as EngineConfig settings: `speculator[@key=value[,key=value]]`."""
    speculator, _, rest = name.partition("@")
    out: dict[str, Any] = {"speculator": speculator}
    words: dict[str, Any] = {"true": True, "false": False, "none": None}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise SystemExit(f"speculator {name!r}: expected speculator@key=value[,key=value]")
        if value.lower() in words:
            out[key] = words[value.lower()]
            continue
        for kind in (int, float, str):
            try:
                out[key] = kind(value)
                break
            except ValueError:
                continue
    return out


def table(results: list[dict[str, Any]], speculators: list[str]) -> str:
    head = "tok/s (vs plain), decode vs plain (its turns' quartiles), tokens/verification"
    lines = ["| threads | plain tok/s | " + " | ".join(f"{s}: {head}" for s in speculators) + " |",
             "|---|---|" + "---|" * len(speculators)]  # fmt: skip
    for r in results:
        plain = r["plain"]
        cells = [
            f"{r[s]['tok_s']:.1f} ({r[s]['tok_s'] / plain['tok_s']:.2f}x), "
            f"{r[s]['decode_tok_s'] / plain['decode_tok_s']:.2f}x ({_spread(r[s])}), "
            f"{r[s]['tokens_per_verification']:.2f}"
            for s in speculators
        ]
        lines.append(f"| {r['threads']} | {plain['tok_s']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _spread(entry: dict[str, Any]) -> str:
    q = entry.get("decode_vs_plain_by_turn")  # absent from runs recorded before it was
    return f"{q[0]:.2f}-{q[2]:.2f}" if q else "n/a"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("speculators", nargs="+", help="EngineConfig.speculator values: 'default', 'ngram', folders")
    ap.add_argument("--model", default=None, help="default: the built-in default model")
    ap.add_argument("--repetition-penalty", type=float, default=PENALTY, help="the console's 1.1 by default")
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); the console's is 0.7")
    ap.add_argument("--top-p", type=float, default=1.0, help="with --temperature (the console's is 0.9)")
    ap.add_argument("--unseeded", action="store_true", help="sampled turns without a seed, as the console draws")
    ap.add_argument("--quantization", default="auto", help="the engines' (none: the unquantized torch path)")
    ap.add_argument("--dtype", default="auto", help="the engines' (float32 with --quantization none: the exact path)")
    add_turn_args(ap)
    args = ap.parse_args(argv)
    if args.worker is not None:
        result = worker(args.worker, args.speculators, args.turns, args.max_tokens, args.model,
                        args.repetition_penalty, args.temperature, args.top_p, args.unseeded, args.quantization,
                        args.dtype)  # fmt: skip
        print(RESULT + json.dumps(result), flush=True)
        return
    model = ["--model", args.model] if args.model else []
    sampling = ["--repetition-penalty", str(args.repetition_penalty), "--temperature", str(args.temperature),
                "--top-p", str(args.top_p), *(["--unseeded"] if args.unseeded else []),
                "--quantization", args.quantization, "--dtype", args.dtype]  # fmt: skip
    results = run_workers("benchmarks.speculator_ab", args, [*args.speculators, *model, *sampling])
    print(table(results, args.speculators))
    for r in results:  # speculation is exact: a difference is a bug, not a figure
        for s in args.speculators:
            if r[s]["identical_to_plain"] not in (None, r["turns"]):
                print(f"[{r['threads']} threads] {s}: only {r[s]['identical_to_plain']} of {r['turns']} turns equal "
                      "plain decoding's tokens", file=sys.stderr)  # fmt: skip
    write_results("benchmarks.speculator_ab", args.out, results, argv)


if __name__ == "__main__":
    main()
