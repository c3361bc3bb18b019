"""Hugging Face transformers baselines for `benchmarks.bench`, run in the same process, dtype and threads."""

from __future__ import annotations

import time
from typing import Any

import torch


class TransformersBaseline:
    """transformers `generate` (one request at a time) and `generate_batch` (its continuous batching)."""

    def __init__(self, path: str, dtype: torch.dtype, device: str = "cpu") -> None:
        from transformers import AutoModelForCausalLM

        self.device = torch.device(device)
        model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        self.model = model.to(self.device).eval()

    def _sync(self) -> None:
        # CUDA runs asynchronously: a timer read before the queued kernels finish measures nothing.
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def generate(self, prompt_ids: list[int], max_new_tokens: int) -> float:
        """Seconds to produce exactly max_new_tokens tokens greedily (EOS ignored)."""
        ids = torch.tensor([prompt_ids], device=self.device)
        self._sync()
        start = time.perf_counter()
        self.model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0,
        )  # fmt: skip
        self._sync()
        return time.perf_counter() - start

    def decode_tokens_per_s(self, prompt_ids: list[int], max_new_tokens: int) -> float:
        """Decode-only speed: the time of N tokens minus the time of 1 token (the prefill), per token."""
        t_one = min(self.generate(prompt_ids, 1) for _ in range(2))
        t_all = self.generate(prompt_ids, max_new_tokens)
        return (max_new_tokens - 1) / max(t_all - t_one, 1e-9)

    @torch.inference_mode()
    def static_compiled_decode_tokens_per_s(self, prompt_ids: list[int], max_new_tokens: int) -> float:
        """Decode-only speed of transformers' own fast path: a static KV cache of one fixed size (so one
        compiled decode step serves every prompt), which `generate` compiles on a GPU with
        torch.compile(mode="reduce-overhead"), i.e. CUDA graphs."""
        import inspect

        from transformers import StaticCache

        if not hasattr(self, "_static"):
            self._static = StaticCache(config=self.model.config, max_cache_len=2048)
            # transformers 5.2x passes the cache as `cache`, earlier releases as `past_key_values`.
            check = inspect.getsource(type(self.model)._valid_auto_compile_criteria)
            self._cache_kw = "cache" if 'model_kwargs.get("cache")' in check else "past_key_values"

        def timed(n: int) -> float:
            self._static.reset()
            ids = torch.tensor([prompt_ids], device=self.device)
            self._sync()
            start = time.perf_counter()
            self.model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                pad_token_id=0, **{self._cache_kw: self._static},
            )  # fmt: skip
            self._sync()
            return time.perf_counter() - start

        t_one = min(timed(1) for _ in range(2))
        t_all = timed(max_new_tokens)
        return (max_new_tokens - 1) / max(t_all - t_one, 1e-9)

    def prompt_lookup_tokens_per_s(self, prompt_ids: list[int], max_new_tokens: int) -> float:
        """transformers' assisted generation with prompt lookup (its training-free speculation)."""
        ids = torch.tensor([prompt_ids], device=self.device)
        self._sync()
        start = time.perf_counter()
        with torch.inference_mode():
            self.model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0, prompt_lookup_num_tokens=10,
            )  # fmt: skip
        self._sync()
        return max_new_tokens / (time.perf_counter() - start)

    def generate_batch_tokens_per_s(self, prompts: list[list[int]], max_new_tokens: int) -> float | None:
        """Aggregate tokens/s of transformers' own continuous batching, or None where it cannot run here."""
        from transformers import GenerationConfig

        cfg = GenerationConfig(
            max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=-1, pad_token_id=0,
        )  # fmt: skip
        try:
            start = time.perf_counter()
            outs = self.model.generate_batch(inputs=prompts, generation_config=cfg, progress_bar=False)
            self._sync()
            elapsed = time.perf_counter() - start
        except Exception as exc:  # its paged attention path is CUDA-first; report instead of dying
            print(f"  transformers generate_batch unavailable: {type(exc).__name__}: {exc}")
            return None
        total = sum(len(o.generated_tokens) for o in outs.values())
        return total / elapsed
