"""Attention kernels behind plain functions. Triton is imported lazily, only on CUDA or when forced."""
