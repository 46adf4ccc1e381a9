"""Fused one-pass block kernel of the per-site statistics, compiled with numba.

:func:`scan` reads a stored block ``(n, D)`` once, row by row (so memory is read
sequentially), and accumulates in float64, per column, the power sums
``sum((x - shift)**k)`` (``k = 1..4``), the extremes and the count of ``|x| < eps``
(compared in float32, as the numpy kernel does), and per row the squared norm
``sum(x**2)``. float16 and bfloat16 (raw bits as uint16) are decoded element by element
through a 65536-entry float32 table, exact for every value (subnormals, inf and NaN
included). The shift is the caller's (:func:`first_sums` gives the column sums of the
first rows it is derived from).

The caller (:mod:`llminstr.analysis.statistics`) checks the sums: a block holding
NaN/inf gives non-finite sums and is redone by the numpy float64 kernel, which also
counts the non-finite entries, so non-finite data take the same path as before.

The kernels release the GIL (``nogil``) so that the threaded scheduler runs blocks in
parallel. They are compiled once per process, for the stored dtypes actually met, and not
cached on disk: numba's on-disk cache index is a pickle, and llminstr reads and writes no
pickles.

Importing this module raises ``ImportError`` when numba is not installed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numba as _numba
import numpy as np

numba: Any = _numba

# ``fastmath`` only allows reassociating the per-row norm sum (so that the row loop
# vectorises) and fusing multiply-adds; NaN/inf semantics are kept.
_FLAGS = {"reassoc", "contract"}


def _jit(fn: Callable[..., Any]) -> Any:
    return numba.njit(nogil=True, cache=False, fastmath=_FLAGS)(fn)


def _accumulate_row_py(
    row: Any,
    shift: Any,
    thresh: Any,
    s1: Any,
    s2: Any,
    s3: Any,
    s4: Any,
    vmin: Any,
    vmax: Any,
    near: Any,
) -> float:
    norm = 0.0
    for j in range(row.shape[0]):
        x32 = row[j]
        x = np.float64(x32)
        vmin[j] = min(vmin[j], x)
        vmax[j] = max(vmax[j], x)
        near[j] += abs(x32) < thresh
        d = x - shift[j]
        d2 = d * d
        s1[j] += d
        s2[j] += d2
        s3[j] += d2 * d
        s4[j] += d2 * d2
        norm += x * x
    return norm


_accumulate_row = _jit(_accumulate_row_py)


def _accumulate_rows4_py(
    r0: Any,
    r1: Any,
    r2: Any,
    r3: Any,
    shift: Any,
    thresh: Any,
    s1: Any,
    s2: Any,
    s3: Any,
    s4: Any,
    vmin: Any,
    vmax: Any,
    near: Any,
) -> tuple[float, float, float, float]:
    # Four rows per sweep: each accumulator is loaded and stored once per four values.
    n0 = n1 = n2 = n3 = 0.0
    for j in range(r0.shape[0]):
        a32, b32, c32, e32 = r0[j], r1[j], r2[j], r3[j]
        a, b, c, e = np.float64(a32), np.float64(b32), np.float64(c32), np.float64(e32)
        vmin[j] = min(vmin[j], min(min(a, b), min(c, e)))
        vmax[j] = max(vmax[j], max(max(a, b), max(c, e)))
        near[j] += (
            np.int64(abs(a32) < thresh)
            + np.int64(abs(b32) < thresh)
            + np.int64(abs(c32) < thresh)
            + np.int64(abs(e32) < thresh)
        )
        sh = shift[j]
        da, db, dc, de = a - sh, b - sh, c - sh, e - sh
        qa, qb, qc, qe = da * da, db * db, dc * dc, de * de
        s1[j] += (da + db) + (dc + de)
        s2[j] += (qa + qb) + (qc + qe)
        s3[j] += (qa * da + qb * db) + (qc * dc + qe * de)
        s4[j] += (qa * qa + qb * qb) + (qc * qc + qe * qe)
        n0 += a * a
        n1 += b * b
        n2 += c * c
        n3 += e * e
    return n0, n1, n2, n3


_accumulate_rows4 = _jit(_accumulate_rows4_py)


def _scan_f32_py(raw: Any, shift: Any, thresh: Any) -> Any:
    n, dims = raw.shape
    power = np.zeros((4, dims), np.float64)
    vmin = np.full(dims, np.inf)
    vmax = np.full(dims, -np.inf)
    near = np.zeros(dims, np.int64)
    norm2 = np.empty(n, np.float64)
    s1, s2, s3, s4 = power[0], power[1], power[2], power[3]
    full = n - n % 4
    for i in range(0, full, 4):
        norm2[i], norm2[i + 1], norm2[i + 2], norm2[i + 3] = _accumulate_rows4(
            raw[i],
            raw[i + 1],
            raw[i + 2],
            raw[i + 3],
            shift,
            thresh,
            s1,
            s2,
            s3,
            s4,
            vmin,
            vmax,
            near,
        )
    for i in range(full, n):
        norm2[i] = _accumulate_row(raw[i], shift, thresh, s1, s2, s3, s4, vmin, vmax, near)
    return power, vmin, vmax, near, norm2


def _decode_py(src: Any, bits: Any, vals: Any, half: bool) -> None:
    # Raw 16-bit patterns (int16) -> float32, vectorisable integer work. bfloat16: the
    # bits are the top half of the float32. float16: shift the magnitude into float32
    # position, keep sign and magnitude, rebias the exponent by multiplying by 2**112;
    # exact for every finite value (subnormals included); inf/NaN become magnitudes
    # >= 65536, which the caller detects from the extremes (numpy kernel then).
    if half:
        for j in range(src.shape[0]):
            bits[j] = (np.int64(src[j]) << 13) & 0x8FFFE000
        for j in range(src.shape[0]):
            vals[j] *= np.float32(2.0**112)
    else:
        for j in range(src.shape[0]):
            bits[j] = (np.int64(src[j]) & 0xFFFF) << 16


_decode = _jit(_decode_py)


def _scan_u16_py(raw: Any, half: bool, shift: Any, thresh: Any) -> Any:
    n, dims = raw.shape
    power = np.zeros((4, dims), np.float64)
    vmin = np.full(dims, np.inf)
    vmax = np.full(dims, -np.inf)
    near = np.zeros(dims, np.int64)
    norm2 = np.empty(n, np.float64)
    bits = np.empty(4 * dims, np.int32)
    buf = bits.view(np.float32)
    b0, b1, b2, b3 = buf[:dims], buf[dims : 2 * dims], buf[2 * dims : 3 * dims], buf[3 * dims :]
    s1, s2, s3, s4 = power[0], power[1], power[2], power[3]
    full = n - n % 4
    for i in range(0, full, 4):
        for r in range(4):
            lo = r * dims
            _decode(raw[i + r], bits[lo : lo + dims], buf[lo : lo + dims], half)
        norm2[i], norm2[i + 1], norm2[i + 2], norm2[i + 3] = _accumulate_rows4(
            b0, b1, b2, b3, shift, thresh, s1, s2, s3, s4, vmin, vmax, near
        )
    for i in range(full, n):
        _decode(raw[i], bits[:dims], b0, half)
        norm2[i] = _accumulate_row(b0, shift, thresh, s1, s2, s3, s4, vmin, vmax, near)
    return power, vmin, vmax, near, norm2


def _first_sums_f32_py(raw: Any, k: int) -> Any:
    out = np.zeros(raw.shape[1], np.float64)
    for i in range(k):
        for j in range(raw.shape[1]):
            out[j] += raw[i, j]
    return out


def _first_sums_u16_py(raw: Any, half: bool, k: int) -> Any:
    dims = raw.shape[1]
    out = np.zeros(dims, np.float64)
    bits = np.empty(dims, np.int32)
    buf = bits.view(np.float32)
    for i in range(k):
        _decode(raw[i], bits, buf, half)
        for j in range(dims):
            out[j] += buf[j]
    return out


_scan_f32 = _jit(_scan_f32_py)
_scan_u16 = _jit(_scan_u16_py)
_first_sums_f32 = _jit(_first_sums_f32_py)
_first_sums_u16 = _jit(_first_sums_u16_py)


def first_sums(raw: np.ndarray, k: int) -> np.ndarray:
    """float64 column sums of the first ``k`` rows of a C-contiguous stored block."""
    if raw.dtype == np.float32:
        out: np.ndarray = _first_sums_f32(raw, k)
    else:
        out = _first_sums_u16(raw.view(np.int16), raw.dtype == np.float16, k)
    return out


def scan(
    raw: np.ndarray, shift: np.ndarray, eps: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One pass over a C-contiguous stored block ``(n, D)`` (float32, float16, or raw
    bfloat16 bits as uint16): ``(power[4, D], vmin[D], vmax[D], near_zero[D],
    norm2[n])``, where ``power[k - 1] = sum((x - shift)**k)`` (float64), the extremes
    are float64, ``near_zero`` counts ``|x| < float32(eps)`` and ``norm2`` holds the
    squared row norms (float64)."""
    thresh = np.float32(eps)
    shift64 = np.ascontiguousarray(shift, dtype=np.float64)
    if raw.dtype == np.float32:
        res = _scan_f32(raw, shift64, thresh)
    else:
        res = _scan_u16(raw.view(np.int16), raw.dtype == np.float16, shift64, thresh)
    power, vmin, vmax, near, norm2 = res
    return power, vmin, vmax, near, norm2


_WARM: set[str] = set()


def warm_up(dtype: Any = None) -> None:
    """Compile the kernels for one stored dtype (``None``: all of them), once per process.
    Called when a statistics graph is built, so that the compile time (about 1-2 s per
    kernel family) and numba's memory (about 150 MiB of RSS: the import and the compiled
    code) are spent up front, not inside the first block tasks."""
    wanted = (np.float32, np.float16, np.uint16) if dtype is None else (np.dtype(dtype).type,)
    for kind in wanted:
        family = "f32" if np.dtype(kind) == np.float32 else "u16"
        if family in _WARM:
            continue
        x = np.zeros((5, 3), kind)
        scan(x, first_sums(x, 1), 1e-6)
        _WARM.add(family)
