"""Fused one-pass block kernel of the per-site statistics, compiled with numba.

:func:`summary` reads a stored block ``(n, D)`` once, eight rows at a time, vectorised
across the columns. Per column it accumulates the power sums ``sum((x - shift)**k)``
(``k = 1..4``) about a shift (the mean of the first rows, at least 64, rounded to 16
significant bits), the extremes and the count of ``|x| < eps``, and per row the squared norm
``sum(x**2)`` (float32, one function for every row so that it does not depend on how a
block's rows are grouped); it then converts the sums to central moments and the norms
to the row-norm sketch, all without the GIL. The elementwise work is float32, like the
numpy kernel's: ``x - shift`` is exact for most ``x``, the eight terms of a row group are
added in a tree, the sums of four row groups (32 rows) are added in float32 and then into
float64 totals (the numpy kernel adds 64 rows in float32). float16 and bfloat16 (raw bits
as int16) are decoded where they are read, with integer operations and a bit cast to
float32 in registers (:func:`_kernel_family` builds one scan per stored dtype around its
``load``; :func:`_decode` does the same decoding into a buffer for the few rows read
outside the scan). :func:`merge_moments` merges two partials' moments.

:func:`summary` also says (``ok``) whether its sums are finite: a block holding NaN/inf,
or whose float32 ``(x - shift)**4`` overflows (``|x - shift| > ~4e9``), is redone by the
caller (:mod:`llminstr.analysis.statistics`) with the numpy float64 kernel, which also
counts the non-finite entries.

The kernels release the GIL (``nogil``) so that the threaded scheduler runs blocks in
parallel. They are compiled once per process, for the stored dtypes actually met, and not
cached on disk: numba's on-disk cache index is a pickle, and llminstr reads and writes no
pickles.

Importing this module raises ``ImportError`` when numba is not installed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numba as _numba
import numpy as np

from llminstr.analysis.statistics import TINY_NORM2

numba: Any = _numba

# ``fastmath`` only allows reassociating the per-row norm sum (so that the row loop
# vectorises) and fusing multiply-adds; NaN/inf semantics are kept.
_FLAGS = {"reassoc", "contract"}


#: Row groups of eight whose float32 sums are added before they go into the float64 totals.
_FLUSH_GROUPS = 4


def _jit(fn: Callable[..., Any]) -> Any:
    return numba.njit(nogil=True, cache=False, fastmath=_FLAGS)(fn)


def _flush_py(g: Any, near: Any, power: Any, near64: Any) -> None:
    # float32 group sums -> float64 totals; int32 counts -> int64.
    for k in range(4):
        for j in range(g.shape[1]):
            power[k, j] += g[k, j]
            g[k, j] = 0.0
    for j in range(near.shape[0]):
        near64[j] += near[j]
        near[j] = 0


_flush = _jit(_flush_py)


def _state(first: Any, n: int) -> Any:
    dims = first.shape[0]
    return (
        np.zeros((4, dims), np.float32),  # float32 sums of the current row groups
        first.copy(),  # vmin (float32)
        first.copy(),  # vmax
        np.zeros(dims, np.int32),  # near-zero counts of the current row groups
        np.zeros((4, dims), np.float64),  # power sums
        np.zeros(dims, np.int64),  # near-zero counts
        np.empty(n, np.float32),  # squared row norms
    )


_state_jit = _jit(_state)


def _as_float32_typing(typingctx: Any, bits: Any) -> Any:
    """The float32 whose bit pattern is the int32 ``bits`` (a bit cast, no conversion)."""
    sig = numba.types.float32(numba.types.int32)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.bitcast(args[0], context.get_value_type(numba.types.float32))

    return sig, codegen


_as_float32: Any = numba.extending.intrinsic(_as_float32_typing)


def _load_f32_py(row: Any, j: int) -> Any:
    return row[j]


def _load_bf16_py(row: Any, j: int) -> Any:
    # bfloat16 (raw bits as int16): the bits are the top half of the float32.
    return _as_float32(np.int32(row[j]) << np.int32(16))


def _load_f16_py(row: Any, j: int) -> Any:
    # float16 (raw bits as int16): shift the magnitude into float32 position, keep sign
    # and magnitude (the sign extension puts the sign in bit 31), rebias the exponent by
    # multiplying by 2**112; exact for every finite value (subnormals included); inf/NaN
    # become magnitudes >= 65536, which the caller detects from the extremes. int32
    # arithmetic: twice the lanes per vector instruction of int64. (_decode does the same.)
    bits = (np.int32(row[j]) << np.int32(13)) & np.int32(-0x70002000)
    return _as_float32(bits) * np.float32(2.0**112)


def _kernel_family(load: Any) -> tuple[Any, Any]:
    """``(first_row, scan)`` for stored values read through ``load(row, j)`` (a float32):
    the 16-bit types are decoded as they are read, in registers (a decoding pass into a
    float32 buffer cost a third of the 16-bit scan, measured)."""

    def norm2_py(row: Any) -> Any:
        # Squared norm of one row in float32 (the loop vectorises: fastmath reassoc). One
        # function for every row of a stored dtype, so that a row's norm does not depend
        # on how the block's rows were grouped (the sketch bins would then differ
        # between block splits).
        total = np.float32(0.0)
        for j in range(row.shape[0]):
            v = load(row, j)
            total += v * v
        return total

    norm2_row = _jit(norm2_py)

    def group8_py(
        x: Any, i: int, shift: Any, thresh: Any, g: Any, vmin: Any, vmax: Any, near: Any, norm2: Any
    ) -> None:
        # Rows i..i+7 of x, vectorised across columns j: each accumulator is loaded and
        # stored once per eight values, the eight terms are added in a tree.
        r0, r1, r2, r3 = x[i], x[i + 1], x[i + 2], x[i + 3]
        r4, r5, r6, r7 = x[i + 4], x[i + 5], x[i + 6], x[i + 7]
        for j in range(x.shape[1]):
            a0, a1, a2, a3 = load(r0, j), load(r1, j), load(r2, j), load(r3, j)
            a4, a5, a6, a7 = load(r4, j), load(r5, j), load(r6, j), load(r7, j)
            lo = min(min(min(a0, a1), min(a2, a3)), min(min(a4, a5), min(a6, a7)))
            hi = max(max(max(a0, a1), max(a2, a3)), max(max(a4, a5), max(a6, a7)))
            vmin[j] = min(vmin[j], lo)
            vmax[j] = max(vmax[j], hi)
            c01 = np.int32(abs(a0) < thresh) + np.int32(abs(a1) < thresh)
            c23 = np.int32(abs(a2) < thresh) + np.int32(abs(a3) < thresh)
            c45 = np.int32(abs(a4) < thresh) + np.int32(abs(a5) < thresh)
            c67 = np.int32(abs(a6) < thresh) + np.int32(abs(a7) < thresh)
            near[j] += (c01 + c23) + (c45 + c67)
            sh = shift[j]
            d0, d1, d2, d3 = a0 - sh, a1 - sh, a2 - sh, a3 - sh
            d4, d5, d6, d7 = a4 - sh, a5 - sh, a6 - sh, a7 - sh
            q0, q1, q2, q3 = d0 * d0, d1 * d1, d2 * d2, d3 * d3
            q4, q5, q6, q7 = d4 * d4, d5 * d5, d6 * d6, d7 * d7
            g[0, j] += ((d0 + d1) + (d2 + d3)) + ((d4 + d5) + (d6 + d7))
            g[1, j] += ((q0 + q1) + (q2 + q3)) + ((q4 + q5) + (q6 + q7))
            g[2, j] += ((q0 * d0 + q1 * d1) + (q2 * d2 + q3 * d3)) + (
                (q4 * d4 + q5 * d5) + (q6 * d6 + q7 * d7)
            )
            g[3, j] += ((q0 * q0 + q1 * q1) + (q2 * q2 + q3 * q3)) + (
                (q4 * q4 + q5 * q5) + (q6 * q6 + q7 * q7)
            )
        for r in range(8):
            norm2[i + r] = norm2_row(x[i + r])

    group8 = _jit(group8_py)

    def row1_py(
        row: Any,
        o: int,
        shift: Any,
        thresh: Any,
        g: Any,
        vmin: Any,
        vmax: Any,
        near: Any,
        norm2: Any,
    ) -> None:
        # One row (a block's last n % 8 rows), same arithmetic as group8.
        for j in range(row.shape[0]):
            a = load(row, j)
            vmin[j] = min(vmin[j], a)
            vmax[j] = max(vmax[j], a)
            near[j] += np.int32(abs(a) < thresh)
            d = a - shift[j]
            q = d * d
            g[0, j] += d
            g[1, j] += q
            g[2, j] += q * d
            g[3, j] += q * q
        norm2[o] = norm2_row(row)

    row1 = _jit(row1_py)

    def first_row_py(row: Any) -> Any:
        out = np.empty(row.shape[0], np.float32)
        for j in range(row.shape[0]):
            out[j] = load(row, j)
        return out

    first_row = _jit(first_row_py)

    def scan_py(raw: Any, shift: Any, thresh: Any) -> Any:
        n = raw.shape[0]
        sh = shift.astype(np.float32)
        g, vmin, vmax, near, power, near64, norm2 = _state_jit(first_row(raw[0]), n)
        full = n - n % 8
        groups = 0
        for i in range(0, full, 8):
            group8(raw, i, sh, thresh, g, vmin, vmax, near, norm2)
            groups += 1
            if groups == _FLUSH_GROUPS:
                _flush(g, near, power, near64)
                groups = 0
        for i in range(full, n):
            row1(raw[i], i, sh, thresh, g, vmin, vmax, near, norm2)
        _flush(g, near, power, near64)
        return (
            power,
            vmin.astype(np.float64),
            vmax.astype(np.float64),
            near64,
            norm2.astype(np.float64),
        )

    return first_row, _jit(scan_py)


def _decode_py(src: Any, bits: Any, vals: Any, half: bool) -> None:
    # Raw 16-bit patterns (int16) -> float32, vectorisable integer work. bfloat16: the
    # bits are the top half of the float32. float16: shift the magnitude into float32
    # position, keep sign and magnitude, rebias the exponent by multiplying by 2**112;
    # exact for every finite value (subnormals included); inf/NaN become magnitudes
    # >= 65536, which the caller detects from the extremes (numpy kernel then).
    # int32 arithmetic (not int64): twice the lanes per vector instruction.
    if half:
        for j in range(src.shape[0]):
            bits[j] = (np.int32(src[j]) << np.int32(13)) & np.int32(-0x70002000)
        for j in range(src.shape[0]):
            vals[j] *= np.float32(2.0**112)
    else:
        for j in range(src.shape[0]):
            bits[j] = np.int32(src[j]) << np.int32(16)


_decode = _jit(_decode_py)


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


_, _scan_f32 = _kernel_family(_jit(_load_f32_py))
_, _scan_bf16 = _kernel_family(_jit(_load_bf16_py))
_, _scan_f16 = _kernel_family(_jit(_load_f16_py))
_first_sums_f32 = _jit(_first_sums_f32_py)
_first_sums_u16 = _jit(_first_sums_u16_py)


# ------------------------------------------------------------------ whole block summary
# Everything a block partial needs, computed without the GIL: with two threads the numpy
# and Python steps around the scan (shift, moments, the row-norm sketch, about thirty
# small calls per block that hold the GIL) cost as much as the scan itself (measured).


def _round_shift_py(c: Any) -> Any:
    # statistics._round_shift: keep 16 significant bits (round half to even).
    out = np.empty_like(c)
    for j in range(c.shape[0]):
        x = c[j]
        if not np.isfinite(x):
            out[j] = x
            continue
        m, e = math.frexp(x)
        r = math.ldexp(np.rint(m * 65536.0) / 65536.0, e)
        out[j] = r if np.isfinite(r) else x
    return out


_round_shift = numba.njit(nogil=True, cache=False)(_round_shift_py)


def _norm_sketch_py(norm2: Any, log_gamma: float) -> Any:
    # statistics._norm_partial: count, mean, m2, min, max of the finite row norms, the
    # zero and non-finite counts, and the log-histogram (offset, counts) of positive ones.
    n = norm2.shape[0]
    norms = np.sqrt(norm2)
    count = 0
    total = 0.0
    for i in range(n):
        if np.isfinite(norms[i]):
            count += 1
            total += norms[i]
    nonfinite = n - count
    empty = np.zeros(0, np.int64)
    if count == 0:
        return 0, 0.0, 0.0, np.inf, -np.inf, 0, nonfinite, 0, empty
    mean = total / count
    m2 = 0.0
    vmin, vmax = np.inf, -np.inf
    zeros = 0
    lo, hi = np.int64(2**62), np.int64(-(2**62))
    idx = np.empty(n, np.int64)
    for i in range(n):
        x = norms[i]
        if not np.isfinite(x):
            continue
        d = x - mean
        m2 += d * d
        vmin = min(vmin, x)
        vmax = max(vmax, x)
        if x > 0:
            k = np.int64(math.ceil(math.log(x) / log_gamma))
            idx[i] = k
            lo = min(lo, k)
            hi = max(hi, k)
        else:
            zeros += 1
    if zeros == count:
        return count, mean, m2, vmin, vmax, zeros, nonfinite, 0, empty
    counts = np.zeros(hi - lo + 1, np.int64)
    for i in range(n):
        x = norms[i]
        if np.isfinite(x) and x > 0:
            counts[idx[i] - lo] += 1
    return count, mean, m2, vmin, vmax, zeros, nonfinite, lo, counts


_norm_sketch = numba.njit(nogil=True, cache=False)(_norm_sketch_py)


def _moments_py(n: int, shift: Any, power: Any) -> Any:
    # statistics.site_block_partial: power sums about the shift -> central moments.
    dims = shift.shape[0]
    mean = np.empty(dims)
    m2 = np.empty(dims)
    m3 = np.empty(dims)
    m4 = np.empty(dims)
    for j in range(dims):
        delta = power[0, j] / n
        delta2 = delta * delta
        mean[j] = shift[j] + delta
        m2[j] = max(power[1, j] - n * delta2, 0.0)
        m3[j] = power[2, j] - 3 * delta * power[1, j] + 2 * n * delta2 * delta
        m4[j] = max(
            power[3, j]
            - 4 * delta * power[2, j]
            + 6 * delta2 * power[1, j]
            - 3 * n * delta2 * delta2,
            0.0,
        )
    return mean, m2, m3, m4


_moments = numba.njit(nogil=True, cache=False)(_moments_py)


def _all_finite_py(power: Any, norm2: Any, vmin: Any, vmax: Any, limit: float) -> bool:
    for k in range(power.shape[0]):
        for j in range(power.shape[1]):
            if not np.isfinite(power[k, j]):
                return False
    for i in range(norm2.shape[0]):
        if not np.isfinite(norm2[i]):
            return False
    for j in range(vmin.shape[0]):  # noqa: SIM110 (numba compiles loops, not all(<genexpr>))
        if not (-vmin[j] < limit and vmax[j] < limit):
            return False
    return True


_all_finite = numba.njit(nogil=True, cache=False)(_all_finite_py)


def _refine_norms_f32_py(raw: Any, norm2: Any) -> None:
    # statistics.TINY_NORM2: squared norms that float32 may have underflowed, in float64.
    for i in range(raw.shape[0]):
        if norm2[i] < TINY_NORM2:
            total = 0.0
            for j in range(raw.shape[1]):
                v = np.float64(raw[i, j])
                total += v * v
            norm2[i] = total


def _refine_norms_u16_py(raw: Any, half: bool, norm2: Any) -> None:
    bits = np.empty(raw.shape[1], np.int32)
    buf = bits.view(np.float32)
    for i in range(raw.shape[0]):
        if norm2[i] < TINY_NORM2:
            _decode(raw[i], bits, buf, half)
            total = 0.0
            for j in range(raw.shape[1]):
                v = np.float64(buf[j])
                total += v * v
            norm2[i] = total


_refine_norms_f32 = _jit(_refine_norms_f32_py)
_refine_norms_u16 = _jit(_refine_norms_u16_py)


def _summary_f32_py(raw: Any, k: int, thresh: Any, log_gamma: float) -> Any:
    shift = _round_shift(_first_sums_f32(raw, k) / k)
    power, vmin, vmax, near, norm2 = _scan_f32(raw, shift, thresh)
    _refine_norms_f32(raw, norm2)
    ok = _all_finite(power, norm2, vmin, vmax, np.inf)
    mean, m2, m3, m4 = _moments(raw.shape[0], shift, power)
    return ok, mean, m2, m3, m4, vmin, vmax, near, _norm_sketch(norm2, log_gamma)


def _summary_16(scan: Any, half: bool) -> Any:
    """The summary of a 16-bit stored dtype (raw bits as int16): ``half`` for float16,
    else bfloat16. Each compiles on its own, when its dtype is first met."""
    # float16: the integer decoding maps inf/NaN to magnitudes >= 65536
    limit = 65536.0 if half else np.inf

    def summary_py(raw: Any, k: int, thresh: Any, log_gamma: float) -> Any:
        shift = _round_shift(_first_sums_u16(raw, half, k) / k)
        power, vmin, vmax, near, norm2 = scan(raw, shift, thresh)
        _refine_norms_u16(raw, half, norm2)
        ok = _all_finite(power, norm2, vmin, vmax, limit)
        mean, m2, m3, m4 = _moments(raw.shape[0], shift, power)
        return ok, mean, m2, m3, m4, vmin, vmax, near, _norm_sketch(norm2, log_gamma)

    return _jit(summary_py)


_summary_f32 = _jit(_summary_f32_py)
_summary_bf16 = _summary_16(_scan_bf16, half=False)
_summary_f16 = _summary_16(_scan_f16, half=True)


def summary(raw: np.ndarray, k: int, eps: float, log_gamma: float) -> Any:
    """The whole summary of a C-contiguous stored block ``(n, D)``, ``n >= 1``, in one
    call without the GIL: ``(ok, mean, m2, m3, m4, vmin, vmax, near_zero, norms)``.
    The shift is the mean of the first ``k`` rows rounded to 16 significant bits
    (:func:`llminstr.analysis.statistics.shift_row_count` gives ``k``);
    ``norms`` is ``(count, mean, m2, min, max, zeros, nonfinite, offset, counts)`` of the
    row norms. ``ok`` is False when a sum is not finite (NaN/inf data, float32
    overflow, or float16 inf/NaN): the caller then redoes the block in float64."""
    thresh = np.float32(eps)
    if raw.dtype == np.float32:
        return _summary_f32(raw, k, thresh, log_gamma)
    if raw.dtype == np.float16:
        return _summary_f16(raw.view(np.int16), k, thresh, log_gamma)
    return _summary_bf16(raw.view(np.int16), k, thresh, log_gamma)


def _merge_py(
    na: float,
    nb: float,
    a_mean: Any,
    a_m2: Any,
    a_m3: Any,
    a_m4: Any,
    b_mean: Any,
    b_m2: Any,
    b_m3: Any,
    b_m4: Any,
) -> Any:
    # statistics._merge_two's moment formulas (Chan et al. / Pebay), one pass, no GIL.
    dims = a_mean.shape[0]
    mean = np.empty(dims)
    m2 = np.empty(dims)
    m3 = np.empty(dims)
    m4 = np.empty(dims)
    n = na + nb
    c2 = na * nb / n
    c3 = na * nb * (na - nb) / (n * n)
    c4 = na * nb * (na * na - na * nb + nb * nb) / (n**3)
    for j in range(dims):
        delta = b_mean[j] - a_mean[j]
        d2 = delta * delta
        mean[j] = a_mean[j] + delta * (nb / n)
        m2[j] = a_m2[j] + b_m2[j] + d2 * c2
        m3[j] = (
            a_m3[j] + b_m3[j] + d2 * delta * c3 + 3.0 * delta * (na * b_m2[j] - nb * a_m2[j]) / n
        )
        m4[j] = (
            a_m4[j]
            + b_m4[j]
            + d2 * d2 * c4
            + 6.0 * d2 * (na * na * b_m2[j] + nb * nb * a_m2[j]) / (n * n)
            + 4.0 * delta * (na * b_m3[j] - nb * a_m3[j]) / n
        )
    return mean, m2, m3, m4


merge_moments = numba.njit(nogil=True, cache=False)(_merge_py)


_WARM: set[str] = set()


def warm_up(dtype: Any = None) -> None:
    """Compile the kernels for one stored dtype (``None``: all of them), once per process.
    Called when a statistics graph is built, so that the compile time (1-6 s per kernel
    family on a 2-core VM: 5.3 s for float32 and 3.3 s for the 16-bit types on a loaded
    one; once per process, distributed workers included) and numba's memory (about 150-215
    MiB of RSS: the import and the compiled code) are spent up front, not inside the first
    block tasks."""
    wanted = (np.float32, np.float16, np.uint16) if dtype is None else (np.dtype(dtype).type,)
    for kind in wanted:
        family = np.dtype(kind).name  # float32, float16, uint16 (bfloat16 bits)
        if family in _WARM:
            continue
        x = np.zeros((5, 3), kind)
        summary(x, 1, 1e-6, 0.01)
        v = np.zeros(3)
        merge_moments(1.0, 2.0, v, v, v, v, v, v, v, v)
        _WARM.add(family)
