"""MLP speculator (published format, recurrence, tying), candidate generation and the draft tree."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import cast

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from specdesk.engine.speculators.acceptance import accept_greedy, accepted_tokens
from specdesk.engine.speculators.candidates import propose, propose_nodes
from specdesk.engine.speculators.draft_vocab import pack_for_cpu
from specdesk.engine.speculators.mlp import MLPSpeculator, MLPSpeculatorConfig
from specdesk.engine.speculators.tree import build_tree
from specdesk.kernels.reference import paged_attention

V, E, D = 37, 12, 16  # vocab, base hidden, inner dim


def reference_states(w: dict[str, torch.Tensor], cfg: dict, z: torch.Tensor, toks: torch.Tensor) -> list:
    """The recurrence written straight from the paper, reading raw checkpoint tensors.

    z [b, E]; toks [b, n_predict]: t_{-1}, t_0, ... Returns per-head logits [b, V].
    """
    n, d = cfg["n_predict"], cfg["inner_dim"] or cfg["emb_dim"]
    sw = 0.5 ** (0.5 / n)
    ew = math.sqrt((1 - sw**2) * d / 2)

    def get(kind: str, i: int, suffix: str = "weight") -> torch.Tensor:
        key = f"speculator.{kind}.{i}.{suffix}"
        if cfg["tie_weights"] and key not in w:  # tied: everything shared with head 0 (proj with proj 1)
            key = f"speculator.{kind}.{1 if kind == 'proj' else 0}.{suffix}"
        return w[key]

    s = z
    if cfg["scale_input"]:
        s = z / torch.sqrt(z.pow(2).mean(-1, keepdim=True) + 1e-6) / math.sqrt(2)
    out = []
    for i in range(n):
        x = s @ get("proj", i).T + ew / sw * get("emb", i)[toks[:, i]]
        x = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * get("ln", i) + get("ln", i, "bias")
        s = 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))
        out.append(s @ get("head", i).T)
    return out


def write_published(path: Path, *, tie: bool, scale_input: bool, n_predict: int = 3, binary: bool = False) -> tuple:
    """A checkpoint laid out like ibm-fms/*-accelerator on the hub, written without our code."""
    g = torch.Generator().manual_seed(1)
    cfg = {
        "architectures": ["MLPSpeculatorPreTrainedModel"],
        "model_type": "mlp_speculator",
        "vocab_size": V,
        "emb_dim": E,
        "inner_dim": D,
        "n_predict": n_predict,
        "top_k_tokens_per_head": [4, 3, 2][:n_predict],
        "n_candidates": 5,
        "tie_weights": tie,
        "scale_input": scale_input,
        "torch_dtype": "float32",
    }
    w: dict[str, torch.Tensor] = {}
    for i in range(1 if tie else n_predict):
        w[f"speculator.emb.{i}.weight"] = torch.randn(V, D, generator=g)
        w[f"speculator.head.{i}.weight"] = torch.randn(V, D, generator=g) * 0.3
        w[f"speculator.ln.{i}.weight"] = 1 + 0.1 * torch.randn(D, generator=g)
        w[f"speculator.ln.{i}.bias"] = 0.1 * torch.randn(D, generator=g)
    for i in range(min(n_predict, 2) if tie else n_predict):
        w[f"speculator.proj.{i}.weight"] = torch.randn(D, E if i == 0 else D, generator=g) * 0.3
    path.mkdir()
    (path / "config.json").write_text(json.dumps(cfg))
    if binary:
        torch.save(w, path / "pytorch_model.bin")
    else:
        save_file(w, str(path / "model.safetensors"))
    return w, cfg


@pytest.mark.parametrize(
    ("tie", "scale_input", "binary"), [(False, False, False), (True, True, False), (False, True, True)]
)
def test_loads_published_format_and_matches_the_recurrence(
    tmp_path: Path, tie: bool, scale_input: bool, binary: bool
) -> None:
    w, cfg = write_published(tmp_path / "ckpt", tie=tie, scale_input=scale_input, binary=binary)
    spec = MLPSpeculator.from_pretrained(tmp_path / "ckpt")
    assert spec.config.top_k_tokens_per_head == [4, 3, 2] and spec.config.tie_weights == tie
    z, toks = torch.randn(5, E), torch.randint(0, V, (5, 3))
    state = spec.scale(z)
    for i, ref in enumerate(reference_states(w, cfg, z, toks)):
        state = spec.step(i, state, toks[:, i])
        torch.testing.assert_close(spec.logits(i, state), ref, rtol=1e-4, atol=1e-4)

    # The teacher-forced training pass agrees with step-by-step inference at every position.
    hidden, ids = torch.randn(2, 4, E), torch.randint(0, V, (2, 4 + 2))
    states = spec(hidden, ids)
    for j in range(4):
        ref = reference_states(w, cfg, hidden[:, j], ids[:, j : j + 3])
        for i in range(3):
            torch.testing.assert_close(spec.logits(i, states[i, :, j]), ref[i], rtol=1e-4, atol=1e-4)


def test_save_pretrained_round_trip_in_the_same_format(tmp_path: Path) -> None:
    cfg = MLPSpeculatorConfig(vocab_size=V, emb_dim=E, inner_dim=D, n_predict=4, tie_weights=True)
    assert cfg.top_k_tokens_per_head == [5, 4, 3, 2]
    spec = MLPSpeculator(cfg)
    spec.save_pretrained(tmp_path / "out")
    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    # Tied weights are written once, under head 0 (proj under 0 and 1), all with the published prefix.
    names = ["emb.0.weight", "head.0.weight", "ln.0.weight", "ln.0.bias", "proj.0.weight", "proj.1.weight"]
    assert sorted(saved) == sorted("speculator." + n for n in names)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "mlp_speculator"
    again = MLPSpeculator.from_pretrained(tmp_path / "out")
    assert again.proj[3] is again.proj[1] and again.emb is not None and again.emb[2] is again.emb[0]
    z, toks = torch.randn(3, E), torch.randint(0, V, (3,))
    a, b = propose(spec, z, toks), propose(again, z, toks)
    assert torch.equal(a[0], b[0]) and torch.allclose(a[1], b[1])


def test_rejects_wrong_checkpoints(tmp_path: Path) -> None:
    write_published(tmp_path / "ckpt", tie=False, scale_input=False)
    w = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    del w["speculator.ln.2.bias"]
    save_file(w, str(tmp_path / "ckpt" / "model.safetensors"))
    with pytest.raises(ValueError, match="lacks"):
        MLPSpeculator.from_pretrained(tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError):
        MLPSpeculator.from_pretrained(tmp_path / "nothing")


class TinyBase(nn.Module):
    """Just what tying needs: engine-style `model.embed_tokens` and `lm_head = None` (tied embeddings)."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(V, E)
        nn.init.normal_(self.model.embed_tokens.weight, generator=torch.Generator().manual_seed(seed))
        self.lm_head = None

    @property
    def embed_weight(self) -> torch.Tensor:
        """`model.embed_tokens.weight`, typed (attributes set on a plain nn.Module read as `Tensor | Module`)."""
        return cast(nn.Embedding, self.model.embed_tokens).weight


def test_tie_to_base_saves_only_projections_and_norms(tmp_path: Path) -> None:
    base = TinyBase(0)
    spec = MLPSpeculator(MLPSpeculatorConfig(vocab_size=V, emb_dim=E, n_predict=3, tie_to_base=True))
    spec.tie_to_base(base)
    trainable = {k for k, p in spec.named_parameters() if p.requires_grad}
    assert all(k.startswith(("proj.", "ln.")) for k in trainable), trainable
    spec.save_pretrained(tmp_path / "tied")
    saved = load_file(str(tmp_path / "tied" / "model.safetensors"))
    assert not any(".emb." in k or ".head." in k for k in saved)
    config = json.loads((tmp_path / "tied" / "config.json").read_text())
    assert config["tie_to_base"] is True and config["base_checksum"] is not None

    with pytest.raises(ValueError, match="base_model"):
        MLPSpeculator.from_pretrained(tmp_path / "tied")
    with pytest.raises(ValueError, match="does not match"):
        MLPSpeculator.from_pretrained(tmp_path / "tied", base_model=TinyBase(1))
    again = MLPSpeculator.from_pretrained(tmp_path / "tied", base_model=base)
    z, toks = torch.randn(2, E), torch.randint(0, V, (2,))
    state = spec.step(0, spec.scale(z), toks)
    torch.testing.assert_close(again.logits(0, again.step(0, z, toks)), state @ base.embed_weight.T)


def test_own_draft_heads_start_at_the_base_rows_and_round_trip(tmp_path: Path) -> None:
    base, vocab = TinyBase(0), torch.tensor([5, 1, 9, 30, 2, 17])
    config = MLPSpeculatorConfig(vocab_size=V, emb_dim=E, n_predict=3, tie_to_base=True, draft_heads=len(vocab))
    spec = MLPSpeculator(config)
    spec.tie_to_base(base)
    spec.restrict_vocab(vocab)
    spec.init_draft_heads()
    z, toks = torch.randn(2, E), torch.randint(0, V, (2,))
    with torch.no_grad():
        state = spec.step(0, z, toks)
        torch.testing.assert_close(spec.logits(0, state), state @ base.embed_weight[vocab].T)
        draft_head = cast(nn.ParameterList, spec.draft_head)  # not None: config.draft_heads > 0
        draft_head[1].add_(1.0)  # as if trained: head 1 no longer reads the base rows
    spec.save_pretrained(tmp_path / "own")
    assert json.loads((tmp_path / "own" / "config.json").read_text())["draft_heads"] == 6
    assert "speculator.draft_head.1" in load_file(str(tmp_path / "own" / "model.safetensors"))
    again = MLPSpeculator.from_pretrained(tmp_path / "own", base_model=base)
    again.restrict_vocab(vocab)
    with torch.no_grad():
        for i in range(3):
            torch.testing.assert_close(again.logits(i, again.step(i, z, toks)), spec.logits(i, spec.step(i, z, toks)))
    with pytest.raises(ValueError, match="draft tokens"):
        again.restrict_vocab(vocab[:5])
    # On a GPU the speculator runs in the model's bf16 (no CPU packing): trained rows and states must agree.
    half = MLPSpeculator.from_pretrained(tmp_path / "own", base_model=base, dtype=torch.bfloat16)
    half.restrict_vocab(vocab)
    with torch.no_grad():
        for i in range(3):
            got = half.logits(i, half.step(i, z.bfloat16(), toks))
            assert got.dtype == torch.float32 and got.shape == (2, 6)
            torch.testing.assert_close(got, spec.logits(i, spec.step(i, z, toks)), atol=0.1, rtol=0.05)


@torch.no_grad()
def test_pack_for_cpu_keeps_the_restricted_logits_at_bf16_precision() -> None:
    from specdesk.engine.models.packed_linear import can_pack

    if not can_pack(torch.bfloat16, torch.device("cpu")):
        pytest.skip("no oneDNN bf16 on this CPU")
    torch.manual_seed(0)
    base = TinyBase(0)
    spec = MLPSpeculator(MLPSpeculatorConfig(vocab_size=V, emb_dim=E, n_predict=3, tie_to_base=True))
    spec.tie_to_base(base)
    spec.restrict_vocab(torch.tensor([5, 1, 9, 30, 2, 17]))
    z, toks = torch.randn(4, E), torch.randint(0, V, (4,))
    expected = [spec.logits(i, spec.step(i, z, toks)) for i in range(3)]
    assert pack_for_cpu(spec)
    for i in range(3):
        got = spec.logits(i, spec.step(i, z, toks))
        assert got.dtype == torch.float32 and got.shape == (4, 6)
        torch.testing.assert_close(got, expected[i], atol=0.05, rtol=0.05)  # bf16 weights and inputs


@torch.no_grad()
def test_propose_equals_brute_force_over_all_leaves() -> None:
    torch.manual_seed(0)
    spec = MLPSpeculator(MLPSpeculatorConfig(vocab_size=V, emb_dim=E, inner_dim=D, n_predict=3))
    z, last = torch.randn(2, E), torch.tensor([3, 7])
    tokens, scores = propose(spec, z, last, [5, 4, 3], 5)
    assert tokens.shape == (2, 5, 3) and scores.shape == (2, 5)
    for b in range(2):
        leaves = []  # enumerate every path through the per-branch top-k, scoring it from scratch
        for path in itertools.product(range(5), range(4), range(3)):
            state, prev, score, toks = spec.scale(z[b : b + 1]), last[b : b + 1], 0.0, []
            for i, rank in enumerate(path):
                state = spec.step(i, state, prev)
                logp = F.log_softmax(spec.logits(i, state).float(), -1)[0]
                tok = int(logp.topk(rank + 1).indices[rank])
                score, prev = score + float(logp[tok]), torch.tensor([tok])
                toks.append(tok)
            leaves.append((score, toks))
        leaves.sort(key=lambda x: -x[0])
        assert tokens[b].tolist() == [t for _, t in leaves[:5]]
        torch.testing.assert_close(scores[b], torch.tensor([s for s, _ in leaves[:5]]))
    short, _ = propose(spec, z, last, [5, 4, 3], 50, num_heads=2)
    assert short.shape == (2, 20, 2)  # capped by the 5 * 4 leaves


@torch.no_grad()
def test_propose_nodes_picks_the_most_likely_nodes_of_the_whole_tree() -> None:
    torch.manual_seed(1)
    spec = MLPSpeculator(MLPSpeculatorConfig(vocab_size=V, emb_dim=E, inner_dim=D, n_predict=3))
    z, last = torch.randn(2, E), torch.tensor([3, 7])
    ranked = propose_nodes(spec, z, last, 12, beam=V * V)  # a beam past every node: the exact optimum
    for b in range(2):
        nodes = {}  # every node of depth <= 3 under the root, scored from scratch
        for depth in (1, 2, 3):
            for path in itertools.product(range(V), repeat=depth):
                if depth > 1 and path[:-1] not in nodes:
                    continue  # only children of the top-scoring parents can make the cut (a child <= its parent)
                state, prev, score = spec.scale(z[b : b + 1]), last[b : b + 1], 0.0
                for i, tok in enumerate(path):
                    state = spec.step(i, state, prev)
                    score += float(F.log_softmax(spec.logits(i, state).float(), -1)[0, tok])
                    prev = torch.tensor([tok])
                nodes[path] = score
            nodes = dict(sorted(nodes.items(), key=lambda x: -x[1])[:12])
        best = sorted(nodes.items(), key=lambda x: -x[1])
        assert [tuple(p) for p in ranked[b]] == [p for p, _ in best]
        # Best first, and every prefix of the ranking is a tree: the width chooser measures each size.
        for m in range(1, 13):
            top = {tuple(p) for p in ranked[b][:m]}
            assert all(p[:-1] in top for p in top if len(p) > 1)
    # A narrow beam expands fewer parents but still returns a tree of the asked size, deepest <= num_heads.
    narrow = propose_nodes(spec, z, last, 12, num_heads=2, beam=2)
    assert all(len(r) == 12 and len({tuple(p) for p in r}) == 12 and max(map(len, r)) <= 2 for r in narrow)
    assert propose_nodes(spec, z, last, 5) == [r[:5] for r in propose_nodes(spec, z, last, 40)]
    # Fewer heads or a depth limit as data (what a CUDA graph of fixed shape takes) rank the same nodes.
    assert propose_nodes(spec, z, last, 12, num_heads=2) == propose_nodes(spec, z, last, 12, max_depth=[2, 2])
    # A request limited to depth 1 gets 12 nodes of depth 1, the best first tokens; the other row is as before.
    limited = propose_nodes(spec, z, last, 12, max_depth=[1, 3])
    assert limited[1] == propose_nodes(spec, z, last, 12)[1]
    logp0 = F.log_softmax(spec.logits(0, spec.step(0, spec.scale(z[:1]), last[:1])).float(), -1)[0]
    assert limited[0] == [[t] for t in logp0.topk(12).indices.tolist()]


def test_build_tree_merges_prefixes_best_path_first() -> None:
    tree = build_tree([[5, 6, 7], [5, 6, 8], [5, 9, 7], [4, 6], [5, 6, 7], [5, 6, 7, 1, 2]])
    assert tree.tokens == [5, 6, 7, 8, 9, 7, 4, 6, 1, 2]
    assert tree.parents == [0, 1, 2, 2, 1, 5, 0, 7, 3, 9]
    assert tree.depths == [1, 2, 3, 3, 2, 3, 1, 2, 4, 5]
    assert tree.position_offsets[:4] == [0, 1, 2, 3]  # best path = rows 1..3 in depth order
    assert tree.children[0] == [1, 7] and tree.children[2] == [3, 4]
    mask = tree.mask()
    for r in range(tree.num_nodes + 1):
        ancestors = {0, r, *tree.path_to(r)}
        assert {c for c in range(tree.num_nodes + 1) if mask[r, c]} == ancestors
    assert build_tree([[1, 2, 3], [4, 5, 6]], max_nodes=4).tokens == [1, 2, 3, 4]


def test_accept_greedy_walks_the_matching_branch() -> None:
    tree = build_tree([[5, 6, 7], [5, 9, 3], [4]])  # rows: 1:5 2:6 3:7 4:9 5:3 6:4
    # Base argmax after each row (root first): picks 5, then 9 (second branch), then 3, then bonus 11.
    acc = accept_greedy(tree, [5, 9, 0, 0, 3, 11, 0])
    assert acc.accepted_rows == [1, 4, 5] and acc.next_token == 11
    assert accepted_tokens(tree, acc) == [5, 9, 3, 11]
    assert accept_greedy(tree, torch.tensor([8, 0, 0, 0, 0, 0, 0])) == ([], 8)


def test_tree_mask_verifies_every_path_as_if_alone() -> None:
    """One tree pass through the reference paged attention == each candidate path run causally on its own."""
    torch.manual_seed(0)
    tree = build_tree([[5, 6, 7], [5, 9], [4, 2]])
    ctx, heads, dim, bs = 6, 2, 8, 4
    n = tree.num_nodes + 1
    k_all, v_all, q_all = (torch.randn(ctx + n, heads, dim) for _ in range(3))
    seq_len = ctx + n

    def run(rows: list[int], mask: torch.Tensor | None) -> torch.Tensor:
        keys = torch.cat([k_all[:ctx], k_all[ctx:][rows]])
        vals = torch.cat([v_all[:ctx], v_all[ctx:][rows]])
        kc = torch.zeros(4, bs, heads, dim)
        vc = torch.zeros(4, bs, heads, dim)
        kc.view(-1, heads, dim)[: len(keys)] = keys
        vc.view(-1, heads, dim)[: len(vals)] = vals
        table = torch.arange(4, dtype=torch.int32)[None]
        return paged_attention(q_all[ctx:][rows], kc, vc, table, [ctx + len(rows)], [len(rows)], 0.5, mask)

    full = run(list(range(n)), tree.mask())
    for leaf in (3, 4, 6):
        rows = [0, *tree.path_to(leaf)]
        torch.testing.assert_close(full[rows], run(rows, None))
    assert seq_len == ctx + n
