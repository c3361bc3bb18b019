"""The int8 CPU path's decoder layers (int8 or Q4_1 weights) in one C call (`specdesk/kernels/cpu_model.c`).

`LlamaForCausalLM.forward` on the int8 CPU path calls the C kernels layer by layer from Python; this runs the
same kernels in the same order from C, bit for bit the same result, without ~4 ms of Python between them per
pass of the default model (a third of a decode step). It serves every bf16 pass: decode steps, verifications
and prefill chunks.
"""

from __future__ import annotations

import ctypes
from typing import Any

import torch

from specdesk.engine.attention_metadata import AttentionMetadata
from specdesk.engine.models.int8_linear import Int8Linear, Q4Linear
from specdesk.kernels import cpu_int8, cpu_lib

_p, _i64, _f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float


class _QLinear(ctypes.Structure):
    _fields_ = [("w", _p), ("wsum", _p), ("ws", _p), ("dm", _p), ("bias", _p), ("n", _i64), ("k", _i64)]


class _Layer(ctypes.Structure):
    _fields_ = [("input_norm", _p), ("post_norm", _p), ("qkv", _QLinear), ("o", _QLinear), ("gate_up", _QLinear),
                ("down", _QLinear), ("k_cache", _p), ("v_cache", _p)]  # fmt: skip


class _Pass(ctypes.Structure):
    _fields_ = [("t", _i64), ("num_seqs", _i64), ("max_blocks", _i64), ("block_size", _i64), ("width", _i64),
                ("slots", _p), ("block_tables", _p), ("seq_lens", _p), ("query_start", _p), ("tree_mask", _p),
                ("cos", _p), ("sin", _p)]  # fmt: skip


class _Shape(ctypes.Structure):
    _fields_ = [("hidden", _i64), ("heads", _i64), ("kv_heads", _i64), ("head_dim", _i64), ("inter", _i64),
                ("eps", _f32), ("residual_multiplier", _f32), ("scale", _f32)]  # fmt: skip


def _qlinear(module: Any) -> _QLinear:
    bias = module.bias.data_ptr() if module.bias is not None else None
    if isinstance(module, Q4Linear):  # cpu_model.c takes a linear with scales dm for a W4A8 one
        q = module.weight_q4
        return _QLinear(q.packed.data_ptr(), None, None, q.dm.data_ptr(), bias, q.out_features, q.in_features)
    w = module.weight_int8
    return _QLinear(w.packed.data_ptr(), w.wsum.data_ptr(), w.scales.data_ptr(), None, bias, w.out_features,
                    w.in_features)  # fmt: skip


class CpuStack:
    """The layers of a Llama-family model on the int8 CPU path, ready to run in one call (see the module doc)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        args = model.args
        attn = model.model.layers[0].self_attn
        self.shape = _Shape(args.hidden_size, args.num_heads, args.num_kv_heads, args.head_dim,
                            args.intermediate_size, args.rms_norm_eps,
                            args.residual_multiplier, attn.attn.scale)  # fmt: skip
        self._layers: tuple[int, Any] | None = None  # (kv pool address, the ctypes layer array)

    @classmethod
    def build(cls, model: Any) -> CpuStack | None:
        """A stack for `model`, or None where the one-call path does not apply (then every pass takes the
        Python path, with the same numbers)."""
        from specdesk.engine.models.llama import LlamaForCausalLM

        lib = cpu_lib.library()
        if lib is None or not isinstance(model, LlamaForCausalLM):
            return None
        args = model.args
        if args.head_dim % 16 or args.head_dim > 256 or args.hidden_act not in ("silu", "swish"):
            return None
        layer: Any
        for layer in model.model.layers:
            linears = (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj)
            norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
            quantized = all(isinstance(m, (Int8Linear, Q4Linear)) for m in linears)
            if not quantized or any(w.dtype != torch.bfloat16 for w in norms):
                return None
        return cls(model)

    def _layer_array(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
        key = kv_caches[0][0].data_ptr()
        if self._layers is None or self._layers[0] != key:
            array = (_Layer * len(kv_caches))()
            for i, (layer, (k, v)) in enumerate(zip(self.model.model.layers, kv_caches, strict=True)):
                assert k.is_contiguous() and v.is_contiguous() and k.dtype == torch.bfloat16
                array[i] = _Layer(
                    layer.input_layernorm.weight.data_ptr(), layer.post_attention_layernorm.weight.data_ptr(),
                    _qlinear(layer.self_attn.qkv_proj), _qlinear(layer.self_attn.o_proj),
                    _qlinear(layer.mlp.gate_up_proj), _qlinear(layer.mlp.down_proj), k.data_ptr(), v.data_ptr(),
                )  # fmt: skip
            self._layers = (key, array)
        return self._layers[1]

    def run(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:  # fmt: skip
        """(the last layer's MLP output, the residual stream it joins) for embeddings x [t, hidden] (bf16), or
        None for a pass this path does not take (another dtype, no tokens)."""
        if x.dtype != torch.bfloat16 or x.shape[0] == 0:
            return None
        s, t = self.shape, x.shape[0]
        x = x.contiguous().clone()  # the C call writes each layer's output over it
        cos, sin = cos.reshape(t, -1).contiguous(), sin.reshape(t, -1).contiguous()
        slots = meta.slot_mapping.to(torch.int64).contiguous()
        tables = meta.block_tables.to(torch.int32).contiguous()
        lens = torch.tensor(meta.seq_lens_list, dtype=torch.int32)
        starts = meta.query_start_loc.to(torch.int32).contiguous()
        mask = meta.tree_mask.to(torch.uint8).contiguous() if meta.tree_mask is not None else None
        block_size = kv_caches[0][0].shape[1]
        pass_ = _Pass(t, len(meta.seq_lens_list), tables.shape[1], block_size, mask.shape[1] if mask is not None else 0,
                      slots.data_ptr(), tables.data_ptr(), lens.data_ptr(), starts.data_ptr(),
                      mask.data_ptr() if mask is not None else None, cos.data_ptr(), sin.data_ptr())  # fmt: skip
        widest = max(s.hidden, s.inter)
        residual, h = torch.empty_like(x), torch.empty_like(x)
        qkv = x.new_empty(t, (s.heads + 2 * s.kv_heads) * s.head_dim)
        attn, gate_up, act = x.new_empty(t, s.heads * s.head_dim), x.new_empty(t, 2 * s.inter), x.new_empty(t, s.inter)
        xu = torch.empty(t, widest, dtype=torch.uint8)
        xs = torch.empty(t, widest // cpu_int8.GROUP, dtype=torch.float32)
        sums = torch.empty_like(xs)
        status = cpu_lib.library().sd_llama_layers(  # type: ignore[union-attr]
            ctypes.byref(self._layer_array(kv_caches)), len(kv_caches), ctypes.byref(s), ctypes.byref(pass_),
            x.data_ptr(), residual.data_ptr(), h.data_ptr(), qkv.data_ptr(), attn.data_ptr(), gate_up.data_ptr(),
            act.data_ptr(), xu.data_ptr(), xs.data_ptr(), sums.data_ptr(), cpu_lib.num_threads(),
        )  # fmt: skip
        return (x, residual) if status == 0 else None
