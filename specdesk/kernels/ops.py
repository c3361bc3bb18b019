"""The attention ops the model layers call, dispatched to the torch twins or the Triton kernels.

    from specdesk.kernels import ops
    backend = ops.resolve_backend(config.attention_backend, device)  # once, at engine start
    ops.write_kv(k, v, k_cache, v_cache, slot_mapping, backend=backend)
    out = ops.paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_lens, scale,
                              tree_mask, backend=backend, seq_lens_t=..., query_start_loc=...)

Signatures match `specdesk.kernels.reference` plus a keyword-only backend. Triton is imported only when the
"triton" backend actually runs (or `triton_available` is asked), never at import of this module.
"""

from __future__ import annotations

import importlib.util
from typing import Literal

import torch

from specdesk.kernels import cpu_fused, reference

Backend = Literal["torch", "triton", "cpu"]  # "cpu": the C kernels of the int8 CPU path (fused ops only)
_BACKENDS = ("torch", "triton")


def triton_available() -> bool:
    """True when the triton package is installed (does not import it)."""
    return importlib.util.find_spec("triton") is not None


def resolve_backend(requested: str, device: torch.device | str) -> Backend:
    """Turn a config value ("auto" | "torch" | "triton") into the backend to run on `device`.

    "auto" picks Triton on CUDA when installed and torch otherwise. An explicit "triton" on a device
    it cannot serve raises here, at startup, rather than at the first forward pass.
    """
    device = torch.device(device)
    if requested == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if requested == "torch":
        return "torch"
    if requested == "triton":
        if not triton_available():
            raise RuntimeError("attention_backend='triton' needs the triton package (pip install triton)")
        if device.type != "cuda":
            from specdesk.kernels.triton_common import is_interpreting

            if not is_interpreting():
                raise RuntimeError(
                    f"attention_backend='triton' needs a CUDA device, got {device} "
                    "(or TRITON_INTERPRET=1 for the slow CPU interpreter)"
                )
        return "triton"
    raise ValueError(f"attention backend must be one of auto, {', '.join(_BACKENDS)}, got {requested!r}")


def write_kv(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # int64 [num_tokens]
    *,
    backend: Backend = "torch",
) -> None:
    """Scatter new K/V rows into their page slots (in place); see `specdesk.kernels.reference.write_kv`."""
    if backend == "torch":
        reference.write_kv(key, value, k_cache, v_cache, slot_mapping)
        return
    _check_backend(backend)
    from specdesk.kernels import triton_kv

    triton_kv.write_kv(key, value, k_cache, v_cache, slot_mapping)


def paged_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # int32 [num_seqs, max_num_blocks]
    seq_lens: list[int],  # context length of each sequence including its query tokens
    query_lens: list[int],  # sum(query_lens) == num_tokens
    scale: float,
    tree_mask: torch.Tensor | None = None,  # bool [num_tokens, max_query_len], see AttentionMetadata
    *,
    backend: Backend = "torch",
    seq_lens_t: torch.Tensor | None = None,  # int32 [num_seqs] on query's device (triton only)
    query_start_loc: torch.Tensor | None = None,  # int32 [num_seqs + 1] on query's device (triton only)
    out: torch.Tensor | None = None,  # optional preallocated result, shape and dtype of query
) -> torch.Tensor:
    """Causal attention of each query token over its sequence's pages; [num_tokens, num_heads, head_dim].

    Same contract as `specdesk.kernels.reference.paged_attention`. For the Triton backend, pass the device
    copies `seq_lens_t` / `query_start_loc` (AttentionMetadata.seq_lens / .query_start_loc) so a launch
    needs no host-to-device copy; the lists are still read on the host (no device sync). The torch
    backend ignores those two tensors.
    """
    if backend == "torch":
        result = reference.paged_attention(
            query, k_cache, v_cache, block_tables, seq_lens, query_lens, scale, tree_mask
        )
        return result if out is None else out.copy_(result)
    _check_backend(backend)
    from specdesk.kernels import triton_attention

    return triton_attention.paged_attention(
        query,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        query_lens,
        scale,
        tree_mask,
        seq_lens_t=seq_lens_t,
        query_start_loc=query_start_loc,
        out=out,
    )


def _check_backend(backend: str) -> None:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(_BACKENDS)}, got {backend!r}")


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    multiplier: float = 1.0,
    *,
    backend: Backend = "torch",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(s), s) for s = residual + x * multiplier (or x); see `specdesk.kernels.reference.rms_norm`."""
    if backend == "cpu":
        fused = cpu_fused.rms_norm(x, weight, eps, residual, multiplier)
        return fused if fused is not None else reference.rms_norm(x, weight, eps, residual, multiplier)
    if backend == "torch":
        return reference.rms_norm(x, weight, eps, residual, multiplier)
    _check_backend(backend)
    from specdesk.kernels import triton_fused

    return triton_fused.rms_norm(x, weight, eps, residual, multiplier)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, backend: Backend = "torch") -> torch.Tensor:
    """x [T, H, D] rotated by cos, sin [T, 1, D // 2]. Triton and cpu rotate x in place and return it; torch
    returns a new tensor: callers use the result and never read x again."""
    if backend == "cpu":
        rotated = cpu_fused.rotary(x, cos, sin)
        return rotated if rotated is not None else reference.rotary(x, cos, sin)
    if backend == "torch":
        return reference.rotary(x, cos, sin)
    _check_backend(backend)
    from specdesk.kernels import triton_fused

    return triton_fused.rotary(x, cos, sin)


def silu_and_mul(gate_up: torch.Tensor, *, backend: Backend = "torch") -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate | up]; see `specdesk.kernels.reference.silu_and_mul`."""
    if backend == "cpu":
        out = cpu_fused.silu_and_mul(gate_up)
        return out if out is not None else reference.silu_and_mul(gate_up)
    if backend == "torch":
        return reference.silu_and_mul(gate_up)
    _check_backend(backend)
    from specdesk.kernels import triton_fused

    return triton_fused.silu_and_mul(gate_up)
