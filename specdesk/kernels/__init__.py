"""Attention kernels behind plain functions. Triton is imported lazily, only on CUDA or when forced.

`specdesk.kernels.ops` is the entry point: write_kv / paged_attention with backend "torch" (the twins in
`specdesk.kernels.reference`) or "triton" (`specdesk.kernels.triton_kv`, `specdesk.kernels.triton_attention`), and
resolve_backend for the engine config. `python -m benchmarks.kernels_gpu` checks and times them on a GPU.
"""
