"""`python -m benchmarks.node_floor`: which MLP draft nodes are worth verifying, walked over held-out replies.

The base model (the console's CPU path, `quantization="auto"`) decodes the second customer turn of held-out
conversations (`benchmarks.cpu`'s turns, greedy, `--repetition-penalty`); then, at every position of each
reply, the shipped speculator ranks its pool of 12 draft nodes from the hidden state the engine would hand it,
and each node is marked by whether its path is the reply's continuation (what verification would accept).
Each reply is then walked as the engine decodes it, one step per verification (a step accepting a nodes moves
a + 1 tokens on), under each policy of choosing the nodes:

* the top m nodes, every step (a fixed width: what `TreeWidth` settles on where the text is uniform);
* every node whose path probability under the speculator is at least a floor (`spec_confident_nodes`, with the
  floor at the cost of a verified token);

priced as the engine pays: a step costs 1 (a plain step) + `--cost` per verified node + `--proposal` for the
ranking. Reported per policy: speed against plain decoding, tokens and nodes per step. The MLP alone is
walked: the n-gram's drafts are not part of it.

    python -m benchmarks.node_floor --repetition-penalty 1.0 --out docs/bench_node_floor_no_penalty.json
    python -m benchmarks.node_floor --cost 0.15 --proposal 0.06
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

from benchmarks.common import write_results

Node = tuple[list[int], float, bool]  # a draft path, its log-probability, whether verification accepts it
Turn = list[list[Node]]  # per position of a reply, its ranked pool
FLOORS = (0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5)


def collect(turns: int, max_tokens: int, penalty: float, pool: int = 12) -> list[Turn]:
    """Each held-out reply's positions with the speculator's ranked pool, every node marked."""
    import torch

    from benchmarks.cpu import hidden_states, second_turns
    from specdesk.engine.config import DEFAULT_SPECULATOR_DIR
    from specdesk.engine.llm import LLM
    from specdesk.engine.sampling_params import SamplingParams
    from specdesk.engine.speculators import draft_vocab
    from specdesk.engine.speculators.candidates import rank_nodes

    llm = LLM(quantization="auto", speculator=None)
    try:
        mlp = draft_vocab.load_speculator(DEFAULT_SPECULATOR_DIR, llm.loaded.model, torch.float32, llm.loaded.device)
        prompts = [llm.apply_chat_template(m) for m in second_turns(turns)]
        outs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, repetition_penalty=penalty))
        seqs = [p + o.token_ids for p, o in zip(prompts, outs, strict=True)]
        walked: list[Turn] = []
        for prompt, seq, hidden in zip(prompts, seqs, hidden_states(llm, seqs), strict=True):
            # A step's root is the last sampled token t; the MLP reads the hidden state that produced it (t - 1).
            roots = range(len(prompt), len(seq) - 1)
            with torch.inference_mode():
                rows = hidden[[t - 1 for t in roots]].float()
                paths, scores = rank_nodes(mlp, rows, torch.tensor([seq[t] for t in roots]), pool, mlp.n_predict)
            turn: Turn = []
            for j, t in enumerate(roots):
                nodes = []
                for path, logp in zip(paths[j].tolist(), scores[j].tolist(), strict=True):
                    path = [x for x in path if x >= 0]
                    if path and logp != -math.inf:
                        nodes.append((path, logp, path == seq[t + 1 : t + 1 + len(path)]))
                turn.append(nodes)
            walked.append(turn)
        return walked
    finally:
        llm.shutdown()


Select = Callable[[list[Node]], list[Node]]


def walk(turns: list[Turn], select: Select, cost: float, proposal: float) -> dict[str, float]:
    """Every reply decoded step by step with the nodes `select` keeps: speed against plain decoding (tokens per
    unit of cost, a plain step costing 1), tokens and verified nodes per step."""
    tokens = price = 0.0
    steps = nodes = 0
    for turn in turns:
        i = 0
        while i < len(turn):
            kept = select(turn[i])
            accepted = max((len(path) for path, _, ok in kept if ok), default=0)
            tokens += accepted + 1
            price += 1 + cost * len(kept) + proposal
            steps, nodes = steps + 1, nodes + len(kept)
            i += accepted + 1
    return {"speed_vs_plain": tokens / price, "tokens_per_step": tokens / steps, "nodes_per_step": nodes / steps}


def policies(turns: list[Turn], cost: float, proposal: float, pool: int = 12) -> list[dict[str, Any]]:
    """The fixed widths 1 .. pool, then the floors (FLOORS and the cost itself), each walked."""

    def top(m: int) -> Select:
        return lambda nodes: nodes[:m]

    def above(floor: float) -> Select:
        return lambda nodes: [x for x in nodes if x[1] >= math.log(floor)]

    rows = [{"policy": f"top {m}", **walk(turns, top(m), cost, proposal)} for m in range(1, pool + 1)]
    for floor in sorted({*FLOORS, cost}):
        name = f"floor {floor:g}" + (" (the cost)" if floor == cost else "")
        rows.append({"policy": name, **walk(turns, above(floor), cost, proposal)})
    return rows


def calibration(turns: list[Turn]) -> list[dict[str, float]]:
    """Per band of path probability (tenths), the nodes of every pool in it and the share verification accepts."""
    bands = [[0, 0] for _ in range(10)]
    for turn in turns:
        for nodes in turn:
            for _, logp, ok in nodes:
                band = bands[min(int(math.exp(logp) * 10 + 1e-9), 9)]  # 0.9 in float32 is 0.8999999
                band[0], band[1] = band[0] + 1, band[1] + ok
    return [{"probability_from": i / 10, "nodes": n, "accepted": a / n} for i, (n, a) in enumerate(bands) if n]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--turns", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repetition-penalty", type=float, default=1.1, help="the console's 1.1 by default")
    ap.add_argument("--cost", type=float, default=0.21, help="a verified node, in plain steps (AVX2 CPU: 0.21)")
    ap.add_argument("--proposal", type=float, default=0.06, help="the ranking, in plain steps")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    turns = collect(args.turns, args.max_tokens, args.repetition_penalty)
    rows = policies(turns, args.cost, args.proposal)
    heads = [nodes[0][2] for turn in turns for nodes in turn if nodes]
    print(f"{sum(map(len, turns))} positions; the top node is the continuation at {sum(heads) / len(heads):.1%}\n")
    print("| policy | speed vs plain | tokens per step | nodes per step |\n|---|---|---|---|")
    for r in rows:
        speed, tokens, nodes = r["speed_vs_plain"], r["tokens_per_step"], r["nodes_per_step"]
        print(f"| {r['policy']} | {speed:.3f}x | {tokens:.2f} | {nodes:.2f} |")
    bands = calibration(turns)
    print("\n| path probability | nodes | accepted |\n|---|---|---|")
    for b in bands:
        print(f"| {b['probability_from']:.1f}-{b['probability_from'] + 0.1:.1f} | {b['nodes']} | {b['accepted']:.1%} |")
    result = {"turns": args.turns, "positions": sum(map(len, turns)), "repetition_penalty": args.repetition_penalty,
              "cost": args.cost, "proposal": args.proposal, "top_node_accepted": sum(heads) / len(heads),
              "policies": rows, "calibration": bands}  # fmt: skip
    write_results("benchmarks.node_floor", args.out, [result], argv)


if __name__ == "__main__":
    main()
