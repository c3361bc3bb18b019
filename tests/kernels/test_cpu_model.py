"""The int8 CPU path's one-call layer stack (kernels/cpu_model.c, engine/models/cpu_stack.py), with int8 or Q4_1
weights, against the same kernels called layer by layer from Python: bit for bit, for decode steps, tree
verifications and prefill chunks, fresh or on cached context."""

from __future__ import annotations

import pytest
import torch

from specdesk.engine import LLM
from specdesk.engine.attention_metadata import AttentionMetadata
from specdesk.kernels import cpu_lib
from tests.tiny_models import make_tiny_model

pytestmark = pytest.mark.skipif(not cpu_lib.available(), reason="no C compiler: the CPU kernels did not build")


@pytest.fixture(scope="module", params=["int8", "q4_1"])
def llm(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> object:
    """An engine on the C kernels with int8 weights, or with Q4_1 ones (the W4A8 matmul in the stack)."""
    previous = torch.get_num_threads()
    engine = LLM(model=str(make_tiny_model("llama", tmp_path_factory.mktemp("m"))), dtype="bfloat16", device="cpu",
                 quantization=request.param, speculator=None, num_blocks=64)  # fmt: skip
    layers = {
        type(m).__name__ for m in engine.engine.runner.model.model.layers.modules() if "Linear" in type(m).__name__
    }
    assert layers == {"Int8Linear" if request.param == "int8" else "Q4Linear"}
    yield engine
    engine.shutdown()
    torch.set_num_threads(previous)
    cpu_lib.set_num_threads(None)


def _pass(query_lens: list[int], context: list[int], tree: bool) -> tuple[AttentionMetadata, torch.Tensor]:
    tables, seq_lens, start = [], [], 0
    for q, c in zip(query_lens, context, strict=True):
        blocks = -(-(q + c) // 16)
        tables.append(list(range(start, start + blocks)))
        seq_lens.append(q + c)
        start += blocks
    mask = None
    if tree:
        g = torch.Generator().manual_seed(sum(query_lens))
        mask = torch.zeros(sum(query_lens), max(query_lens), dtype=torch.bool)
        row = 0
        for q in query_lens:
            m = (torch.rand(q, q, generator=g) < 0.5).tril() | torch.eye(q, dtype=torch.bool)
            m[:, 0] = True
            mask[row : row + q, :q] = m
            row += q
    positions = torch.cat([torch.arange(c, c + q) for q, c in zip(query_lens, context, strict=True)])
    return AttentionMetadata.build(tables, seq_lens, query_lens, 16, tree_mask=mask), positions


@pytest.mark.parametrize(
    ("query_lens", "context", "tree"),
    [([1], [40], False), ([1, 1, 1], [5, 70, 33], False), ([9], [50], True), ([4, 7], [20, 3], True),
     ([30], [0], False), ([200], [10], False), ([1, 150, 5], [60, 0, 30], True)],
)  # fmt: skip
def test_stack_equals_the_per_layer_path(llm: LLM, query_lens: list[int], context: list[int], tree: bool) -> None:
    runner = llm.engine.runner
    model = runner.model
    stack = model.cpu_stack
    assert stack is not None
    meta, positions = _pass(query_lens, context, tree)
    ids = torch.randint(0, model.vocab_size, (sum(query_lens),), generator=torch.Generator().manual_seed(1))
    outs = []
    with torch.inference_mode():
        for use_stack in (True, False):
            torch.manual_seed(0)
            runner.kv_pool.normal_()  # the same context pages for both
            model.cpu_stack = stack if use_stack else None
            try:
                outs.append(model(ids, positions, runner.kv_caches, meta))
            finally:
                model.cpu_stack = stack
    assert torch.equal(outs[0], outs[1])
    embeds = model.model.embed_tokens(ids)
    cos, sin = model.rotary(positions, embeds.dtype)
    ran = stack.run(embeds, cos, sin, runner.kv_caches, meta)
    assert ran is not None  # every bf16 pass takes the one-call path
