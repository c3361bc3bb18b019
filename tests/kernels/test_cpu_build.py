"""The CPU kernels must build wherever a C compiler is: a compile error would otherwise only show as the
kernel tests skipping and the int8 path falling back to its (much slower) torch twins."""

from __future__ import annotations

import os
import shutil

import pytest

from specdesk.kernels import cpu_lib


def test_the_kernels_build_where_there_is_a_compiler() -> None:
    if not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler on this machine")
    lib = cpu_lib.library()
    assert lib is not None, "the C kernels failed to compile (see specdesk/kernels/cpu_lib.py for the command)"
    flags: list[str] = []
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            flags = f.read().split()
    if "avx512_vnni" in flags:
        assert cpu_lib.has_vnni() and cpu_lib.int8_path() == "vnni"
    elif "avx2" in flags:
        assert cpu_lib.int8_path() == "avx2"
    if "avx512_bf16" in flags and "avx512f" in flags:
        assert lib.sd_attention_path() == 4
    elif "avx2" in flags and "fma" in flags and "avx512f" not in flags:
        assert lib.sd_attention_path() == 2


def test_every_c_file_and_header_keys_the_build_cache() -> None:
    """A source or header left out of cpu_lib's lists would not rebuild the cached library when it changes."""
    folder = cpu_lib._SOURCES[0].parent
    assert set(cpu_lib._SOURCES) == set(folder.glob("*.c"))
    assert set(cpu_lib._HEADERS) == set(folder.glob("*.h"))
