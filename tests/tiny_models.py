"""Tiny random-weight checkpoints of every supported family, built offline, for tests across the repo.

make_tiny_model(family, tmp_path) saves a 2-layer, hidden-64 model with a tokenizer trained here on a
small in-repo corpus (sentencepiece for "llama", byte-level BPE otherwise) and a ChatML chat template.
Weights are seeded; the EOS row of the output layer is scaled down so greedy decoding never picks EOS.
"""

from __future__ import annotations

import functools
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel

FAMILIES = ["llama", "mistral", "qwen2", "granite", "gpt_bigcode"]

CORPUS = """\
Hello, thank you for contacting customer care. How can I help you today?
I would like to reset my password, the login page keeps saying my account is locked.
I am sorry about that. I have unlocked your account; please try to sign in again.
My order number is 48213 and it has not arrived yet. Where is my package?
Orders ship within two business days and arrive in three to five days.
Can I get a refund for a damaged item? The box was crushed and the lamp is broken.
Yes, refunds take five business days after we receive the returned item.
Please share a photo of the damage and we will send a prepaid return label.
Is there anything else I can help you with today? Have a wonderful day!
The invoice shows a charge of $29.99 for the premium plan, billed monthly.
You can cancel your subscription at any time from the account settings page.
Thanks for waiting. I checked with the warehouse: your parcel left this morning.
Bonjour ! Merci de votre patience. Ünïcödé text, emojis 🙂 and tabs\tare fine too.
"""

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Shared shape: GQA with 4 query heads over 2 kv heads.
_BASE: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "initializer_range": 0.1,  # wide logits: fewer near-ties in greedy comparisons
}


def make_tiny_model(family: str, tmp_path: Path, *, seed: int = 0, name: str | None = None, **overrides: Any) -> Path:
    """Save a tiny checkpoint of `family` (one of FAMILIES) under tmp_path and return its directory.

    overrides go to the config (e.g. tie_word_embeddings=True, rope_parameters={...}).
    Defaults: llama untied with a sentencepiece tokenizer; mistral untied with head_dim 32 != hidden/heads;
    qwen2 tied with random q/k/v biases; granite tied with non-trivial multipliers; gpt_bigcode multi-query.
    """
    from transformers import AutoModelForCausalLM

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")
    out = tmp_path / (name or f"tiny-{family}")
    out.mkdir(parents=True, exist_ok=False)
    tokenizer = _save_sentencepiece_tokenizer(out) if family == "llama" else _save_bpe_tokenizer(out)
    config = _config(family, tokenizer, overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _perturb(model, seed, tokenizer.eos_token_id)
    model.save_pretrained(out)
    return out


def _config(family: str, tokenizer: Any, overrides: dict[str, Any]) -> Any:
    from transformers import GPTBigCodeConfig, GraniteConfig, LlamaConfig, MistralConfig, Qwen2Config

    ids = {
        "vocab_size": len(tokenizer),  # every id the model can emit decodes to text
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if family == "gpt_bigcode":
        kwargs = {
            "n_embd": 64, "n_inner": 128, "n_layer": 2, "n_head": 4, "n_positions": 512,
            "multi_query": True, "activation_function": "gelu_pytorch_tanh", "initializer_range": 0.1,
        }  # fmt: skip
        return GPTBigCodeConfig(**{**ids, **kwargs, **overrides})
    if family == "llama":
        return LlamaConfig(**{**ids, **_BASE, "rope_parameters": rope, **overrides})
    if family == "mistral":
        extra = {"head_dim": 32, "sliding_window": None}  # head_dim * heads != hidden_size on purpose
        return MistralConfig(**{**ids, **_BASE, "rope_parameters": rope, **extra, **overrides})
    if family == "qwen2":
        return Qwen2Config(**{**ids, **_BASE, "rope_parameters": rope, "tie_word_embeddings": True, **overrides})
    multipliers = {"embedding_multiplier": 3.0, "residual_multiplier": 0.5, "attention_multiplier": 0.2,
                   "logits_scaling": 2.5}  # fmt: skip
    return GraniteConfig(
        **{**ids, **_BASE, "rope_parameters": rope, "tie_word_embeddings": True, **multipliers, **overrides}
    )


@torch.no_grad()
def _perturb(model: PreTrainedModel, seed: int, eos_token_id: int) -> None:
    # transformers initialises biases to 0 and norm weights to 1; randomise them so loading bugs show.
    gen = torch.Generator().manual_seed(seed + 1)
    for name, param in model.named_parameters():
        if name.endswith("bias"):
            param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
        elif param.ndim == 1:
            param.copy_(1.0 + torch.randn(param.shape, generator=gen) * 0.1)
    # A near-zero output row keeps the EOS logit near 0, below the top logit: generations run long.
    model.get_output_embeddings().weight[eos_token_id] *= 0.01


def _save_bpe_tokenizer(out: Path) -> Any:
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_bpe_json()),
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )
    tokenizer.save_pretrained(out)
    return AutoTokenizer.from_pretrained(out)


@functools.cache
def _trained_bpe_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(), trainer)
    return tok.to_str()


def _save_sentencepiece_tokenizer(out: Path) -> Any:
    """A Llama-style tokenizer: tokenizer.model (sentencepiece) + tokenizer_config.json, no tokenizer.json."""
    from transformers import AutoTokenizer

    (out / "tokenizer.model").write_bytes(train_sentencepiece())
    tokenizer_config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "<|im_end|>",
        "unk_token": "<unk>",
        "pad_token": "<unk>",
        "add_bos_token": True,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return AutoTokenizer.from_pretrained(out)


@functools.cache
def train_sentencepiece(vocab_size: int = 360) -> bytes:
    """A byte-fallback BPE sentencepiece model trained on CORPUS; returns the .model file's bytes."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines()),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=1.0,
        byte_fallback=True,  # any text round-trips, even characters the corpus never had
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        user_defined_symbols=["<|im_start|>", "<|im_end|>"],
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return model.getvalue()


def make_tiny_gguf(tmp_path: Path) -> Path:
    """The tiny "llama" checkpoint re-exported as an F32 GGUF file (llama.cpp layout), with its tokenizer.

    Returns the .gguf path; the source checkpoint sits next to it in tmp_path / "tiny-llama".
    """
    import gguf
    import numpy as np
    import sentencepiece as spm
    from safetensors.torch import load_file
    from transformers import AutoConfig

    src = make_tiny_model("llama", tmp_path)
    cfg = AutoConfig.from_pretrained(src)
    out = tmp_path / "tiny-llama.F32.gguf"
    writer = gguf.GGUFWriter(str(out), arch="llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)

    sp = spm.SentencePieceProcessor(model_proto=train_sentencepiece())
    pieces = [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    kinds = gguf.TokenType
    types = [
        kinds.UNKNOWN if sp.is_unknown(i) else kinds.CONTROL if sp.is_control(i) else kinds.BYTE if sp.is_byte(i)
        else kinds.USER_DEFINED if piece.startswith("<|") else kinds.NORMAL
        for i, piece in enumerate(pieces)
    ]  # fmt: skip
    writer.add_tokenizer_model("llama")
    writer.add_token_list(pieces)
    writer.add_token_scores([sp.get_score(i) for i in range(sp.vocab_size())])
    writer.add_token_types(types)
    writer.add_bos_token_id(cfg.bos_token_id)
    writer.add_eos_token_id(cfg.eos_token_id)
    writer.add_unk_token_id(0)
    writer.add_chat_template(CHAT_TEMPLATE)

    for name, tensor in load_file(src / "model.safetensors").items():
        array = tensor.numpy()
        # llama.cpp interleaves the rotary halves of q and k per head; transformers undoes it on load.
        if ".q_proj." in name or ".k_proj." in name:
            heads = cfg.num_attention_heads if ".q_proj." in name else cfg.num_key_value_heads
            array = array.reshape(heads, 2, -1, array.shape[-1]).swapaxes(1, 2).reshape(array.shape)
        writer.add_tensor(_gguf_name(name), np.ascontiguousarray(array, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


_GGUF_GLOBAL = {
    "model.embed_tokens.weight": "token_embd",
    "model.norm.weight": "output_norm",
    "lm_head.weight": "output",
}
_GGUF_LAYER = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _gguf_name(hf_name: str) -> str:
    if hf_name in _GGUF_GLOBAL:
        return f"{_GGUF_GLOBAL[hf_name]}.weight"
    parts = hf_name.split(".")  # model.layers.<i>.<module path>.weight
    return f"blk.{parts[2]}.{_GGUF_LAYER['.'.join(parts[3:-1])]}.{parts[-1]}"


def make_tiny_speculator(model_dir: Path, out: Path, n_predict: int = 3, seed: int = 1, **config: Any) -> Path:
    """A random-weight MLP speculator for the tiny model in `model_dir`, saved in the published format to
    `out`: its guesses are mostly wrong, which must never change any output. config: more MLPSpeculatorConfig."""
    from specdesk.engine.models.loader import load_model
    from specdesk.engine.speculators.mlp import MLPSpeculator, MLPSpeculatorConfig

    cfg = load_model(str(model_dir), "float32", "cpu").hf_config
    torch.manual_seed(seed)
    spec = MLPSpeculator(
        MLPSpeculatorConfig(vocab_size=cfg.vocab_size, emb_dim=cfg.hidden_size, n_predict=n_predict, **config)
    )
    spec.save_pretrained(out)
    return out
