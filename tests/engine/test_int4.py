"""Weight-only int4 linears (engine/models/int4_linear.py): GGUF Q4_1's grid, the kernel's math, the engine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from specdesk.engine import LLM, SamplingParams
from specdesk.engine.config import EngineConfig
from specdesk.engine.models.int4_linear import GROUP, Int4Linear, can_quantize, quantize
from tests.tiny_models import make_tiny_model

pytestmark = pytest.mark.skipif(not can_quantize(torch.device("cpu")), reason="torch without the CPU int4 matmul")


def _q4_1(rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    # A weight on Q4_1's grid, w = d * q + m per block of 32, each block using q = 0 and 15 as Q4_1 does.
    torch.manual_seed(0)
    blocks = cols // GROUP
    d, m = torch.rand(rows, blocks, 1) * 0.05 + 0.01, -torch.rand(rows, blocks, 1) * 0.2
    q = torch.randint(0, 16, (rows, blocks, GROUP))
    q[..., 3], q[..., 17] = 0, 15
    return (d * q + m).reshape(rows, cols), q.reshape(rows, cols)


def test_quantize_recovers_a_q4_1_weight() -> None:
    w, q = _q4_1(48, 128)
    got, scales_and_zeros = quantize(w)
    assert torch.equal(got, q.int())
    scale = scales_and_zeros[..., 0].repeat_interleave(GROUP, 0).T  # [K // GROUP, N] -> [N, K]
    zero = scales_and_zeros[..., 1].repeat_interleave(GROUP, 0).T
    torch.testing.assert_close((got - 8) * scale + zero, w, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_int4_linear_is_the_dequantized_matmul_row_by_row(dtype: torch.dtype) -> None:
    w, _ = _q4_1(48, 96)
    bias = torch.randn(48)
    layer = Int4Linear(w.to(dtype), bias.to(dtype))
    x = torch.randn(2, 5, 96).to(dtype)
    out = layer(x)
    assert out.shape == (2, 5, 48) and out.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(out.float(), x.float() @ w.T + bias, atol=tol, rtol=tol)
    # Every row as if alone: a verification pass computes each token as a one-token step would.
    rows = torch.cat([layer(x.reshape(10, 96)[i : i + 1]) for i in range(10)])
    assert torch.equal(rows, out.reshape(10, 48))


def test_engine_in_int4_quantizes_the_layers_and_speculation_stays_lossless(tmp_path: Path) -> None:
    model_dir = str(make_tiny_model("llama", tmp_path))
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    prompts: list[str | list[int]] = ["Your order ships today. Your order ships today. Your order", [5, 17, 42]]
    runs = {}
    for speculator in (None, "ngram"):
        llm = LLM(model=model_dir, dtype="float32", device="cpu", speculator=speculator, quantization="int4",
                  spec_max_batch_size=16)  # fmt: skip
        try:
            model = llm.loaded.model
            quantized = [m for m in model.modules() if isinstance(m, Int4Linear)]
            assert len(quantized) == 4 * model.num_layers  # qkv, o, gate_up, down in every layer
            assert not any(isinstance(m, torch.nn.Linear) for m in model.model.modules())
            runs[speculator] = [o.token_ids for o in llm.generate(prompts, params)]
            if speculator:
                assert llm.stats().spec_num_accepted_tokens > 0
        finally:
            llm.shutdown()
    assert runs["ngram"] == runs[None]


def test_int4_is_a_cpu_option_with_a_clear_error() -> None:
    with pytest.raises(ValueError, match="quantization"):
        EngineConfig(quantization="int3")
    assert not can_quantize(torch.device("cuda"))
