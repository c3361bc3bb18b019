"""Held-out acceptance of a speculator, measured the way the engine decodes (`walk`).

Used by `python -m specdesk.training.train` for its report and by `--evaluate DIR` on a saved speculator.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from specdesk.engine.logits_processors import penalize
from specdesk.engine.speculators.candidates import propose, propose_nodes
from specdesk.engine.speculators.draft_penalty import DraftPenalty
from specdesk.engine.speculators.mlp import MLPSpeculator
from specdesk.training.train_data import IGNORE, Positions, rows_to_end


@torch.no_grad()
def evaluate(
    spec: MLPSpeculator, data: Positions, penalty: float = 1.0, max_tree_positions: int = 512
) -> dict[str, object]:
    """Held-out acceptance on the base model's own replies.

    penalty: the repetition penalty the replies were generated under; a `draft_penalty` speculator's heads
    rank under it, over what each position has seen, as in the engine.

    Teacher-forced top-1 per head; the greedy chain accepts head i exactly when heads 0..i are all right.
    For a candidate tree the accepted length at a position is the longest prefix any candidate shares with
    the true continuation. `walk_tokens_per_step` is what the engine measures (see `walk`); the per-position
    means (`chain_tokens_per_step`, `tree_tokens_per_step`, on a random sample of positions) overstate it.
    """
    spec.eval()
    if len(data) == 0:
        return {"num_positions": 0}
    n = spec.n_predict
    correct = teacher_forced(spec, data, penalty)
    valid = data.windows[:, 1:] != IGNORE
    penalized = spec.config.draft_penalty and penalty != 1.0 and data.history is not None
    of = (lambda rows: root_penalty(spec, data, rows, penalty)) if penalized else (lambda rows: None)
    full = valid.all(1)  # positions where every head has a target
    run = torch.cumprod(correct[full].long(), dim=1).sum(1).float()
    top1 = [float(correct[valid[:, i], i].float().mean()) for i in range(n)]
    g = torch.Generator().manual_seed(0)
    pick = torch.nonzero(full)[:, 0]
    pick = pick[torch.randperm(len(pick), generator=g)[:max_tree_positions]]
    k = spec.config.top_k_tokens_per_head
    ibm = f"top_k={k},n={spec.config.n_candidates}"
    shapes = {ibm: (k, spec.config.n_candidates), "chain (top_k=1)": ([1] * n, 1)}
    trees = {
        ibm: tree_run(spec, data, pick, k, spec.config.n_candidates, of),
        # Cheaper trees: the proposal costs 1 + k0 + k0 k1 + ... head evaluations over the whole vocabulary.
        "top_k=[3, 2, 1],n=3": tree_run(spec, data, pick, [3, 2, 1][:n] + [1] * (n - 3), 3, of),
        "chain (top_k=1)": tree_run(spec, data, pick, [1] * n, 1, of),
    }
    everywhere = torch.arange(len(data))
    report: dict[str, object] = {"num_positions": len(data)}
    if n >= 2:  # walk finds reply ends from the IGNORE padding of head 1's target (rows_to_end)
        walks = {
            name: round(walk(tree_run(spec, data, everywhere, top_k, c, of), data.windows), 3)
            for name, (top_k, c) in shapes.items()
        }
        by_nodes = nodes_run(spec, data, everywhere, NODE_BUDGETS, of)
        walks |= {f"best {m} nodes": round(walk(a, data.windows), 3) for m, a in by_nodes.items()}
        report["walk_tokens_per_step"] = walks
    return report | {
        "top1_per_head": [round(a, 4) for a in top1],
        "chain_tokens_per_step": round(1 + float(run.mean()), 3),
        "tree_tokens_per_step": {name: round(1 + float(r.mean()), 3) for name, r in trees.items()},
        "tree_accept_rate_by_depth": {
            name: [round(float((r > d).float().mean()), 4) for d in range(n)] for name, r in trees.items()
        },
    }


@torch.no_grad()
def teacher_forced(spec: MLPSpeculator, data: Positions, penalty: float = 1.0) -> torch.Tensor:
    """[positions, n_predict] bool: whether head i's top token is x_{j+i+2}, each head reading the true tokens
    before it (False where there is no target); a `draft_penalty` speculator's heads ranked under the penalty."""
    correct = torch.zeros(len(data), spec.n_predict, dtype=torch.bool)
    penalized = spec.config.draft_penalty and penalty != 1.0 and data.history is not None
    columns = spec.columns()
    for start in range(0, len(data), 512):
        h, w = data.hidden[start : start + 512].float(), data.windows[start : start + 512]
        rows = torch.arange(start, min(start + 512, len(data)))
        state = spec.scale(h)
        for i in range(spec.n_predict):
            state = spec.step(i, state, w[:, i].clamp(min=0))
            logits = spec.logits(i, state)
            if penalized:
                logits = penalize(logits, data.seen(rows, columns, logits.shape[-1], ahead=i + 1), penalty)
            correct[start : start + 512, i] = spec.vocab_ids(logits.argmax(-1)) == w[:, i + 1]
    return correct


def walk(accepted: torch.Tensor, windows: torch.Tensor) -> float:
    """Mean tokens per base step as the engine measures them, from the accepted drafts at every position.

    Each reply is decoded from its first position; a step at position j emits 1 + accepted[j] tokens and
    the next step reads the hidden state at j + 1 + accepted[j]. The mean of 1 + accepted over all positions
    weights an easy stretch by its length although the engine crosses it in few steps: for the previous
    (token-trained) speculator on the held-out written replies, 2.42 per position, 2.02 walked, 2.05 in the
    engine.
    """
    ends = (rows_to_end(windows) == 0).nonzero()[:, 0].tolist()
    acc = [int(a) for a in accepted.tolist()]
    tokens = steps = start = 0
    for end in ends:
        j = start
        while j <= end:
            tokens, steps, j = tokens + 1 + acc[j], steps + 1, j + 1 + acc[j]
        start = end + 1
    return tokens / max(steps, 1)


def root_penalty(spec: MLPSpeculator, data: Positions, rows: torch.Tensor, penalty: float) -> DraftPenalty:
    """The engine's DraftPenalty at these positions: each has seen x_0..x_{j+1} (its last token included)."""
    width = spec.vocab_size if spec.draft_vocab is None else len(spec.draft_vocab)
    seen = data.seen(rows, spec.columns(), width, ahead=1)
    return DraftPenalty(seen, torch.full((len(rows),), penalty))


Penalties = Callable[[torch.Tensor], DraftPenalty | None]


def tree_run(
    spec: MLPSpeculator, data: Positions, pick: torch.Tensor, top_k: list[int], n: int,
    penalty_of: Penalties = lambda rows: None,
) -> torch.Tensor:  # fmt: skip
    """Accepted drafts per position when the candidate tree is verified greedily against the true reply:
    the longest prefix any candidate shares with it. penalty_of: positions -> their DraftPenalty (or None)."""
    out = []
    for chunk in pick.split(1024):
        hidden, last = data.hidden[chunk].float(), data.windows[chunk, 0]
        tokens, _ = propose(spec, hidden, last, top_k, n, penalty=penalty_of(chunk))
        truth = data.windows[chunk, 1:]  # [P, n_predict]
        match = torch.cumprod((tokens == truth[:, None, :]).long(), dim=2).sum(2)  # [P, candidates]
        out.append(match.max(1).values.float())
    return torch.cat(out) if out else torch.zeros(0)


NODE_BUDGETS = (4, 8, 10, 16, 32, 64)


def nodes_run(
    spec: MLPSpeculator, data: Positions, pick: torch.Tensor, budgets: tuple[int, ...],
    penalty_of: Penalties = lambda rows: None, num_heads: int | None = None,
) -> dict[int, torch.Tensor]:  # fmt: skip
    """Accepted drafts per position for the best-m-node tree (`propose_nodes`, its first num_heads heads) of every
    m in budgets: the deepest prefix of the true continuation among the tree's nodes. One proposal at the largest
    budget serves all, since its first m nodes are the m-node tree."""
    out: dict[int, list[float]] = {m: [] for m in budgets}
    width = max(budgets)
    for chunk in pick.split(512):
        truth = data.windows[chunk, 1:].tolist()
        ranked = propose_nodes(
            spec, data.hidden[chunk].float(), data.windows[chunk, 0], width, num_heads, penalty=penalty_of(chunk)
        )
        for nodes, t in zip(ranked, truth, strict=True):
            for m in budgets:
                tree = {tuple(p) for p in nodes[:m]}
                a = 0
                while a < len(t) and tuple(t[: a + 1]) in tree:
                    a += 1
                out[m].append(float(a))
    return {m: torch.tensor(a) for m, a in out.items()}
