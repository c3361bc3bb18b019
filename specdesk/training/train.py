"""`python -m specdesk.training.train`: IBM's two-stage recipe for the MLP speculator, on this CPU.

    nice -n 10 python -m specdesk.training.train      # default model -> specdesk/engine/speculators/default
    python -m specdesk.training.train --resume        # continue from the last checkpoint
    python -m specdesk.training.train --evaluate specdesk/engine/speculators/default   # held-out figures only
    python -m specdesk.training.train --repetition-penalty 1.1 --quantization int8 # the CPU console's text (AVX2: q4_1)

The base model is frozen. Stage 1 trains on text (head i predicts the token i + 2 ahead of the hidden state
it reads), stage 2 on the base model's own replies to the training conversations (see train_data.py).
Loss: per-head cross-entropy against the base model's own distribution at the drafted position (IBM's
uses the reply's token; --distill 0), summed. AdamW (0.9, 0.95), weight decay 0.1, gradient clip 1.0, IBM's
schedule: warmup then cosine to 10 % in stage 1, a restart decaying to 10 % of its peak in stage 2. IBM's
stage 1 is the long one (5:2); here stage 1 is the training conversations as text and stage 2 the base
model's own text. For a small base model the speculator's embedding is the base model's own (tie_to_base)
and each head scores a draft vocabulary with its own rows, started from the base LM head's (train_heads:
own rows accept more than the frozen base rows; docs/benchmarks.md has the measurement). Each base hidden
state is computed once per stage and cached. Under --repetition-penalty every reply is generated with it, the
distilled distribution is penalized, and (--draft-penalty, the default there) so are the heads' own logits, over
what each position has seen, as the engine then ranks them (draft_penalty.py).
Data: see dataset.py (held out: every tenth training scenario; prompts/eval is never read).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from specdesk.engine.logits_processors import penalize
from specdesk.engine.speculators import draft_vocab
from specdesk.engine.speculators.mlp import MLPSpeculator, MLPSpeculatorConfig, SpeculatorNorm
from specdesk.training import draft_vocab as vocab_builder
from specdesk.training.config import TrainConfig
from specdesk.training.dataset import build_data
from specdesk.training.held_out import evaluate
from specdesk.training.train_data import IGNORE, base_distribution, rows_to_end


def lr_factor(step: int, stage1_steps: int, stage2_steps: int, stage2_peak: float = 0.1) -> float:
    """IBM's schedule as a factor of the peak learning rate (step counts from 0).

    Stage 1: quadratic warmup over w1 = min(2000, S1 // 20) steps, then 0.1 + 0.45 (1 + cos(pi s / S1)).
    Stage 2 restarts: warmup to stage2_peak (IBM: 0.1), then cosine down to stage2_peak / 10.
    """
    if step < stage1_steps:
        w = max(1, min(2000, stage1_steps // 20))
        warm = 1 - (1 - min(step + 1, w) / w) ** 2
        return min(warm, 0.1 + 0.45 * (1 + math.cos(math.pi * step / stage1_steps)))
    s = step - stage1_steps
    w = max(1, min(2000, stage2_steps // 20))
    warm = stage2_peak * (1 - (1 - min(s + 1, w) / w) ** 2)
    cos = 0.5 * (1 + math.cos(math.pi * min(s, stage2_steps) / max(1, stage2_steps)))
    return min(warm, stage2_peak * (0.1 + 0.9 * cos))


def head_losses(
    spec: MLPSpeculator,
    hidden: torch.Tensor,
    windows: torch.Tensor,
    soft: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    distill: float = 0.0,
    seen: list[torch.Tensor] | None = None,
    penalty: float = 1.0,
) -> list[torch.Tensor]:
    """Per-head mean loss over a batch: hidden [B, d], windows [B, n_predict + 1].

    Head i's target is the reply's token (cross-entropy) mixed with, where `soft[i]` has it, the base model's
    own distribution at that token's position (`base_distribution`) with weight `distill`. A sampled reply's
    token is one draw from that distribution; the distribution is what verification compares against.
    With a restricted vocabulary the softmax runs over the draft tokens only, exactly what the heads rank
    at inference (and 10x cheaper); a target token outside it can never be drafted and is ignored.
    seen[i] (a `draft_penalty` speculator): the columns head i's distribution has seen; its logits are
    penalized over them as the engine will (draft_penalty.py).
    """
    state = spec.scale(hidden.float())
    columns = vocab_columns(spec)
    losses = []
    for i in range(spec.n_predict):
        state = spec.step(i, state, windows[:, i].clamp(min=0))  # IGNORE inputs only feed ignored targets
        logits = spec.logits(i, state).float()
        if seen is not None:
            logits = penalize(logits, seen[i], penalty)
        target = windows[:, i + 1]
        if columns is not None:
            target = torch.where(target == IGNORE, IGNORE, columns[target.clamp(min=0)])
        loss = F.cross_entropy(logits, target, ignore_index=IGNORE, reduction="none")  # 0 where ignored
        counted = target != IGNORE
        if soft is not None and distill > 0:
            probs, has = soft[i]
            weight = has.float() * distill
            loss = (1 - weight) * loss - weight * (probs * F.log_softmax(logits, dim=-1)).sum(-1)
            counted = counted | has
        losses.append(loss.sum() / counted.sum().clamp(min=1))
    return losses


def vocab_columns(spec: MLPSpeculator) -> torch.Tensor | None:
    """token id -> logits column under a restricted vocabulary (IGNORE outside it); None when unrestricted."""
    return None if spec.draft_vocab is None else spec.columns()


def train(cfg: TrainConfig) -> dict[str, object]:
    """Run both stages, save the speculator to cfg.out and return the report (also written there).

    With cfg.evaluate, only measure the speculator saved there on the (cached) held-out replies.
    """
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    started = time.time()
    from specdesk.engine.models.loader import load_model

    loaded = load_model(cfg.model, dtype=cfg.dtype, device="cpu", quantization=cfg.quantization)
    stage1, stage2, held, vocab = build_data(cfg, loaded)
    if cfg.evaluate:
        saved = draft_vocab.load_speculator(cfg.evaluate, loaded.model, torch.float32)
        return {"held_out": {mode: evaluate(saved, data, cfg.repetition_penalty) for mode, data in held.items()}}
    sizes = {"stage1": len(stage1), "stage2": len(stage2), **{f"held_out_{k}": len(v) for k, v in held.items()}}
    print(f"training positions: {sizes}", file=sys.stderr)
    spec = MLPSpeculator(
        MLPSpeculatorConfig(
            vocab_size=loaded.vocab_size,
            emb_dim=loaded.hidden_size,
            n_predict=cfg.n_predict,
            tie_weights=cfg.tie_weights,
            tie_to_base=True,
            draft_heads=len(vocab) if cfg.train_heads and cfg.draft_vocab_size else 0,
            draft_penalty=cfg.draft_penalty and cfg.repetition_penalty != 1.0,
        )
    )
    spec.tie_to_base(loaded.model)
    init_norms_from_base(spec, loaded.model)
    if cfg.draft_vocab_size:
        spec.restrict_vocab(torch.tensor(vocab, dtype=torch.long))
    if spec.draft_head is not None:
        spec.init_draft_heads()
    trainable = [(k, p) for k, p in spec.named_parameters() if p.requires_grad]
    params = [p for _, p in trainable]
    heads = [p for k, p in trainable if k.startswith("draft_head.")]
    groups = [{"params": [p for k, p in trainable if not k.startswith("draft_head.")], "lr_scale": 1.0}]
    if heads:
        groups.append({"params": heads, "lr_scale": 0.1, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.1)
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
    # Self-distillation targets: where each position's reply ends, and the base head rows the heads score.
    assert spec.base_head is not None
    distill = cfg.distill if cfg.n_predict >= 2 else 0.0  # reply ends are read from head 1's padding
    to_end = [rows_to_end(d.windows) for d in (stage1, stage2)] if distill else []
    base_rows = (spec.base_head if spec.draft_vocab is None else spec.base_head[spec.draft_vocab]).float()
    columns = vocab_columns(spec)
    g = torch.Generator()
    bar = tqdm(range(step, total), initial=step, total=total, desc="training", unit="step")
    for step in bar:
        stage = 0 if step < cfg.stage1_steps else 1
        data = (stage1, stage2)[stage]
        g.manual_seed(cfg.seed * 1_000_003 + step)  # the batch depends on the step only: resume-exact
        idx = torch.randint(len(data), (cfg.batch_size,), generator=g)
        for group in opt.param_groups:
            group["lr"] = (
                group["lr_scale"] * cfg.lr * lr_factor(step, cfg.stage1_steps, cfg.stage2_steps, cfg.stage2_peak)
            )
        seen = None  # per head, the columns its distribution has seen (x_0..x_{j+i+1})
        if data.history is not None and (spec.config.draft_penalty or (distill and cfg.repetition_penalty != 1.0)):
            seen = [data.seen(idx, columns, len(base_rows), ahead=i + 1) for i in range(cfg.n_predict)]
        soft = None
        if distill:
            soft = [
                base_distribution(data, idx, i + 1, to_end[stage], base_rows, cfg.distill_temperature,
                                  cfg.repetition_penalty, columns, None if seen is None else seen[i])
                for i in range(cfg.n_predict)
            ]  # fmt: skip
        own = seen if spec.config.draft_penalty else None
        losses = head_losses(spec, data.hidden[idx], data.windows[idx], soft, distill, own, cfg.repetition_penalty)
        opt.zero_grad(set_to_none=True)
        sum(losses).backward()  # type: ignore[union-attr]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        bar.set_postfix(
            stage=stage + 1,
            loss=" ".join(f"{x.item():.2f}" for x in losses),
            gnorm=f"{float(grad_norm):.2f}",
        )
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == total:
            _save_checkpoint(ckpt, spec, opt, step + 1)
    report = {
        "held_out": {mode: evaluate(spec, data, cfg.repetition_penalty) for mode, data in held.items()},
        "positions": sizes,
        "minutes": round((time.time() - started) / 60, 1),
        "command": "python -m specdesk.training.train " + shlex.join(sys.argv[1:]),
        "config": asdict(cfg),
    }
    out = Path(cfg.out)
    spec.save_pretrained(out, dtype=torch.bfloat16)
    if cfg.draft_vocab_size:
        vocab_builder.save(out, vocab)
    (out / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def init_norms_from_base(spec: MLPSpeculator, base: torch.nn.Module) -> None:
    """Start each LN_i scale at the base model's final-norm weight.

    The tied head expects states shaped like the base's own final-norm output (w * x / rms(x)); starting
    LN_i the same way (IBM's init of 1 suits a head trained from scratch) lets the heads learn from step 0.
    """
    norm = getattr(getattr(base, "model", None), "norm", None)
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return
    with torch.no_grad():
        for ln in spec.ln:
            assert isinstance(ln, SpeculatorNorm) and ln.weight is not None, ln
            if ln.weight.shape == weight.shape:
                ln.weight.copy_(weight.float())


def _save_checkpoint(path: Path, spec: MLPSpeculator, opt: torch.optim.Optimizer, step: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"speculator": spec.state_dict(), "optimizer": opt.state_dict(), "step": step}, tmp)
    tmp.replace(path)  # atomic: a crash never leaves half a checkpoint


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    d = TrainConfig()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=d.model, help="base model path (default: built-in SmolLM2-135M-Instruct)")
    ap.add_argument("--out", default=d.out, help="where the trained speculator goes")
    ap.add_argument("--work-dir", default=d.work_dir, help="cached replies, hidden states and checkpoints")
    ap.add_argument("--dtype", default=d.dtype, choices=["bfloat16", "float32"])
    ints = "n_predict stage1_steps stage2_steps batch_size max_reply_tokens persona_every holdout_every"
    ints += " samples_per_prompt synthetic_messages draft_vocab_size"
    ap.add_argument("--distill", type=float, default=d.distill,
                    help="weight of the base model's own distribution as heads' target (0: tokens)")  # fmt: skip
    for name in f"{ints} checkpoint_every seed threads".split():
        ap.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(d, name))
    ap.add_argument("--max-conversations", type=int, default=None, help="use only the first N (smoke runs)")
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--distill-temperature", type=float, default=d.distill_temperature)
    ap.add_argument("--stage2-peak", type=float, default=d.stage2_peak, help="stage 2 peak lr / lr (IBM's: 0.1)")
    ap.add_argument("--sampled-temperature", type=float, default=d.sampled_temperature, help="0 = greedy")
    ap.add_argument("--sampled-top-p", type=float, default=d.sampled_top_p)
    ap.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty,
                    help="applied to every generated reply and to the distilled distribution (1: off)")  # fmt: skip
    ap.add_argument("--quantization", default=d.quantization, choices=["int8", "q4_1"],
                    help="the base model's weights as the engine quantizes them (replies, hidden states)")  # fmt: skip
    ap.add_argument("--draft-penalty", action=argparse.BooleanOptionalAction, default=d.draft_penalty,
                    help="under a repetition penalty, train the heads with it applied to their own logits")  # fmt: skip
    ap.add_argument("--persona-greedy", action=argparse.BooleanOptionalAction, default=d.persona_greedy,
                    help="also a greedy reply to each persona prompt (besides the sampled one)")  # fmt: skip
    ap.add_argument("--tie-weights", action="store_true", help="IBM's tie_weights (heads share proj/ln)")
    ap.add_argument("--train-heads", action=argparse.BooleanOptionalAction, default=d.train_heads,
                    help="train each head's own draft-vocabulary rows")  # fmt: skip
    ap.add_argument("--resume", action="store_true", help="continue from work-dir/checkpoint.pt")
    ap.add_argument("--evaluate", metavar="DIR", default=None,
                    help="measure the speculator saved in DIR on the held-out replies; no training")  # fmt: skip
    return TrainConfig(**vars(ap.parse_args(argv)))


def main(argv: list[str] | None = None) -> None:
    report = train(parse_args(argv))
    print(json.dumps(report["held_out"], indent=2))


if __name__ == "__main__":
    main()
