"""Attention kernels behind plain functions. Triton is imported lazily, only on CUDA or when forced.

`kernels.ops` is the entry point: write_kv / paged_attention with backend "torch" (the twins in
`kernels.reference`) or "triton" (`kernels.triton_kv`, `kernels.triton_attention`), and
resolve_backend for the engine config. `python -m kernels.bench` checks and times them on a GPU.
"""
