"""Builds and loads the CPU kernels (`cpu_*.c`: int8 and W4A8 matmuls, attention, fused ops, the Llama layer
stack, the sampler's pass over a row) as one shared library, with the ctypes signature of every entry point.

The C files are compiled on first use with the machine's C compiler and `-march=native` into a per-user
cache (`SPECDESK_KERNEL_CACHE`, default ~/.cache/specdesk/kernels), keyed by the sources, flags and machine:
no Python build step and no torch headers (about a second of gcc, once). `library()` is None where no
compiler works; callers then use the torch twins.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from functools import cache
from pathlib import Path

import torch

_SOURCES = [
    Path(__file__).with_name(name)
    for name in (
        "cpu_pool.c",
        "cpu_int8.c",
        "cpu_q4.c",
        "cpu_attention.c",
        "cpu_attention_avx2.c",
        "cpu_attention_grouped.c",
        "cpu_fused.c",
        "cpu_model.c",
        "cpu_sampling.c",
    )
]
_HEADERS = [Path(__file__).with_name(name) for name in ("cpu_common.h", "cpu_attention.h", "cpu_attention_avx2.h")]
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-shared", "-fPIC", "-pthread"]


def _cache_dir() -> Path:
    base = os.environ.get("SPECDESK_KERNEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "specdesk", "kernels"
    )
    return Path(base)


def _cpu_flags() -> str:
    """The CPU's feature flags (Linux): -march=native code built on one CPU may not run on another, so a cache
    shared between machines (a home directory, a volume) keeps one build per instruction set."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


@cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel, built once per source version and machine; None where no C compiler works."""
    return build()


def build(folder: Path | None = None, cache_dir: Path | None = None) -> ctypes.CDLL | None:
    """The kernels compiled from the C files of `folder` (default: this package's; another revision's copies,
    for benchmarks.attention_ab) into cache_dir (default: the per-user cache), or the build already there."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    sources = [folder / p.name for p in _SOURCES] if folder else _SOURCES
    headers = [folder / p.name for p in _HEADERS] if folder else _HEADERS
    source = b"".join(path.read_bytes() for path in [*sources, *headers])
    machine = " ".join([compiler, *_FLAGS, os.uname().machine, _cpu_flags()])
    key = hashlib.sha256(source + machine.encode()).hexdigest()[:16]
    target = (cache_dir or _cache_dir()) / f"specdesk_cpu_{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        # Build beside the target and rename: a concurrent process never loads a half-written file.
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            command = [compiler, *_FLAGS, *map(str, sources), "-o", str(built), "-lm"]
            result = subprocess.run(command, capture_output=True)
            if result.returncode != 0:
                return None
            built.replace(target)
    lib = ctypes.CDLL(str(target))
    i64, ptr, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.sd_quantize_rows.argtypes = [ptr, c_int, i64, i64, ptr, ptr, c_int]
    lib.sd_linear.argtypes = [ptr, ptr, i64, i64, ptr, ptr, ptr, ptr, i64, ptr, c_int, c_int]
    if hasattr(lib, "sd_q4_path"):  # absent from revisions before it (benchmarks.attention_ab builds those)
        lib.sd_quantize_rows_q4.argtypes = [ptr, c_int, i64, i64, ptr, ptr, ptr, c_int]
        lib.sd_linear_q4.argtypes = [ptr, ptr, ptr, i64, i64, ptr, ptr, ptr, i64, ptr, c_int, c_int]
        lib.sd_q4_path.restype = c_int
    lib.sd_has_vnni.restype = c_int
    lib.sd_int8_path.restype = c_int
    lib.sd_paged_attention.argtypes = [ptr, i64, *[ptr] * 6, *[i64] * 8, ctypes.c_float, ptr, c_int]
    lib.sd_paged_attention.restype = c_int
    lib.sd_attention_path.restype = c_int
    lib.sd_rms_norm.argtypes = [ptr, ptr, ptr, ctypes.c_float, ctypes.c_float, i64, i64, ptr, ptr, c_int]
    lib.sd_rotary.argtypes = [ptr, i64, ptr, ptr, i64, i64, i64]
    lib.sd_silu_mul.argtypes = [ptr, i64, i64, ptr, c_int]
    if hasattr(lib, "sd_norm_gelu"):  # absent from revisions before it (the kernel A/B benchmarks build those)
        lib.sd_norm_gelu.argtypes = [ptr, i64, i64, ptr, ptr, ctypes.c_float, ptr]
    if hasattr(lib, "sd_nucleus_scan"):  # absent from revisions before it
        lib.sd_nucleus_scan.argtypes = [ptr, i64, ctypes.c_float, ctypes.c_float, ptr, ptr, ptr]
        lib.sd_nucleus_scan.restype = i64
    lib.sd_llama_layers.argtypes = [ptr, i64, ptr, ptr, *[ptr] * 10, c_int]
    lib.sd_llama_layers.restype = c_int
    return lib


_threads: int | None = None
_engines = 0  # int8 engines alive in the process (ThreadClaim)
_torch_threads = 0  # torch's threads before the first of them took them
_claims = threading.Lock()


def set_num_threads(threads: int | None) -> None:
    """Threads the kernels split a call over (None: torch.get_num_threads() of the calling thread). An int8
    engine sets it while it lives (ThreadClaim)."""
    global _threads
    _threads = threads


class ThreadClaim:
    """An int8 engine's hold on the process's threads, from construction to `release()`.

    While any claim is held, the kernels split over the claimed threads and torch's own ops run on one
    (ModelRunner says why). The first claim reads torch's count and sets the kernels' to `threads` or that
    count; a later one sets them only when given `threads` (torch is at one by then). Releasing the last claim
    gives torch its count back and the kernels follow torch again. torch.set_num_threads reaches the calling
    thread and threads started afterwards, so release from the thread that built the engine.
    """

    def __init__(self, threads: int | None) -> None:
        global _engines, _torch_threads
        with _claims:
            if _engines == 0:
                _torch_threads = torch.get_num_threads()
            if threads or _engines == 0:
                set_num_threads(threads or _torch_threads)
            torch.set_num_threads(1)
            _engines += 1
            self._held = True

    def release(self) -> None:
        """Idempotent and thread-safe: a claim is given back once, whoever calls it how often."""
        global _engines
        with _claims:
            if not self._held:
                return
            self._held = False
            _engines -= 1
            if _engines == 0:
                torch.set_num_threads(_torch_threads)
                set_num_threads(None)


def num_threads() -> int:
    """The threads a kernel call splits over."""
    return _threads or torch.get_num_threads()


def available() -> bool:
    """True when the C kernel compiled and loaded on this machine."""
    return library() is not None


def has_vnni() -> bool:
    """True when the loaded kernel uses AVX-512 VNNI (the fast path); False for the AVX2 or portable loops."""
    return int8_path() == "vnni"


def q4_path() -> str | None:
    """The W4A8 matmul path of the loaded kernel: "vnni" (its tile with AVX-512 VNNI's vpdpbusd), "avx2" (AVX2
    with F16C), "portable", or None."""
    lib = library()
    return None if lib is None else ("portable", "avx2", "vnni")[lib.sd_q4_path()]


def int8_path() -> str | None:
    """The int8 matmul path of the loaded kernel: "vnni" (AVX-512 VNNI), "avx2", "portable", or None."""
    lib = library()
    return None if lib is None else ("portable", "avx2", "vnni")[lib.sd_int8_path()]
