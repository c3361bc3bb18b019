"""Our paged-cache models against transformers' forward, float32, for every family and rope variant.

Every check runs a whole token sequence through transformers once (no cache) and compares our logits at
the same positions, however we split the sequence: full prefill, suffix on cached pages, decode steps,
a ragged batch mixing all three, and a batched decode. Pages come from a shuffled pool, block_size 16.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from specdesk.engine.attention_metadata import AttentionMetadata
from specdesk.engine.models.layers import rope_inv_freq, rope_parameters
from specdesk.engine.models.loader import LoadedModel, load_model
from tests.tiny_models import make_tiny_model

BLOCK_SIZE = 16
ATOL = 1e-4
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}  # fmt: skip
LINEAR_ROPE = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}
YARN_ROPE = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 128,
}

# variant id -> (family, config overrides)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", {}),  # untied, sentencepiece tokenizer
    "llama-tied-llama3-rope": ("llama", {"tie_word_embeddings": True, "rope_parameters": LLAMA3_ROPE}),
    "llama-linear-rope": ("llama", {"rope_parameters": LINEAR_ROPE}),
    "mistral-yarn-rope": ("mistral", {"rope_parameters": YARN_ROPE}),  # head_dim 32 * 4 heads != hidden 64
    "qwen2": ("qwen2", {}),  # tied, q/k/v biases
    "granite": ("granite", {}),  # tied, all four multipliers
    "gpt_bigcode": ("gpt_bigcode", {}),  # multi-query, learned positions, LayerNorm, GELU
    "gpt_bigcode-multihead-untied": ("gpt_bigcode", {"multi_query": False, "tie_word_embeddings": False}),
}


class PagedRunner:
    """Minimal stand-in for the model runner: a shuffled page pool, one block table per sequence."""

    def __init__(self, lm: LoadedModel, num_blocks: int = 48, seed: int = 0):
        shape = (num_blocks, BLOCK_SIZE, lm.num_kv_heads, lm.head_dim)
        self.lm = lm
        self.kv_caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(lm.num_layers)]
        self.free = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
        self.tables: dict[int, list[int]] = {}
        self.lens: dict[int, int] = {}

    def step(self, batch: list[tuple[int, list[int]]], tree_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Run new tokens of several sequences in one forward; returns each sequence's logits [q, vocab]."""
        input_ids: list[int] = []
        positions: list[int] = []
        seq_lens: list[int] = []
        query_lens: list[int] = []
        for seq_id, tokens in batch:
            start = self.lens.get(seq_id, 0)
            table = self.tables.setdefault(seq_id, [])
            while len(table) * BLOCK_SIZE < start + len(tokens):
                table.append(self.free.pop())
            input_ids += tokens
            positions += range(start, start + len(tokens))
            self.lens[seq_id] = start + len(tokens)
            seq_lens.append(start + len(tokens))
            query_lens.append(len(tokens))
        tables = [self.tables[s] for s, _ in batch]
        meta = AttentionMetadata.build(tables, seq_lens, query_lens, BLOCK_SIZE, tree_mask=tree_mask)
        with torch.inference_mode():
            hidden = self.lm.model(torch.tensor(input_ids), torch.tensor(positions), self.kv_caches, meta)
            assert hidden.shape == (len(input_ids), self.lm.hidden_size)
            logits = self.lm.model.compute_logits(hidden)
        assert logits.dtype == torch.float32 and logits.shape == (len(input_ids), self.lm.vocab_size)
        return list(logits.split(query_lens))


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[LoadedModel, Any]:
    """(our model, the transformers model) on the same tiny checkpoint."""
    from transformers import AutoModelForCausalLM

    family, overrides = VARIANTS[request.param]
    path = make_tiny_model(family, tmp_path_factory.mktemp(request.param), **overrides)
    ours = load_model(str(path), dtype="float32", device="cpu")
    theirs = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return ours, theirs


def _tokens(lm: LoadedModel, n: int, seed: int) -> list[int]:
    return torch.randint(0, lm.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _reference(hf_model: Any, tokens: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return hf_model(torch.tensor([tokens])).logits[0].float()


def _close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def test_full_prefill(pair: tuple[LoadedModel, Any]) -> None:
    lm, hf = pair
    tokens = _tokens(lm, 37, seed=1)
    (logits,) = PagedRunner(lm).step([(0, tokens)])
    _close(logits, _reference(hf, tokens))


def test_suffix_prefill_on_cached_pages(pair: tuple[LoadedModel, Any]) -> None:
    lm, hf = pair
    tokens = _tokens(lm, 37, seed=2)
    runner = PagedRunner(lm, seed=1)
    (prefix_logits,) = runner.step([(0, tokens[:21])])
    (suffix_logits,) = runner.step([(0, tokens[21:])])
    ref = _reference(hf, tokens)
    _close(prefix_logits, ref[:21])
    _close(suffix_logits, ref[21:])


def test_decode_steps(pair: tuple[LoadedModel, Any]) -> None:
    lm, hf = pair
    tokens = _tokens(lm, 20, seed=3)
    runner = PagedRunner(lm, seed=2)
    runner.step([(0, tokens[:13])])
    ref = _reference(hf, tokens)
    for pos in range(13, 20):  # crosses into a second page at position 16
        (logits,) = runner.step([(0, [tokens[pos]])])
        _close(logits[0], ref[pos])


def test_ragged_batch_then_batched_decode(pair: tuple[LoadedModel, Any]) -> None:
    lm, hf = pair
    seqs = {0: _tokens(lm, 6, seed=4), 1: _tokens(lm, 33, seed=5), 2: _tokens(lm, 42, seed=6)}
    runner = PagedRunner(lm, seed=3)
    runner.step([(1, seqs[1][:20])])  # cached prefix of sequence 1
    runner.step([(2, seqs[2][:40])])  # sequence 2 decodes below
    # One forward: a fresh prefill, a suffix on cached pages, and a decode step.
    new = {0: seqs[0][:5], 1: seqs[1][20:32], 2: seqs[2][40:41]}
    out = runner.step([(0, new[0]), (1, new[1]), (2, new[2])])
    refs = {i: _reference(hf, seqs[i]) for i in seqs}
    _close(out[0], refs[0][:5])
    _close(out[1], refs[1][20:32])
    _close(out[2], refs[2][40:41])
    # Every sequence decodes one token: the batched decode path.
    out = runner.step([(0, [seqs[0][5]]), (1, [seqs[1][32]]), (2, [seqs[2][41]])])
    _close(out[0], refs[0][5:6])
    _close(out[1], refs[1][32:33])
    _close(out[2], refs[2][41:42])


def test_tree_mask_chain_equals_causal(pair: tuple[LoadedModel, Any]) -> None:
    # A chain-shaped candidate tree (each token sees the ones before it) must equal plain causal decoding:
    # this checks the mask reaches the attention kernel through the model.
    lm, hf = pair
    tokens = _tokens(lm, 22, seed=7)
    runner = PagedRunner(lm, seed=4)
    runner.step([(0, tokens[:18])])
    chain = torch.tril(torch.ones(4, 4, dtype=torch.bool))
    (logits,) = runner.step([(0, tokens[18:])], tree_mask=chain)
    _close(logits, _reference(hf, tokens)[18:])
    # A tree where candidate 3 does not see candidate 2 must differ from the causal logits there.
    runner = PagedRunner(lm, seed=4)
    runner.step([(0, tokens[:18])])
    tree = chain.clone()
    tree[3, 2] = False
    (branched,) = runner.step([(0, tokens[18:])], tree_mask=tree)
    _close(branched[:3], logits[:3])
    assert not torch.allclose(branched[3], logits[3], atol=ATOL)


@pytest.mark.parametrize("params", [LLAMA3_ROPE, LINEAR_ROPE, YARN_ROPE], ids=lambda p: p["rope_type"])
def test_rope_inv_freq_matches_transformers(params: dict[str, Any]) -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(hidden_size=256, num_attention_heads=2, max_position_embeddings=512, rope_parameters=params)
    theirs, their_scale = ROPE_INIT_FUNCTIONS[params["rope_type"]](config, "cpu")
    ours, our_scale = rope_inv_freq(128, rope_parameters(config), 512)
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)
    assert our_scale == pytest.approx(their_scale)


def test_unsupported_rope_type_is_rejected() -> None:
    with pytest.raises(ValueError, match="llama3"):
        rope_inv_freq(64, {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}, 512)


def test_bfloat16_model_runs(tmp_path: Path) -> None:
    path = make_tiny_model("qwen2", tmp_path)
    lm32 = load_model(str(path), dtype="float32", device="cpu")
    lm16 = load_model(str(path), dtype="bfloat16", device="cpu")
    assert lm16.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in lm16.model.parameters())
    tokens = _tokens(lm32, 20, seed=8)
    (ref,) = PagedRunner(lm32).step([(0, tokens)])
    runner = PagedRunner(lm16)
    runner.kv_caches = [(k.bfloat16(), v.bfloat16()) for k, v in runner.kv_caches]
    (logits,) = runner.step([(0, tokens)])
    assert logits.dtype == torch.float32
    assert (logits - ref).abs().max() < 0.1


_TRITON_SCRIPT = """
import sys, torch
from tests.engine.test_models import VARIANTS, PagedRunner, _tokens
from tests.tiny_models import make_tiny_model
from specdesk.engine.models.loader import load_model
from pathlib import Path
device = "cuda" if torch.cuda.is_available() else "cpu"
path = make_tiny_model("llama", Path(sys.argv[1]))
from specdesk.engine.models.layers import set_fused_ops
out = {}
for backend in ("torch", "triton", "triton-unfused"):
    lm = load_model(str(path), dtype="float32", device=device, attention_backend=backend.split("-")[0])
    if backend == "triton-unfused":  # Triton attention, torch norms / rotary / SwiGLU
        set_fused_ops(lm.model, "torch")
        assert {m.fused_ops for m in lm.model.modules() if hasattr(m, "fused_ops")} == {"torch"}
        assert sum(hasattr(m, "fused_ops") for m in lm.model.modules()) == 2 * 4 + 1  # norms, attn, mlp; final norm
    runner = PagedRunner(lm)
    runner.kv_caches = [(k.to(device), v.to(device)) for k, v in runner.kv_caches]
    a, b = _tokens(lm, 21, 1), _tokens(lm, 9, 2)
    runner.step([(0, a[:14])])
    out[backend] = torch.cat(runner.step([(0, a[14:]), (1, b)]) + runner.step([(0, [3]), (1, [4])])).cpu()
torch.testing.assert_close(out["triton"], out["torch"], atol=1e-4, rtol=0)
torch.testing.assert_close(out["triton-unfused"], out["torch"], atol=1e-4, rtol=0)
print("ok")
"""


def test_triton_backend_matches_torch_backend(tmp_path: Path) -> None:
    # The attention_backend hook end to end; without CUDA through the Triton interpreter, in a fresh
    # process because TRITON_INTERPRET must be set before any kernel is defined.
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "0" if torch.cuda.is_available() else "1"}
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", _TRITON_SCRIPT, str(tmp_path)], env=env, cwd=root, capture_output=True, text=True
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


@pytest.mark.slow
def test_default_model_matches_transformers() -> None:
    from transformers import AutoModelForCausalLM

    from specdesk.engine.models.default_model import default_model_path

    lm = load_model(None, dtype="float32", device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(default_model_path(), dtype=torch.float32).eval()
    assert (lm.num_layers, lm.num_kv_heads, lm.head_dim, lm.vocab_size) == (30, 3, 64, 49152)
    messages = [{"role": "user", "content": "My parcel is late. What can I do?"}]
    prompt = lm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    tokens = lm.tokenizer.encode(prompt, add_special_tokens=False)
    runner = PagedRunner(lm, num_blocks=16)
    logits = runner.step([(0, tokens[:-3])])[0]
    decoded = [runner.step([(0, [t])])[0] for t in tokens[-3:]]
    ref = _reference(hf, tokens)
    ours = torch.cat([logits, *decoded])
    torch.testing.assert_close(ours, ref, atol=5e-4, rtol=0)
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))
