"""Model families behind one interface, and the registry that picks one from a Hugging Face config.

Every model class subclasses `CausalLM`: the model runner calls only forward() and compute_logits().
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from specdesk.engine.attention_metadata import AttentionMetadata


class CausalLM(nn.Module):
    """What the model runner relies on. The geometry attributes size the paged KV cache."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    # The output projection prepacked for a fast CPU matmul (pack_for_cpu sets it as a submodule).
    packed_head: nn.Module | None

    def forward(
        self,
        input_ids: torch.Tensor,  # int64 [num_tokens], a flattened ragged batch
        positions: torch.Tensor,  # int64 [num_tokens]
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],  # per layer, [num_blocks, block_size, kvh, d]
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Hidden states after the final norm, [num_tokens, hidden_size]; writes K/V via meta.slot_mapping."""
        raise NotImplementedError

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[n, hidden_size] -> float32 [n, vocab_size] (lm_head and any logits scaling applied)."""
        raise NotImplementedError

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Fill every parameter from (Hugging Face name, tensor) pairs; raises on missing/unexpected keys."""
        raise NotImplementedError


# architecture name in config.json -> "module:class"
ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "specdesk.engine.models.llama:LlamaForCausalLM",
    "MistralForCausalLM": "specdesk.engine.models.llama:LlamaForCausalLM",
    "Qwen2ForCausalLM": "specdesk.engine.models.llama:LlamaForCausalLM",
    "GraniteForCausalLM": "specdesk.engine.models.llama:LlamaForCausalLM",
    "GPTBigCodeForCausalLM": "specdesk.engine.models.gpt_bigcode:GPTBigCodeForCausalLM",
}

_MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "granite": "GraniteForCausalLM",
    "gpt_bigcode": "GPTBigCodeForCausalLM",
}


def model_class(hf_config: Any) -> type[CausalLM]:
    """The class serving this config's architecture; ValueError naming the supported ones otherwise."""
    import importlib

    names = list(getattr(hf_config, "architectures", None) or [])
    if not names and getattr(hf_config, "model_type", None) in _MODEL_TYPES:
        names = [_MODEL_TYPES[hf_config.model_type]]  # configs read from GGUF files list no architectures
    for name in names:
        if name in ARCHITECTURES:
            module, cls = ARCHITECTURES[name].split(":")
            found: type[CausalLM] = getattr(importlib.import_module(module), cls)
            return found
    raise ValueError(
        f"unsupported architecture {names or getattr(hf_config, 'model_type', None)!r}; "
        f"supported: {', '.join(ARCHITECTURES)}"
    )


__all__ = ["ARCHITECTURES", "CausalLM", "model_class"]


def pack_for_cpu(model: CausalLM, dtype: torch.dtype, device: torch.device) -> bool:
    """Prepack every linear and the output projection for oneDNN when that is the fast bf16 CPU path.

    Numerically identical to the unpacked matmuls; returns whether anything was packed.
    """
    from specdesk.engine.models.packed_linear import PackedLinear, can_pack, pack_linears

    if not can_pack(dtype, device):
        return False
    lm_head = getattr(model, "lm_head", None)
    pack_linears(model, skip=lm_head if isinstance(lm_head, nn.Module) else None)  # packed_head replaces it
    model.packed_head = PackedLinear(output_weight(model), None)
    return True


def output_weight(model: nn.Module) -> torch.Tensor:
    lm_head = getattr(model, "lm_head", None)
    name = "model.embed_tokens" if hasattr(model, "model") else "transformer.wte"  # tied to the input embedding
    weight = lm_head.weight if lm_head is not None else model.get_submodule(name).weight
    assert isinstance(weight, torch.Tensor), type(weight)
    return weight
