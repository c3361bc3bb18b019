"""`python -m benchmarks.reply_store`: what the reply store adds to the n-gram drafts, walked on held-out replies.

The base model (the console's CPU path, plain decoding) answers the second customer turn of every held-out
conversation (`prompts/eval`, under its persona prompt, the console's repetition penalty): 128 greedy tokens,
greedy to the reply's end, and sampled to its end (temperature 0.7, top-p 0.9, seeded). Each reply is then
walked as the engine walks it: from the reply's start, the n-gram speculator (the conversation and, where that
has fewer tokens, the store) proposes a chain of k drafts; the matching prefix is accepted and the step moves
that many tokens plus one on. Reported: tokens per step for k = 1..3, with the shipped store and without; and
each walk priced as the engine pays for it, tokens per plain step's time where a step costs 1 + c per draft
verified (`--cost`, 0.15: what a verified token costs on a 2-core CPU), for chains of up to 4 drafts (the
engine's n-gram depth) with and without the calibrated cut (a store draft only while its chain's chance of
acceptance is at least 1.5 c, as the engine walks it). No timing: the engine's speed is
`benchmarks.speculator_ab`'s.

    python -m benchmarks.reply_store --out docs/bench_reply_store_walk.json
    python -m benchmarks.reply_store --store A/replies.npz B/replies.npz   # two stores on the same replies
"""

from __future__ import annotations

import argparse
from typing import Any

from benchmarks.common import write_results
from benchmarks.cpu import PENALTY, second_turns
from specdesk.engine.speculators import DEFAULT_SPECULATOR_DIR
from specdesk.engine.speculators.decoder import STORE_CHANCE_PER_COST
from specdesk.engine.speculators.ngram import NgramSpeculator
from specdesk.engine.speculators.reply_store import FILE_NAME, ReplyStore


def walk(
    prompts: list[list[int]], replies: list[list[int]], store: ReplyStore | None, k: int, cost: float = 0.0,
    min_prob: float = 0.0,
) -> float:  # fmt: skip
    """Tokens per step of chains of k n-gram drafts over the replies (each reply its own request); with a cost,
    tokens per plain step's time where a step costs 1 + cost per draft it verifies."""
    ngram = NgramSpeculator(store=store)
    steps = tokens = drafts = 0
    for j, (prompt, reply) in enumerate(zip(prompts, replies, strict=True)):
        pos = 0
        while pos < len(reply):
            draft = ngram.propose(str(j), prompt + reply[:pos], k, min_prob)
            drafts += len(draft)
            accepted = 0
            for guess, token in zip(draft, reply[pos:], strict=False):
                if guess != token:
                    break
                accepted += 1
            moved = min(accepted + 1, len(reply) - pos)
            steps, tokens, pos = steps + 1, tokens + moved, pos + moved
        ngram.release(str(j))
    return tokens / max(steps + cost * drafts, 1)


def replies_of(turns: int) -> tuple[list[list[int]], dict[str, list[list[int]]]]:
    """The held-out prompts and the base model's replies to them, per decoding."""
    from specdesk.engine.llm import LLM
    from specdesk.engine.sampling_params import SamplingParams

    llm = LLM(quantization="auto", speculator=None)
    try:
        prompts = [llm.apply_chat_template(m) for m in second_turns(turns)]
        decodings = {
            "greedy, 128 tokens": [SamplingParams(max_tokens=128, ignore_eos=True, repetition_penalty=PENALTY)],
            "greedy, to the end": [SamplingParams(max_tokens=400, repetition_penalty=PENALTY)],
            "sampled (0.7, 0.9), to the end": [
                SamplingParams(max_tokens=400, repetition_penalty=PENALTY, temperature=0.7, top_p=0.9, seed=i)
                for i in range(len(prompts))
            ],
        }
        replies = {}
        for name, params in decodings.items():
            outs = llm.generate(prompts, params if len(params) > 1 else params[0])
            replies[name] = [o.token_ids for o in outs]
        return prompts, replies
    finally:
        llm.shutdown()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--turns", type=int, default=100, help="held-out conversations with a second turn, at most")
    ap.add_argument("--store", nargs="+", default=[str(DEFAULT_SPECULATOR_DIR / FILE_NAME)],
                    help="one or more replies.npz files, each walked over the same held-out replies")  # fmt: skip
    ap.add_argument("--cost", type=float, default=0.15, help="a verified draft's cost, in plain steps")
    ap.add_argument("--out", default=None, help="write the results as JSON here (one entry per store)")
    args = ap.parse_args(argv)
    stores = [ReplyStore.load(path) for path in args.store]  # a bad file fails before the replies are made
    prompts, replies = replies_of(args.turns)
    walked = [_walk_store(path, store, prompts, replies, args.cost)
              for path, store in zip(args.store, stores, strict=True)]  # fmt: skip
    write_results("benchmarks.reply_store", args.out, walked, argv)


def _walk_store(path: str, store: ReplyStore, prompts: list[list[int]], replies: dict[str, list[list[int]]],
                c: float) -> dict[str, Any]:  # fmt: skip
    """One store's tables over the held-out replies, printed and returned."""
    results: dict[str, Any] = {"store": path, "turns": len(prompts), "store_replies": store.num_replies, "rows": {}}
    print(f"{len(prompts)} held-out second turns; store {path}: {store.num_replies} replies, {len(store)} n-grams\n")
    print("| held-out replies | k = 1 | k = 2 | k = 3 | without the store: k = 1 | k = 2 | k = 3 |")
    print("|---|---|---|---|---|---|---|")
    for name, rows in replies.items():
        with_store = [walk(prompts, rows, store, k) for k in (1, 2, 3)]
        without = [walk(prompts, rows, None, k) for k in (1, 2, 3)]
        results["rows"][name] = {"with_store": with_store, "without": without}
        print(f"| {name} | " + " | ".join(f"{x:.2f}" for x in with_store + without) + " |")
    cut = STORE_CHANCE_PER_COST * c
    print(f"\nPriced: tokens per plain step's time, a step costing 1 + {c} per draft (chains of up to 4 drafts)")
    print(f"\n| held-out replies | without the store | store | store, calibrated cut at {cut:.3f} |")
    print("|---|---|---|---|")
    results.update(cost=c, min_prob=cut, calibrated=store.accuracy is not None)
    for name, rows in replies.items():
        priced = [walk(prompts, rows, None, 4, c), walk(prompts, rows, store, 4, c),
                  walk(prompts, rows, store, 4, c, cut)]  # fmt: skip
        results["rows"][name]["priced"] = priced
        print(f"| {name} | " + " | ".join(f"{x:.3f}" for x in priced) + " |")
    print()  # the next store's tables start apart
    return results


if __name__ == "__main__":
    main()
