"""The Llama family in one implementation: Llama, Mistral, Qwen2 (q/k/v biases) and Granite (multipliers).

Pre-norm decoder layers: x + attn(rmsnorm(x)), then x + swiglu(rmsnorm(x)); rotary positions; GQA.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from specdesk.engine.attention_metadata import AttentionMetadata
from specdesk.engine.models import CausalLM
from specdesk.engine.models.layers import (
    KVCache,
    MergedLinear,
    PagedAttention,
    RMSNorm,
    RotaryEmbedding,
    SwiGLU,
    load_params,
    rope_parameters,
)
from specdesk.kernels import ops


@dataclass(frozen=True)
class LlamaArgs:
    """The shape and the family quirks of a Llama-like model, read once from its Hugging Face config."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: dict[str, Any]
    hidden_act: str = "silu"
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    attention_scale: float | None = None  # None: head_dim ** -0.5; Granite: attention_multiplier
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0  # Granite divides logits by this

    @classmethod
    def from_hf(cls, c: Any) -> LlamaArgs:
        """Read a LlamaConfig, MistralConfig, Qwen2Config or GraniteConfig."""
        is_qwen2 = c.model_type == "qwen2"
        attention_bias = bool(getattr(c, "attention_bias", False))
        is_granite = c.model_type == "granite"
        return cls(
            vocab_size=c.vocab_size,
            hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size,
            num_layers=c.num_hidden_layers,
            num_heads=c.num_attention_heads,
            num_kv_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
            head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
            rms_norm_eps=c.rms_norm_eps,
            max_position_embeddings=c.max_position_embeddings,
            rope=rope_parameters(c),
            hidden_act=c.hidden_act,
            qkv_bias=is_qwen2 or attention_bias,
            o_bias=attention_bias and not is_qwen2,  # Qwen2's o_proj never has a bias
            mlp_bias=bool(getattr(c, "mlp_bias", False)),
            tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
            attention_scale=c.attention_multiplier if is_granite else None,
            embedding_multiplier=c.embedding_multiplier if is_granite else 1.0,
            residual_multiplier=c.residual_multiplier if is_granite else 1.0,
            logits_scaling=c.logits_scaling if is_granite else 1.0,
        )


class LlamaAttention(nn.Module):
    """Fused q/k/v projection, rotary on q and k in one call, paged attention, output projection."""

    def __init__(self, args: LlamaArgs, backend: str):
        super().__init__()
        h, kvh, d = args.num_heads, args.num_kv_heads, args.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = h, kvh, d
        self.qkv_proj = MergedLinear(args.hidden_size, [h * d, kvh * d, kvh * d], bias=args.qkv_bias)
        self.o_proj = nn.Linear(h * d, args.hidden_size, bias=args.o_bias)
        scale = args.attention_scale if args.attention_scale is not None else d**-0.5
        self.attn = PagedAttention(h, kvh, d, scale, backend)
        self.fused_ops: ops.Backend = "triton" if backend == "triton" else "torch"

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        num_tokens, d = x.shape[0], self.head_dim
        num_qk = self.num_heads + self.num_kv_heads
        qkv = self.qkv_proj(x)  # [T, (h + 2 * kvh) * d]
        # q and k heads are adjacent in the fused output: rotate them together.
        qk = ops.rotary(qkv[:, : num_qk * d].view(num_tokens, num_qk, d), cos, sin, backend=self.fused_ops)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        v = qkv[:, num_qk * d :].view(num_tokens, self.num_kv_heads, d)
        return self.o_proj(self.attn(q, k, v, kv_cache, meta))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block. The residual stream travels beside the sublayer output, so each norm also does the
    add before it (one fused kernel on Triton); on torch the ops and their order are transformers'."""

    def __init__(self, args: LlamaArgs, backend: str):
        super().__init__()
        self.self_attn = LlamaAttention(args, backend)
        self.mlp = SwiGLU(args.hidden_size, args.intermediate_size, args.mlp_bias, args.hidden_act, backend)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, backend)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, backend)
        self.residual_multiplier = args.residual_multiplier

    def forward(
        self,
        x: torch.Tensor,  # the previous layer's MLP output, or the embeddings for the first layer
        residual: torch.Tensor | None,  # the residual stream before x joins it; None for the first layer
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's MLP output, the residual stream it joins): the block's output is their sum."""
        mult = self.residual_multiplier
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm.add_norm(x, residual, mult)
        h = self.self_attn(h, cos, sin, kv_cache, meta)
        h, residual = self.post_attention_layernorm.add_norm(h, residual, mult)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, args: LlamaArgs, backend: str):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(args, backend) for _ in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps, backend)


class LlamaForCausalLM(CausalLM):
    """Llama, Mistral, Qwen2 and Granite causal LMs over a paged KV cache (see engine/models/__init__.py)."""

    def __init__(self, hf_config: Any, backend: str = "torch"):
        super().__init__()
        args = LlamaArgs.from_hf(hf_config)
        self.args = args
        self.num_layers, self.num_kv_heads, self.head_dim = args.num_layers, args.num_kv_heads, args.head_dim
        self.hidden_size, self.vocab_size = args.hidden_size, args.vocab_size
        self.model = LlamaModel(args, backend)
        self.rotary = RotaryEmbedding(args.head_dim, args.rope, args.max_position_embeddings)
        # Tied: the logits reuse model.embed_tokens.weight and there is no lm_head parameter at all.
        self.lm_head = None if args.tie_word_embeddings else nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def forward(
        self,
        input_ids: torch.Tensor,  # int64 [num_tokens]
        positions: torch.Tensor,  # int64 [num_tokens]
        kv_caches: list[KVCache],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Hidden states after the final norm, [num_tokens, hidden_size]; writes this pass's K/V."""
        x = self.model.embed_tokens(input_ids)
        if self.args.embedding_multiplier != 1.0:
            x = x * self.args.embedding_multiplier
        cos, sin = self.rotary(positions, x.dtype)
        stack = getattr(self, "cpu_stack", None)  # the int8 CPU path's layers in one C call, where it applies
        done = stack.run(x, cos, sin, kv_caches, meta) if stack is not None else None
        if done is not None:
            return self.model.norm.add_norm(done[0], done[1], self.args.residual_multiplier)[0]
        residual: torch.Tensor | None = None
        for layer, kv_cache in zip(self.model.layers, kv_caches, strict=True):
            x, residual = layer(x, residual, cos, sin, kv_cache, meta)
        if residual is None:  # no layers
            return self.model.norm(x)
        return self.model.norm.add_norm(x, residual, self.args.residual_multiplier)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[n, hidden_size] -> float32 [n, vocab_size]."""
        weight = self.lm_head.weight if self.lm_head is not None else self.model.embed_tokens.weight
        packed = getattr(self, "packed_head", None)
        logits = packed(hidden) if packed is not None else F.linear(hidden, weight)
        if self.args.logits_scaling != 1.0:
            logits = logits / self.args.logits_scaling
        return logits.float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load a Hugging Face state dict (names as in transformers' *ForCausalLM) into the fused layout."""
        load_params(self, weights, self._rename)

    def _rename(self, hf_name: str) -> tuple[str, int | None] | None:
        if hf_name.endswith("rotary_emb.inv_freq"):
            return None  # a non-persistent buffer that old conversions saved; we compute our own
        if hf_name == "lm_head.weight" and self.lm_head is None:
            return None  # tied: checkpoints may store the copy, the embedding is the source of truth
        module_path, _, param = hf_name.rpartition(".")  # "model.layers.0.self_attn.q_proj", "weight"
        parent, _, module = module_path.rpartition(".")
        if module not in _FUSED:
            return hf_name, None
        fused, shard = _FUSED[module]
        return f"{parent}.{fused}.{param}", shard


# Checkpoint projection -> (our fused module, shard index).
_FUSED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
