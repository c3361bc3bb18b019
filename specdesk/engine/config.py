"""The one frozen engine configuration, validated once and passed down."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from specdesk.engine.speculators import DEFAULT_SPECULATOR_DIR, reply_store

DType = Literal["float32", "bfloat16", "float16", "auto"]
Device = Literal["cpu", "cuda", "auto"]
AttentionBackend = Literal["auto", "torch", "triton"]
SpecTree = Literal["nodes", "paths"]


QUANTIZATIONS = (None, "int8", "q4_1", "int4", "auto")


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
    spec_pool_size: draft nodes the "nodes" tree ranks every step when spec_tree_width is None (the widest
      tree it may choose); None = the device default (SpecConfig). spec_max_kv_usage: speculate only while at
      most this fraction of KV pages is in use. spec_step_cost_prior: the cost of one more verified token, in
      plain steps, assumed until it is measured; None = the device default. spec_max_ngram_tokens: the
      n-gram draft's length at most where the conversation's own match reaches 16 tokens back and the request
      does not penalize repeats (other drafts: the request's depth, at most 4 and at most this); None = the
      device default (12 on CPU, 4 on CUDA). spec_reply_store: where a conversation has no
      n-gram match of its own, draft from the speculator folder's store of the model's own replies
      (speculators/reply_store.py; the default model ships one); False: only the conversation and the replies
      this engine has served. spec_mlp_ledger: where the MLP may rest (spec_rest), also rest it
      where its steps lose against themselves without it (speculators/mlp_ledger.py); False: the width policy
      alone decides. spec_confident_nodes: on the C kernels' CPU path, verify only the draft nodes whose path
      probability under the MLP speculator is at least what one more verified token costs (in plain steps, as measured),
      so each step's tree follows the speculator's confidence; False: the top nodes of the chosen width; None
      (default): where the MLP drafts alone, not beside the n-gram (measured on the AVX2 CPU, decoding alone:
      the MLP alone 1.13x of plain with it against 1.07x without; beside the n-gram 0.97-0.98x of the speed
      without it, no penalty, and 1.01x under the console's; docs/benchmarks.md).
    spec_rest: whether speculation may rest where it is measured not to pay (the MLP at width 0, the n-gram
      drafts by gating.MeasuredRest, the MLP ledger); None (default): on every CPU path, where verified tokens
      cost compute (on the torch path a pass of two tokens already costs 1.55-2.2x a one-token step: its
      matmuls leave the matrix-vector kernels), not on CUDA.
    enforce_eager: never use CUDA graphs (vLLM's name); on CUDA the speculator's proposal is otherwise one.
    quantization: None, "int8" (CPU): weights and activations in 8 bits, exact int32 sums, so speculation stays
      exact (models/int8_linear.py), "q4_1" (CPU): the same with 4-bit weights on GGUF's Q4_1 grid, a
      checkpoint's own codes where it holds them (a GGUF Q4_1 file, the default model), "int4" (CPU): the
      layers' weights in 4 bits for torch's kernel (models/int4_linear.py), or "auto": the C kernels on a CPU
      whose compiled kernel has AVX-512 VNNI or AVX2 when the dtype is not float32 (float32 stays the exact,
      unquantized oracle; dtype "auto" then means bf16 activations even where torch's bf16 matmuls are
      slow), none elsewhere; with AVX2 (where it was measured faster), Q4_1 weights wherever they are the
      checkpoint's own and int8 for the rest, else int8.
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
    spec_pool_size: int | None = None
    spec_max_kv_usage: float = 0.75
    spec_step_cost_prior: float | None = None
    spec_max_ngram_tokens: int | None = None
    spec_reply_store: bool = True
    spec_mlp_ledger: bool = True
    spec_confident_nodes: bool | None = None
    spec_rest: bool | None = None
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
        if self.spec_max_batch_size is not None and self.spec_max_batch_size < 0:
            raise ValueError(f"spec_max_batch_size must be >= 1 or None (auto), got {self.spec_max_batch_size}")
        if self.spec_pool_size is not None and self.spec_pool_size < 1:
            raise ValueError(f"spec_pool_size must be >= 1 or None, got {self.spec_pool_size}")
        if not 0.0 <= self.spec_max_kv_usage <= 1.0:
            raise ValueError(f"spec_max_kv_usage must be in [0, 1], got {self.spec_max_kv_usage}")
        if self.spec_step_cost_prior is not None and not 0.0 <= self.spec_step_cost_prior <= 1.0:
            raise ValueError(f"spec_step_cost_prior must be in [0, 1] or None, got {self.spec_step_cost_prior}")
        if self.spec_max_ngram_tokens is not None and self.spec_max_ngram_tokens < 1:
            raise ValueError(f"spec_max_ngram_tokens must be >= 1 or None, got {self.spec_max_ngram_tokens}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be None, 'int8', 'q4_1', 'int4' or 'auto', got {self.quantization!r}")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")


@dataclass(frozen=True)
class _DeviceDefaults:
    node_pool_size: int
    max_batch_size: int
    step_cost_prior: float
    max_ngram_tokens: int


# Where verifying an extra query token is nearly free until the batch fills the card (a GPU), speculation
# pays up to IBM's batch of 16 and a wide node tree; on a CPU every verified token costs compute, so the
# gate closes after batch 2 and the tree stays narrow. The prior is the cost of one more verified token
# in plain steps, used until StepCost has measured it. The n-gram's drafts of a match reaching far back (a
# passage or loop the conversation repeats; a small model's greedy text loops) are accepted nearly whole at 12
# tokens on the CPU (docs/benchmarks.md); CUDA keeps 4 until measured there.
_DEVICE_DEFAULTS = {
    "cuda": _DeviceDefaults(node_pool_size=64, max_batch_size=16, step_cost_prior=0.002, max_ngram_tokens=4),
    "cpu": _DeviceDefaults(node_pool_size=12, max_batch_size=2, step_cost_prior=0.04, max_ngram_tokens=12),
}


@dataclass(frozen=True)
class SpecConfig:
    """Speculative decoding's settings, resolved once from an EngineConfig and the device.

    mlp_dir / use_ngram: the speculators (see `resolve_speculator`). tree, tree_width: EngineConfig's
    spec_tree and spec_tree_width. node_pool_size: draft nodes the "nodes" tree ranks every step (a fixed
    width ranks exactly that many); the "paths" tree ranks max(n_candidates, tree_width) paths, which needs
    the speculator's own config. max_batch_size, max_kv_usage: the gate (speculate only up to that many
    running requests and that KV usage). step_cost_prior: the cost of one verified token in plain steps
    until it is measured. cuda_graphs: capture the node proposal as CUDA graphs (CUDA, not enforce_eager).
    reply_store: the n-gram speculator's frozen reply store file, or None (`_reply_store`). mlp_ledger,
    confident_nodes, rest: EngineConfig's spec_mlp_ledger, spec_confident_nodes and spec_rest (resolved).
    """

    mlp_dir: str | None
    use_ngram: bool
    tree: SpecTree = "nodes"
    tree_width: int | None = None
    node_pool_size: int = 12
    max_batch_size: int = 2
    max_kv_usage: float = 0.75
    step_cost_prior: float = 0.04
    max_ngram_tokens: int = 4
    cuda_graphs: bool = False
    reply_store: str | None = None
    mlp_ledger: bool = True
    confident_nodes: bool = True
    rest: bool = False

    @classmethod
    def resolve(cls, config: EngineConfig, device_type: str) -> SpecConfig | None:
        """The settings for an engine on `device_type` ("cuda" or "cpu"); None when speculation is off."""
        mlp_dir, use_ngram = resolve_speculator(config.speculator, config.model is None)
        if mlp_dir is None and not use_ngram:
            return None
        defaults = _DEVICE_DEFAULTS["cuda" if device_type == "cuda" else "cpu"]
        prior = config.spec_step_cost_prior
        return cls(
            mlp_dir=mlp_dir,
            use_ngram=use_ngram,
            tree=config.spec_tree,
            tree_width=config.spec_tree_width,
            node_pool_size=config.spec_tree_width or config.spec_pool_size or defaults.node_pool_size,
            max_batch_size=config.spec_max_batch_size or defaults.max_batch_size,
            max_kv_usage=config.spec_max_kv_usage,
            step_cost_prior=defaults.step_cost_prior if prior is None else prior,
            max_ngram_tokens=config.spec_max_ngram_tokens or defaults.max_ngram_tokens,
            cuda_graphs=device_type == "cuda" and not config.enforce_eager,
            reply_store=_reply_store(config, mlp_dir) if use_ngram else None,
            mlp_ledger=config.spec_mlp_ledger,
            confident_nodes=not use_ngram if config.spec_confident_nodes is None else config.spec_confident_nodes,
            rest=device_type != "cuda" if config.spec_rest is None else config.spec_rest,
        )


def _reply_store(config: EngineConfig, mlp_dir: str | None) -> str | None:
    """The n-gram speculator's frozen store of the model's own replies (speculators/reply_store.py): the MLP
    speculator folder's, or for the built-in default model the shipped speculator's (its token ids are that
    model's); None where there is none or spec_reply_store is off."""
    if not config.spec_reply_store:
        return None
    folder = mlp_dir if mlp_dir is not None else (str(DEFAULT_SPECULATOR_DIR) if config.model is None else None)
    path = reply_store.find(folder)
    return None if path is None else str(path)


def resolve_speculator(name: str | None, is_default_model: bool) -> tuple[str | None, bool]:
    """(MLP speculator folder or None, use n-gram) for an EngineConfig.speculator value.

    "auto": the shipped speculator + n-gram for the default model, n-gram alone otherwise; "default":
    the shipped one (+ n-gram); "ngram": n-gram alone; "mlp:<dir>" or "<dir>": that MLP speculator alone;
    "<dir>+ngram": both; None / "none": off.
    """
    if name is None or name == "none":
        return None, False
    if name == "auto":
        return (str(DEFAULT_SPECULATOR_DIR), True) if is_default_model and _has_default() else (None, True)
    if name == "default":
        if not _has_default():
            raise FileNotFoundError(f"no shipped speculator in {DEFAULT_SPECULATOR_DIR}")
        return str(DEFAULT_SPECULATOR_DIR), True
    if name == "ngram":
        return None, True
    with_ngram = name.endswith("+ngram")
    path = name.removesuffix("+ngram").removeprefix("mlp:")
    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(
            f"speculator {name!r}: expected 'auto', 'default', 'ngram', None, or a folder with an "
            f"mlp_speculator config.json (optionally suffixed '+ngram')"
        )
    return path, with_ngram


def _has_default() -> bool:
    return (DEFAULT_SPECULATOR_DIR / "config.json").is_file()
