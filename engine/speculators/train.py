"""`python -m engine.speculators.train`: IBM's two-stage recipe for the MLP speculator, on this CPU.

    nice -n 10 python -m engine.speculators.train      # default model -> engine/speculators/default
    python -m engine.speculators.train --resume        # continue from the last checkpoint

The base model is frozen. Stage 1 trains on text (head i predicts the token i + 2 ahead of the hidden state
it reads), stage 2 on the base model's own replies to the training conversations (see train_data.py).
Loss: per-head cross-entropy, summed. AdamW (0.9, 0.95), weight decay 0.1, gradient clip 1.0, IBM's
schedule: warmup then cosine to 10 % in stage 1, a restart at 10 % decaying to 1 % in stage 2; stage 1 to
stage 2 steps 5:2. For a small base model the speculator's embedding and heads are the base model's own
(tie_to_base): only projections and norms train, and each base hidden state is computed once per stage.
Held out: every tenth training conversation; prompts/eval is never read.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from engine.speculators.candidates import propose
from engine.speculators.mlp import MLPSpeculator, MLPSpeculatorConfig
from engine.speculators.train_data import (
    IGNORE,
    HiddenStateExtractor,
    Positions,
    TokenSequence,
    extract_positions,
    generate_replies,
    stage1_sequences,
    stage2_prompts,
)

DEFAULT_OUT = Path(__file__).resolve().parent / "default"


@dataclass(frozen=True)
class TrainConfig:
    """Everything that shapes a run (recorded next to the result)."""

    model: str | None = None
    out: str = str(DEFAULT_OUT)
    work_dir: str = str(Path.home() / ".cache" / "specdesk" / "speculator-train")
    dtype: str = "bfloat16"
    n_predict: int = 3
    tie_weights: bool = False
    stage1_steps: int = 500
    stage2_steps: int = 200
    batch_size: int = 128
    lr: float = 1e-3
    max_reply_tokens: int = 160
    temperature: float = 0.0
    max_conversations: int | None = None
    holdout_every: int = 10
    checkpoint_every: int = 100
    seed: int = 0
    threads: int = 2
    resume: bool = False


def lr_factor(step: int, stage1_steps: int, stage2_steps: int) -> float:
    """IBM's schedule as a factor of the peak learning rate (step counts from 0).

    Stage 1: quadratic warmup over w1 = min(2000, S1 // 20) steps, then 0.1 + 0.45 (1 + cos(pi s / S1)).
    Stage 2: warmup to 0.1, then 0.01 + 0.045 (1 + cos(pi s / S2)).
    """
    if step < stage1_steps:
        w = max(1, min(2000, stage1_steps // 20))
        warm = 1 - (1 - min(step + 1, w) / w) ** 2
        return min(warm, 0.1 + 0.45 * (1 + math.cos(math.pi * step / stage1_steps)))
    s = step - stage1_steps
    w = max(1, min(2000, stage2_steps // 20))
    warm = 0.1 * (1 - (1 - min(s + 1, w) / w) ** 2)
    return min(warm, 0.01 + 0.045 * (1 + math.cos(math.pi * min(s, stage2_steps) / max(1, stage2_steps))))


def head_losses(spec: MLPSpeculator, hidden: torch.Tensor, windows: torch.Tensor) -> list[torch.Tensor]:
    """Per-head mean cross-entropy over a batch: hidden [B, d], windows [B, n_predict + 1]."""
    state = spec.scale(hidden.float())
    losses = []
    for i in range(spec.n_predict):
        state = spec.step(i, state, windows[:, i].clamp(min=0))  # IGNORE inputs only feed ignored targets
        logits = spec.logits(i, state)  # in the base head's dtype (bf16: the matmul dominates the cost)
        losses.append(F.cross_entropy(logits.float(), windows[:, i + 1], ignore_index=IGNORE))
    return losses


@torch.no_grad()
def evaluate(spec: MLPSpeculator, data: Positions, max_tree_positions: int = 512) -> dict[str, object]:
    """Held-out acceptance on the base model's own replies.

    Teacher-forced top-1 per head; the greedy chain accepts head i exactly when heads 0..i are all right,
    so mean tokens per base step for a chain = 1 + E[run of correct heads from head 0]. For the candidate
    tree (IBM's top-k [5, 4, 3], 5 paths) the accepted length is the longest prefix any candidate shares
    with the true continuation.
    """
    spec.eval()
    n = spec.n_predict
    correct = torch.zeros(len(data), n, dtype=torch.bool)
    valid = data.windows[:, 1:] != IGNORE
    for start in range(0, len(data), 512):
        h, w = data.hidden[start : start + 512].float(), data.windows[start : start + 512]
        state = spec.scale(h)
        for i in range(n):
            state = spec.step(i, state, w[:, i].clamp(min=0))
            correct[start : start + 512, i] = spec.logits(i, state).argmax(-1) == w[:, i + 1]
    full = valid.all(1)  # positions where every head has a target
    run = torch.cumprod(correct[full].long(), dim=1).sum(1).float()
    top1 = [float(correct[valid[:, i], i].float().mean()) for i in range(n)]
    g = torch.Generator().manual_seed(0)
    pick = torch.nonzero(full)[:, 0]
    pick = pick[torch.randperm(len(pick), generator=g)[:max_tree_positions]]
    tokens, _ = propose(spec, data.hidden[pick].float(), data.windows[pick, 0])
    truth = data.windows[pick, 1:]  # [P, n]
    match = torch.cumprod((tokens == truth[:, None, :]).long(), dim=2).sum(2)  # [P, candidates]
    tree_run = match.max(1).values.float()
    return {
        "num_positions": len(data),
        "top1_per_head": [round(a, 4) for a in top1],
        "chain_tokens_per_step": round(1 + float(run.mean()), 3),
        "tree_tokens_per_step": round(1 + float(tree_run.mean()), 3),
        "tree_accept_rate_by_depth": [round(float((tree_run > d).float().mean()), 4) for d in range(n)],
    }


def split_conversations(cfg: TrainConfig) -> tuple[list, list]:
    """(train, held-out) lists of (domain, messages) from prompts/train only."""
    from prompts.loader import load_dataset

    entries = load_dataset("train")[: cfg.max_conversations]
    convs = [(e.domain, [dict(m) for m in e.messages]) for e in entries]
    held = [c for i, c in enumerate(convs) if i % cfg.holdout_every == cfg.holdout_every - 1]
    train = [c for i, c in enumerate(convs) if i % cfg.holdout_every != cfg.holdout_every - 1]
    return train, held


def build_data(cfg: TrainConfig, loaded: Any) -> tuple[Positions, Positions, Positions]:
    """Stage 1 text positions, stage 2 reply positions, held-out reply positions (cached in work_dir)."""
    n_predict = cfg.n_predict
    work = Path(cfg.work_dir)
    cache = work / f"positions-n{n_predict}.pt"
    tok = loaded.tokenizer
    data_key = json.dumps(
        [
            cfg.model,
            cfg.dtype,
            cfg.max_reply_tokens,
            cfg.temperature,
            cfg.max_conversations,
            cfg.holdout_every,
            cfg.seed,
        ]
    )
    if cache.is_file():
        saved = torch.load(cache, weights_only=False)
        if saved["key"] == data_key:
            return saved["stage1"], saved["stage2"], saved["held"]
    train, held = split_conversations(cfg)
    s1 = stage1_sequences(tok, train)
    prompts = stage2_prompts(tok, train)
    held_prompts = stage2_prompts(tok, held)
    replies = generate_replies(
        prompts + held_prompts,
        work / "replies.json",
        model=cfg.model,
        dtype=cfg.dtype,
        max_tokens=cfg.max_reply_tokens,
        temperature=cfg.temperature,
        seed=cfg.seed,
    )
    s2 = [TokenSequence(p + r, len(p) - 1) for p, r in zip(prompts + held_prompts, replies, strict=True)]
    max_len = max(len(s.tokens) for s in s1 + s2)
    extractor = HiddenStateExtractor(loaded.model, loaded, max_len)
    stage1 = extract_positions(extractor, s1, n_predict, "stage 1: base hidden states")
    stage2 = extract_positions(extractor, s2[: len(prompts)], n_predict, "stage 2: base hidden states")
    held_out = extract_positions(extractor, s2[len(prompts) :], n_predict, "held out: base hidden states")
    work.mkdir(parents=True, exist_ok=True)
    torch.save({"key": data_key, "stage1": stage1, "stage2": stage2, "held": held_out}, cache)
    return stage1, stage2, held_out


def train(cfg: TrainConfig) -> dict[str, object]:
    """Run both stages, save the speculator to cfg.out and return the report (also written there)."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    started = time.time()
    from engine.models.loader import load_model

    loaded = load_model(cfg.model, dtype=cfg.dtype, device="cpu")
    stage1, stage2, held = build_data(cfg, loaded)
    print(f"positions: stage 1 {len(stage1)}, stage 2 {len(stage2)}, held out {len(held)}", file=sys.stderr)
    spec = MLPSpeculator(
        MLPSpeculatorConfig(
            vocab_size=loaded.vocab_size,
            emb_dim=loaded.hidden_size,
            n_predict=cfg.n_predict,
            tie_weights=cfg.tie_weights,
            tie_to_base=True,
        )
    )
    spec.tie_to_base(loaded.model)
    params = [p for p in spec.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.1)
    total = cfg.stage1_steps + cfg.stage2_steps
    ckpt = Path(cfg.work_dir) / "checkpoint.pt"
    step = 0
    if cfg.resume and ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        spec.load_state_dict(state["speculator"])
        opt.load_state_dict(state["optimizer"])
        step = state["step"]
        print(f"resumed at step {step}", file=sys.stderr)
    spec.train()
    g = torch.Generator()
    bar = tqdm(range(step, total), initial=step, total=total, desc="training", unit="step")
    for step in bar:
        data = stage1 if step < cfg.stage1_steps else stage2
        g.manual_seed(cfg.seed * 1_000_003 + step)  # the batch depends on the step only: resume-exact
        idx = torch.randint(len(data), (cfg.batch_size,), generator=g)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * lr_factor(step, cfg.stage1_steps, cfg.stage2_steps)
        losses = head_losses(spec, data.hidden[idx], data.windows[idx])
        opt.zero_grad(set_to_none=True)
        sum(losses).backward()  # type: ignore[union-attr]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        bar.set_postfix(
            stage=1 if step < cfg.stage1_steps else 2,
            loss=" ".join(f"{x.item():.2f}" for x in losses),
            gnorm=f"{float(grad_norm):.2f}",
        )
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == total:
            _save_checkpoint(ckpt, spec, opt, step + 1)
    report = {
        "held_out": evaluate(spec, held),
        "positions": {"stage1": len(stage1), "stage2": len(stage2), "held_out": len(held)},
        "minutes": round((time.time() - started) / 60, 1),
        "command": "python -m engine.speculators.train " + shlex.join(sys.argv[1:]),
        "config": asdict(cfg),
    }
    out = Path(cfg.out)
    spec.save_pretrained(out, dtype=torch.bfloat16)
    (out / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _save_checkpoint(path: Path, spec: MLPSpeculator, opt: torch.optim.Optimizer, step: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"speculator": spec.state_dict(), "optimizer": opt.state_dict(), "step": step}, tmp)
    tmp.replace(path)  # atomic: a crash never leaves half a checkpoint


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    d = TrainConfig()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model", default=d.model, help="base model path (default: built-in SmolLM2-135M-Instruct)"
    )
    ap.add_argument("--out", default=d.out, help="where the trained speculator goes")
    ap.add_argument("--work-dir", default=d.work_dir, help="cached replies, hidden states and checkpoints")
    for name in ("dtype",):
        ap.add_argument(f"--{name}", default=getattr(d, name), choices=["bfloat16", "float32"])
    for name in (
        "n_predict",
        "stage1_steps",
        "stage2_steps",
        "batch_size",
        "max_reply_tokens",
        "holdout_every",
        "checkpoint_every",
        "seed",
        "threads",
    ):
        ap.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(d, name))
    ap.add_argument("--max-conversations", type=int, default=None, help="use only the first N (smoke runs)")
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--temperature", type=float, default=d.temperature, help="stage 2 sampling; 0 = greedy")
    ap.add_argument("--tie-weights", action="store_true", help="IBM's tie_weights (heads share proj/ln)")
    ap.add_argument("--resume", action="store_true", help="continue from work-dir/checkpoint.pt")
    return TrainConfig(**vars(ap.parse_args(argv)))


def main(argv: list[str] | None = None) -> None:
    report = train(parse_args(argv))
    print(json.dumps(report["held_out"], indent=2))


if __name__ == "__main__":
    main()
