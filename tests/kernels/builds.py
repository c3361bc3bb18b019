"""The CPU kernels built with one more compiler flag (a path this machine's native build does not take), through
a compiler wrapper that cpu_lib's own build step calls: same sources, same flags otherwise, same argtypes."""

from __future__ import annotations

import ctypes
import os
import shlex
import shutil

import pytest

from specdesk.kernels import cpu_lib


def build_with(flag: str, tmp: str) -> ctypes.CDLL | None:
    """The library built with `flag` into the cache folder tmp; None without an x86-64 compiler that takes it."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None or os.uname().machine != "x86_64":
        return None
    wrapper = os.path.join(tmp, "cc")
    with open(wrapper, "w") as f:
        f.write(f'#!/bin/sh\nexec {shlex.quote(compiler)} "$@" {flag}\n')
    os.chmod(wrapper, 0o755)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CC", wrapper)
        mp.setenv("SPECDESK_KERNEL_CACHE", tmp)
        return cpu_lib.library.__wrapped__()
