"""Turn a model reference (local dir, hub id, .gguf file, or None for the default) into a ready model.

Weights come straight from the checkpoint's safetensors (or .bin) files, each tensor converted once to the
target dtype and device; GGUF files go through transformers' GGUF dequantization.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from specdesk.engine.models import CausalLM, int8_linear, model_class, output_weight, pack_for_cpu
from specdesk.engine.models.cpu_stack import CpuStack
from specdesk.engine.models.default_model import DEFAULT_MODEL_NAME, default_model_path
from specdesk.engine.models.int4_linear import can_quantize, quantize_linears
from specdesk.engine.models.layers import set_fused_ops
from specdesk.kernels import cpu_int8, cpu_lib
from specdesk.kernels.ops import resolve_backend

CPU_KERNELS = ("int8", "q4_1")  # the quantizations that run on the C kernels (int8 activations)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


@dataclass
class LoadedModel:
    """A model ready to serve, with everything the engine needs to size its cache and stop sequences."""

    model: CausalLM
    tokenizer: Any  # a transformers tokenizer
    hf_config: Any
    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_model_len: int
    eos_token_ids: list[int]
    dtype: torch.dtype
    device: torch.device
    name: str
    quantization: str | None = None  # what load_model resolved "auto" to


def resolve_device(device: str) -> torch.device:
    """Device "auto" is cuda when available, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """Dtype "auto" is bfloat16 on cuda and on CPUs with native bf16 matmuls (prepacked oneDNN), else float32."""
    if dtype == "auto":
        from specdesk.engine.models.packed_linear import can_pack

        fast_bf16 = device.type == "cuda" or can_pack(torch.bfloat16, device)
        return torch.bfloat16 if fast_bf16 else torch.float32
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in names:
        raise ValueError(f"dtype must be one of auto, {', '.join(names)}; got {dtype!r}")
    return names[dtype]


def load_model(
    model: str | None,
    dtype: str = "auto",
    device: str = "auto",
    *,
    tokenizer: str | None = None,
    attention_backend: str = "torch",
    max_model_len: int | None = None,
    trust_remote_code: bool = False,
    quantization: str | None = None,
) -> LoadedModel:
    """Load a supported causal LM and its tokenizer.

    model: a checkpoint directory, a .gguf file, a Hugging Face hub id, or None for the default model.
    attention_backend: "torch", "triton" or "auto" (kernels.ops.resolve_backend picks for the device).
    quantization: None, "int8", "q4_1", "int4" (CPU only; models/int8_linear.py, models/int4_linear.py) or
    "auto" (resolve_quantization; on an AVX2 CPU it then keeps 4-bit weights where the checkpoint holds them
    on the Q4_1 grid, and LoadedModel.quantization says "q4_1").
    Raises FileNotFoundError when nothing is found, ValueError for an unsupported architecture or a
    max_model_len beyond what the model supports.
    """
    from transformers import AutoConfig, AutoTokenizer

    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if dtype == "auto" and quantization == "auto" and int8_pays(torch_device):
        # float32 is "auto"'s pick where torch's bf16 matmuls are slow; the int8 path does not use them (its C
        # kernels keep activations in bf16), and on such a CPU it is the fastest path by far.
        torch_dtype = torch.bfloat16
    requested = quantization
    quantization = resolve_quantization(quantization, torch_dtype, torch_device)
    if quantization in CPU_KERNELS and attention_backend in ("torch", "auto"):
        attention_backend = "cpu"  # the C attention beside the C matmuls (kernels/cpu_attention.py)
    path, gguf_file = resolve_checkpoint(model)
    gguf_kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    hf_config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, **gguf_kwargs)
    cls = model_class(hf_config)  # fails on an unsupported architecture before any weight is read
    limit = model_max_len(hf_config)
    if max_model_len is not None and max_model_len > limit:
        raise ValueError(f"max_model_len {max_model_len} exceeds the model's limit of {limit} tokens")
    if attention_backend == "auto":
        attention_backend = resolve_backend("auto", torch_device)

    # The C kernels quantize a float32 checkpoint's weights as stored (a GGUF file's Q4_1 values survive only
    # in float32), then the rest of the model takes the run's dtype.
    load_dtype = torch.float32 if quantization in CPU_KERNELS and _stored_float32(hf_config, gguf_file) else torch_dtype
    # "auto" on a CPU whose W4A8 tile runs (AVX2, or AVX-512 VNNI): 4-bit weights wherever the checkpoint holds
    # them exactly (quantize_linears' "exact"), measured faster per turn than int8 on both (docs/benchmarks.md).
    # Only a float32 checkpoint can hold them exactly.
    exact_q4 = requested == "auto" and quantization == "int8" and load_dtype == torch.float32 and q4_pays()
    with torch.device("meta"):
        net = cls(hf_config, backend=attention_backend)
    net = net.to(load_dtype).to_empty(device=torch_device)
    net.load_weights(_checkpoint_weights(path, gguf_file))
    net.eval().requires_grad_(False)
    lm_head = getattr(net, "lm_head", None)
    skip = lm_head if isinstance(lm_head, torch.nn.Module) else None
    quantized_head: torch.nn.Module | None = None
    if quantization == "int4":
        quantize_linears(net, skip=skip)
    elif quantization in CPU_KERNELS:
        weights = "exact" if exact_q4 else quantization
        if int8_linear.quantize_linears(net, skip=skip, weights=weights) and weights == "exact":
            quantization = "q4_1"
        # The output projection too (where its shape fits): a fifth of the default model. Q4_1 codes only
        # where they are the checkpoint's own; the default model's is Q8_0, which int8 holds as it is.
        head = output_weight(net)
        if cpu_int8.supported(head.shape[1], head.shape[0]):
            quantized_head = int8_linear.quantized_linear(head, None, "exact" if quantization == "q4_1" else "int8")
        net.to(torch_dtype)
    pack_for_cpu(net, torch_dtype, torch_device)  # whatever is left: the output projection at least
    if quantized_head is not None:
        net.packed_head = quantized_head  # after pack_for_cpu, which sets its own where bf16 is native
    if quantization in CPU_KERNELS:
        set_fused_ops(net, "cpu")  # norms, rotary and SwiGLU in C as well (kernels/cpu_fused.py)
        int8_linear.gather_weights(net)  # one stream on huge pages, before the stack takes their addresses
        setattr(net, "cpu_stack", CpuStack.build(net))  # noqa: B010 (and, for the Llama family, all layers in one C call)

    tok = AutoTokenizer.from_pretrained(
        tokenizer or path, trust_remote_code=trust_remote_code, **({} if tokenizer else gguf_kwargs)
    )
    return LoadedModel(
        model=net,
        tokenizer=tok,
        hf_config=hf_config,
        num_layers=net.num_layers,
        num_kv_heads=net.num_kv_heads,
        head_dim=net.head_dim,
        hidden_size=net.hidden_size,
        vocab_size=net.vocab_size,
        max_model_len=max_model_len or limit,
        eos_token_ids=eos_token_ids(path, hf_config, tok),
        dtype=torch_dtype,
        device=torch_device,
        name=_display_name(model, path, gguf_file),
        quantization=quantization,
    )


def int8_pays(device: torch.device) -> bool:
    """True on a CPU whose compiled int8 kernel has a vector path (AVX-512 VNNI or AVX2): there W8A8 is the
    fastest way to run a model (docs/benchmarks.md); the portable loops are not."""
    return device.type == "cpu" and cpu_lib.int8_path() in ("vnni", "avx2")


def q4_pays() -> bool:
    """True where the compiled W4A8 matmul has a vector tile as fast as int8's: AVX2 with F16C (int8 without
    VNNI), where Q4_1 weights ran 1.3-1.4x faster per turn than int8, or both with AVX-512 VNNI, where a decode
    step reads half the bytes and won per turn although int8's 512-bit tile prefills faster (docs/benchmarks.md)."""
    return (cpu_lib.int8_path(), cpu_lib.q4_path()) in (("avx2", "avx2"), ("vnni", "vnni"))


def resolve_quantization(quantization: str | None, dtype: torch.dtype, device: torch.device) -> str | None:
    """The quantization to load with: "auto" is "int8" where `int8_pays`, for a dtype other than float32 (the
    exact oracle stays unquantized); None elsewhere. An explicit choice that cannot run here raises ValueError."""
    if quantization == "auto":
        return "int8" if dtype != torch.float32 and int8_pays(device) else None
    if quantization == "int4" and not can_quantize(device):
        raise ValueError(f"quantization='int4' runs on CPU (torch >= 2.6), not on {device}")
    if quantization in CPU_KERNELS and device.type != "cpu":
        raise ValueError(f"quantization={quantization!r} runs on CPU, not on {device}")
    return quantization


def _stored_float32(hf_config: Any, gguf_file: str | None) -> bool:
    """Whether the checkpoint's weights are float32 (transformers dequantizes GGUF files to float32)."""
    dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    return gguf_file is not None or str(dtype).removeprefix("torch.") == "float32"


def resolve_checkpoint(model: str | None) -> tuple[Path, str | None]:
    """(checkpoint directory, GGUF file name in it or None). Downloads a hub id unless offline."""
    if model is None:
        return default_model_path(), None
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist")
        return path.parent, path.name
    if path.is_dir():
        if (path / "config.json").is_file():
            return path, None
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return path, ggufs[0].name
        raise FileNotFoundError(f"{str(path)!r} has no config.json (nor exactly one .gguf file)")
    if path.exists():
        raise ValueError(f"{str(path)!r} is neither a checkpoint directory nor a .gguf file")
    if not _HUB_ID.match(model) or model.startswith((".", "~")):
        raise FileNotFoundError(f"model path {model!r} does not exist")
    return _download(model), None


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        local = Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS))
        if not any(local.glob("*.safetensors")):  # older repos only have PyTorch .bin weights
            local = Path(snapshot_download(repo_id, allow_patterns=[*_HUB_PATTERNS, "*.bin"]))
    except Exception as e:  # offline, unknown repo, gated repo: all "not found" to the caller
        raise FileNotFoundError(
            f"model {repo_id!r} is not a local directory or .gguf file, and fetching it from the "
            f"Hugging Face hub failed: {type(e).__name__}: {e}"
        ) from e
    return local


def _checkpoint_weights(path: Path, gguf_file: str | None) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face parameter name, CPU tensor) pairs, one tensor in memory at a time where possible."""
    if gguf_file:
        yield from _gguf_weights(path, gguf_file)
        return
    from safetensors import safe_open

    for file in _weight_files(path):
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open handles are not iterable
                    yield key, f.get_tensor(key)
        else:
            yield from torch.load(file, map_location="cpu", weights_only=True, mmap=True).items()


def _weight_files(path: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            return [path / name for name in sorted(set(weight_map.values()))]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (path / single).is_file():
            return [path / single]
    files = sorted(p for p in path.glob("*.safetensors") if not p.name.startswith("consolidated"))
    if not files:
        raise FileNotFoundError(f"no model.safetensors / pytorch_model.bin weights found in {str(path)!r}")
    return files


def _gguf_weights(path: Path, gguf_file: str) -> Iterable[tuple[str, torch.Tensor]]:
    from transformers import AutoModelForCausalLM

    # transformers dequantizes and un-permutes GGUF tensors into its own layout; we reuse its state dict.
    source = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf_file, dtype=torch.float32)
    return source.state_dict().items()


def model_max_len(hf_config: Any) -> int:
    """Longest context the model handles exactly. Sliding-window attention (Mistral v0.1, some Qwen2) is
    not implemented, so such models are capped at their window, where full attention is equivalent."""
    limit = int(getattr(hf_config, "max_position_embeddings", None) or hf_config.n_positions)
    window: int | None = getattr(hf_config, "sliding_window", None)
    layer_types = getattr(hf_config, "layer_types", None)
    uses_window = window is not None and (
        "sliding_attention" in layer_types if layer_types else getattr(hf_config, "use_sliding_window", True)
    )
    return min(limit, window) if window is not None and uses_window else limit


def eos_token_ids(path: Path, hf_config: Any, tokenizer: Any) -> list[int]:
    """Every id that ends a generation: generation_config.json's, the config's and the tokenizer's."""
    ids: list[int] = []
    gen_path = path / "generation_config.json"
    gen_eos = json.loads(gen_path.read_text()).get("eos_token_id") if gen_path.is_file() else None
    for value in (gen_eos, getattr(hf_config, "eos_token_id", None), tokenizer.eos_token_id):
        for token_id in value if isinstance(value, list) else [value]:
            if token_id is not None and int(token_id) not in ids:
                ids.append(int(token_id))
    return ids


def _display_name(model: str | None, path: Path, gguf_file: str | None) -> str:
    if model is None:
        return DEFAULT_MODEL_NAME
    if gguf_file:
        return Path(gguf_file).stem
    return model if not Path(model).expanduser().exists() else path.resolve().name
