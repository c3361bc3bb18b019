"""`python -m benchmarks.ngram_matches`: the n-gram speculator's drafts grouped by how far back their match reaches.

The default speculative engine decodes `benchmarks.cpu`'s second turns (persona prompt, an earlier exchange,
exactly `--max-tokens` tokens, nothing cached). Every n-gram draft the engine verifies is classed by where it
came from: the conversation's own earlier text, by how many tokens before the matched occurrence agree with the
sequence's last ones (2, 3, 4-7, 8-15, 16 or more), or elsewhere (the replies this engine served, the frozen
store's walk). Per class: drafts, their mean length, the mean tokens accepted of them, and the share accepted
whole. What `ngram.LONG_MATCH` and `decoder.NGRAM_TOKENS` rest on.

Every decode step is classed too, by what it verified (its n-gram draft's class, the MLP's nodes alone, or no
draft): steps, share of the decoding time, ms a step, draft nodes, tokens emitted, how many of them the MLP's
nodes added beyond the n-gram draft, and how often the MLP proposed. What the MLP's rest (`decoder._mlp_pays`)
rests on: where its nodes add next to nothing, a step with them costs more than the tokens they win.

    python -m benchmarks.ngram_matches --threads 2 --turns 16 --repetition-penalty 1.0 \\
        --out docs/bench_ngram_matches_no_penalty.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from benchmarks.common import write_results
from benchmarks.cpu import second_turns
from specdesk.engine.llm import LLM
from specdesk.engine.sampling_params import SamplingParams
from specdesk.engine.speculators.ngram import NgramSpeculator, continuation
from specdesk.engine.speculators.tree import common_prefix

BUCKETS = (2, 3, 4, 8, 16)  # a class starts at each; the last is open
MOST = 64  # the reach is counted up to this


def match_class(ngram: NgramSpeculator, request_id: str, draft: list[int]) -> str:
    """ "own N+" (the sequence's own match, reaching back at least bucket N) or "elsewhere" for a draft the
    n-gram just proposed for this request."""
    index = ngram._sequences[request_id]  # the request's index, as propose() left it
    tokens = index.tokens
    for n in range(min(ngram.max_n, len(tokens)), ngram.min_n - 1, -1):
        end = index.ends.get(tuple(tokens[-n:]))
        if end is None:
            continue
        if continuation(tokens, end, len(draft)) == draft:  # the continuation propose() drafts from this match
            reach = n
            while reach < min(MOST, end) and tokens[end - reach - 1] == tokens[-reach - 1]:
                reach += 1
            return f"own {max(b for b in BUCKETS if b <= reach)}+"
        break  # propose() took the longest match: another source gave this draft
    return "elsewhere"


def trace(llm: LLM, prompts: Sequence[list[int]], params: SamplingParams) -> dict[str, dict[str, dict[str, float]]]:
    """Decode every prompt on the speculative engine. "drafts": each verified n-gram draft by its class (see the
    module); "steps": every decode step by what it verified (its n-gram draft's class, "MLP alone", "no draft"),
    with its wall time and what the MLP's nodes added to the n-gram draft's accepted tokens."""
    engine, spec = llm.engine, llm.engine.speculation
    assert spec is not None and spec.ngram is not None, "an engine with the n-gram speculator"
    ngram, propose, record, step, engine_step = spec.ngram, spec.ngram.propose, spec._record, spec.propose, engine.step
    last: dict[str, tuple[list[int], str]] = {}
    rows: dict[str, list[tuple[int, int]]] = {}  # class -> (draft length, accepted of it)
    now: dict[str, Any] = {}  # this step's verification (a lone sequence: one prompt at a time)
    steps: dict[str, list[tuple[float, int, int, int, bool]]] = {}  # class -> (seconds, nodes, tokens, MLP's, MLP ran)

    def traced_propose(request_id: str, token_ids: Sequence[int], *args: Any, **kwargs: Any) -> list[int]:
        draft = propose(request_id, token_ids, *args, **kwargs)
        if draft:
            last[request_id] = (draft, match_class(ngram, request_id, draft))
        else:
            last.pop(request_id, None)
        return draft

    def traced_step(*args: Any, **kwargs: Any) -> None:
        last.clear()  # a draft proposed last step but never verified (cut, pruned) is not this step's
        step(*args, **kwargs)

    def traced_record(seq: Any, tree: Any, acc: Any) -> None:
        drafted = last.pop(seq.request_id, None)
        accepted = 0
        if drafted is not None:
            draft, cls = drafted
            accepted = common_prefix(draft, [tree.token(r) for r in acc.accepted_rows])
            rows.setdefault(cls, []).append((len(draft), accepted))
        # "mlp": what the tree held beyond the n-gram draft's own tokens.
        now.update(cls=drafted[1] if drafted else "MLP alone", nodes=tree.num_nodes, accepted=acc.num_accepted,
                   mlp=acc.num_accepted - accepted)  # fmt: skip
        record(seq, tree, acc)

    def traced_engine_step() -> Any:
        running = engine.scheduler.running  # empty before a prompt's first chunk
        decoding = bool(running) and all(s.num_output_tokens > 0 for s in running)  # not a prefill chunk
        now.clear()
        started = time.perf_counter()
        deltas = engine_step()
        seconds = time.perf_counter() - started
        if decoding:
            row = (seconds, now.get("nodes", 0), now.get("accepted", 0) + 1, now.get("mlp", 0), spec._mlp_ran)
            steps.setdefault(now.get("cls", "no draft"), []).append(row)
        return deltas

    ngram.propose, spec._record, spec.propose = traced_propose, traced_record, traced_step  # type: ignore[method-assign]
    engine.step = traced_engine_step  # type: ignore[method-assign]
    try:
        for i, ids in enumerate(prompts):
            llm.reset_prefix_cache()
            llm.forget_replies()
            last.clear()
            llm.generate([ids], replace(params, seed=i))
    finally:
        del ngram.propose, spec._record, spec.propose, engine.step  # the class's methods again
    order = [f"own {b}+" for b in BUCKETS] + ["elsewhere"]
    drafts = {
        cls: {
            "drafts": len(r),
            "mean_length": sum(d for d, _ in r) / len(r),
            "longest": max(d for d, _ in r),
            "mean_accepted": sum(a for _, a in r) / len(r),
            "accepted_whole": sum(a == d for d, a in r) / len(r),
        }
        for cls in order
        if (r := rows.get(cls))
    }
    total = sum(row[0] for r in steps.values() for row in r)
    by_step = {
        cls: {
            "steps": len(t),
            "share_of_time": sum(row[0] for row in t) / total,
            "ms_per_step": 1000 * sum(row[0] for row in t) / len(t),
            "nodes": sum(row[1] for row in t) / len(t),
            "tokens": sum(row[2] for row in t) / len(t),
            "mlp_tokens": sum(row[3] for row in t) / len(t),
            "mlp_proposed": sum(row[4] for row in t) / len(t),
        }
        for cls in [*order, "MLP alone", "no draft"]
        if (t := steps.get(cls))
    }
    return {"drafts": drafts, "steps": by_step}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="default: the built-in default model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--turns", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repetition-penalty", type=float, default=1.0, help="1.0: the library's default")
    ap.add_argument("--out", default=None, help="write the table as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    llm = LLM(args.model, quantization="auto", dtype="auto", speculator="auto", num_threads=args.threads)
    try:
        prompts = [llm.apply_chat_template(m) for m in second_turns(args.turns)]
        params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True, repetition_penalty=args.repetition_penalty)
        table = trace(llm, prompts, params)
    finally:
        llm.shutdown()
    print("| match | drafts | mean length | longest | mean accepted | accepted whole |\n|---|---|---|---|---|---|")
    for cls, r in table["drafts"].items():
        print(f"| {cls} | {r['drafts']} | {r['mean_length']:.2f} | {r['longest']} | {r['mean_accepted']:.2f} | "
              f"{100 * r['accepted_whole']:.0f} % |")  # fmt: skip
    print("\n| decode steps by what they verified | steps | share of time | ms a step | nodes | tokens | of them the "
          "MLP's | MLP proposed |\n|---|---|---|---|---|---|---|---|")  # fmt: skip
    for cls, r in table["steps"].items():
        share, proposed = 100 * r["share_of_time"], 100 * r["mlp_proposed"]
        print(f"| {cls} | {r['steps']} | {share:.1f} % | {r['ms_per_step']:.2f} | {r['nodes']:.2f} | "
              f"{r['tokens']:.2f} | {r['mlp_tokens']:.2f} | {proposed:.0f} % |")  # fmt: skip
    result = {"threads": args.threads, "turns": len(prompts), "max_tokens": args.max_tokens,
              "repetition_penalty": args.repetition_penalty, "classes": table["drafts"],
              "steps": table["steps"]}  # fmt: skip
    write_results("benchmarks.ngram_matches", args.out, [result], argv)
    print(json.dumps(result["classes"]) if args.out is None else f"written to {args.out}")


if __name__ == "__main__":
    main()
