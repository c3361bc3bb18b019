"""The engine on the CPU int8 path (engine/models/int8_linear.py, kernels/cpu_int8.c, kernels/cpu_attention.c):
what loading with quantization="int8" swaps in, the threads it sets, how "auto" resolves, and that speculation
stays lossless on it (greedy, with a repetition penalty, and seeded sampling)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from specdesk.engine import LLM, SamplingParams
from specdesk.engine.config import EngineConfig
from specdesk.engine.models import layers
from specdesk.engine.models.cpu_stack import CpuStack
from specdesk.engine.models.int8_linear import Int8Linear
from specdesk.engine.models.loader import resolve_dtype, resolve_quantization
from specdesk.kernels import cpu_attention, cpu_lib
from tests.tiny_models import make_tiny_model

# Repetitive text and ids: random models fall into loops that the n-gram speculator predicts.
PROMPTS: list[str | list[int]] = [
    "Your order ships today. Your order ships today. Your order",
    [5, 17, 42],
    "Hello, thank you for contacting customer care. Hello, thank you",
]
PARAMS = {
    "greedy": SamplingParams(max_tokens=40, ignore_eos=True),
    "repetition_penalty": SamplingParams(max_tokens=40, ignore_eos=True, repetition_penalty=1.1),
    "seeded": SamplingParams(temperature=0.8, seed=1234, max_tokens=40, ignore_eos=True),
}
# The same seeded requests again: the n-gram store now holds their first replies, so the speculator drafts the
# sampled tokens and the verifier's sampling must accept them (a random model's sampled reply has no loop).
PARAMS["seeded, again"] = PARAMS["seeded"]

pytestmark = pytest.mark.usefixtures("restore_threads")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """mistral (untied head, head_dim 32 != hidden / heads) and qwen2 (tied head, q/k/v biases); both have a
    vocabulary of 400, a multiple of the kernel's 16-channel blocks."""
    tmp = tmp_path_factory.mktemp("int8-models")
    return {family: make_tiny_model(family, tmp) for family in ("mistral", "qwen2")}


def _layer_modules(llm: LLM) -> list[torch.nn.Module]:
    """Every module of the decoder stack (embeddings, layers, final norm): what quantize_linears walks."""
    body = llm.loaded.model.model
    assert isinstance(body, torch.nn.Module)
    return list(body.modules())


def _llm(model_dir: Path, dtype: str, speculator: str | None = None) -> LLM:
    return LLM(model=str(model_dir), dtype=dtype, device="cpu", quantization="int8", speculator=speculator,
               spec_max_batch_size=16)  # fmt: skip


@pytest.mark.parametrize(("family", "dtype"), [("mistral", "bfloat16"), ("mistral", "float32"), ("qwen2", "bfloat16")])
def test_int8_swaps_every_linear_and_the_head(models: dict[str, Path], family: str, dtype: str) -> None:
    """Every layer linear (qkv, o, gate_up, down) and the output projection run the int8 kernel; in bf16 the
    attention is the C kernel's backend."""
    llm = _llm(models[family], dtype)
    try:
        assert llm.loaded.quantization == "int8"
        model = llm.loaded.model
        quantized = [m for m in _layer_modules(llm) if isinstance(m, Int8Linear)]
        assert len(quantized) == 4 * model.num_layers
        assert not any(isinstance(m, torch.nn.Linear) for m in _layer_modules(llm))
        assert isinstance(model.packed_head, Int8Linear)
        assert model.packed_head.out_features == model.vocab_size
        # The kernels' operands lie end to end in one mapping, in the order a pass reads them (gather_weights).
        starts = [m.weight_int8.packed.data_ptr() for m in [*quantized, model.packed_head]]
        assert starts == sorted(starts)
        storages = {m.weight_int8.scales.untyped_storage().data_ptr() for m in [*quantized, model.packed_head]}
        assert storages == {quantized[0].weight_int8.packed.untyped_storage().data_ptr()}
        attentions = [m for m in model.modules() if isinstance(m, layers.PagedAttention)]
        assert len(attentions) == model.num_layers
        if dtype == "bfloat16":
            assert all(a.attn_fn is layers._cpu_attention for a in attentions)
        out = llm.generate(PROMPTS[:1], SamplingParams(max_tokens=8, ignore_eos=True))[0]
        assert len(out.token_ids) == 8
    finally:
        llm.shutdown()


def test_int8_loads_an_output_layer_whose_vocabulary_is_not_a_multiple_of_16(tmp_path: Path) -> None:
    """The tiny llama's 360-token vocabulary does not split into 16-channel blocks: the layers still go int8
    and the model loads and generates (the head must fall back, not fail the load)."""
    model_dir = make_tiny_model("llama", tmp_path)
    llm = _llm(model_dir, "bfloat16")
    try:
        model = llm.loaded.model
        assert model.vocab_size % 16 != 0
        assert len([m for m in _layer_modules(llm) if isinstance(m, Int8Linear)]) == 4 * model.num_layers
        out = llm.generate(PROMPTS[:2], SamplingParams(max_tokens=8, ignore_eos=True))
        assert [len(o.token_ids) for o in out] == [8, 8]
    finally:
        llm.shutdown()


def _generate(model_dir: Path, dtype: str, speculator: str | None) -> dict[str, tuple[list[list[int]], int]]:
    """Every PARAMS run on one engine: (token ids per prompt, tokens the speculator got accepted)."""
    llm = _llm(model_dir, dtype, speculator)
    try:
        runs = {}
        for name, params in PARAMS.items():
            outs = llm.generate(PROMPTS, params)
            runs[name] = ([o.token_ids for o in outs], sum(o.metrics.num_accepted_tokens for o in outs))
        return runs
    finally:
        llm.shutdown()  # both engines of a comparison start from the same threads


@pytest.mark.parametrize(("family", "dtype"), [("mistral", "bfloat16"), ("mistral", "float32"), ("qwen2", "bfloat16")])
def test_int8_speculation_is_lossless(
    models: dict[str, Path], family: str, dtype: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Greedy, repetition-penalized and seeded-sampled outputs with the n-gram speculator equal those without,
    token for token: each row of a verification pass gets the bits a one-token step gets (int32 sums,
    per-row activation scales, attention over the same keys in the same order). In bf16 the draft trees'
    verification passes run in C (the whole layer stack, cpu_stack.py), never in the torch twins."""
    ran: list[tuple[bool, bool]] = []  # (C answered, under a tree mask) per layer stack or attention call

    def stack_spy(self: CpuStack, *args: Any) -> Any:
        out = stack_run(self, *args)
        ran.append((out is not None, args[4].tree_mask is not None))
        return out

    def attention_spy(*args: Any, **kwargs: Any) -> torch.Tensor | None:
        out = c_attention(*args, **kwargs)
        ran.append((out is not None, (args[7] if len(args) > 7 else kwargs.get("tree_mask")) is not None))
        return out

    stack_run, c_attention = CpuStack.run, cpu_attention.paged_attention
    monkeypatch.setattr(CpuStack, "run", stack_spy)
    monkeypatch.setattr(cpu_attention, "paged_attention", attention_spy)
    plain = _generate(models[family], dtype, None)
    spec = _generate(models[family], dtype, "ngram")
    if dtype == "bfloat16":
        assert all(answered for answered, _ in ran) and any(tree for _, tree in ran)
    else:
        assert ran and not any(answered for answered, _ in ran)  # float32 pages: the twin
    for name in PARAMS:
        assert spec[name][0] == plain[name][0], name
        assert plain[name][1] == 0, name
    assert plain["seeded, again"][0] == plain["seeded"][0]
    accepted = {name: run[1] for name, run in spec.items()}
    assert all(accepted[name] > 0 for name in ("greedy", "repetition_penalty", "seeded, again")), accepted


def test_int8_engine_threads(models: dict[str, Path]) -> None:
    """While an int8 engine lives the C kernels get the threads torch had and torch's own ops drop to one; a
    second engine keeps the kernels' threads (torch is at one by then); after the last shuts down, torch has
    its threads back and the kernels follow it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    engines: list[LLM] = []
    try:
        engines.append(_llm(models["mistral"], "bfloat16"))
        assert torch.get_num_threads() == 1
        assert cpu_lib.num_threads() == 2
        engines.append(_llm(models["mistral"], "bfloat16"))
        assert (torch.get_num_threads(), cpu_lib.num_threads()) == (1, 2)
        out = engines[1].generate(PROMPTS[:1], SamplingParams(max_tokens=4, ignore_eos=True))[0]
        assert len(out.token_ids) == 4
        first = engines.pop(0)
        first.shutdown()
        first.shutdown()  # a second shutdown gives nothing back twice
        assert (torch.get_num_threads(), cpu_lib.num_threads()) == (1, 2)  # one engine still lives
        engines[0].shutdown()
        assert (torch.get_num_threads(), cpu_lib.num_threads()) == (2, 2)
        torch.set_num_threads(1)
        assert cpu_lib.num_threads() == 1
        torch.set_num_threads(2)
        with pytest.raises(FileNotFoundError, match="speculator"):  # raised after the runner took the threads
            _llm(models["mistral"], "bfloat16", speculator=str(models["mistral"] / "no-such-folder"))
        assert (torch.get_num_threads(), cpu_lib.num_threads()) == (2, 2)
    finally:
        for llm in engines:
            llm.shutdown()
        torch.set_num_threads(previous)
        cpu_lib.set_num_threads(None)


def test_resolve_quantization() -> None:
    """quantization="auto" is int8 on a CPU with VNNI or AVX2 for bf16, never for float32 (the exact oracle) or
    CUDA; int8 is a CPU option with a clear error; an unknown name is refused at config time."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    vector = cpu_lib.int8_path() in ("vnni", "avx2")
    assert resolve_quantization("auto", torch.bfloat16, cpu) == ("int8" if vector else None)
    assert resolve_quantization("auto", torch.float32, cpu) is None
    assert resolve_quantization("auto", torch.bfloat16, cuda) is None
    assert resolve_quantization("int8", torch.float32, cpu) == "int8"
    assert resolve_quantization(None, torch.bfloat16, cpu) is None
    with pytest.raises(ValueError, match="int8"):
        resolve_quantization("int8", torch.bfloat16, cuda)
    with pytest.raises(ValueError, match="quantization"):
        EngineConfig(quantization="int3")
    assert EngineConfig(quantization="int8").quantization == "int8"


def test_auto_dtype_and_quantization_take_the_int8_path_where_it_pays(tmp_path: Path) -> None:
    """The console's defaults (dtype and quantization "auto") load int8 with bf16 activations on any CPU with a
    vector int8 path, also where dtype "auto" alone means float32 (torch's bf16 matmuls slow, AVX2 only)."""
    from specdesk.engine.models.loader import int8_pays, load_model

    path = make_tiny_model("llama", tmp_path)
    lm = load_model(str(path), dtype="auto", device="cpu", quantization="auto")
    if int8_pays(torch.device("cpu")):
        assert (lm.quantization, lm.dtype) == ("int8", torch.bfloat16)
    else:
        assert lm.quantization is None
    plain = load_model(str(path), dtype="auto", device="cpu")  # the library's LLM() default: unquantized
    assert plain.quantization is None and plain.dtype == resolve_dtype("auto", torch.device("cpu"))
