"""The one frozen engine configuration, validated once and passed down."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

DType = Literal["float32", "bfloat16", "float16", "auto"]
Device = Literal["cpu", "cuda", "auto"]
AttentionBackend = Literal["auto", "torch", "triton"]
SpecTree = Literal["nodes", "paths"]


@dataclass(frozen=True)
class EngineConfig:
    """Everything that shapes an engine instance.

    model: local path, hub id or GGUF file; None means the built-in default (SmolLM2-135M-Instruct).
    kv_cache_memory_gib: budget for the paged KV pool; `num_blocks` overrides it (tests force preemption).
    max_num_batched_tokens: per-step token budget; a long prompt is prefilled in chunks of at most this.
    attention_backend: "auto" picks Triton kernels on CUDA and the torch path on CPU.
    speculator: "auto" (the shipped MLP speculator + n-gram for the default model, n-gram otherwise),
      "default", "ngram", a folder with an mlp_speculator checkpoint (suffix "+ngram" for both), or None.
    spec_max_batch_size: None = 16 on CUDA (IBM's gate) and 2 on CPU, where every verified token costs.
    spec_tree: how the MLP draft tree is chosen: "nodes" (the best draft nodes by path probability,
      speculators/candidates.py `propose_nodes`) or "paths" (IBM's best whole paths, top-k [5, 4, 3]).
    spec_tree_width: the tree's size, in draft nodes ("nodes") or candidate paths ("paths"); None = chosen
      per step from measured step cost and acceptance (speculators/tree_width.py), an int fixes it.
    enforce_eager: never use CUDA graphs (vLLM's name); on CUDA the speculator's proposal is otherwise one.
    quantization: None, or "int4" (CPU): the layers' weights in 4 bits, groups of 32 (models/int4_linear.py;
      GGUF Q4_1's own grid, so near-lossless for the default model, lossy for a full-precision checkpoint).
    """

    model: str | None = None
    tokenizer: str | None = None
    dtype: DType = "auto"
    device: Device = "auto"
    block_size: int = 16
    kv_cache_memory_gib: float = 1.0
    num_blocks: int | None = None
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    speculator: str | None = "auto"
    spec_max_batch_size: int | None = None  # speculate only up to this many running requests (None: auto)
    spec_tree: SpecTree = "nodes"
    spec_tree_width: int | None = None
    attention_backend: AttentionBackend = "auto"
    enforce_eager: bool = False
    quantization: str | None = None
    num_threads: int | None = None
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if self.block_size not in (8, 16, 32, 64, 128):
            raise ValueError(f"block_size must be one of 8, 16, 32, 64, 128, got {self.block_size}")
        if self.dtype not in ("float32", "bfloat16", "float16", "auto"):
            raise ValueError(f"dtype must be float32, bfloat16, float16 or auto, got {self.dtype!r}")
        if self.device not in ("cpu", "cuda", "auto"):
            raise ValueError(f"device must be cpu, cuda or auto, got {self.device!r}")
        if self.attention_backend not in ("auto", "torch", "triton"):
            raise ValueError(f"attention_backend must be auto, torch or triton, got {self.attention_backend!r}")
        if self.num_blocks is not None and self.num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2, got {self.num_blocks}")
        if self.kv_cache_memory_gib <= 0:
            raise ValueError(f"kv_cache_memory_gib must be > 0, got {self.kv_cache_memory_gib}")
        if self.spec_tree not in ("nodes", "paths"):
            raise ValueError(f"spec_tree must be 'nodes' or 'paths', got {self.spec_tree!r}")
        if self.spec_tree_width is not None and self.spec_tree_width < 1:
            raise ValueError(f"spec_tree_width must be >= 1 or None, got {self.spec_tree_width}")
        if self.quantization not in (None, "int4"):
            raise ValueError(f"quantization must be None or 'int4', got {self.quantization!r}")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
