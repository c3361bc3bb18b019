"""Padded static-buffer passes (what the CUDA graphs replay) against the eager ragged pass, float32.

On CPU `PassGraphs(capture=False)` runs the same padded computation eagerly, so these tests check that
padding sequences, dummy tree nodes and the scratch page change no real row's logits and no real K/V.
The capture itself runs where CUDA is present (skipped here, with the reason).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from specdesk.engine.attention_metadata import AttentionMetadata
from specdesk.engine.config import EngineConfig
from specdesk.engine.llm_engine import LLMEngine
from specdesk.engine.models.loader import LoadedModel, load_model
from specdesk.engine.pass_graphs import Bucket, PassGraphs, bucket_sizes
from specdesk.engine.sampling_params import SamplingParams
from specdesk.engine.speculators.tree import build_tree
from tests.tiny_models import make_tiny_model, make_tiny_speculator

BS = 16
NUM_BLOCKS = 24  # real pages; page NUM_BLOCKS is the scratch page


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    path = make_tiny_model("llama", Path(tmp_path_factory.mktemp("tiny")))
    return load_model(str(path), dtype="float32", device="cpu")


def _caches(lm: LoadedModel) -> list[tuple[torch.Tensor, torch.Tensor]]:
    shape = (NUM_BLOCKS + 1, BS, lm.num_kv_heads, lm.head_dim)
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)) for _ in range(lm.num_layers)]


def _eager(lm, caches, ids, pos, slots, tables, seq_lens, query_lens, tree_mask=None) -> torch.Tensor:  # type: ignore[no-untyped-def]
    width = max(len(t) for t in tables)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots), block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables],
        dtype=torch.int32), seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        query_start_loc=torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32),
        seq_lens_list=seq_lens, query_lens_list=query_lens, block_size=BS, tree_mask=tree_mask,
    )  # fmt: skip
    with torch.inference_mode():
        return lm.model.compute_logits(lm.model(torch.tensor(ids), torch.tensor(pos), caches, meta))


def _graphs(lm: LoadedModel, caches, buckets: list[Bucket]) -> PassGraphs:  # type: ignore[no-untyped-def]
    return PassGraphs(lm.model, caches, BS, max_blocks_per_seq=8, max_model_len=128, pad_block=NUM_BLOCKS,
                      buckets=buckets, device=torch.device("cpu"), capture=False)  # fmt: skip


def _assert_real_pages_alike(caches, ref_caches) -> None:  # type: ignore[no-untyped-def]
    # A padded token writing into a real page would leave an O(1) difference (the pages start random);
    # the written real slots differ from the eager pass by float32 rounding at most (other matmul shapes).
    for (k, v), (rk, rv) in zip(caches, ref_caches, strict=True):
        torch.testing.assert_close(k[:NUM_BLOCKS], rk[:NUM_BLOCKS], atol=1e-5, rtol=0, equal_nan=True)
        torch.testing.assert_close(v[:NUM_BLOCKS], rv[:NUM_BLOCKS], atol=1e-5, rtol=0, equal_nan=True)


def test_bucket_ladder_and_choice(lm: LoadedModel) -> None:
    assert bucket_sizes(32) == [1, 2, 4, 8, 16, 24, 32]
    assert bucket_sizes(3) == [1, 2, 3]
    graphs = _graphs(lm, _caches(lm), [Bucket(1, 1), Bucket(4, 1), Bucket(2, 9), Bucket(4, 9), Bucket(2, 17)])
    assert graphs.bucket_for(3, 1, 50) == Bucket(4, 1)
    assert graphs.bucket_for(5, 1, 50) is None  # larger than every decode bucket: eager
    assert graphs.bucket_for(2, 5, 50) == Bucket(2, 9)
    assert graphs.bucket_for(2, 12, 50) == Bucket(2, 17)
    assert graphs.bucket_for(3, 9, 50) == Bucket(4, 9)
    assert graphs.bucket_for(1, 1, 50) == Bucket(1, 1)  # decode never pads into a tree bucket
    # Dummy slots sit over the context before the root: a context shorter than the bucket runs eagerly.
    assert graphs.bucket_for(2, 5, 8) is None
    assert graphs.bucket_for(2, 10, 16) is None


def test_padded_decode_matches_eager_and_writes_only_real_slots(lm: LoadedModel) -> None:
    caches = _caches(lm)
    tables = [[3, 7], [11, 2, 5]]
    seq_lens = [20, 40]  # this step's token is the last of each context
    ids, pos = [5, 9], [19, 39]
    slots = [tables[0][19 // BS] * BS + 19 % BS, tables[1][39 // BS] * BS + 39 % BS]
    ref_caches = copy.deepcopy(caches)
    want = _eager(lm, ref_caches, ids, pos, slots, tables, seq_lens, [1, 1])
    graphs = _graphs(lm, caches, [Bucket(4, 1)])
    _, logits, rows = graphs.run(Bucket(4, 1), ids, pos, slots, tables, seq_lens, [1, 1])
    assert rows == [0, 1]
    torch.testing.assert_close(logits[rows], want, atol=1e-5, rtol=0)
    _assert_real_pages_alike(caches, ref_caches)


def test_padded_tree_verification_matches_eager(lm: LoadedModel) -> None:
    caches = _caches(lm)
    # Sequence 0 verifies a 4-node tree from its root at position 30; sequence 1 decodes plainly at 17.
    tree = build_tree([[4, 8, 15], [4, 16], [23]])
    root_pos = 30
    tables = [[1, 6, 9], [12, 4]]
    q0 = tree.num_nodes + 1
    ids = [7, *tree.tokens, 3]
    pos = [root_pos, *(root_pos + d for d in tree.depths), 17]
    slots = [tables[0][p // BS] * BS + p % BS for p in range(root_pos, root_pos + q0)]
    slots.append(tables[1][17 // BS] * BS + 17 % BS)
    seq_lens, query_lens = [root_pos + q0, 18], [q0, 1]
    for k, v in caches:  # stale NaN past sequence 0's end in its last page: a masked key must stay unread
        k[tables[0][2], (root_pos + q0) % BS :] = float("nan")
        v[tables[0][2], (root_pos + q0) % BS :] = float("nan")
    mask = torch.zeros(q0 + 1, q0, dtype=torch.bool)
    mask[:q0, :q0] = tree.mask()
    mask[q0, 0] = True
    ref_caches = copy.deepcopy(caches)
    want = _eager(lm, ref_caches, ids, pos, slots, tables, seq_lens, query_lens, mask)
    bucket = Bucket(4, 9)  # room for 8 nodes: 4 dummy nodes in sequence 0, 8 in sequence 1, 2 padded sequences
    graphs = _graphs(lm, caches, [bucket])
    _, logits, rows = graphs.run(bucket, ids, pos, slots, tables, seq_lens, query_lens, [tree.mask(), None])
    assert rows == [*range(9 - q0, 9), 17]  # dummies first in each sequence's 9 slots
    assert torch.isfinite(want).all()
    torch.testing.assert_close(logits[rows], want, atol=1e-5, rtol=0)
    _assert_real_pages_alike(caches, ref_caches)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a CUDA device")
def test_captured_graph_matches_eager_on_cuda(lm: LoadedModel) -> None:
    model = copy.deepcopy(lm.model).cuda()
    caches = [(k.cuda(), v.cuda()) for k, v in _caches(lm)]
    tables, seq_lens, ids, pos = [[3, 7]], [20], [5], [19]
    slots = [tables[0][1] * BS + 3]
    ref_caches = [(k.clone(), v.clone()) for k, v in caches]
    cuda_lm = copy.copy(lm)
    cuda_lm.model = model
    want = _eager(cuda_lm, ref_caches, ids, pos, slots, tables, seq_lens, [1])
    graphs = PassGraphs(model, caches, BS, 8, 128, NUM_BLOCKS, [Bucket(2, 1)], torch.device("cuda"), capture=True)
    _, logits, rows = graphs.run(Bucket(2, 1), ids, pos, slots, tables, seq_lens, [1])
    torch.testing.assert_close(logits[rows], want, atol=1e-4, rtol=0)


def _run_engine(
    engine: LLMEngine, prompts: list[list[int]], params: SamplingParams, errors: list[str] | None = None
) -> list[list[int]]:
    ids = [engine.add_request(p, params) for p in prompts]
    out: dict[str, list[int]] = {rid: [] for rid in ids}
    while engine.has_work:
        for delta in engine.step():
            out[delta.request_id] += delta.token_ids
            if delta.error is not None and errors is not None:
                errors.append(delta.error)
    return [out[rid] for rid in ids]


def test_padded_passes_at_the_end_of_the_context(tmp_path: Path) -> None:
    # Near max_model_len the trees shrink to a few nodes while the smallest tree bucket keeps its width:
    # the padded pass must read nothing past a context's end (it once did, and failed the whole batch).
    model_dir = make_tiny_model("llama", tmp_path / "model")
    params = SamplingParams(max_tokens=200, ignore_eos=True)
    prompts = [[5, 17, 42, 8, 99, 5, 17, 42] * 3, [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]]

    def engine(speculator: str | None) -> LLMEngine:
        config = EngineConfig(model=str(model_dir), dtype="float32", device="cpu", speculator=speculator,
                              max_model_len=64, spec_max_batch_size=4, max_num_seqs=4)  # fmt: skip
        return LLMEngine(config, load_model(config.model, "float32", "cpu", max_model_len=64))

    padded = engine("ngram")
    assert padded.speculation is not None
    padded.runner.graphs = padded.runner.pass_graphs(padded.speculation.max_tree_nodes, 4, capture=False)
    errors: list[str] = []
    got = _run_engine(padded, prompts, params, errors)
    assert not errors and [len(p) + len(g) for p, g in zip(prompts, got, strict=True)] == [64, 64]
    assert got == _run_engine(engine(None), prompts, params)


@pytest.mark.parametrize("seeded", [False, True])
def test_engine_through_padded_passes_gives_identical_output(tmp_path: Path, seeded: bool) -> None:
    # The whole engine (prefill eager, decode and tree verification through the padded passes the CUDA
    # graphs replay) against the plain eager engine: same tokens, greedy and seeded, speculating.
    model_dir = make_tiny_model("llama", tmp_path / "model")
    make_tiny_speculator(model_dir, tmp_path / "mlp")
    params = (
        SamplingParams(temperature=0.8, top_k=40, seed=7, max_tokens=24, ignore_eos=True)
        if seeded
        else SamplingParams(max_tokens=24, ignore_eos=True)
    )

    def engine(speculator: str | None) -> LLMEngine:
        config = EngineConfig(model=str(model_dir), dtype="float32", device="cpu", speculator=speculator,
                              spec_max_batch_size=4, max_num_seqs=4)  # fmt: skip
        return LLMEngine(config, load_model(config.model, "float32", "cpu"))

    def through_padded_passes(speculator: str | None) -> tuple[list[list[int]], list[Bucket]]:
        llm = engine(speculator)
        nodes = llm.speculation.max_tree_nodes if llm.speculation is not None else 0
        graphs = llm.runner.graphs = llm.runner.pass_graphs(nodes, 4, capture=False)
        runs: list[Bucket] = []
        run = graphs.run
        graphs.run = lambda bucket, *a: runs.append(bucket) or run(bucket, *a)  # type: ignore[method-assign]
        return _run_engine(llm, prompts, params), runs

    prompts = [[5, 17, 42, 8, 99, 5, 17, 42], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5], [7, 7, 7]]
    eager = _run_engine(engine(None), prompts, params)
    plain, plain_runs = through_padded_passes(None)
    assert plain == eager and plain_runs and all(b.query_len == 1 for b in plain_runs)
    speculating, spec_runs = through_padded_passes(f"{tmp_path / 'mlp'}+ngram")
    assert speculating == eager and any(b.query_len > 1 for b in spec_runs), spec_runs
