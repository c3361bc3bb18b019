"""The speculator's training set: which conversations, which replies, cached hidden-state positions.

Stage 1: the training conversations as text. Stage 2: the base model's own text, generated with this
engine: greedy replies to the training conversations (as `benchmarks.bench` sends them), sampled replies
(`samples_per_prompt` per conversation, and to persona prompts as the console sends them; `--persona-greedy`
adds a greedy reply to each persona prompt), and optionally (`--synthetic-messages N`) the model's replies
to customer messages it wrote itself from briefs (synth.py).

Held out: every tenth *scenario* with all its tones, so the held-out figure measures conversations whose
situation the speculator never saw (holding out single tones of seen scenarios overstated acceptance). The
written conversations (each its own scenario) are also reported alone: they resemble real customers far
more than the templated ones, and accept less. prompts/eval is never read. docs/benchmarks.md has the
figures.
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from specdesk.training import draft_vocab, synth
from specdesk.training.train_data import (
    HiddenStateExtractor,
    Positions,
    TokenSequence,
    chat_ids,
    extract_positions,
    generate_replies,
    stage1_sequences,
    stage2_prompts,
    with_system_prompt,
)

if TYPE_CHECKING:
    from specdesk.training.config import TrainConfig

Conversation = tuple[str, list[dict[str, str]]]


def split_conversations(cfg: TrainConfig) -> tuple[list[Conversation], list[Conversation], list[Conversation]]:
    """(train, held-out templated, held-out written) lists of (domain, messages) from prompts/train only,
    held out by scenario. The written ones are the closer stand-in for real customers."""
    from specdesk.prompts.loader import load_dataset

    entries = load_dataset("train")[: cfg.max_conversations]
    scenarios = list(dict.fromkeys(scenario_of(e.id) for e in entries))
    held_out = {s for i, s in enumerate(scenarios) if i % cfg.holdout_every == cfg.holdout_every - 1}
    train: list[Conversation] = []
    held: list[Conversation] = []
    written: list[Conversation] = []
    for e in entries:
        conv = (e.domain, [dict(m) for m in e.messages])
        if scenario_of(e.id) not in held_out:
            train.append(conv)
        else:
            (written if e.id.startswith("written-") else held).append(conv)
    return train, held, written


def scenario_of(entry_id: str) -> str:
    """Templated ids (train-<domain>-<nn>-<tone>) share a scenario across tones; a written one is its own."""
    return entry_id.rsplit("-", 1)[0] if entry_id.startswith("train-") else entry_id


def data_key(cfg: TrainConfig) -> str:
    """What the cached positions depend on (not the training hyperparameters)."""
    fields = (
        "model dtype max_reply_tokens sampled_temperature sampled_top_p persona_every max_conversations "
        "holdout_every seed samples_per_prompt synthetic_messages draft_vocab_size repetition_penalty"
    )
    key = [getattr(cfg, f) for f in fields.split()] + ["history"]  # positions carry their history
    if cfg.quantization:  # keeps the key of caches made before the setting existed
        key.append(cfg.quantization)
    if cfg.persona_greedy:  # likewise
        key.append("persona_greedy")
    return json.dumps(key)


def build_data(cfg: TrainConfig, loaded: Any) -> tuple[Positions, Positions, dict[str, Positions], list[int]]:
    """Stage 1 text positions, stage 2 positions, held-out positions by decoding mode (greedy, sampled) and
    the draft vocabulary (most frequent tokens of the stage-2 text); cached in work_dir."""
    work = Path(cfg.work_dir)
    cache = work / f"positions-n{cfg.n_predict}.pt"
    key = data_key(cfg)
    if cache.is_file():
        saved = torch.load(cache, weights_only=False)
        if saved["key"] == key:
            return saved["stage1"], saved["stage2"], saved["held"], saved["draft_vocab"]
    tok = loaded.tokenizer
    train, held_templated, held_written = split_conversations(cfg)
    held = held_templated + held_written
    s1 = stage1_sequences(tok, train)
    greedy, sampled = 0.0, cfg.sampled_temperature
    plain, persona = stage2_prompts(tok, train, cfg.persona_every)
    held_plain, held_persona = stage2_prompts(tok, held, 2)
    writes = [chat_ids(tok, [{"role": "user", "content": b}], True) for b in _briefs(cfg)]
    # Phase 1: replies to the training conversations, the held-out ones, and the customer messages.
    groups = [plain, persona, plain * cfg.samples_per_prompt, writes, held_plain, held_persona]
    temps = [greedy, sampled, sampled, max(sampled, 0.9), greedy, sampled]
    if cfg.persona_greedy:  # last, so that the groups above keep their places
        groups, temps = [*groups, persona], [*temps, greedy]
    p1 = _generate(cfg, groups, temps, work / "replies.json")
    # Phase 2: the base model answers the messages it wrote, greedily and (every other one) with a persona.
    messages = [m for m in (synth.clean_message(tok.decode(r, skip_special_tokens=True)) for r in _replies(p1[3])) if m]
    convs: list[Conversation] = [("general", [{"role": "user", "content": m}]) for m in messages]
    synth_plain = [chat_ids(tok, c, True) for _, c in convs]
    synth_persona = [
        chat_ids(tok, with_system_prompt(c, "general", i), True) for i, (_, c) in enumerate(convs) if i % 2 == 0
    ]
    p2 = (
        _generate(cfg, [synth_plain, synth_persona], [greedy, sampled], work / "replies-synthetic.json")
        if convs
        else []
    )
    train_seqs = [s for g in (*p1[:4], *p1[6:], *p2) for s in g]
    vocab = draft_vocab.build(_replies(train_seqs), cfg.draft_vocab_size, loaded.eos_token_ids)
    print(f"stage 2: {len(train_seqs)} sequences ({len(messages)} self-written customer messages)", file=sys.stderr)
    extractor = HiddenStateExtractor(loaded.model, loaded, max(len(s.tokens) for s in s1 + train_seqs + p1[4] + p1[5]))
    stage1 = extract_positions(extractor, s1, cfg.n_predict, "stage 1: base hidden states")
    stage2 = extract_positions(extractor, train_seqs, cfg.n_predict, "stage 2: base hidden states")
    held_out = {
        "greedy": extract_positions(extractor, p1[4], cfg.n_predict, "held out (greedy): base hidden states"),
        "sampled": extract_positions(extractor, p1[5], cfg.n_predict, "held out (sampled): base hidden states"),
    }
    if held_written:  # the greedy replies to the written conversations alone (they come last)
        tail = p1[4][len(held_templated) :]
        held_out["greedy_written"] = extract_positions(extractor, tail, cfg.n_predict, "held out (written)")
    work.mkdir(parents=True, exist_ok=True)
    saved = {"key": key, "stage1": stage1, "stage2": stage2, "held": held_out, "draft_vocab": vocab}
    torch.save(saved, cache)
    return stage1, stage2, held_out, vocab


def _replies(seqs: list[TokenSequence]) -> list[list[int]]:
    return [s.tokens[s.start + 1 :] for s in seqs]


def _briefs(cfg: TrainConfig) -> list[str]:
    return synth.briefs(synth.load_pieces(), cfg.synthetic_messages, cfg.seed) if cfg.synthetic_messages else []


def _generate(
    cfg: TrainConfig, groups: list[list[list[int]]], temps: list[float], cache_file: Path
) -> list[list[TokenSequence]]:
    """Generate every group's replies in one continuous batch; per group, prompt + reply sequences whose
    training positions start at the prompt's last token."""
    prompts = [p for g in groups for p in g]
    replies = generate_replies(
        prompts,
        [t for g, t in zip(groups, temps, strict=True) for _ in g],
        cache_file,
        model=cfg.model,
        dtype=cfg.dtype,
        quantization=cfg.quantization,
        max_tokens=cfg.max_reply_tokens,
        top_p=cfg.sampled_top_p,
        seed=cfg.seed,
        repetition_penalty=cfg.repetition_penalty,
    )
    seqs = [TokenSequence(p + r, len(p) - 1) for p, r in zip(prompts, replies, strict=True)]
    bounds = [0, *itertools.accumulate(len(g) for g in groups)]
    return [seqs[bounds[i] : bounds[i + 1]] for i in range(len(groups))]
