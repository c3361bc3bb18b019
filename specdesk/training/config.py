"""The settings of a speculator training run (recorded next to the result)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from specdesk.engine.speculators import DEFAULT_SPECULATOR_DIR

DEFAULT_OUT = DEFAULT_SPECULATOR_DIR  # training writes where the engine loads from


@dataclass(frozen=True)
class TrainConfig:
    """Everything that shapes a run (recorded next to the result)."""

    model: str | None = None
    out: str = str(DEFAULT_OUT)
    work_dir: str = str(Path.home() / ".cache" / "specdesk" / "speculator-train")
    dtype: str = "bfloat16"
    n_predict: int = 3
    tie_weights: bool = False
    stage1_steps: int = 1000
    stage2_steps: int = 5000
    batch_size: int = 256
    lr: float = 1e-3
    # Stage 2's peak learning rate as a fraction of lr. IBM restarts at 0.1 after a huge stage 1; our stage 1
    # is a few hundred conversations unlike the model's own replies, and a full restart learns far more
    # (a trial is in docs/benchmarks.md).
    stage2_peak: float = 1.0
    max_reply_tokens: int = 128
    sampled_temperature: float = 0.7  # persona prompts are sampled like the console does; plain ones greedy
    sampled_top_p: float = 0.9
    # The repetition penalty every reply is generated under and the heads' distilled distribution is penalized
    # with (train_data.base_distribution). The console verifies drafts against penalized text (1.1,
    # settings.DEFAULT_REPETITION_PENALTY); the shipped speculator was trained before this option, at 1.0,
    # which stays the default so that its recorded run reproduces. A 1.1 run: speculators/default/README.md.
    repetition_penalty: float = 1.0
    # Under a repetition penalty, apply it to the heads' own logits too, over the tokens each position has seen,
    # in training and in the engine (draft_penalty.py): a hidden state can't tell the heads which tokens the
    # sequence has used. The speculator's config records it.
    draft_penalty: bool = True
    # The base model's weights as the engine quantizes them (EngineConfig.quantization), for the replies and the
    # hidden states alike: "int8" or "q4_1" (what the CPU console verifies against on AVX-512 VNNI / AVX2),
    # 5-10x faster on a CPU without native bf16 matmuls. None: the dtype's own weights (the shipped speculator's run).
    quantization: str | None = None
    persona_every: int = 3  # persona-prompt replies for every k-th training conversation (5x longer prompts)
    # Also a greedy reply to each of those persona prompts (besides the sampled one): what the engine verifies
    # when a request decodes greedily under a persona, as the benchmarks' console turns do.
    persona_greedy: bool = False
    samples_per_prompt: int = 1  # extra sampled replies per training conversation (varied trajectories)
    # Customer messages the base model writes, then answers (synth.py). Off by default: the 135M model's
    # messages are poor, and the written conversations in prompts/train cover real customers' style.
    synthetic_messages: int = 0
    draft_vocab_size: int = 4096  # heads score (and train on) only the most frequent stage-2 tokens
    # Each head trains its own draft-vocabulary rows (from the base head's, at a tenth of the learning rate, no
    # weight decay) instead of reading the frozen base rows: 3 x 4096 x 576 more parameters (+14 MB in bf16).
    train_heads: bool = True
    # Weight of the base model's own distribution (self-distillation) against the reply's actual token as
    # each head's target (see head_losses).
    distill: float = 1.0
    distill_temperature: float = 1.0  # of the base distribution (below 1: sharper, towards greedy's argmax)
    max_conversations: int | None = None
    holdout_every: int = 10
    checkpoint_every: int = 100
    seed: int = 0
    threads: int = 2
    resume: bool = False
    evaluate: str | None = None  # a saved speculator folder: only measure it on the held-out replies
