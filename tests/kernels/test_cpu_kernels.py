"""The C kernels of the CPU int8 path (kernels/cpu_int8.c, kernels/cpu_attention.c) against their torch twins:
the W8A8 linear bit for bit, the paged attention within bf16 rounding, and the properties that keep
speculation exact on this path (a row never depends on the rest of its batch; a draft-tree node computes
exactly what plain decoding of its path computes)."""

from __future__ import annotations

import ctypes
import math
import threading
from typing import Any

import pytest
import torch

from specdesk.engine.attention_metadata import slot_mapping
from specdesk.kernels import cpu_attention, cpu_int8, cpu_lib, reference
from tests.kernels.builds import build_with
from tests.kernels.paged_batches import make_batch

pytestmark = pytest.mark.skipif(
    not cpu_lib.available(), reason="no working C compiler: the CPU kernels are not built and callers use the twins"
)

HEADS, KV_HEADS, HEAD_DIM, PAGE = 4, 2, 32, 16


# Build flags of the int8 matmul's paths below the native one (appended to cpu_lib's): AVX2 without VNNI, and
# the portable loops. A path this CPU or compiler cannot give is skipped.
LOWER_BUILDS = {"avx2": ("-mno-avx512f", "avx2"), "portable": ("-mno-avx512f -mno-avx2", "portable")}


_LOWER: dict[str, ctypes.CDLL | str] = {}  # built once per session: the library, or why it is skipped


def _lower_lib(name: str, tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    """The same sources built for a lower path (the loops a machine without VNNI, or without AVX2, runs)."""
    if name not in _LOWER:
        flag, path = LOWER_BUILDS[name]
        lib = build_with(flag, str(tmp_path_factory.mktemp(f"{name}-kernels")))
        if lib is None:
            _LOWER[name] = f"no x86-64 compiler that takes {flag}"
        else:
            got = ("portable", "avx2", "vnni")[lib.sd_int8_path()]
            assert not lib.sd_has_vnni()
            if got == path:
                _LOWER[name] = lib
            else:
                assert path == "avx2" and got == "portable", got  # only a CPU without AVX2 may fall short
                _LOWER[name] = "this CPU has no AVX2"
    lib_or_reason = _LOWER[name]
    if isinstance(lib_or_reason, str):
        pytest.skip(lib_or_reason)
    return lib_or_reason


@pytest.fixture(params=["native", *LOWER_BUILDS])
def kernels(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> str:
    """Runs a test on the -march=native build and on each lower path's build of the same C files."""
    if request.param != "native":
        lib = _lower_lib(str(request.param), tmp_path_factory)
        monkeypatch.setattr(cpu_lib, "library", lambda: lib)
    return str(request.param)


def _inputs(m: int, n: int, k: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, cpu_int8.Int8Weight]:
    # Rows and groups of very different magnitudes (every group's scale matters), an all-zero row and a row of
    # rounding ties.
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen) * torch.logspace(-2, 1, max(m, 1))[:m, None] * torch.logspace(-1, 1, k)
    if m > 2:
        x[m // 2] = 0
    if m > 3:  # 127 in every group makes its scale exactly 1: x / scale lands on .5 ties (round half to even)
        x[m // 2 + 1] = torch.tensor([127.0, 0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 126.5]).repeat(k // 8 + 1)[:k]
    w = torch.randn(n, k, generator=gen) * 0.1
    return x.to(dtype), cpu_int8.quantize_weight(w)


# ---------------------------------------------------------------------------------------- int8 linear


@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize(("n", "k"), [(16, 96), (48, 32), (64, 256), (80, 160)])
def test_int8_linear_equals_its_twin_bit_for_bit(dtype: torch.dtype, with_bias: bool, n: int, k: int) -> None:
    """Guards the VNNI tile, the odd 16-channel tail block, one or an odd number of 32-input groups (K not a
    multiple of 64), the groups' float sum and the epilogue's rounding."""
    for m in (1, 3, 4, 5, 6, 11, 13, 64):
        x, w = _inputs(m, n, k, dtype, seed=m)
        bias = torch.randn(n).to(dtype) if with_bias else None
        out = cpu_int8.linear(x, w, bias)
        assert out.shape == (m, n) and out.dtype == dtype
        assert torch.equal(out, cpu_int8.linear_reference(x, w, bias)), (m, n, k)


@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_int8_linear_zero_row_and_batch_invariance(dtype: torch.dtype) -> None:
    """An all-zero row gives exactly the bias; each row alone equals that row in the batch (speculation's
    verification pass computes every token as a one-token step would)."""
    x, w = _inputs(13, 48, 96, dtype, seed=7)
    bias = torch.randn(48)
    out = cpu_int8.linear(x, w, bias)
    assert torch.equal(out[6], bias.to(dtype))  # row 13 // 2 is all zeros
    assert torch.equal(cpu_int8.linear(x[6:7], w), torch.zeros(1, 48, dtype=dtype))
    for i in range(x.shape[0]):
        assert torch.equal(cpu_int8.linear(x[i : i + 1], w, bias), out[i : i + 1]), i


def test_int8_linear_non_contiguous_input_and_empty_batch() -> None:
    """A strided x (a slice of a fused tensor) reads the right values; an empty batch gives [0, n]."""
    x, w = _inputs(5, 32, 64, torch.bfloat16, seed=3)
    wide = torch.randn(5, 128).to(torch.bfloat16)
    wide[:, ::2] = x
    assert torch.equal(cpu_int8.linear(wide[:, ::2], w), cpu_int8.linear_reference(x, w))
    empty = cpu_int8.linear(x[:0], w)
    assert empty.shape == (0, 32) and empty.dtype == torch.bfloat16


def test_int8_linear_strided_float32_bias() -> None:
    """A float32 bias that is a strided view is read by value, as the twin reads it (linear() hands the C
    kernel bias.data_ptr() as if contiguous)."""
    x, w = _inputs(5, 32, 64, torch.bfloat16, seed=3)
    bias = torch.randn(64)[::2]  # float32, stride 2
    assert torch.equal(cpu_int8.linear(x, w, bias), cpu_int8.linear_reference(x, w, bias))


def test_quantize_weight_round_trip_and_layout() -> None:
    """Per group of GROUP inputs of a channel: q * scale is within half a step of w, the largest |q| is 127,
    wsum is the group's sum of q; packed is q in the kernel's [n/16][k/4][16][4] layout."""
    gen = torch.Generator().manual_seed(1)
    group = cpu_int8.GROUP
    n, k = 48, 3 * group
    w = torch.randn(n, k, generator=gen) * torch.logspace(-3, 1, n)[:, None]
    w[:, :group] *= 100  # groups of one channel at very different scales
    w[5] = 0  # a dead channel and a dead group: scale 0, q 0
    w[9, group : 2 * group] = 0
    qw = cpu_int8.quantize_weight(w)
    assert qw.q.dtype == torch.int8 and qw.q.shape == (n, k) and int(qw.q.abs().max()) <= 127
    assert qw.scales.shape == qw.wsum.shape == (k // group, n)
    scales = qw.scales.t().repeat_interleave(group, 1)  # [n, k]: each input's group scale
    assert bool(((qw.q.float() * scales - w).abs() <= scales * 0.5 * (1 + 1e-5)).all())
    live = qw.scales.t() > 0
    assert int(live.sum()) == 3 * n - 4
    assert bool((qw.q.view(n, -1, group).abs().amax(-1)[live] == 127).all())
    assert not qw.q[5].any() and not qw.q[9, group : 2 * group].any()
    assert qw.wsum.dtype == torch.int32
    assert torch.equal(qw.wsum, qw.q.view(n, -1, group).sum(-1, dtype=torch.int32).t())
    packed = qw.packed.view(n // 16, k // 4, 16, 4)
    nb, j, c, t = 2, 11, 5, 3
    assert int(packed[nb, j, c, t]) == int(qw.q[nb * 16 + c, 4 * j + t])
    assert torch.equal(packed.permute(0, 2, 1, 3).reshape(n, k), qw.q)
    assert qw.out_features == n and qw.in_features == k and cpu_int8.supported(k, n)
    assert not cpu_int8.supported(k, 40) and not cpu_int8.supported(k + 4, n)


def test_int8_linear_is_close_to_the_float_matmul() -> None:
    """W8A8 on random data stays within 2 % (relative Frobenius error) of x @ w.T."""
    gen = torch.Generator().manual_seed(2)
    x, w = torch.randn(16, 512, generator=gen), torch.randn(256, 512, generator=gen) / 512**0.5
    bias = torch.randn(256, generator=gen)
    exact = x @ w.T + bias
    for dtype in (torch.float32, torch.bfloat16):
        got = cpu_int8.linear(x.to(dtype), cpu_int8.quantize_weight(w), bias).float()
        rel = float((got - exact).norm() / exact.norm())
        assert rel < 0.02, (dtype, rel)


def test_int8_linear_same_result_from_another_thread_and_any_thread_count() -> None:
    """The kernel's own thread pool: a call from a non-main thread, from several threads at once, and with
    1 or 2 threads gives the same bits (every output channel is summed by one thread, in one order)."""
    x, w = _inputs(24, 256, 384, torch.bfloat16, seed=5)
    bias = torch.randn(256)
    try:
        cpu_lib.set_num_threads(1)
        one = cpu_int8.linear(x, w, bias)
        cpu_lib.set_num_threads(2)
        two = cpu_int8.linear(x, w, bias)
        assert torch.equal(one, two)
        assert torch.equal(two, cpu_int8.linear_reference(x, w, bias))
        results: dict[int, list[torch.Tensor]] = {}

        def work(i: int) -> None:
            results[i] = [cpu_int8.linear(x, w, bias) for _ in range(20)]

        threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert sorted(results) == [0, 1, 2]
        assert all(torch.equal(r, one) for rs in results.values() for r in rs)
    finally:
        cpu_lib.set_num_threads(None)


# ---------------------------------------------------------------------------------------- paged attention


def _attend_both(batch: dict[str, Any]) -> torch.Tensor:
    # The C kernel on the NaN-padded pages (it must read only visible slots) against the twin on zeroed ones.
    out = cpu_attention.paged_attention(**batch)
    assert out is not None and out.dtype == torch.bfloat16 and not out.isnan().any()
    clean = {**batch, **{name: batch[name].nan_to_num(0.0) for name in ("k_cache", "v_cache")}}
    torch.testing.assert_close(out.float(), reference.paged_attention(**clean).float(), atol=2e-2, rtol=2e-2)
    return out


@pytest.mark.usefixtures("kernels")
def test_paged_attention_decode_batch_matches_twin_and_rows_are_independent() -> None:
    """Decode steps of sequences with shuffled page tables; each row equals the sequence attended alone."""
    lens = [5, 300, 17, 33, 2, 64, 9, 16]
    batch = make_batch(lens, [1] * len(lens), HEADS, KV_HEADS, HEAD_DIM, PAGE, torch.bfloat16, "cpu", seed=11)
    out = _attend_both(batch)
    for i, n in enumerate(lens):
        alone = {**batch, "query": batch["query"][i : i + 1], "block_tables": batch["block_tables"][i : i + 1],
                 "seq_lens": [n], "query_lens": [1]}  # fmt: skip
        got = cpu_attention.paged_attention(**alone)
        assert got is not None and torch.equal(got, out[i : i + 1]), i


@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize("head_dim", [32, 64])
def test_paged_attention_tree_verification_matches_twin(head_dim: int) -> None:
    """A 13-token draft-tree verification on 40 tokens of context, under a tree mask."""
    batch = make_batch([53], [13], HEADS, KV_HEADS, head_dim, PAGE, torch.bfloat16, "cpu", with_tree=True, seed=12)
    _attend_both(batch)


def test_paged_attention_long_prefill_chunk_matches_twin() -> None:
    """A 100-token prefill chunk on top of cached context."""
    q_len = 100
    batch = make_batch([q_len + 70], [q_len], HEADS, KV_HEADS, HEAD_DIM, PAGE, torch.bfloat16, "cpu", seed=13)
    _attend_both(batch)


@pytest.mark.usefixtures("kernels")
def test_paged_attention_mixed_batch_matches_twin() -> None:
    """Decodes, a short chunk, a tree verification and a long prefill chunk in one pass; decode rows equal
    those of the decodes attended alone."""
    long = 65
    lens, q_lens = [40, 7, 90, 25, 3, 60, long + 20], [1, 1, 12, 1, 3, 9, long]
    batch = make_batch(lens, q_lens, HEADS, KV_HEADS, HEAD_DIM, PAGE, torch.bfloat16, "cpu", seed=14)
    out = _attend_both(batch)
    tree = make_batch(lens, q_lens, HEADS, KV_HEADS, HEAD_DIM, PAGE, torch.bfloat16, "cpu", with_tree=True, seed=15)
    _attend_both(tree)
    decodes = [i for i, q in enumerate(q_lens) if q == 1]
    rows = [sum(q_lens[:i]) for i in decodes]
    alone = {**batch, "query": batch["query"][rows], "block_tables": batch["block_tables"][decodes],
             "seq_lens": [lens[i] for i in decodes], "query_lens": [1] * len(decodes)}  # fmt: skip
    got = cpu_attention.paged_attention(**alone)
    assert got is not None and torch.equal(got, out[rows])


def _paged(kv: list[torch.Tensor], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NaN-filled bf16 pages holding kv[i] ([2, len, kvh, d]) as sequence i, on shuffled pages."""
    need = [-(-x.shape[1] // PAGE) for x in kv]
    shape = (1 + sum(need), PAGE, kv[0].shape[2], kv[0].shape[3])
    k_cache, v_cache = (torch.full(shape, math.nan, dtype=torch.bfloat16) for _ in range(2))
    tables = torch.zeros(len(kv), max(need), dtype=torch.int32)
    free = (torch.randperm(shape[0] - 1, generator=gen) + 1).tolist()
    for i, x in enumerate(kv):
        pages = [free.pop() for _ in range(need[i])]
        tables[i, : len(pages)] = torch.tensor(pages, dtype=torch.int32)
        reference.write_kv(x[0], x[1], k_cache, v_cache, torch.tensor(slot_mapping(pages, 0, x.shape[1], PAGE)))
    return k_cache, v_cache, tables


@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize("seed", range(4))
def test_tree_node_equals_plain_decoding_of_its_path_bit_for_bit(seed: int) -> None:
    """What makes speculation exact here: every node of a verified draft tree gets the bits that plain
    decoding of its root-to-node path gets, as the last row of a causal pass and as a one-token step."""
    gen = torch.Generator().manual_seed(100 + seed)
    context, q, heads, kv_heads, head_dim = 37 + 16 * seed, 13, 16, 4, 64
    parent = [-1] + [int(torch.randint(-1, i, (1,), generator=gen)) for i in range(1, q)]
    mask = torch.zeros(q, q, dtype=torch.bool)
    paths: list[list[int]] = []
    for i in range(q):
        path: list[int] = []
        j = i
        while j >= 0:
            path.insert(0, j)
            j = parent[j]
        paths.append(path)
        mask[i, path] = True
    ctx_kv = torch.randn(2, context, kv_heads, head_dim, generator=gen).bfloat16()
    new_kv = torch.randn(2, q, kv_heads, head_dim, generator=gen).bfloat16()
    # An amplifier: context keys in equal pairs whose values cancel in the first half of each head, where the
    # new tokens' values are 0. Those outputs are then pure float32 rounding noise of the weighted sum, whose
    # bits change with any change in the order or grouping of the sum (the rest of a bf16 row rarely shows it).
    half, pairs = head_dim // 2, context // 2 * 2
    ctx_kv[0, 1:pairs:2] = ctx_kv[0, 0:pairs:2]
    ctx_kv[1, 1:pairs:2, :, :half] = -ctx_kv[1, 0:pairs:2, :, :half]
    ctx_kv[1, pairs:, :, :half] = 0  # an odd context's last key
    new_kv[1, :, :, :half] = 0
    queries = (torch.randn(q, heads, head_dim, generator=gen) * 2).bfloat16()  # peaked softmax: wide exp range
    scale = head_dim**-0.5
    # The verification pass and, in the same pages, every node's path as its own sequence.
    seqs = [torch.cat([ctx_kv, new_kv], 1)] + [torch.cat([ctx_kv, new_kv[:, p]], 1) for p in paths]
    k_cache, v_cache, tables = _paged(seqs, gen)
    tree = cpu_attention.paged_attention(queries, k_cache, v_cache, tables[:1], [context + q], [q], scale, mask)
    assert tree is not None
    clean = (k_cache.nan_to_num(0.0), v_cache.nan_to_num(0.0))
    twin = reference.paged_attention(queries, *clean, tables[:1], [context + q], [q], scale, mask)
    torch.testing.assert_close(tree.float(), twin.float(), atol=2e-2, rtol=2e-2)
    for i, path in enumerate(paths):
        n = context + len(path)
        plain = cpu_attention.paged_attention(queries[path], k_cache, v_cache, tables[i + 1 : i + 2], [n],
                                              [len(path)], scale)  # fmt: skip
        step = cpu_attention.paged_attention(queries[i : i + 1], k_cache, v_cache, tables[i + 1 : i + 2], [n], [1],
                                             scale)  # fmt: skip
        assert plain is not None and step is not None
        assert torch.equal(tree[i], plain[-1]), (i, path)
        assert torch.equal(tree[i : i + 1], step), (i, path)
    # The whole batch at once (tree pass beside every path's decode step) changes no row.
    steps_mask = torch.zeros(q, q, dtype=torch.bool)
    steps_mask[:, 0] = True
    everything = cpu_attention.paged_attention(
        torch.cat([queries, queries]), k_cache, v_cache, tables, [context + q] + [context + len(p) for p in paths],
        [q] + [1] * q, scale, torch.cat([mask, steps_mask]),
    )  # fmt: skip
    assert everything is not None and torch.equal(everything[:q], tree) and torch.equal(everything[q:], tree)


def test_paged_attention_declines_what_it_does_not_take() -> None:
    """None (so the caller uses the twin) for a float32 query or pages, and for head_dim not a multiple of 16."""
    fp32 = make_batch([20, 5], [1, 1], HEADS, KV_HEADS, HEAD_DIM, PAGE, torch.float32, "cpu", seed=16)
    assert cpu_attention.paged_attention(**fp32) is None
    bf16 = make_batch([20, 5], [1, 1], HEADS, KV_HEADS, HEAD_DIM, PAGE, torch.bfloat16, "cpu", seed=16)
    assert cpu_attention.paged_attention(**{**bf16, "query": bf16["query"].float()}) is None
    odd = make_batch([20, 5], [1, 1], HEADS, KV_HEADS, 24, PAGE, torch.bfloat16, "cpu", seed=17)
    assert cpu_attention.paged_attention(**odd) is None
