"""The engine with Q4_1 weights on the C kernels (quantization "q4_1", and "auto" on an AVX2 or AVX-512 VNNI
CPU): which linears keep a checkpoint's own 4-bit codes, what "auto" resolves to, and that speculation stays
lossless on it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from specdesk.engine import LLM, SamplingParams
from specdesk.engine.config import EngineConfig
from specdesk.engine.models.int8_linear import Int8Linear, Q4Linear
from specdesk.engine.models.loader import load_model, q4_pays, resolve_quantization
from specdesk.kernels import cpu_lib, cpu_q4
from tests.kernels.test_cpu_kernels import kernels  # noqa: F401 (the fixture: native and lower builds)
from tests.tiny_models import make_tiny_model

pytestmark = pytest.mark.usefixtures("restore_threads")


def _onto_q4_1_grid(model_dir: Path) -> None:
    """Rewrite the checkpoint's projection weights as a Q4_1 GGUF file holds them after dequantization (float32
    d * q + m, gguf-py's own quantizer), as the default model's conversion does."""
    from gguf import GGMLQuantizationType, quants
    from safetensors.torch import load_file, save_file

    file = model_dir / "model.safetensors"
    tensors = load_file(str(file))
    for name, t in tensors.items():
        if name.endswith("proj.weight") and t.shape[1] % 32 == 0:
            raw = quants.quantize(t.float().numpy(), GGMLQuantizationType.Q4_1)
            back = quants.dequantize(raw, GGMLQuantizationType.Q4_1).reshape(t.shape)
            tensors[name] = torch.from_numpy(np.ascontiguousarray(back, dtype=np.float32))
    save_file(tensors, str(file), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def grid_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = make_tiny_model("mistral", tmp_path_factory.mktemp("q4"))
    _onto_q4_1_grid(path)
    return path


def _layer_linears(model: torch.nn.Module) -> set[str]:
    return {type(m).__name__ for m in model.model.layers.modules() if "Linear" in type(m).__name__}


@pytest.mark.usefixtures("kernels")
def test_auto_keeps_the_checkpoints_own_codes_where_the_tile_runs(grid_model: Path, tmp_path: Path) -> None:
    """On a Q4_1-grid checkpoint "auto" takes the W4A8 kernel with the file's exact codes on an AVX2 or AVX-512
    VNNI build (where it was measured faster per turn than int8) and no C kernels on a portable build; off the
    grid it stays int8. Run on the native build and each lower one this CPU runs."""
    loaded = load_model(str(grid_model), dtype="auto", device="cpu", quantization="auto")
    path = cpu_lib.int8_path()
    if q4_pays():
        assert cpu_lib.q4_path() == path and path in ("avx2", "vnni")
        assert loaded.quantization == "q4_1" and _layer_linears(loaded.model) == {"Q4Linear"}
        assert loaded.model.cpu_stack is not None  # every layer in one C call, with the W4A8 matmul
        qkv = loaded.model.model.layers[0].self_attn.qkv_proj
        assert isinstance(qkv, Q4Linear)
        from safetensors.torch import load_file

        source = load_file(str(grid_model / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"]
        assert torch.equal(qkv.weight_q4.dequantize()[: source.shape[0]], source)  # the file's values, bit for bit
    elif path in ("vnni", "avx2"):  # a W4A8 build without the tile's instructions (AVX2 without F16C)
        assert loaded.quantization == "int8" and _layer_linears(loaded.model) == {"Int8Linear"}
    off_grid = load_model(str(make_tiny_model("mistral", tmp_path)), dtype="auto", device="cpu", quantization="auto")
    if path in ("avx2", "vnni"):
        assert off_grid.quantization == "int8" and _layer_linears(off_grid.model) == {"Int8Linear"}
        assert isinstance(loaded.model.packed_head, Int8Linear)  # this head is not on the grid: int8, not rounded


def test_explicit_q4_1_rounds_weights_off_the_grid(tmp_path: Path) -> None:
    """quantization="q4_1" puts every layer linear on the W4A8 kernel, rounding weights that are not on the grid
    (as llama.cpp's Q4_1 quantizer); the output head keeps int8 unless it is on the grid itself."""
    loaded = load_model(str(make_tiny_model("mistral", tmp_path)), dtype="bfloat16", device="cpu", quantization="q4_1")
    assert loaded.quantization == "q4_1" and _layer_linears(loaded.model) == {"Q4Linear"}
    assert isinstance(loaded.model.packed_head, Int8Linear)
    assert loaded.model.model.embed_tokens.weight.dtype == torch.bfloat16  # the rest took the run's dtype


def test_resolve_and_config_accept_q4_1() -> None:
    assert EngineConfig(quantization="q4_1").quantization == "q4_1"
    assert resolve_quantization("q4_1", torch.bfloat16, torch.device("cpu")) == "q4_1"
    with pytest.raises(ValueError, match="q4_1"):
        resolve_quantization("q4_1", torch.bfloat16, torch.device("cuda"))


def test_q4_1_speculation_is_lossless(grid_model: Path) -> None:
    """Greedy and repetition-penalized outputs with the n-gram speculator equal those without, token for token,
    on the W4A8 kernel: each row of a verification pass gets the bits of a one-token step."""
    prompts: list[str | list[int]] = ["Your order ships today. Your order ships today. Your order", [5, 17, 42]]
    params = [SamplingParams(max_tokens=40, ignore_eos=True),
              SamplingParams(max_tokens=40, ignore_eos=True, repetition_penalty=1.1)]  # fmt: skip
    runs = {}
    for speculator in (None, "ngram"):
        llm = LLM(model=str(grid_model), dtype="bfloat16", device="cpu", quantization="q4_1", speculator=speculator,
                  spec_max_batch_size=16)  # fmt: skip
        try:
            assert llm.loaded.quantization == "q4_1"
            outs = [llm.generate(prompts, p) for p in params]
            runs[speculator] = ([[o.token_ids for o in out] for out in outs],
                                sum(o.metrics.num_accepted_tokens for out in outs for o in out))  # fmt: skip
        finally:
            llm.shutdown()
    assert runs["ngram"][0] == runs[None][0]
    assert runs[None][1] == 0 and runs["ngram"][1] > 0


def test_q4_weight_memory_is_half_a_byte_a_weight(grid_model: Path) -> None:
    """A Q4Linear holds its codes packed two to a byte plus float16 scales, not a copy of the weight."""
    loaded = load_model(str(grid_model), dtype="bfloat16", device="cpu", quantization="q4_1")
    lin = loaded.model.model.layers[0].mlp.gate_up_proj
    assert isinstance(lin, Q4Linear)
    w = lin.weight_q4
    n, k = w.out_features, w.in_features
    held = sum(t.numel() * t.element_size() for t in vars(w).values() if isinstance(t, torch.Tensor))
    assert held == n * k // 2 + n * k // cpu_q4.GROUP * 4


@pytest.mark.parametrize("quantization", ["int8", "q4_1"])
def test_the_quantized_head_survives_where_bf16_is_native(
    grid_model: Path, quantization: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a CPU with native bf16 matmuls pack_for_cpu packs what is left for oneDNN, the output projection
    included; the C kernels' own head must still be the one used (it was once overwritten there)."""
    from specdesk.engine.models import packed_linear

    class Packed(torch.nn.Module):  # stands in for oneDNN's packing, which this CPU may not have
        def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
            super().__init__()

    monkeypatch.setattr(packed_linear, "can_pack", lambda dtype, device: True)
    monkeypatch.setattr(packed_linear, "PackedLinear", Packed)
    loaded = load_model(str(grid_model), dtype="bfloat16", device="cpu", quantization=quantization)
    assert isinstance(loaded.model.packed_head, Int8Linear)  # this head is not on the grid: int8
