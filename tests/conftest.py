"""Shared test setup: CPU only, few threads (CI has 2 cores), deterministic."""

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
torch.manual_seed(0)
