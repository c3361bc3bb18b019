"""`python -m benchmarks.feature_drafter_walk`: the feature drafter's and the MLP's draft trees, walked as the engine
walks them (offline, on the held-out replies of `benchmarks.feature_drafter`).

The engine verifies a tree of the best m draft nodes, ranked by their paths' summed log-probabilities
(`candidates.propose_nodes`), not a single chain. Here both drafters build that tree to depth two for m = 1, 2,
4 and 8 at every held-out position: the MLP by `propose_nodes` over its first two heads; the drafter from its
first draft's top m and, for its four best first tokens (the MLP's beam at these sizes), the second draft made
from the first's predicted state with that token, each under the penalty over what its own path has seen. A
position accepts the longest prefix of the true continuation among the tree's nodes, and `held_out.walk` turns
that into tokens per step the way the engine moves through a reply (a step at position j emits 1 + accepted
tokens and the next starts after them).

    python -m benchmarks.feature_drafter --mlp /tmp/train/pg-out --save /tmp/drafter.pt   # train it first
    python -m benchmarks.feature_drafter_walk --load /tmp/drafter.pt --mlp /tmp/train/pg-out --out FILE
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmarks.feature_drafter import Drafter, _batch, _penalized, _token_ids, runs
from specdesk.engine.logits_processors import penalize
from specdesk.training.train_data import IGNORE, Positions

BUDGETS = (1, 2, 4, 8)
BEAM = 4  # first drafts expanded: max(4, m // 8), as propose_nodes, for m up to 32


@torch.no_grad()
def drafter_accepted(model: Drafter, data: Positions, cols: Tensor, penalty: float) -> dict[int, Tensor]:
    """Accepted drafts at every position of data (rows in data's order) for each budget in BUDGETS."""
    width, top = model.head_rows.shape[0], max(BUDGETS)
    ids = torch.tensor(_token_ids(cols))
    out = {m: torch.zeros(len(data)) for m in BUDGETS}
    replies = runs(data)
    for i in range(0, len(replies), 64):
        chunk = replies[i : i + 64]
        b = _batch(data, chunk, cols, width, penalty)
        pred, _, k, v = model(b["state"], b["tokens"])
        s1, c1 = F.log_softmax(_penalized(model.logits(pred), b, "seen1", penalty), -1).topk(top, -1)  # [B, L, top]
        s2, c2 = [], []
        for q in range(BEAM):
            guess = c1[..., q]
            z2 = model.logits(model.second(pred, ids[guess], k, v))
            if "seen1" in b:  # this path has seen its own first draft too
                z2 = penalize(z2, b["seen1"].scatter(-1, guess[..., None], True), penalty)
            s, c = F.log_softmax(z2, -1).topk(top, -1)
            s2.append(s1[..., q : q + 1] + s)
            c2.append(c)
        scores = torch.cat([s1, *s2], -1)  # first drafts, then each parent's children: a parent sorts first on ties
        order = scores.sort(dim=-1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1]).expand_as(order))
        t1, t2 = b["t1"][..., None], b["t2"][..., None]
        first_hit = c1 == t1  # [B, L, top]: which first draft is the true token (at most one)
        second_hit = torch.stack([(c == t2) & first_hit[..., q : q + 1] for q, c in enumerate(c2)], -2)
        rank1, rank2 = rank[..., :top], rank[..., top:].reshape(*second_hit.shape)
        for m in BUDGETS:
            a1 = (first_hit & (rank1 < m)).any(-1)
            a2 = a1 & (second_hit & (rank2 < m)).flatten(-2).any(-1) & (b["t2"] != IGNORE)
            accepted = a1.float() + a2.float()
            for r, (start, n) in enumerate(chunk):
                out[m][start : start + n] = accepted[r, :n]
    return out


def mlp_accepted(spec: Any, data: Positions, penalty: float) -> dict[int, Tensor]:
    """The same for the MLP speculator's best-m-node trees over its first two heads (`held_out.nodes_run`)."""
    from specdesk.training.held_out import nodes_run, root_penalty

    penalized = spec.config.draft_penalty and penalty != 1.0
    return nodes_run(spec, data, torch.arange(len(data)), BUDGETS,
                     (lambda rows: root_penalty(spec, data, rows, penalty)) if penalized else (lambda rows: None),
                     num_heads=2)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work-dir", default="/tmp/train/pg", help="a specdesk.training.train work dir")
    ap.add_argument("--load", required=True, help="the drafter's weights (benchmarks.feature_drafter --save)")
    ap.add_argument("--mlp", required=True, help="the MLP speculator to walk beside it")
    ap.add_argument("--repetition-penalty", type=float, default=1.1, help="what the replies were generated under")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    from benchmarks.feature_drafter import build
    from specdesk.engine.speculators import draft_vocab
    from specdesk.training.held_out import walk

    saved, loaded, model, cols = build(args.work_dir)
    model.load_state_dict(torch.load(args.load, weights_only=True))
    spec = draft_vocab.load_speculator(args.mlp, loaded.model, torch.float32)
    report: dict[str, Any] = {"args": vars(args), "budgets": list(BUDGETS)}
    for mode, data in saved["held"].items():
        got = {"drafter": drafter_accepted(model, data, cols, args.repetition_penalty),
               "mlp": mlp_accepted(spec, data, args.repetition_penalty)}  # fmt: skip
        report[mode] = {name: {m: round(walk(a, data.windows), 3) for m, a in acc.items()} for name, acc in got.items()}
        print(mode, json.dumps(report[mode]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
