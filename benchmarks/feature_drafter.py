"""`python -m benchmarks.feature_drafter`: would an EAGLE-style drafter beat the MLP speculator here? (offline)

The shipped drafter is IBM's MLP speculator: each head maps the base model's last hidden state and the tokens
guessed so far to a token, through its own small output head. Issue 19's remaining idea was a drafter of the
other kind (EAGLE): one decoder layer that predicts the base model's *next hidden state* from its current one
and the next token, attends to the reply's earlier states, and scores tokens with the base model's own output
projection, so its logits sit on the base's scale and the repetition penalty applies to them as the base
applies it. This study trains one on the speculator's cached training set and measures it on the same held-out
replies as the MLP, before anything goes into the engine.

Data: a work dir of `python -m specdesk.training.train` (its `positions-n3.pt`: the base model's hidden states
after the final norm over its own replies, the held-out replies by decoding mode, the draft vocabulary).
Trained on the stage-2 positions (the model's own replies) only; the logits cover the draft vocabulary (the
MLP's heads cover the same). Under the replies' repetition penalty every logit row is penalized over what its
position has seen, in training and evaluation alike.

Reported per held-out mode: top-1 of the first draft (the MLP's head 0 equivalent), of the second draft given
the first was right (fed its own predicted state), and the greedy chain's tokens per step over two drafts.

    python -m specdesk.training.train --repetition-penalty 1.1 --quantization q4_1 --persona-greedy \
        --persona-every 2 --work-dir /tmp/train/pg --out /tmp/train/pg-out      # the data (32 min)
    python -m benchmarks.feature_drafter --work-dir /tmp/train/pg --mlp /tmp/train/pg-out --every-epoch --out FILE
    python -m benchmarks.feature_drafter --mlp /tmp/train/pg-out --time-only   # what a draft costs each
"""

from __future__ import annotations

import argparse
import json
import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from specdesk.engine.logits_processors import penalize
from specdesk.training.train_data import IGNORE, Positions


def runs(data: Positions) -> list[tuple[int, int]]:
    """The replies as (first row, length): consecutive rows of one sequence (same history start, each row one
    token further)."""
    assert data.begin is not None and data.end is not None
    begin, end = data.begin.tolist(), data.end.tolist()
    out, start = [], 0
    for r in range(1, len(begin) + 1):
        if r == len(begin) or begin[r] != begin[r - 1] or end[r] != end[r - 1] + 1:
            out.append((start, r - start))
            start = r
    return out


def rotary(x: Tensor, positions: Tensor) -> Tensor:
    """Llama's rotary embedding on x [..., L, heads, dim] at positions [L]."""
    dim = x.shape[-1]
    inv = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    ang = positions[:, None].float() * inv[None, :]  # [L, dim / 2]
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
    a, b = x[..., : dim // 2], x[..., dim // 2 :]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


class Drafter(nn.Module):
    """One Llama decoder layer over fc([state; embedding of the next token]); its output, normed, is the
    predicted next state, scored by the base model's (frozen) output projection rows of the draft vocabulary."""

    def __init__(self, d: int, heads: int, inter: int, head_rows: Tensor, embed: Tensor) -> None:
        super().__init__()
        self.d, self.heads = d, heads
        self.fc = nn.Linear(2 * d, d, bias=False)
        self.norm1, self.norm2, self.out_norm = nn.RMSNorm(d), nn.RMSNorm(d), nn.RMSNorm(d)
        self.qkv, self.o = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.gate_up, self.down = nn.Linear(d, 2 * inter, bias=False), nn.Linear(inter, d, bias=False)
        self.head_rows, self.embed = head_rows, embed  # [draft vocab, d], [vocab, d]: frozen, not parameters

    def inputs(self, state: Tensor, tokens: Tensor) -> Tensor:
        return self.fc(torch.cat([state, self.embed[tokens.clamp(min=0)]], dim=-1))

    def qkv_of(self, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, L, d] -> q, k, v [B, heads, L, dim], rotary applied."""
        b, n, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, self.d // self.heads).unbind(2)
        q, k = rotary(q, positions), rotary(k, positions)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def finish(self, x: Tensor, attn: Tensor) -> Tensor:
        """The layer's rest after attention [B, heads, L, dim]: the predicted next state [B, L, d]."""
        b, _, n, _ = attn.shape
        h = x + self.o(attn.transpose(1, 2).reshape(b, n, self.d))
        gate, up = self.gate_up(self.norm2(h)).chunk(2, dim=-1)
        return self.out_norm(h + self.down(F.silu(gate) * up))

    def forward(self, state: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Teacher-forced over whole replies: state [B, L, d] (true states), tokens [B, L] (the next tokens).
        Returns the predicted next states [B, L, d] and the layer's inputs, keys and values (for `second`)."""
        x = self.inputs(state, tokens)
        pos = torch.arange(x.shape[1])
        q, k, v = self.qkv_of(x, pos)
        return self.finish(x, F.scaled_dot_product_attention(q, k, v, is_causal=True)), x, k, v

    def second(self, pred: Tensor, guess: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """The second draft at every position j at once: its input is (predicted state j + 1, guessed token),
        and it attends to the true inputs 0..j (keys k, values v) and itself."""
        x2 = self.inputs(pred, guess)
        n = x2.shape[1]
        q2, k2, v2 = self.qkv_of(x2, torch.arange(1, n + 1))
        scale = 1.0 / math.sqrt(q2.shape[-1])
        past = (q2 @ k.transpose(-1, -2)) * scale  # [B, H, L, L]
        past = past.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
        own = (q2 * k2).sum(-1, keepdim=True) * scale  # [B, H, L, 1]
        p = torch.cat([past, own], dim=-1).softmax(-1)
        attn = p[..., :n] @ v + p[..., n:] * v2
        return self.finish(x2, attn)

    def logits(self, state: Tensor) -> Tensor:
        return state @ self.head_rows.T


def _batch(
    data: Positions, chunk: list[tuple[int, int]], cols: Tensor, width: int, penalty: float
) -> dict[str, Tensor]:
    """Padded tensors for a list of replies: states, next tokens, targets (as draft columns), next states,
    validity masks and the penalty's seen-masks for drafts one and two."""
    length = max(n for _, n in chunk)
    rows = torch.full((len(chunk), length), -1, dtype=torch.long)
    for i, (s, n) in enumerate(chunk):
        rows[i, :n] = torch.arange(s, s + n)
    ok = rows >= 0
    r = rows.clamp(min=0)
    w = data.windows[r]
    nxt = torch.where(ok[:, 1:], r[:, 1:], r[:, :-1])
    out = {
        "state": data.hidden[r].float(), "tokens": w[..., 0], "ok": ok,
        "next_tokens": w[..., 1].clamp(min=0),
        "t1": torch.where(ok & (w[..., 1] != IGNORE), cols[w[..., 1].clamp(min=0)], IGNORE),
        "t2": torch.where(ok & (w[..., 2] != IGNORE), cols[w[..., 2].clamp(min=0)], IGNORE),
        "has1": ok & (w[..., 1] != IGNORE), "has2": ok & (w[..., 1] != IGNORE) & (w[..., 2] != IGNORE),
        "next_state": F.pad(data.hidden[nxt].float(), (0, 0, 0, 1)), "next_ok": F.pad(ok[:, 1:], (0, 1)),
    }  # fmt: skip
    if penalty != 1.0:
        flat = r.reshape(-1)
        out["seen1"] = data.seen(flat, cols, width, ahead=1).view(*r.shape, width)
        out["seen2"] = data.seen(flat, cols, width, ahead=2).view(*r.shape, width)
    return out


def _penalized(logits: Tensor, b: dict[str, Tensor], key: str, penalty: float) -> Tensor:
    return penalize(logits, b[key], penalty) if key in b else logits


def train(model: Drafter, data: Positions, cols: Tensor, penalty: float, epochs: int, batch: int, lr: float,
          weight_decay: float, feature_weight: float, second_weight: float, seed: int,
          held: Positions | None = None) -> list[float]:  # fmt: skip
    """AdamW over shuffled batches of replies, cosine schedule; cross-entropy on the first draft's token plus
    feature_weight * smooth L1 on the predicted state (EAGLE's two losses), and second_weight * cross-entropy of the
    second draft made from the first's predicted state. Returns each epoch's mean first-draft cross-entropy."""
    replies = runs(data)
    width = model.head_rows.shape[0]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(replies) / batch)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    g = torch.Generator().manual_seed(seed)
    losses = []
    for epoch in range(epochs):
        order = torch.randperm(len(replies), generator=g).tolist()
        total, count, started = 0.0, 0, time.time()
        for i in range(0, len(order), batch):
            b = _batch(data, [replies[j] for j in order[i : i + batch]], cols, width, penalty)
            pred, _, k, v = model(b["state"], b["tokens"])
            logits = _penalized(model.logits(pred), b, "seen1", penalty)
            ce = F.cross_entropy(logits.reshape(-1, width), b["t1"].reshape(-1), ignore_index=IGNORE)
            mask = b["next_ok"][..., None].float()
            feat = (F.smooth_l1_loss(pred, b["next_state"], reduction="none") * mask).sum() / (
                mask.sum() * pred.shape[-1]
            )
            loss = ce + feature_weight * feat
            if second_weight:  # the second draft from its own predicted state, as it drafts (EAGLE-3's test)
                pred2 = model.second(pred, b["next_tokens"], k, v)
                logits2 = _penalized(model.logits(pred2), b, "seen2", penalty)
                loss = loss + second_weight * F.cross_entropy(logits2.reshape(-1, width), b["t2"].reshape(-1),
                                                              ignore_index=IGNORE)  # fmt: skip
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total, count = total + float(ce.detach()), count + 1
        losses.append(total / count)
        seen = f", held out: {evaluate(model, held, cols, penalty)}" if held is not None else ""
        print(f"epoch {epoch + 1}/{epochs}: cross-entropy {total / count:.3f} ({time.time() - started:.0f} s){seen}",
              flush=True)  # fmt: skip
    return losses


@torch.no_grad()
def evaluate(model: Drafter, data: Positions, cols: Tensor, penalty: float) -> dict[str, float]:
    """Top-1 of the first draft, of the second given the first (fed its own predicted state and guess), and the
    greedy chain's tokens per step over two drafts (1 + P(first) + P(first and second))."""
    width = model.head_rows.shape[0]
    first = both = n1 = n2 = 0
    replies, ids = runs(data), torch.tensor(_token_ids(cols))
    for i in range(0, len(replies), 64):
        b = _batch(data, replies[i : i + 64], cols, width, penalty)
        pred, _, k, v = model(b["state"], b["tokens"])
        c1 = _penalized(model.logits(pred), b, "seen1", penalty).argmax(-1)
        right1 = (c1 == b["t1"]) & (b["t1"] != IGNORE)  # a target outside the draft vocabulary is a miss
        guess = ids[c1]
        pred2 = model.second(pred, guess, k, v)
        c2 = _penalized(model.logits(pred2), b, "seen2", penalty).argmax(-1)
        has2 = b["has2"]
        right2 = (c2 == b["t2"]) & (b["t2"] != IGNORE) & has2
        first += int(right1.sum())
        n1 += int(b["has1"].sum())
        both += int((right1 & right2).sum())
        n2 += int((right1 & has2).sum())
    return {"positions": n1, "first_top1": round(first / max(n1, 1), 4),
            "second_top1_given_first": round(both / max(n2, 1), 4),
            "chain_tokens_per_step_2": round(1 + first / max(n1, 1) + both / max(n1, 1), 3)}  # fmt: skip


def _token_ids(cols: Tensor) -> list[int]:
    """The draft vocabulary's token ids by column (cols maps token id -> column or IGNORE)."""
    ids = torch.nonzero(cols >= 0)[:, 0]
    out = torch.empty(len(ids), dtype=torch.long)
    out[cols[ids]] = ids
    return out.tolist()


def mlp_chain(spec: Any, data: Positions, penalty: float) -> float:
    """The MLP speculator's greedy chain over its first two heads (`held_out.teacher_forced`): 1 + P(head 0
    right) + P(heads 0 and 1 right), over the positions with a first target."""
    from specdesk.training.held_out import teacher_forced

    correct, has = teacher_forced(spec, data, penalty), data.windows[:, 1] != IGNORE
    run = correct[:, 0] & has
    return round(1 + float(run.sum() + (run & correct[:, 1]).sum()) / max(int(has.sum()), 1), 3)


@torch.no_grad()
def draft_step_ms(model: Drafter, spec: Any, context: int = 200, repeats: int = 300) -> dict[str, float]:
    """ms per draft of one sequence in torch (float32, the process's threads): the drafter's step against a
    cache of `context` states (its input, one query's attention, the layer's rest, the draft vocabulary's
    logits), and the MLP's head 0 (state step and logits) beside it, alternated, each the median."""
    d = model.d
    k = v = torch.randn(1, model.heads, context, d // model.heads)
    state, token, pos = torch.randn(1, 1, d), torch.tensor([[5]]), torch.tensor([context])

    def drafter() -> None:
        x = model.inputs(state, token)
        q, k1, v1 = model.qkv_of(x, pos)
        attn = F.scaled_dot_product_attention(q, torch.cat([k, k1], 2), torch.cat([v, v1], 2))
        model.logits(model.finish(x, attn)).argmax(-1)

    def mlp() -> None:
        spec.logits(0, spec.step(0, spec.scale(state[0]), token[0])).argmax(-1)

    times: dict[str, list[float]] = {"drafter": [], "mlp_head": []}
    for _ in range(repeats):
        for name, fn in (("drafter", drafter), ("mlp_head", mlp)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: round(1e3 * sorted(t)[len(t) // 2], 3) for name, t in times.items()}


def _costs(model: Drafter, mlp: str | None, base: Any) -> dict[str, Any]:
    """What a draft costs each: multiply-adds (weights read) and torch's ms (`draft_step_ms`)."""
    if mlp is None:
        raise SystemExit("--mlp: the MLP speculator to compare with")
    from specdesk.engine.speculators import draft_vocab

    spec = draft_vocab.load_speculator(mlp, base, torch.float32)
    rows = len(spec.draft_vocab) if spec.draft_vocab is not None else spec.vocab_size
    inner = spec.config.inner_dim or spec.config.emb_dim
    return {
        "macs_per_draft": {
            "drafter": sum(p.numel() for p in model.parameters()) + model.head_rows.numel(),
            # head 0's state projection (emb_dim -> inner_dim), then its rows of the draft vocabulary
            "mlp_head": spec.config.emb_dim * inner + inner * rows,
        },
        "ms_per_draft": draft_step_ms(model, spec),
    }


def _some_replies(data: Positions, fraction: float, seed: int = 0) -> Positions:
    """A random fraction of the replies (seeded), each whole: for the drafter's accuracy against its data."""
    replies = runs(data)
    keep = torch.randperm(len(replies), generator=torch.Generator().manual_seed(seed))[: round(fraction * len(replies))]
    rows = torch.cat([torch.arange(replies[i][0], replies[i][0] + replies[i][1]) for i in sorted(keep.tolist())])
    assert data.begin is not None and data.end is not None
    return Positions(data.hidden[rows], data.windows[rows], data.history, data.begin[rows], data.end[rows])


def build(work_dir: str) -> tuple[dict[str, Any], Any, Drafter, Tensor]:
    """The work dir's cached positions, the base model they came from, an untrained drafter of its shape and the
    draft vocabulary's columns (token id -> column, IGNORE outside it)."""
    from specdesk.engine.models.loader import load_model

    saved = torch.load(f"{work_dir}/positions-n3.pt", weights_only=False)
    key = json.loads(saved["key"]) if isinstance(saved["key"], str) else saved["key"]
    loaded = load_model(key[0], dtype="float32", device="cpu")  # the data key's first entry: the model
    base: Any = loaded.model
    embed = base.model.embed_tokens.weight.detach().float()  # tied: also the output projection
    vocab = torch.tensor(saved["draft_vocab"], dtype=torch.long)
    cols = torch.full((embed.shape[0],), IGNORE, dtype=torch.long)
    cols[vocab] = torch.arange(len(vocab))
    cfg = loaded.hf_config
    if not getattr(cfg, "tie_word_embeddings", False):  # the embedding is then not the output projection
        raise SystemExit("the drafter scores with the base's tied output rows: this model's are untied")
    model = Drafter(embed.shape[1], cfg.num_attention_heads, cfg.intermediate_size, embed[vocab], embed)
    return saved, loaded, model, cols


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work-dir", default="/tmp/train/pg", help="a specdesk.training.train work dir")
    ap.add_argument("--mlp", default=None, help="a trained MLP speculator to measure beside it (held_out.evaluate)")
    ap.add_argument("--repetition-penalty", type=float, default=1.1, help="what the replies were generated under")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--batch", type=int, default=16, help="replies per step")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--feature-weight", type=float, default=1.0)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument(
        "--second-weight",
        type=float,
        default=1.0,
        help="also train the second draft from the first's predicted state (0: off, as EAGLE-1)",
    )
    ap.add_argument("--every-epoch", action="store_true", help="print the greedy held-out figures after each epoch")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--fraction", type=float, default=1.0, help="train on this random fraction of the replies")
    ap.add_argument("--time-only", action="store_true", help="only time a draft of each (weights do not matter)")
    ap.add_argument("--save", default=None, help="save the trained drafter's weights here (torch.save)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    saved, loaded, model, cols = build(args.work_dir)
    stage2 = saved["stage2"]
    if args.fraction < 1.0:
        stage2 = _some_replies(stage2, args.fraction)
    if args.time_only:
        report: dict[str, Any] = _costs(model, args.mlp, loaded.model)
        print(json.dumps(report, indent=2))
        return
    started = time.time()
    losses = train(model, stage2, cols, args.repetition_penalty, args.epochs, args.batch, args.lr, args.weight_decay,
                   args.feature_weight, args.second_weight, seed=0,
                   held=saved["held"]["greedy"] if args.every_epoch else None)  # fmt: skip
    if args.save:
        torch.save(model.state_dict(), args.save)
    report = {
        "args": vars(args), "train_minutes": round((time.time() - started) / 60, 1), "losses": losses,
        "parameters": sum(p.numel() for p in model.parameters()),
        "drafter": {mode: evaluate(model, data, cols, args.repetition_penalty) for mode, data in saved["held"].items()},
    }  # fmt: skip
    if args.mlp:
        from specdesk.engine.speculators import draft_vocab
        from specdesk.training.held_out import evaluate as mlp_evaluate

        spec = draft_vocab.load_speculator(args.mlp, loaded.model, torch.float32)
        report["mlp"] = {}
        for mode, data in saved["held"].items():
            got = mlp_evaluate(spec, data, args.repetition_penalty)
            report["mlp"][mode] = {
                "top1_per_head": got["top1_per_head"],
                "chain_tokens_per_step_2": mlp_chain(spec, data, args.repetition_penalty),
            }
        report |= _costs(model, args.mlp, loaded.model)
    print(json.dumps({k: v for k, v in report.items() if k != "args"}, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
