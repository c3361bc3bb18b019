"""The CPU sampler's pass over a row of logits (`cpu_sampling.c`), and its numpy twin.

`sampler._Nucleus` draws a top-p row from three things of the whole vocabulary: the maximum of the scaled logits,
the normalizer of their exponentials, and the tokens near the maximum. `nucleus_scan` makes them in one C call
(two passes reading the row, ~35 us for 49k logits where numpy's ten calls took ~75) where the kernels build,
and with numpy otherwise. The two give the same maximum and candidates; their normalizers agree to about 1e-8
(the exponentials' rounding and the sum's order).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np

from specdesk.kernels import cpu_lib


@dataclass
class Scan:
    """One row's scan: top = max of z / t; total = sum of e^(z / t - top) (float64); index: the tokens with
    z / t >= top - span (ascending, int64). broken: a NaN, or top or total not finite (the row cannot be
    sampled; index is then empty)."""

    top: float
    total: float
    index: np.ndarray
    broken: bool = False


_NONE = np.empty(0, dtype=np.int64)


def nucleus_scan(row: np.ndarray, temperature: float, span: float) -> Scan:
    """The scan of a float32 row, by the C kernel where it is built, else `nucleus_scan_numpy`."""
    lib = cpu_lib.library()
    if lib is None or not hasattr(lib, "sd_nucleus_scan"):  # no compiler, or a build of an earlier revision
        return nucleus_scan_numpy(row, temperature, span)
    row = np.ascontiguousarray(row, dtype=np.float32)
    index = np.empty(row.size, dtype=np.int32)
    top, total = ctypes.c_float(), ctypes.c_double()
    count = lib.sd_nucleus_scan(row.ctypes.data, row.size, temperature, span, index.ctypes.data, ctypes.byref(top),
                                ctypes.byref(total))  # fmt: skip
    if count < 0:
        return Scan(top.value, total.value, _NONE, broken=True)
    return Scan(top.value, total.value, index[:count].astype(np.int64))


def nucleus_scan_numpy(row: np.ndarray, temperature: float, span: float) -> Scan:
    """The twin of `sd_nucleus_scan` in numpy (its exponentials are numpy's float32 exp)."""
    scaled = row.astype(np.float32, copy=False) / np.float32(temperature)  # as filter_logits: logits / T
    top = scaled.max()
    if not np.isfinite(top):  # max propagates NaN
        return Scan(float(top), float("nan"), _NONE, broken=True)
    total = float(np.exp(scaled - top).sum(dtype=np.float64))
    if not np.isfinite(total):
        return Scan(float(top), total, _NONE, broken=True)
    return Scan(float(top), total, np.flatnonzero(scaled >= top - np.float32(span)))
