"""Shared test setup: CPU only, few threads (CI has 2 cores), deterministic."""

import os
from collections.abc import Iterator

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
torch.manual_seed(0)


def _run_engines_on(device: str) -> None:
    """SPECDESK_TEST_DEVICE=cuda re-runs the engine tests on a GPU (the `device` tool's check, never CI):
    every engine a test builds for the CPU runs there instead, with the backend that device would pick
    ("auto": Triton on CUDA), so exactness and speculation tests cover the production GPU path."""
    from specdesk.engine import config

    post_init = config.EngineConfig.__post_init__

    def moved(self: config.EngineConfig) -> None:
        if self.device == "cpu":
            object.__setattr__(self, "device", device)
            object.__setattr__(self, "attention_backend", "auto")
        post_init(self)

    config.EngineConfig.__post_init__ = moved  # type: ignore[method-assign]


if os.environ.get("SPECDESK_TEST_DEVICE"):
    _run_engines_on(os.environ["SPECDESK_TEST_DEVICE"])


@pytest.fixture
def restore_threads() -> Iterator[None]:
    """Give the next test the threads this one had (it may set them, or fail with an int8 LLM still open)."""
    from specdesk.kernels import cpu_lib

    previous = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(previous)
        cpu_lib.set_num_threads(None)
