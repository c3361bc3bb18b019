"""How often replies fall into a loop, and what speculation saves on replies that do not (`python -m
benchmarks.loops`). One process, one engine, the default model as the console runs it.

A reply *loops* when some 4-gram of its tokens occurs at least 4 times (`support-support-support-...` or a
sentence said over and over); a normal 128-token reply repeats no 4 tokens 4 times. The prompts are the
console's: a persona system prompt (the conversation's domain) and the held-out conversations (prompts/eval)
up to their first and second customer turns, greedy (as the side-by-side view), 128 tokens.

1. The loop rate of each candidate setting (no penalty; repetition_penalty 1.05 / 1.1 / 1.15 / 1.2; an
   OpenAI-style frequency penalty), with speculation on: the output is the same as plain decoding's.
2. Speculation's speed-up end to end per turn (prefill included: submit to last token), side by side with
   plain decoding (speculate=False) in the same engine, interleaved: on all replies without a penalty (what
   a loop flatters: a loop is trivially predictable), and on the loop-free replies under the chosen default.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

from specdesk import prompts
from specdesk.app.settings import DEFAULT_REPETITION_PENALTY
from specdesk.engine.llm import LLM
from specdesk.engine.sampling_params import SamplingParams

NGRAM, REPEATS = 4, 4
SETTINGS: dict[str, dict[str, float]] = {
    "no penalty": {},
    "repetition_penalty 1.05": {"repetition_penalty": 1.05},
    "repetition_penalty 1.1": {"repetition_penalty": 1.1},
    "repetition_penalty 1.15": {"repetition_penalty": 1.15},
    "repetition_penalty 1.2": {"repetition_penalty": 1.2},
    "frequency_penalty 0.3": {"frequency_penalty": 0.3},
}


def loops(token_ids: list[int], n: int = NGRAM, repeats: int = REPEATS) -> bool:
    """True when some n-gram of the tokens occurs at least `repeats` times (overlapping occurrences count)."""
    grams = Counter(tuple(token_ids[i : i + n]) for i in range(len(token_ids) - n + 1))
    return any(count >= repeats for count in grams.values())


def turns(limit: int) -> list[list[dict[str, str]]]:
    """Persona-prompted conversations up to each of their first two customer turns (held-out split)."""
    personas = {p.key for p in prompts.list_personas()}
    out = []
    for entry in prompts.load_dataset("eval"):
        persona = entry.domain if entry.domain in personas else "general"
        user_turns = [i for i, m in enumerate(entry.messages) if m["role"] == "user"]
        for end in user_turns[:2]:
            out.append(prompts.build_messages(persona, entry.messages[: end + 1]))
    return out[:limit]


def _timed(llm: LLM, ids: list[int], params: SamplingParams) -> tuple[list[int], float]:
    start = time.perf_counter()
    out = llm.generate([ids], params)[0]
    return out.token_ids, time.perf_counter() - start


def run(llm: LLM, convs: list[list[dict[str, str]]], max_tokens: int) -> dict[str, Any]:
    prompt_ids = [llm.apply_chat_template(m) for m in convs]
    greedy = SamplingParams(max_tokens=max_tokens)
    llm.generate(prompt_ids[:1], greedy)  # warm-up
    rates: dict[str, float] = {}
    replies: dict[str, list[list[int]]] = {}
    for name, extra in SETTINGS.items():
        params = replace(greedy, **extra)  # type: ignore[arg-type]
        replies[name] = [o.token_ids for o in llm.generate(prompt_ids, params)]
        rates[name] = 100 * sum(loops(r) for r in replies[name]) / len(replies[name])
        print(f"loop rate, {name}: {rates[name]:.1f} %", flush=True)
    default = replace(greedy, repetition_penalty=DEFAULT_REPETITION_PENALTY)
    speed = {"no penalty, all replies": _speedup(llm, prompt_ids, greedy, None)}
    loop_free = [not loops(r) for r in replies[f"repetition_penalty {DEFAULT_REPETITION_PENALTY:g}"]]
    speed[f"repetition_penalty {DEFAULT_REPETITION_PENALTY:g}, loop-free replies"] = _speedup(
        llm, prompt_ids, default, loop_free
    )
    return {"loop_rate_percent": rates, "speedup": speed, "num_replies": len(prompt_ids), "max_tokens": max_tokens,
            "default_repetition_penalty": DEFAULT_REPETITION_PENALTY}  # fmt: skip


def _speedup(llm: LLM, prompt_ids: list[list[int]], params: SamplingParams, keep: list[bool] | None) -> dict[str, Any]:
    """Speculation vs plain, end to end per turn, interleaved (alternating which goes first), prompts whose
    reply is kept only; the prefix cache is emptied before each so both prefill the whole prompt."""
    plain_s = spec_s = 0.0
    tokens = same = used = 0
    for i, ids in enumerate(prompt_ids):
        if keep is not None and not keep[i]:
            continue
        runs: dict[bool, tuple[list[int], float]] = {}
        for speculate in (True, False) if i % 2 == 0 else (False, True):
            llm.reset_prefix_cache()
            runs[speculate] = _timed(llm, ids, replace(params, speculate=speculate))
        spec_s, plain_s = spec_s + runs[True][1], plain_s + runs[False][1]
        tokens += len(runs[False][0])
        same += runs[True][0] == runs[False][0]
        used += 1
    return {"replies": used, "plain_tok_s": tokens / plain_s if plain_s else 0.0,
            "spec_tok_s": tokens / spec_s if spec_s else 0.0, "speedup": plain_s / spec_s if spec_s else 0.0,
            "identical_percent": 100 * same / max(used, 1)}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint (default: the built-in default model)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=None, help="default: torch's (the machine's cores)")
    ap.add_argument("--replies", type=int, default=24, help="conversation turns to answer (held-out split)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    llm = LLM(model=args.model, dtype=args.dtype, num_threads=args.threads, spec_max_batch_size=32)
    try:
        result = run(llm, turns(args.replies), args.max_tokens)
    finally:
        llm.shutdown()
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
