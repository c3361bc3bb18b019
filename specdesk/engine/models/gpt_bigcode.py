"""GPTBigCode (StarCoder, SantaCoder, granite-*-code base models): multi-query attention, learned positions.

Pre-LayerNorm blocks: x + c_proj(attn(c_attn(ln_1(x)))), then x + mlp(ln_2(x)); lm_head usually tied to wte.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from specdesk.engine.attention_metadata import AttentionMetadata
from specdesk.engine.models import CausalLM
from specdesk.engine.models.layers import KVCache, PagedAttention, activation, load_params


class GPTBigCodeAttention(nn.Module):
    """c_attn packs q (all heads) then k then v (one kv head when multi_query) in one matmul."""

    def __init__(self, hf_config: Any, backend: str):
        super().__init__()
        hidden, h = hf_config.hidden_size, hf_config.num_attention_heads
        self.num_heads, self.head_dim = h, hidden // h
        self.num_kv_heads = 1 if hf_config.multi_query else h
        kv_dim = self.num_kv_heads * self.head_dim
        self.c_attn = nn.Linear(hidden, hidden + 2 * kv_dim)
        self.c_proj = nn.Linear(hidden, hidden)
        scale = self.head_dim**-0.5 if hf_config.scale_attn_weights else 1.0
        self.attn = PagedAttention(h, self.num_kv_heads, self.head_dim, scale, backend)

    def forward(self, x: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata) -> torch.Tensor:
        qkv = self.c_attn(x).view(x.shape[0], self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        q, k, v = qkv.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=1)
        return self.c_proj(self.attn(q, k, v, kv_cache, meta))


class GPTBigCodeMLP(nn.Module):
    def __init__(self, hf_config: Any):
        super().__init__()
        inner = hf_config.n_inner if hf_config.n_inner is not None else 4 * hf_config.hidden_size
        self.c_fc = nn.Linear(hf_config.hidden_size, inner)
        self.c_proj = nn.Linear(inner, hf_config.hidden_size)
        self.act = activation(hf_config.activation_function)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPTBigCodeBlock(nn.Module):
    def __init__(self, hf_config: Any, backend: str):
        super().__init__()
        eps = hf_config.layer_norm_epsilon
        self.ln_1 = nn.LayerNorm(hf_config.hidden_size, eps=eps)
        self.attn = GPTBigCodeAttention(hf_config, backend)
        self.ln_2 = nn.LayerNorm(hf_config.hidden_size, eps=eps)
        self.mlp = GPTBigCodeMLP(hf_config)

    def forward(self, x: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), kv_cache, meta)
        return x + self.mlp(self.ln_2(x))


class GPTBigCodeModel(nn.Module):
    def __init__(self, hf_config: Any, backend: str):
        super().__init__()
        self.wte = nn.Embedding(hf_config.vocab_size, hf_config.hidden_size)
        self.wpe = nn.Embedding(hf_config.max_position_embeddings, hf_config.hidden_size)
        self.h = nn.ModuleList(GPTBigCodeBlock(hf_config, backend) for _ in range(hf_config.num_hidden_layers))
        self.ln_f = nn.LayerNorm(hf_config.hidden_size, eps=hf_config.layer_norm_epsilon)


class GPTBigCodeForCausalLM(CausalLM):
    """GPTBigCode causal LM over a paged KV cache (see engine/models/__init__.py for the interface)."""

    def __init__(self, hf_config: Any, backend: str = "torch"):
        super().__init__()
        if getattr(hf_config, "add_cross_attention", False):
            raise ValueError("GPTBigCode with cross-attention is not a causal LM we can serve")
        self.num_layers = hf_config.num_hidden_layers
        self.hidden_size, self.vocab_size = hf_config.hidden_size, hf_config.vocab_size
        self.num_heads = hf_config.num_attention_heads
        self.head_dim = self.hidden_size // self.num_heads
        self.num_kv_heads = 1 if hf_config.multi_query else self.num_heads
        self.transformer = GPTBigCodeModel(hf_config, backend)
        tied = bool(getattr(hf_config, "tie_word_embeddings", True))
        self.lm_head = None if tied else nn.Linear(self.hidden_size, self.vocab_size, bias=False)

    def forward(
        self,
        input_ids: torch.Tensor,  # int64 [num_tokens]
        positions: torch.Tensor,  # int64 [num_tokens]
        kv_caches: list[KVCache],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Hidden states after ln_f, [num_tokens, hidden_size]; writes this pass's K/V."""
        x = self.transformer.wte(input_ids) + self.transformer.wpe(positions)
        for block, kv_cache in zip(self.transformer.h, kv_caches, strict=True):
            x = block(x, kv_cache, meta)
        return self.transformer.ln_f(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[n, hidden_size] -> float32 [n, vocab_size]."""
        weight = self.lm_head.weight if self.lm_head is not None else self.transformer.wte.weight
        packed = getattr(self, "packed_head", None)
        logits = packed(hidden) if packed is not None else F.linear(hidden, weight)
        return logits.float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load a Hugging Face GPTBigCodeForCausalLM state dict."""
        load_params(self, self._regroup_c_attn(weights), self._rename)

    def _rename(self, hf_name: str) -> tuple[str, int | None] | None:
        if hf_name == "lm_head.weight" and self.lm_head is None:
            return None  # tied to transformer.wte
        if hf_name.endswith((".attn.bias", ".attn.masked_bias")):
            return None  # causal-mask buffers that old checkpoints saved
        return hf_name, None

    def _regroup_c_attn(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        # Without multi_query, transformers lays c_attn out per head as [h, (q, k, v), d]; we want
        # [(q, k, v), h, d] so that q, k and v are contiguous blocks like in the multi-query layout.
        for name, tensor in weights:
            if ".attn.c_attn." in name and self.num_kv_heads != 1:
                h, d = self.num_heads, self.head_dim
                tensor = tensor.reshape(h, 3, d, *tensor.shape[1:]).transpose(0, 1).reshape(tensor.shape)
            yield name, tensor
