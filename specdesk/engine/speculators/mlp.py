"""IBM's MLP speculator (arXiv 2404.19124; fms-extras `MLPSpeculator`), loadable from the published format.

n_predict heads read the base model's last hidden state z (after its final norm) and guess the next
n_predict tokens, each head conditioned on the token guessed before it (an RNN over guesses):

    s_{-1} = z                       (or rmsnorm_noaffine(z) / sqrt(2) when scale_input)
    s_i    = GELU(LN_i(proj_i(s_{i-1}) + (emb_weight / state_weight) * emb_i[t_{i-1}]))
    logits_i = head_i(s_i)

t_{-1} is the token the base model just produced; t_i is head i's guess. With
state_weight = 0.5 ** (0.5 / n_predict) the base state keeps half of the magnitude by the last head, and
emb_weight = sqrt((1 - state_weight**2) * inner_dim / 2) balances the embedding against it. (fms-extras
writes `state_weight * proj + emb_weight * emb`; LN_i is scale invariant, so dividing by state_weight,
as vLLM does, changes nothing but eps.)

`tie_to_base`: emb_i and head_i are the base model's own frozen input embedding and LM head (EAGLE does
the same), so a speculator for a small base model holds only its projections and norms.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from specdesk.kernels import cpu_fused

_CONFIG_KEYS = (
    "vocab_size",
    "emb_dim",
    "inner_dim",
    "n_predict",
    "top_k_tokens_per_head",
    "n_candidates",
    "tie_weights",
    "scale_input",
    "tie_to_base",
)
_OWN_KEYS = ("base_checksum", "draft_heads", "draft_penalty")  # ours, beyond the published config
_PREFIX = "speculator."


@dataclass(frozen=True)
class MLPSpeculatorConfig:
    """The Hugging Face `mlp_speculator` config plus `tie_to_base`.

    inner_dim == 0 means inner_dim = emb_dim (IBM's convention). top_k_tokens_per_head has one entry per
    head; left empty it is IBM's [5, 4, 3] (cut or extended with 2s to n_predict).
    tie_to_base: emb_i and head_i are the base model's input embedding and LM head (not saved; re-tied by
    `from_pretrained(path, base_model)`); `base_checksum` fingerprints that embedding to catch a wrong base.
    draft_heads: > 0 gives each head its own trained [draft_heads, inner_dim] rows over a draft vocabulary
    of that size (saved as `draft_head.i`; started from the base head's rows) instead of the base's rows.
    draft_penalty: trained with each request's repetition penalty applied to the heads' own logits over the
    tokens seen so far (draft_penalty.py); the engine applies it the same way.
    """

    vocab_size: int
    emb_dim: int
    inner_dim: int = 0
    n_predict: int = 3
    top_k_tokens_per_head: list[int] = field(default_factory=list)
    n_candidates: int = 5
    tie_weights: bool = False
    scale_input: bool = False
    tie_to_base: bool = False
    base_checksum: float | None = None
    draft_heads: int = 0
    draft_penalty: bool = False

    def __post_init__(self) -> None:
        if not self.top_k_tokens_per_head:
            default = ([5, 4, 3] + [2] * self.n_predict)[: self.n_predict]
            object.__setattr__(self, "top_k_tokens_per_head", default)
        object.__setattr__(self, "top_k_tokens_per_head", [int(k) for k in self.top_k_tokens_per_head])
        if self.n_predict < 1:
            raise ValueError(f"n_predict must be >= 1, got {self.n_predict}")
        if len(self.top_k_tokens_per_head) != self.n_predict or min(self.top_k_tokens_per_head) < 1:
            raise ValueError(
                f"top_k_tokens_per_head needs {self.n_predict} entries >= 1, got {self.top_k_tokens_per_head}"
            )
        if self.tie_weights and self.n_predict < 2:
            raise ValueError("tie_weights needs n_predict >= 2 (nothing to share with one head)")
        if self.draft_heads and (self.tie_weights or not self.tie_to_base):
            raise ValueError("draft_heads needs tie_to_base and separate heads (no tie_weights)")
        if self.tie_to_base and self.dim != self.emb_dim:
            raise ValueError(f"tie_to_base needs inner_dim == emb_dim (the base hidden size), got {self.inner_dim}")

    @property
    def dim(self) -> int:
        """The resolved inner dimension."""
        return self.inner_dim or self.emb_dim

    def to_hf_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k in (*_CONFIG_KEYS, "base_checksum") or (k in _OWN_KEYS and v)}
        return {"architectures": ["MLPSpeculatorPreTrainedModel"], "model_type": "mlp_speculator", **d}

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> MLPSpeculatorConfig:
        if d.get("model_type", "mlp_speculator") != "mlp_speculator":
            raise ValueError(f"not an mlp_speculator config: model_type={d.get('model_type')!r}")
        keys = {k: d[k] for k in (*_CONFIG_KEYS, *_OWN_KEYS) if k in d}
        return cls(**keys)


class SpeculatorNorm(nn.Module):
    """RMS-style norm (no mean subtraction) with a learned scale and bias: w * x / sqrt(mean(x^2) + eps) + b.

    `affine=False` is the parameter-free ln0 used by `scale_input`.
    """

    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None
        self.bias = nn.Parameter(torch.zeros(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight is not None and self.bias is not None:
            x = x * self.weight + self.bias
        return x


class MLPSpeculator(nn.Module):
    """The speculator; parameter names match the published checkpoints (without the `speculator.` prefix)."""

    def __init__(self, config: MLPSpeculatorConfig):
        super().__init__()
        self.config = config
        n, d, v, e = config.n_predict, config.dim, config.vocab_size, config.emb_dim
        self.n_predict, self.inner_dim, self.emb_dim, self.vocab_size = n, d, e, v
        self.state_weight = 0.5 ** (0.5 / n)
        self.emb_weight = math.sqrt((1 - self.state_weight**2) * d / 2)
        tied = config.tie_weights

        def shared(make: Any, count: int) -> nn.ModuleList:
            # tie_weights: one module object repeated, as vLLM does; named_parameters() lists it once.
            return nn.ModuleList([make()] * count if tied else [make() for _ in range(count)])

        self.proj = nn.ModuleList([nn.Linear(e, d, bias=False)])
        self.proj.extend(shared(lambda: nn.Linear(d, d, bias=False), n - 1))
        self.ln = shared(lambda: SpeculatorNorm(d), n)
        self.ln0 = SpeculatorNorm(e, affine=False) if config.scale_input else None
        # tie_to_base: the base's frozen weights, held as plain tensors so they are neither trained nor saved.
        self.base_emb: torch.Tensor | None = None
        self.base_head: torch.Tensor | None = None
        self.draft_vocab: torch.Tensor | None = None  # restrict_vocab(): the token ids the heads score
        self.draft_heads: list[torch.Tensor] = []
        self.packed_heads: list[nn.Module] = []  # draft_vocab.pack_for_cpu(): float32 in, float32 out
        self.fused_norm_act = False  # pack_for_cpu(int8=True): norm_act in one C call (kernels/cpu_fused.py)
        self.emb = None if config.tie_to_base else shared(lambda: nn.Embedding(v, d), n)
        self.head = None if config.tie_to_base else shared(lambda: nn.Linear(d, v, bias=False), n)
        rows = config.draft_heads
        self.draft_head = nn.ParameterList([torch.zeros(rows, d) for _ in range(n)]) if rows else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """IBM's init: embeddings and linears ~ N(0, 1/sqrt(inner_dim)) (truncated), norms scale 1, bias 0."""
        for m in self.modules():
            if isinstance(m, nn.Embedding | nn.Linear):
                nn.init.trunc_normal_(m.weight, 0.0, 1 / math.sqrt(self.inner_dim))
            elif isinstance(m, SpeculatorNorm) and m.weight is not None and m.bias is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ---- tying to the base model ------------------------------------------------------------------
    def tie_to_base(self, base_model: nn.Module) -> None:
        """Point emb_i and head_i at the base model's frozen input embedding and LM head."""
        assert self.config.tie_to_base, "this speculator has its own embeddings and heads"
        emb, head = base_weights(base_model)
        if tuple(emb.shape) != (self.vocab_size, self.inner_dim) or tuple(head.shape) != tuple(emb.shape):
            raise ValueError(
                f"base weights {tuple(emb.shape)}/{tuple(head.shape)} do not fit a speculator "
                f"with vocab {self.vocab_size} and dim {self.inner_dim}"
            )
        expected = self.config.base_checksum
        if expected is not None and not math.isclose(embedding_checksum(emb), expected, rel_tol=1e-2, abs_tol=1e-2):
            raise ValueError(
                f"base model does not match: embedding checksum {embedding_checksum(emb):.4f}, "
                f"speculator trained on {expected:.4f}"
            )
        self.base_emb, self.base_head = emb.detach(), head.detach()

    # ---- the recurrence ---------------------------------------------------------------------------
    def embed(self, i: int, token_ids: torch.Tensor) -> torch.Tensor:
        """emb_i[t] for int64 token ids of any shape -> [..., inner_dim]."""
        if self.emb is not None:
            return self.emb[i](token_ids)
        assert self.base_emb is not None, "tie_to_base speculator used before tie_to_base(base_model)"
        return F.embedding(token_ids, self.base_emb)

    def restrict_vocab(self, token_ids: torch.Tensor) -> None:
        """Score only these tokens from now on (see draft_vocab.py): float32 copies of their head rows, or
        the speculator's own trained rows (config.draft_heads), which must be for exactly these tokens."""
        self.packed_heads = []
        if self.draft_head is not None:
            if len(token_ids) != self.config.draft_heads:
                raise ValueError(f"{len(token_ids)} draft tokens for heads trained on {self.config.draft_heads}")
            self.draft_heads, self.draft_vocab = list(self.draft_head), token_ids.to(self.draft_head[0].device)
            return
        weights: list[torch.Tensor] = []
        for i in range(self.n_predict):
            w = self.head[i].weight if self.head is not None else self.base_head
            assert isinstance(w, torch.Tensor), "tie_to_base speculator used before tie_to_base(base_model)"
            weights.append(w)
        rows: dict[int, torch.Tensor] = {}  # tied heads share one copy
        self.draft_heads = [rows.setdefault(id(w), w.detach()[token_ids].float()) for w in weights]
        self.draft_vocab = token_ids.to(weights[0].device)

    def init_draft_heads(self) -> None:
        """Start the own draft heads at the base head's rows of the draft vocabulary (after restrict_vocab)."""
        assert self.draft_head is not None and self.draft_vocab is not None and self.base_head is not None
        with torch.no_grad():
            for p in self.draft_head:
                p.copy_(self.base_head[self.draft_vocab].float())

    def columns(self) -> torch.Tensor:
        """token id -> logits column, -100 outside a restricted vocabulary (cached per vocabulary)."""
        from specdesk.engine.speculators.draft_penalty import column_map

        ref = self.draft_vocab if self.draft_vocab is not None else self.base_emb
        device = ref.device if ref is not None else next(self.parameters()).device
        key = (None if self.draft_vocab is None else self.draft_vocab.data_ptr(), device)
        cached = getattr(self, "_columns", None)
        if cached is None or cached[0] != key:
            cached = (key, column_map(self.vocab_size, self.draft_vocab, device))
            self._columns = cached
        return cached[1]

    def vocab_ids(self, index: torch.Tensor) -> torch.Tensor:
        """Token ids of logits columns (identity unless the vocabulary is restricted)."""
        return self.draft_vocab[index] if self.draft_vocab is not None else index

    def logits(self, i: int, state: torch.Tensor) -> torch.Tensor:
        """head_i(s_i): [..., inner_dim] -> [..., vocab] (state dtype; the caller upcasts if needed).

        With a restricted vocabulary: float32 logits over those tokens only (columns map via vocab_ids).
        """
        if self.draft_vocab is not None:
            if self.packed_heads and not torch.is_grad_enabled():
                return self.packed_heads[i](state.float()).float()
            rows = self.draft_heads[i]  # trained rows keep the speculator's dtype (bf16 on a GPU)
            return F.linear(state.to(rows.dtype), rows).float()
        if self.head is not None:
            return self.head[i](state)
        assert self.base_head is not None, "tie_to_base speculator used before tie_to_base(base_model)"
        # Compute in the base head's dtype: casting the [vocab, d] matrix up would cost more than the matmul.
        return F.linear(state.to(self.base_head.dtype), self.base_head)

    def scale(self, z: torch.Tensor) -> torch.Tensor:
        """s_{-1}: the base hidden state, or rmsnorm_noaffine(z) / sqrt(2) when scale_input."""
        return self.ln0(z) / math.sqrt(2) if self.ln0 is not None else z

    def step(self, i: int, state: torch.Tensor, prev_token_ids: torch.Tensor) -> torch.Tensor:
        """s_i = GELU(LN_i(proj_i(s_{i-1}) + (emb_weight / state_weight) * emb_i[t_{i-1}])).

        state [..., d_in] and prev_token_ids [...] broadcast over any leading shape.
        """
        z = self.embed(i, prev_token_ids).to(state.dtype)
        x = self.proj[i](state) + (self.emb_weight / self.state_weight) * z
        return self.norm_act(i, x)

    def norm_act(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """GELU(LN_i(x)), exact (erf) GELU; on the CPU int8 path (fused_norm_act) one C call with erf by a
        polynomial (within 1.5e-7), which `step` and `candidates.Int8NodeRanker` share, so they rank alike."""
        ln = self.ln[i]
        assert isinstance(ln, SpeculatorNorm)
        if self.fused_norm_act and not torch.is_grad_enabled() and ln.weight is not None and ln.bias is not None:
            out = cpu_fused.norm_gelu(x, ln.weight, ln.bias, ln.eps)
            if out is not None:
                return out
        return F.gelu(ln(x))

    def forward(self, hidden: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """Teacher-forced pass (training): per-head states for every position, [n_predict, b, n, inner_dim].

        hidden [b, n, emb_dim]: base hidden states, hidden[:, j] read token x_j. token_ids is the sequence
        shifted left by one, token_ids[:, j] = x_{j+1} (the base's own next token), at least
        n + n_predict - 1 long. Head i at position j reads t_{i-1} = token_ids[:, j + i] and is trained to
        predict token_ids[:, j + i + 1] = x_{j+i+2}: i + 2 tokens ahead of the hidden state's own token.
        Call `logits(i, states[i])` per head: [n_predict, b, n, vocab] at once rarely fits in memory.
        """
        n = hidden.shape[1]
        assert token_ids.shape[1] >= n + self.n_predict - 1, (hidden.shape, token_ids.shape, self.n_predict)
        state = self.scale(hidden)
        out = []
        for i in range(self.n_predict):
            state = self.step(i, state, token_ids[:, i : i + n])
            out.append(state)
        return torch.stack(out)

    # ---- the Hugging Face format ------------------------------------------------------------------
    def save_pretrained(self, path: str | Path, dtype: torch.dtype | None = None) -> None:
        """Write config.json and model.safetensors with `speculator.`-prefixed keys (vLLM/fms-extras format).

        Shared (tied) weights are saved once, under the first head's name, as vLLM's loader expects.
        dtype: store the weights in this dtype (e.g. bfloat16 to halve the file).
        """
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = self.config
        if config.tie_to_base and config.base_checksum is None and self.base_emb is not None:
            config = MLPSpeculatorConfig(**{**asdict(config), "base_checksum": embedding_checksum(self.base_emb)})
        (path / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
        tensors = {_PREFIX + k: p.detach().to(dtype or p.dtype).contiguous().cpu() for k, p in self.named_parameters()}
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        base_model: nn.Module | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> MLPSpeculator:
        """Load a published `mlp_speculator` checkpoint (safetensors or pytorch_model.bin) from a folder.

        A `tie_to_base` speculator needs `base_model` to re-tie its embedding and heads.
        """
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"no config.json in speculator folder {path}")
        config = MLPSpeculatorConfig.from_hf_dict(json.loads(config_file.read_text()))
        model = cls(config)
        model.load_state(_read_weights(path))
        if dtype is not None or device is not None:
            model.to(device=device, dtype=dtype)
        if config.tie_to_base:
            if base_model is None:
                raise ValueError(f"speculator {path} is tied to its base model: pass base_model=")
            model.tie_to_base(base_model)
        return model.eval()

    def load_state(self, weights: dict[str, torch.Tensor]) -> None:
        """Copy checkpoint tensors in; aliases of tied weights (emb.1.weight, ...) are accepted, ignored."""
        params = dict(self.named_parameters())
        aliases = set(self.state_dict()) - set(params)
        seen = set()
        for name, tensor in weights.items():
            key = name.removeprefix(_PREFIX)
            if key in params:
                if params[key].shape != tensor.shape:
                    raise ValueError(
                        f"{name}: checkpoint shape {tuple(tensor.shape)}, model {tuple(params[key].shape)}"
                    )
                with torch.no_grad():
                    params[key].copy_(tensor)
                seen.add(key)
            elif key not in aliases:
                raise ValueError(f"unexpected speculator weight {name!r}")
        missing = set(params) - seen
        if missing:
            raise ValueError(f"speculator checkpoint lacks {sorted(missing)}")


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    if files:
        from safetensors.torch import load_file

        return {k: v for f in files for k, v in load_file(str(f)).items()}
    bins = sorted(path.glob("pytorch_model*.bin"))
    if bins:
        return {k: v for f in bins for k, v in torch.load(f, map_location="cpu", weights_only=True).items()}
    raise FileNotFoundError(f"no *.safetensors or pytorch_model*.bin in {path}")


def base_weights(base_model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(input embedding [vocab, hidden], LM head [vocab, hidden]) of our engine's model or a transformers one.

    Engine models keep `model.embed_tokens` and `lm_head` (None when tied to the embedding).
    """
    get_in = getattr(base_model, "get_input_embeddings", None)
    if callable(get_in):  # transformers PreTrainedModel
        emb = get_in().weight
        out = base_model.get_output_embeddings()  # type: ignore[operator]
        return emb, (out.weight if out is not None else emb)
    inner = getattr(base_model, "model", None)
    if inner is None or not hasattr(inner, "embed_tokens"):
        raise TypeError(f"cannot find the input embedding of {type(base_model).__name__}")
    emb = inner.embed_tokens.weight
    head = getattr(base_model, "lm_head", None)
    return emb, (head.weight if head is not None else emb)


def embedding_checksum(emb: torch.Tensor) -> float:
    """A cheap fingerprint of a base embedding (mean |w| of the first 256 rows, float64)."""
    return float(emb[:256].detach().double().abs().mean())
