"""Blocks shared by the model families: norms, rotary embedding, MLPs, paged attention, weight loading.

Every module works on a flattened ragged batch: activations are [num_tokens, ...], never [batch, seq, ...].
Numerics follow Hugging Face transformers op for op, so float32 logits match its forward to ~1e-5.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from specdesk.engine.attention_metadata import AttentionMetadata
from specdesk.kernels import cpu_attention, ops, reference

# write_fn(key, value, k_cache, v_cache, slot_mapping): scatter K/V into page slots (see kernels.reference).
# attn_fn(query, k_cache, v_cache, meta, scale) -> [T, num_heads, head_dim]: paged attention over the batch.
WriteKVFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata, float], torch.Tensor]
KVCache = tuple[torch.Tensor, torch.Tensor]

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def attention_backend(name: str) -> tuple[WriteKVFn, AttentionFn]:
    """The (write_fn, attn_fn) pair of a backend: "torch" (kernels.reference), "triton" (kernels.ops) or "cpu"
    (kernels.cpu_attention, the C kernel that the int8 CPU path uses).

    Chosen once at model construction; resolve "auto" first with kernels.ops.resolve_backend.
    """
    if name == "torch":
        return reference.write_kv, _torch_attention
    if name == "triton":
        return _triton_write_kv, _triton_attention
    if name == "cpu":
        return reference.write_kv, _cpu_attention
    raise ValueError(f"unknown attention backend {name!r}; available: torch, triton, cpu")


def _torch_attention(
    query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    return reference.paged_attention(
        query, k_cache, v_cache, meta.block_tables, meta.seq_lens_list, meta.query_lens_list, scale,
        meta.tree_mask,
    )  # fmt: skip


def _cpu_attention(
    query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    # The C kernel (kernels/cpu_attention.c) where it takes the dtype and shape, the twin elsewhere.
    out = cpu_attention.paged_attention(
        query, k_cache, v_cache, meta.block_tables, meta.seq_lens_list, meta.query_lens_list, scale, meta.tree_mask
    )
    return out if out is not None else _torch_attention(query, k_cache, v_cache, meta, scale)


def _triton_write_kv(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor
) -> None:
    ops.write_kv(key, value, k_cache, v_cache, slots, backend="triton")


def _triton_attention(
    query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    # The device copies of the lengths spare each launch a host-to-device copy.
    return ops.paged_attention(
        query, k_cache, v_cache, meta.block_tables, meta.seq_lens_list, meta.query_lens_list, scale,
        meta.tree_mask, backend="triton", seq_lens_t=meta.seq_lens, query_start_loc=meta.query_start_loc,
    )  # fmt: skip


class PagedAttention(nn.Module):
    """Writes this pass's K/V into the paged cache, then attends over each sequence's pages."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, backend: str = "torch") -> None:
        super().__init__()
        assert num_heads % num_kv_heads == 0, (num_heads, num_kv_heads)
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.write_fn, self.attn_fn = attention_backend(backend)

    def forward(
        self,
        query: torch.Tensor,  # [T, num_heads, head_dim]
        key: torch.Tensor,  # [T, num_kv_heads, head_dim]
        value: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, num_heads * head_dim]
        k_cache, v_cache = kv_cache
        self.write_fn(key, value, k_cache, v_cache, meta.slot_mapping)
        out = self.attn_fn(query, k_cache, v_cache, meta, self.scale)
        return out.reshape(out.shape[0], -1)


class RMSNorm(nn.Module):
    """Llama's RMSNorm: normalise in float32, cast back, then scale (the order transformers uses).

    `add_norm` also adds a sublayer's output to the residual stream first; on the Triton backend that is
    one fused kernel instead of ~9 torch ops (see kernels/triton_fused.py).
    """

    def __init__(self, hidden_size: int, eps: float, backend: str = "torch"):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.fused_ops: ops.Backend = "triton" if backend == "triton" else "torch"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps, backend=self.fused_ops)[0]

    def add_norm(
        self, x: torch.Tensor, residual: torch.Tensor, multiplier: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(s), s) for the new residual stream s = residual + x * multiplier."""
        return ops.rms_norm(x, self.weight, self.eps, residual, multiplier, backend=self.fused_ops)


def set_fused_ops(model: nn.Module, backend: ops.Backend) -> None:
    """Run a model's norms, rotary embeddings and SwiGLU activations on `backend`'s ops ("torch": separate
    torch ops, "triton": one fused kernel each). Models get their attention backend's at construction;
    `python -m benchmarks.bench --device cuda` builds a "plain, unfused" engine with this to measure the fusion."""
    for module in model.modules():
        if hasattr(module, "fused_ops"):
            setattr(module, "fused_ops", backend)  # noqa: B010 (a plain attribute, not a submodule)


def rope_parameters(hf_config: Any) -> dict[str, Any]:
    """The rope settings of a config as one dict with rope_type and rope_theta (transformers 4.x or 5.x)."""
    params = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None)
    params = dict(params or {})
    params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type", params.get("type")) or "default"
    return params


def rope_inv_freq(head_dim: int, params: dict[str, Any], max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """Float32 inverse frequencies [head_dim // 2] and the cos/sin scale for one rope variant.

    Written as transformers' modeling_rope_utils writes them, so the tables agree bit for bit.
    """
    rope_type, base, dim = params["rope_type"], float(params["rope_theta"]), head_dim
    if rope_type not in SUPPORTED_ROPE_TYPES:
        supported = ", ".join(SUPPORTED_ROPE_TYPES)
        raise ValueError(f"rope_type {rope_type!r} is not supported; supported: {supported}")
    # Explicit CPU: models are built under a meta-device context, but these small tables must be real.
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim)
    inv_freq = 1.0 / pos_freqs
    if rope_type == "default":
        return inv_freq, 1.0
    original = params.get("original_max_position_embeddings") or max_position_embeddings
    # yarn may leave factor out: then it is the ratio of the extended to the original context.
    factor: float = params.get("factor") or max_position_embeddings / original
    if rope_type == "linear":
        return inv_freq / factor, 1.0
    if rope_type == "llama3":
        low_wavelen = original / params["low_freq_factor"]
        high_wavelen = original / params["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        # Between the two wavelengths, interpolate smoothly from scaled to unscaled.
        smooth = (original / wavelen - params["low_freq_factor"]) / (
            params["high_freq_factor"] - params["low_freq_factor"]
        )
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, scaled), 1.0

    # yarn: extrapolate high frequencies, interpolate low ones, ramp linearly in between.
    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        m, m_all = params.get("mscale"), params.get("mscale_all_dim")
        attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    beta_fast, beta_slow = params.get("beta_fast") or 32, params.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    inv_freq_interp = 1.0 / (factor * pos_freqs)
    return inv_freq_interp * (1 - extrapolation) + inv_freq * extrapolation, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """Neox-style rotary embedding with cos/sin tables computed once per (device, dtype), grown on demand.

    The model computes (cos, sin) for the batch's positions once per forward and every layer reuses them.
    """

    def __init__(self, head_dim: int, params: dict[str, Any], max_position_embeddings: int):
        super().__init__()
        self.inv_freq, self.attention_scaling = rope_inv_freq(head_dim, params, max_position_embeddings)
        self.max_position = max_position_embeddings
        self._cos: torch.Tensor | None = None  # [max_position, head_dim // 2] in the model's dtype
        self._sin: torch.Tensor | None = None

    def _build(self, num_positions: int, device: torch.device, dtype: torch.dtype) -> None:
        positions = torch.arange(num_positions, device=device).float()
        freqs = positions[:, None] * self.inv_freq.to(device)[None, :]  # [num_positions, head_dim // 2]
        self._cos = (freqs.cos() * self.attention_scaling).to(dtype)
        self._sin = (freqs.sin() * self.attention_scaling).to(dtype)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for each position: [num_tokens, 1, head_dim // 2], ready to broadcast over heads."""
        cos = self._cos
        if cos is None or cos.device != positions.device or cos.dtype != dtype:
            self._build(self.max_position, positions.device, dtype)
        elif positions.device.type == "cpu" and positions.numel() and int(positions.max()) >= cos.shape[0]:
            # Only CPU checks for growth: on CUDA the check would sync; positions there stay < max_model_len.
            self._build(2 * int(positions.max()) + 1, positions.device, dtype)
        assert self._cos is not None and self._sin is not None
        return self._cos[positions].unsqueeze(1), self._sin[positions].unsqueeze(1)


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation a config names (transformers' ACT2FN spelling)."""
    if name in ("silu", "swish"):
        return F.silu
    if name == "gelu":
        return F.gelu
    if name in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu
    raise ValueError(f"unsupported activation {name!r}")


class MergedLinear(nn.Linear):
    """Several linears with the same input fused into one matmul; output rows are the shards, in order.

    load_params() fills shard i of the weight (and bias) from the checkpoint's i-th projection.
    """

    def __init__(self, in_features: int, shard_sizes: list[int], bias: bool):
        super().__init__(in_features, sum(shard_sizes), bias=bias)
        self.shard_sizes = shard_sizes


class SwiGLU(nn.Module):
    """Llama MLP: down(act(gate(x)) * up(x)) with gate and up fused (and, for silu on Triton, the activation
    and product in one kernel)."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool, act: str = "silu", backend: str = "torch"):
        super().__init__()
        self.gate_up_proj = MergedLinear(hidden_size, [intermediate_size, intermediate_size], bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act = activation(act)
        self.fused_ops: ops.Backend = "triton" if backend == "triton" else "torch"
        self.fuse_act = act in ("silu", "swish")  # other activations stay separate ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.fuse_act:
            return self.down_proj(ops.silu_and_mul(gate_up, backend=self.fused_ops))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


# rename(hf_name) -> (our parameter name, shard index or None), or None for an entry skipped on purpose.
Rename = Callable[[str], "tuple[str, int | None] | None"]


@torch.no_grad()
def load_params(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]], rename: Rename) -> None:
    """Copy checkpoint tensors into model parameters (converting dtype/device), failing loudly.

    Raises ValueError on an unexpected key, a shape mismatch, or a parameter (shard) left unloaded.
    """
    params = dict(model.named_parameters())
    expected: set[tuple[str, int | None]] = set()
    for name in params:
        shards = _shard_sizes(model, name)
        if shards:
            expected.update((name, i) for i in range(len(shards)))
        else:
            expected.add((name, None))
    loaded: set[tuple[str, int | None]] = set()
    unexpected: list[str] = []
    for hf_name, tensor in weights:
        target = rename(hf_name)
        if target is None:
            continue
        name, shard = target
        if name not in params:
            unexpected.append(hf_name)
            continue
        dest = params[name].data
        if shard is not None:
            sizes = _shard_sizes(model, name)
            assert sizes is not None, f"{hf_name} maps to shard {shard} of unsharded {name}"
            dest = dest.narrow(0, sum(sizes[:shard]), sizes[shard])
        if dest.shape != tensor.shape:
            raise ValueError(
                f"shape mismatch for {hf_name}: checkpoint {tuple(tensor.shape)}, model {tuple(dest.shape)}"
            )
        dest.copy_(tensor)
        loaded.add((name, shard))
    if unexpected:
        raise ValueError(f"unexpected checkpoint weights ({len(unexpected)}): {unexpected[:10]}")
    missing = sorted(f"{n}[{s}]" if s is not None else n for n, s in expected - loaded)
    if missing:
        raise ValueError(f"checkpoint is missing weights ({len(missing)}) for: {missing[:10]}")


def _shard_sizes(model: nn.Module, param_name: str) -> list[int] | None:
    module = model.get_submodule(param_name.rsplit(".", 1)[0]) if "." in param_name else model
    return module.shard_sizes if isinstance(module, MergedLinear) else None
