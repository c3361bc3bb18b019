"""The CPU attention's builds (grouped AVX-512 BF16 tasks, a task per query with AVX-512, grouped and per-query
AVX2, the portable loops), each against the twin, and the property that keeps a pass's numbers independent of
how it was cut: the same query gets the same bits whatever the thread count (which changes how queries are
grouped into tasks), whichever other queries and sequences share its pass, and however its prompt was
chunked."""

from __future__ import annotations

import ctypes

import pytest
import torch

from specdesk.kernels import cpu_attention, cpu_lib, reference
from tests.kernels.builds import build_with
from tests.kernels.paged_batches import make_batch

pytestmark = pytest.mark.skipif(
    not cpu_lib.available(), reason="no working C compiler: the CPU kernels are not built and callers use the twins"
)

PAGE = 16
# Build flags of each path (appended to cpu_lib's): none, then the one-task-per-query AVX-512 path, the grouped
# and the per-query AVX2 paths, then the portable loops. A build the compiler or CPU cannot give is skipped.
BUILDS = {
    "native": None,
    "avx512": "-mno-avx512bf16",
    "avx2": "-mno-avx512f",
    "avx2_per_query": "-mno-avx512f -DSPECDESK_PER_QUERY",
    "portable": "-mno-avx512f -mno-avx2",
}
PATHS = {"avx512": 3, "avx2": 2, "avx2_per_query": 1, "portable": 0}


@pytest.fixture(scope="module", params=list(BUILDS))
def build(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    flag = BUILDS[request.param]
    native = cpu_lib.library()
    assert native is not None
    if flag is None:
        return native
    if native.sd_attention_path() < PATHS[request.param]:
        pytest.skip("this CPU lacks the instructions of that path")
    if request.param == "avx2_per_query" and native.sd_attention_path() < PATHS["avx2"]:
        pytest.skip("this CPU lacks AVX2 and FMA")
    lib = build_with(flag, str(tmp_path_factory.mktemp(f"kernels-{request.param}")))
    if lib is None:
        pytest.skip(f"no x86-64 compiler that takes {flag}")
    assert lib.sd_attention_path() == PATHS[request.param]
    return lib


@pytest.fixture
def kernel(build: ctypes.CDLL, monkeypatch: pytest.MonkeyPatch) -> ctypes.CDLL:
    monkeypatch.setattr(cpu_lib, "library", lambda: build)
    return build


def _amplify(batch: dict, contexts: list[int]) -> dict:
    """The pages rewritten so that rounding shows: context keys in equal pairs whose values cancel in the first
    half of each head, where the other keys' values are 0. Those outputs are then pure float32 rounding noise of
    the weighted sum, whose bits change with any change in the order or grouping of the arithmetic (the rest of
    a bf16 row rarely shows it)."""
    k, v, tables = batch["k_cache"].clone(), batch["v_cache"].clone(), batch["block_tables"]
    half = k.shape[-1] // 2
    for seq, (seq_len, context) in enumerate(zip(batch["seq_lens"], contexts, strict=True)):
        slots = [int(tables[seq, j // PAGE]) * PAGE + j % PAGE for j in range(seq_len)]
        kf, vf = k.view(-1, *k.shape[2:]), v.view(-1, *v.shape[2:])
        for j in range(0, context - 1, 2):
            kf[slots[j + 1]] = kf[slots[j]]
            vf[slots[j + 1], :, :half] = -vf[slots[j], :, :half]
        for j in range(context // 2 * 2, seq_len):
            vf[slots[j], :, :half] = 0
    return {**batch, "k_cache": k, "v_cache": v, "query": batch["query"] * 4}  # peaked softmax: wide exp range


def _attend(batch: dict, threads: int = 2) -> torch.Tensor:
    cpu_lib.set_num_threads(threads)
    try:
        out = cpu_attention.paged_attention(**batch)
    finally:
        cpu_lib.set_num_threads(None)
    assert out is not None
    return out


@pytest.mark.usefixtures("kernel")
@pytest.mark.parametrize("head_dim", [32, 48, 64, 128])
def test_every_build_matches_the_twin(head_dim: int) -> None:
    """Decodes, a tree verification and a prefill chunk in one pass, GQA 3:1, each head size's code path."""
    lens, q_lens = [700, 40, 90, 25], [1, 1, 13, 20]
    for tree in (False, True):
        batch = make_batch(lens, q_lens, 9, 3, head_dim, PAGE, torch.bfloat16, "cpu", with_tree=tree, seed=head_dim)
        out = _attend(batch)
        clean = {**batch, **{name: batch[name].nan_to_num(0.0) for name in ("k_cache", "v_cache")}}
        torch.testing.assert_close(out.float(), reference.paged_attention(**clean).float(), atol=2e-2, rtol=2e-2)


@pytest.mark.usefixtures("kernel")
@pytest.mark.parametrize("tree", [False, True])
def test_bits_do_not_depend_on_threads_or_batch(tree: bool) -> None:
    """Thread counts change how queries are grouped into tasks and which thread runs them; other sequences in
    the pass change it too. No row changes."""
    lens, q_lens = [334, 61, 200, 18, 95], [1, 7, 24, 1, 40]
    batch = make_batch(lens, q_lens, 8, 2, 64, PAGE, torch.bfloat16, "cpu", with_tree=tree, seed=21)
    batch = _amplify(batch, [n - q for n, q in zip(lens, q_lens, strict=True)])
    base = _attend(batch, threads=2)
    for threads in (1, 3, 5):
        assert torch.equal(_attend(batch, threads=threads), base), threads
    small = {
        **batch,
        "query": batch["query"][:8],
        "block_tables": batch["block_tables"][:2],
        "seq_lens": lens[:2],
        "query_lens": q_lens[:2],
        "tree_mask": None if batch["tree_mask"] is None else batch["tree_mask"][:8],
    }
    for threads in (1, 2, 3, 5, 8):  # 64 queries: from 32 to 2 a task
        assert torch.equal(_attend(small, threads=threads), base[:8]), threads
    start = sum(q_lens[:2])
    alone = {**batch, "query": batch["query"][start : start + q_lens[2]], "block_tables": batch["block_tables"][2:3],
             "seq_lens": [lens[2]], "query_lens": [q_lens[2]]}  # fmt: skip
    if tree:
        alone["tree_mask"] = batch["tree_mask"][start : start + q_lens[2]]
    assert torch.equal(_attend(alone, threads=2), base[start : start + q_lens[2]])


@pytest.mark.usefixtures("kernel")
def test_a_prompt_gets_the_same_bits_however_it_is_chunked() -> None:
    """A 150-token prompt on 70 cached tokens as one causal pass, as chunks of 37 and 113, as a causal tree
    mask, and its last token as a decode step: the same bits for every token."""
    context, q_len = 70, 150
    batch = make_batch([context + q_len], [q_len], 9, 3, 64, PAGE, torch.bfloat16, "cpu", seed=22)
    batch = _amplify(batch, [context])
    whole = _attend(batch)
    cut = 37
    first = {**batch, "query": batch["query"][:cut], "seq_lens": [context + cut], "query_lens": [cut]}
    second = {**batch, "query": batch["query"][cut:], "seq_lens": [context + q_len], "query_lens": [q_len - cut]}
    assert torch.equal(torch.cat([_attend(first), _attend(second)]), whole)
    causal_tree = {**batch, "tree_mask": torch.ones(q_len, q_len, dtype=torch.bool).tril()}
    assert torch.equal(_attend(causal_tree), whole)
    last = {**batch, "query": batch["query"][-1:], "query_lens": [1]}
    assert torch.equal(_attend(last, threads=1), whole[-1:])


@pytest.mark.parametrize("head_dim", [48, 64, 128])  # the value sums' 16- and 64-column steps
def test_grouped_avx2_gives_the_per_query_bits(tmp_path_factory: pytest.TempPathFactory, head_dim: int) -> None:
    """The AVX2 tasks share each block's conversion among the queries reading it; each query's arithmetic is
    the per-query loop's, so both builds agree bit for bit (decodes, tree verifications, prefill chunks)."""
    grouped = build_with("-mno-avx512f", str(tmp_path_factory.mktemp("grouped-avx2")))
    per_query = build_with("-mno-avx512f -DSPECDESK_PER_QUERY", str(tmp_path_factory.mktemp("per-query-avx2")))
    if grouped is None or per_query is None or grouped.sd_attention_path() != PATHS["avx2"]:
        pytest.skip("no AVX2 and FMA on this CPU, or no compiler for them")
    assert per_query.sd_attention_path() == PATHS["avx2_per_query"]
    lens, q_lens = [700, 40, 90, 25, 130], [1, 1, 13, 20, 64]
    for tree in (False, True):
        batch = make_batch(lens, q_lens, 9, 3, head_dim, PAGE, torch.bfloat16, "cpu", with_tree=tree, seed=5)
        batch = _amplify(batch, [n - q for n, q in zip(lens, q_lens, strict=True)])
        outs = []
        for lib in (grouped, per_query):
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(cpu_lib, "library", lambda lib=lib: lib)
                outs.append(_attend(batch, threads=3))
        assert torch.equal(outs[0], outs[1]), tree


@pytest.mark.usefixtures("kernel")
@pytest.mark.parametrize(("tree", "q_len"), [(False, 1), (True, 5), (True, 13)])
def test_a_step_cut_by_segment_keeps_its_bits(tree: bool, q_len: int) -> None:
    """A decode step or a tree on a long context has fewer tasks than two a thread, so the grouped paths (AVX2,
    and AVX-512 BF16) run each KV head's list as segments of their own and join them after (run_split in
    cpu_attention.c): the same bits as one thread running each list whole, and close to the twin. A tree of 13
    holds 39 queries per KV head: one AVX2 task (up to 64), where it had been two."""
    batch = make_batch([1500], [q_len], 9, 3, 64, PAGE, torch.bfloat16, "cpu", with_tree=tree, seed=31)
    batch = _amplify(batch, [1500 - q_len])
    whole = _attend(batch, threads=1)
    for threads in (2, 3, 4):
        assert torch.equal(_attend(batch, threads=threads), whole), threads
    torch.testing.assert_close(whole.float(), reference.paged_attention(**batch).float(), atol=2e-2, rtol=2e-2)


@pytest.mark.usefixtures("kernel")
def test_a_mask_that_shows_later_tokens_is_joined_whole() -> None:
    """A tree mask may let a token see a later token of its pass, so its list can run past what causal order gives:
    on 255 context keys plus 2, token 0 (a task of its own: one head) sees 257, into a segment its causal count
    (256) would not reach."""
    batch = make_batch([257], [2], 1, 1, 64, PAGE, torch.bfloat16, "cpu", seed=32)
    batch = {**batch, "tree_mask": torch.ones(2, 2, dtype=torch.bool)}
    whole = _attend(batch, threads=1)
    for threads in (2, 3):
        assert torch.equal(_attend(batch, threads=threads), whole), threads
    torch.testing.assert_close(whole.float(), reference.paged_attention(**batch).float(), atol=2e-2, rtol=2e-2)
