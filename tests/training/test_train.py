"""Speculator training: schedule, training positions, hidden states, and a tiny end-to-end run with resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from specdesk.engine.models.loader import load_model
from specdesk.engine.speculators import draft_vocab
from specdesk.engine.speculators.candidates import propose
from specdesk.engine.speculators.mlp import MLPSpeculator, MLPSpeculatorConfig
from specdesk.training.held_out import nodes_run, walk
from specdesk.training.train import TrainConfig, head_losses, lr_factor, parse_args, train
from specdesk.training.train_data import (
    IGNORE,
    HiddenStateExtractor,
    Positions,
    TokenSequence,
    base_distribution,
    positions_of,
    rows_to_end,
)
from tests.tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Long enough context for the console's persona system prompts.
    return make_tiny_model("llama", tmp_path_factory.mktemp("spec-train"), max_position_embeddings=4096)


def test_ibm_schedule_shape() -> None:
    s1, s2 = 500, 200
    f = [lr_factor(i, s1, s2) for i in range(s1 + s2)]
    assert f[0] < 0.2 and max(f[:s1]) == pytest.approx(1.0, abs=0.02)  # warmup to the peak
    assert f[s1 - 1] == pytest.approx(0.1, abs=0.01)  # cosine down to 10 % by the end of stage 1
    assert max(f[s1:]) == pytest.approx(0.1, abs=0.01) and f[-1] == pytest.approx(0.01, abs=0.002)


def test_positions_pair_each_hidden_state_with_the_tokens_ahead() -> None:
    seq = TokenSequence([10, 11, 12, 13, 14, 15], start=1)
    hidden = torch.arange(6.0)[:, None].expand(6, 4)
    pos = positions_of(seq, hidden, n_predict=3)
    # Position j reads x_{j+1} and head i targets x_{j+i+2}; j runs from start to L - 3.
    assert pos.hidden[:, 0].tolist() == [1.0, 2.0, 3.0]
    assert pos.windows.tolist() == [[12, 13, 14, 15], [13, 14, 15, IGNORE], [14, 15, IGNORE, IGNORE]]


def test_walk_steps_through_each_reply_like_the_engine() -> None:
    # Two replies, 4 and 3 positions. A step at j emits 1 + accepted[j] tokens and moves to j + 1 + accepted[j];
    # each reply starts at its own first position (a jump never carries into the next reply).
    a = positions_of(TokenSequence([1, 2, 3, 4, 5, 6], start=0), torch.zeros(6, 2), n_predict=3)
    b = positions_of(TokenSequence([7, 8, 9, 10, 11], start=0), torch.zeros(5, 2), n_predict=3)
    windows = torch.cat([a.windows, b.windows])
    accepted = torch.tensor([2, 0, 0, 1, 0, 1, 0])
    # Reply a: j=0 (3 tokens), j=3 (2). Reply b: j=0 (1), j=1 (2). 8 tokens in 4 steps, where the mean over
    # positions would say 1 + 4/7.
    assert walk(accepted, windows) == 2.0
    assert walk(torch.tensor([2, 0, 0, 0, 0, 0, 0]), windows) == pytest.approx(7 / 5)


@torch.no_grad()
def test_nodes_run_accepts_the_deepest_true_prefix_among_the_best_nodes() -> None:
    torch.manual_seed(0)
    spec = MLPSpeculator(MLPSpeculatorConfig(vocab_size=11, emb_dim=8, inner_dim=8, n_predict=3))
    hidden, first = torch.randn(6, 8).bfloat16().float(), torch.randint(0, 11, (6,))
    top1 = propose(spec, hidden, first, [1, 1, 1], 1)[0][:, 0, 0]  # head 0's best guess
    truth = torch.randint(0, 11, (6, 3))
    truth[:3, 0] = top1[:3]  # the first three start as head 0 guesses, the rest at random
    data = Positions(hidden, torch.cat([first[:, None], truth], dim=1))
    by_nodes = nodes_run(spec, data, torch.arange(6), (1, 3, 2000))
    # One node: head 0's best guess alone. 2000 nodes hold all 11 + 121 + 1331: every continuation is in.
    assert by_nodes[1].tolist() == [float(t == g) for t, g in zip(truth[:, 0], top1, strict=True)]
    assert by_nodes[2000].tolist() == [3.0] * 6
    assert all((by_nodes[1] <= by_nodes[3]) & (by_nodes[3] <= by_nodes[2000]))  # a bigger tree holds the smaller


def test_base_distribution_reads_the_hidden_state_ahead_within_the_reply() -> None:
    a = positions_of(TokenSequence([1, 2, 3, 4, 5, 6], start=0), torch.randn(6, 4), n_predict=3)
    b = positions_of(TokenSequence([7, 8, 9, 10, 11], start=0), torch.randn(5, 4), n_predict=3)
    data = Positions.concat([a, b])
    to_end = rows_to_end(data.windows)
    assert to_end.tolist() == [3, 2, 1, 0, 2, 1, 0]
    rows = torch.randn(5, 4)  # a 5-token head
    idx = torch.tensor([0, 2, 3, 4, 5])
    probs, valid = base_distribution(data, idx, 1, to_end, rows)
    assert valid.tolist() == [True, True, False, True, True]  # row 3 ends reply a: nothing after it is a's
    expected = torch.softmax(data.hidden[torch.tensor([1, 3, 5, 6])].float() @ rows.T, dim=-1)
    torch.testing.assert_close(probs[valid], expected)
    _, valid2 = base_distribution(data, idx, 2, to_end, rows)
    assert valid2.tolist() == [True, False, False, True, False]
    sharp, _ = base_distribution(data, idx, 1, to_end, rows, temperature=0.5)
    torch.testing.assert_close(sharp[valid], torch.softmax(2 * (data.hidden[torch.tensor([1, 3, 5, 6])] @ rows.T), -1))


def test_penalized_base_distribution_is_the_engines_penalty_at_each_position() -> None:
    # The distilled distribution under a repetition penalty must be the one the engine verifies against:
    # process_rows' penalty over x_0..x_j (prompt and reply so far) at the position the head drafts for.
    from specdesk.engine.logits_processors import process_rows
    from specdesk.engine.sampling_params import SamplingParams

    torch.manual_seed(0)
    vocab, dim = 12, 6
    seqs = [TokenSequence([3, 5, 3, 7, 1, 5, 9, 2], start=2), TokenSequence([4, 4, 11, 0, 6, 4], start=0)]
    data = Positions.concat([positions_of(s, torch.randn(len(s.tokens), dim), n_predict=3) for s in seqs])
    spans = [(i, j) for i, s in enumerate(seqs) for j in range(s.start, len(s.tokens) - 2)]
    head = torch.randn(vocab, dim) * 4  # logits of both signs, large enough that the penalty matters
    to_end = rows_to_end(data.windows)
    params = SamplingParams(temperature=0.0, repetition_penalty=1.3)
    draft = torch.tensor([0, 3, 4, 5, 9, 11])  # a draft vocabulary: token ids of the rows
    columns = torch.full((vocab,), IGNORE, dtype=torch.long)
    columns[draft] = torch.arange(len(draft))
    idx = torch.arange(len(data))
    for ahead in (1, 2):
        probs, valid = base_distribution(data, idx, ahead, to_end, head, penalty=1.3)
        sub, _ = base_distribution(data, idx, ahead, to_end, head[draft], penalty=1.3, columns=columns)
        plain, _ = base_distribution(data, idx, ahead, to_end, head)
        assert not torch.allclose(probs[valid], plain[valid])
        for r in idx[valid].tolist():
            s, j = spans[r + ahead]
            assert spans[r][0] == s  # still the same sequence
            z = process_rows((data.hidden[r + ahead].float() @ head.T)[None], params, seqs[s].tokens[: j + 1],
                             j + 1, [[]], None)[0]  # fmt: skip
            # Log-probabilities: a penalized token is often an unlikely one, invisible in probabilities.
            torch.testing.assert_close(probs[r].log(), torch.log_softmax(z, -1), atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(sub[r].log(), torch.log_softmax(z[draft], -1), atol=1e-4, rtol=1e-4)


def test_distillation_loss_is_cross_entropy_against_the_base_distribution() -> None:
    torch.manual_seed(0)
    spec = MLPSpeculator(MLPSpeculatorConfig(vocab_size=11, emb_dim=8, n_predict=2))
    hidden, windows = torch.randn(6, 8), torch.randint(0, 11, (6, 3))
    windows[5, 2] = IGNORE
    hard = head_losses(spec, hidden, windows)
    # One-hot base distributions at the reply's tokens: distillation is exactly the token cross-entropy.
    one_hot = [(torch.nn.functional.one_hot(windows[:, i + 1].clamp(min=0), 11).float(), windows[:, i + 1] != IGNORE)
               for i in range(2)]  # fmt: skip
    for got, want in zip(head_losses(spec, hidden, windows, one_hot, distill=1.0), hard, strict=True):
        torch.testing.assert_close(got, want)
    # A uniform base distribution: the loss is the mean of -log_softmax over the vocabulary, whatever the tokens.
    uniform = [(torch.full((6, 11), 1 / 11), torch.ones(6, dtype=torch.bool)) for _ in range(2)]
    soft = head_losses(spec, hidden, windows, uniform, distill=1.0)
    with torch.no_grad():
        state = spec.step(0, spec.scale(hidden), windows[:, 0])
        want0 = -torch.log_softmax(spec.logits(0, state).float(), -1).mean(-1).mean()
    torch.testing.assert_close(soft[0], want0)
    assert not torch.allclose(soft[0], hard[0])
    # Half and half is the mean of the two where both exist.
    mixed = head_losses(spec, hidden, windows, uniform, distill=0.5)
    torch.testing.assert_close(mixed[0], (soft[0] + hard[0]) / 2)


def test_draft_penalty_loss_penalizes_each_heads_logits_over_what_its_position_has_seen() -> None:
    # Head i's distribution sees x_0..x_{j+i+1} (Positions.seen with ahead = i + 1); its logits are penalized over
    # those before the cross-entropy, as the engine will penalize them before ranking.
    torch.manual_seed(0)
    seq = TokenSequence([3, 5, 3, 7, 1, 5, 9, 2, 4], start=1)
    data = positions_of(seq, torch.randn(len(seq.tokens), 8), n_predict=2)
    rows = torch.arange(len(data))
    for ahead in (0, 1, 2):
        seen = data.seen(rows, None, 11, ahead=ahead)
        for r in rows.tolist():
            j = seq.start + r
            assert set(torch.nonzero(seen[r])[:, 0].tolist()) == set(seq.tokens[: j + ahead + 1])
    spec = MLPSpeculator(MLPSpeculatorConfig(vocab_size=11, emb_dim=8, n_predict=2))
    seen = [data.seen(rows, None, 11, ahead=i + 1) for i in range(2)]
    got = head_losses(spec, data.hidden, data.windows, seen=seen, penalty=1.5)
    plain = head_losses(spec, data.hidden, data.windows)
    with torch.no_grad():
        state = spec.step(0, spec.scale(data.hidden), data.windows[:, 0])
        z = spec.logits(0, state).float()
        z = torch.where(seen[0], torch.where(z > 0, z / 1.5, z * 1.5), z)
        want = torch.nn.functional.cross_entropy(z, data.windows[:, 1])
    torch.testing.assert_close(got[0], want)
    assert not torch.allclose(got[0], plain[0])


def test_hidden_states_equal_transformers_and_reuse_prefixes(tiny: Path) -> None:
    from transformers import AutoModelForCausalLM

    loaded = load_model(str(tiny), dtype="float32", device="cpu")
    a, b = list(range(5, 45)), list(range(5, 35)) + list(range(60, 75))
    shared = HiddenStateExtractor(loaded.model, loaded, max_len=64, chunk=16)
    shared(a)
    reused = shared(b)  # only b's last 15 tokens are computed, on top of a's cached prefix
    fresh = HiddenStateExtractor(loaded.model, loaded, max_len=64, chunk=16)(b)
    hf = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    with torch.no_grad():
        expected = hf.model(torch.tensor([b])).last_hidden_state[0]  # after the final norm
    # Stored in bf16: compare at bf16 resolution.
    torch.testing.assert_close(reused.float(), fresh.float())
    torch.testing.assert_close(reused.float(), expected, rtol=1e-2, atol=1e-2)


def test_tiny_end_to_end_run_and_resume(tiny: Path, tmp_path: Path) -> None:
    argv = ["--model", str(tiny), "--out", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work"),
            "--dtype", "float32", "--max-conversations", "8", "--holdout-every", "2", "--max-reply-tokens", "6",
            "--stage1-steps", "5", "--stage2-steps", "2", "--batch-size", "8", "--checkpoint-every", "3",
            "--samples-per-prompt", "1", "--synthetic-messages", "3", "--draft-vocab-size", "64"]  # fmt: skip
    cfg = parse_args(argv)
    assert isinstance(cfg, TrainConfig) and cfg.stage1_steps == 5
    report = train(cfg)
    held = report["held_out"]
    assert isinstance(held, dict) and set(held) == {"greedy", "sampled"}
    assert len(held["greedy"]["top1_per_head"]) == 3
    assert all(1.0 <= v <= 4.0 for v in held["greedy"]["tree_tokens_per_step"].values())
    assert all(1.0 <= v <= 4.0 for v in held["greedy"]["walk_tokens_per_step"].values())
    assert {"best 10 nodes", "best 64 nodes"} <= set(held["greedy"]["walk_tokens_per_step"])
    saved = json.loads((tmp_path / "out" / "train_report.json").read_text())
    assert saved["command"].startswith("python -m specdesk.training.train")
    base = load_model(str(tiny), dtype="float32", device="cpu").model
    spec = MLPSpeculator.from_pretrained(tmp_path / "out", base_model=base)
    assert spec.config.tie_to_base and spec.config.n_predict == 3
    vocab = draft_vocab.load(tmp_path / "out")  # trained on, and shipped with, the speculator
    # At most 64: the tiny model's few short replies (sampled ones depend on the draws) may hold fewer distinct
    # tokens; the heads score exactly the shipped vocabulary.
    assert vocab is not None and 16 <= len(vocab) <= 64 and len(set(vocab.tolist())) == len(vocab)
    assert spec.config.draft_heads == len(vocab)
    # Resume: replies and hidden states come from the cache; training continues from the checkpoint.
    assert (tmp_path / "work" / "checkpoint.pt").is_file()
    again = train(parse_args([*argv, "--resume", "--stage2-steps", "3"]))
    assert again["positions"] == report["positions"]
    # --evaluate measures a saved speculator on the same held-out replies without training it.
    measured = train(parse_args([*argv, "--evaluate", str(tmp_path / "out")]))
    measured_held = measured["held_out"]
    assert set(measured) == {"held_out"} and isinstance(measured_held, dict)
    assert set(measured_held) == {"greedy", "sampled"} and "walk_tokens_per_step" in measured_held["greedy"]


def test_a_penalized_run_trains_and_records_a_draft_penalty_speculator(tiny: Path, tmp_path: Path) -> None:
    argv = ["--model", str(tiny), "--work-dir", str(tmp_path / "work"), "--dtype", "float32",
            "--max-conversations", "6", "--holdout-every", "2", "--max-reply-tokens", "6", "--stage1-steps", "2",
            "--stage2-steps", "2", "--batch-size", "8", "--samples-per-prompt", "0", "--draft-vocab-size", "64",
            "--repetition-penalty", "1.2"]  # fmt: skip
    base = load_model(str(tiny), dtype="float32", device="cpu").model
    for flag, want in (("--draft-penalty", True), ("--no-draft-penalty", False)):
        report = train(parse_args([*argv, flag, "--out", str(tmp_path / flag)]))
        assert MLPSpeculator.from_pretrained(tmp_path / flag, base_model=base).config.draft_penalty is want
        held = report["held_out"]
        assert isinstance(held, dict) and all(1.0 <= v <= 4.0 for v in held["greedy"]["walk_tokens_per_step"].values())


@pytest.mark.usefixtures("restore_threads")
def test_int8_replies_leave_the_training_its_threads(tiny: Path, tmp_path: Path) -> None:
    # An int8 engine takes torch's threads while it lives (kernels/cpu_lib.py); training after it needs them back.
    from specdesk.training.train_data import generate_replies

    torch.set_num_threads(2)
    replies = generate_replies([[5, 9, 13, 2]], [0.0], tmp_path / "r.json", model=str(tiny), dtype="bfloat16",
                               max_tokens=4, top_p=1.0, seed=0, quantization="int8")  # fmt: skip
    assert len(replies[0]) == 4 and torch.get_num_threads() == 2


def test_held_out_by_whole_scenario() -> None:
    from specdesk.training.dataset import scenario_of, split_conversations

    cfg = TrainConfig(max_conversations=80, holdout_every=5)
    train_set, held, written = split_conversations(cfg)
    assert len(train_set) + len(held) == 80 and 0 < len(held) < 40 and not written
    seen = {m[0]["content"] for _, m in train_set}
    assert not seen & {m[0]["content"] for _, m in held}
    # Templated tones of one situation share a scenario; each written conversation is its own.
    assert scenario_of("train-retail-00-angry") == scenario_of("train-retail-00-polite") == "train-retail-00"
    assert scenario_of("written-a-001") != scenario_of("written-a-002")
    train_set, held, written = split_conversations(TrainConfig(holdout_every=10))
    assert 30 <= len(written) <= 40 and not {m[0]["content"] for _, m in train_set} & {
        m[0]["content"] for _, m in written
    }


def test_synthetic_briefs_and_cleaning() -> None:
    from specdesk.training import synth

    briefs = synth.briefs(synth.load_pieces(), 30, seed=1)
    assert len(briefs) == 30 and len(set(briefs)) == 30
    assert briefs == synth.briefs(synth.load_pieces(), 30, seed=1)  # deterministic
    assert synth.clean_message('Here is the message:\n\n"My bill doubled this month, why?"') == (
        "My bill doubled this month, why?"
    )
    assert synth.clean_message("Hi there!") is None  # too short to be a customer message
    long = "My parcel is late. " * 60
    cleaned = synth.clean_message(long, max_chars=100)
    assert cleaned is not None and len(cleaned) <= 100 and cleaned.endswith(".")


def test_persona_greedy_adds_a_greedy_reply_to_each_persona_prompt(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The console's turns decode greedily under a persona in the benchmarks: --persona-greedy trains on those too.
    from specdesk.training import dataset

    calls: list[tuple[list[list[int]], list[float]]] = []

    def fake_replies(prompts: list[list[int]], temperatures: list[float], *_: object, **__: object) -> list[list[int]]:
        calls.append((prompts, temperatures))
        return [[7, 8, 9, 10] for _ in prompts]

    monkeypatch.setattr(dataset, "generate_replies", fake_replies)
    loaded = load_model(str(tiny), dtype="float32", device="cpu")
    common = ["--model", str(tiny), "--dtype", "float32", "--max-conversations", "8", "--holdout-every", "2",
              "--samples-per-prompt", "0", "--draft-vocab-size", "64", "--persona-every", "2"]  # fmt: skip
    sizes = {}
    for flag in ("--no-persona-greedy", "--persona-greedy"):
        cfg = parse_args([*common, flag, "--work-dir", str(tmp_path / flag)])
        _, stage2, _, _ = dataset.build_data(cfg, loaded)
        sizes[flag] = len(stage2)
    (plain, plain_temps), (more, more_temps) = calls
    # The same groups first, then each sampled persona prompt once more, greedy.
    assert more[: len(plain)] == plain and more_temps[: len(plain)] == plain_temps
    sampled_persona = [p for p, t in zip(plain, plain_temps, strict=True) if t > 0]
    assert sampled_persona and all(p in sampled_persona for p in more[len(plain) :])
    assert more_temps[len(plain) :] == [0.0] * (len(more) - len(plain)) and len(more) > len(plain)
    assert sizes["--persona-greedy"] > sizes["--no-persona-greedy"]  # and they are trained on
