"""Per-site activation statistics as lazy Dask graphs that read every chunk once.

Passes over the data
--------------------
**One.** Each storage chunk of a site is read (and decoded) once per
:func:`llminstr.analysis.compute` call, whatever statistics are asked for. A block task
turns a chunk into a small *partial* (a few vectors of the feature size plus a sparse
histogram of row norms); partials are merged by a tree reduction (``split_every`` at a
time); a final task turns the merged partial into numbers. Nothing in the graph depends
on a global result before the block tasks run, so no block waits in memory for another
pass (the trap ``DESIGN.md`` warns about).

How each statistic stays one-pass
---------------------------------
* **Moments** (mean, std, skewness, kurtosis). A block computes its power sums about a
  *block-local shift* ``c`` (the mean of its first rows, at least 64, rounded to 16
  significant bits so that ``x - c`` is exact for most ``x``): ``P_k = sum((x - c)**k)``, ``k = 1..4``,
  with the elementwise work in float32 on cache-sized slabs, float32 partial sums over
  at most 64 rows (16 slabs for ``P_1``) and float64 beyond (small blocks: float64
  throughout the sums). They are converted exactly to moments about the block mean and
  merged with the pairwise formulas of Chan et al. / Pébay (2008). This is the
  raw-power-sum method with a per-block origin: no task depends on the global mean, and
  it avoids the catastrophic cancellation of plain ``sum(x**4) - 4*mean*sum(x**3) + ...``
  on dimensions whose mean is large against their spread (the "massive activation" dims
  of residual streams). ``std`` is the population standard deviation (``ddof=0``);
  ``kurtosis`` is the *excess* (Fisher) kurtosis, 0 for a normal distribution.
* **min / max / max_abs** are elementwise reductions; ``rms = sqrt(mean(x**2))``.
* **near_zero_fraction**: the fraction of entries with ``|x| < eps``, compared in float32
  (the values as decoded to float32), counted exactly.
* **Row norms** (L2 norm of each row's flattened features), from float32 sums of
  squares (float64 for rows whose squared norm is below 1e-30, where float32 squares
  underflow). Their count is exact, and their mean, std, min and max are those of these
  norms; their quantiles come from a logarithmic histogram with fixed bin
  edges ``gamma**i``, ``gamma = (1 + a) / (1 - a)`` for a relative accuracy ``a`` (a
  DDSketch-style sketch, default ``a = 0.005``). Bin edges do not depend on the data, so
  no range-finding pass is needed and block histograms merge by addition; the number of
  bins grows with ``log(max / min)`` only. The quantile ``q`` is the value of rank
  ``floor(q * (count - 1))`` in the sorted norms (numpy's ``method="lower"``), returned
  to within a relative error ``a`` (zero norms are exact).
* **Outlier dimensions** (the rule): a flat feature index ``d`` is an outlier when
  ``max_abs[d] > k * median(max_abs)`` or ``rms[d] > k * median(rms)``, with
  ``k = outlier_factor`` (default 6, after the magnitude-6 outlier features of
  LLM.int8()). Medians ignore NaN dims. ``outlier_dims`` lists flat indices into the
  flattened feature vector, most extreme first (by ``max(max_abs/median, rms/median)``).

Non-finite values. A block whose float32 sums come out non-finite (NaN/inf inputs, or
float32 overflow of ``x**4`` for ``|x| > ~1e9``) is recomputed in float64. In a dimension
that holds NaN or inf, ``min``, ``max`` and ``max_abs`` are numpy's and the moments (mean,
std, rms, skewness, kurtosis) are NaN (numpy's mean and rms of a column holding +inf
are inf); ``nonfinite_count`` counts such entries per dimension, and rows whose norm is
not finite are left out of the row
norm statistics (counted in ``row_norm["nonfinite_count"]``).

Token columns (:func:`token_summary`) are separate arrays; summarising them reads each
of their chunks once too.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ml_dtypes
import numpy as np

from llminstr.analysis._common import (
    TaskGraph,
    as_capture,
    check_sites,
    lazy_item,
    resolve_rows,
)
from llminstr.errors import ConfigError

if TYPE_CHECKING:
    from dask.delayed import Delayed

    from llminstr.reader import Capture

#: Passes over each site's activations made by one compute of these statistics.
PASSES = 1
DEFAULT_EPS = 1e-6
DEFAULT_OUTLIER_FACTOR = 6.0
DEFAULT_RELATIVE_ACCURACY = 0.005
#: Squared row norms below this are recomputed in float64 (by both kernels): float32
#: squares of entries below about 1e-19 underflow (a row of 1e-24 values had norm 0).
TINY_NORM2 = 1e-30
#: Below this the norm histogram needs about 10**5 bins per decade of norms.
MIN_RELATIVE_ACCURACY = 1e-5
NORM_QUANTILES: tuple[float, ...] = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
DEFAULT_SPLIT_EVERY = 8
#: Per-dimension outputs (numpy arrays of the site's feature shape once computed).
PER_DIM_KEYS: tuple[str, ...] = (
    "mean",
    "std",
    "min",
    "max",
    "max_abs",
    "rms",
    "skewness",
    "kurtosis",
    "near_zero_fraction",
    "nonfinite_count",
)
#: Other lazy outputs of :func:`statistics_for_site`.
LAZY_KEYS: tuple[str, ...] = (
    "near_zero_fraction_total",
    "outlier_dims",
    "outlier_scores",
    "row_norm",
)
#: Token columns whose value counts are summarised (distinct sequences, rows per step...).
COUNTED_COLUMNS: tuple[str, ...] = ("sequence", "step", "token_id")


# ---------------------------------------------------------------------- partials
@dataclass
class NormPartial:
    """Row-norm summary of some rows: exact moments and extremes plus a log histogram."""

    count: int  # finite norms
    mean: float
    m2: float
    vmin: float
    vmax: float
    zeros: int
    nonfinite: int
    offset: int  # histogram index of counts[0]
    counts: np.ndarray  # int64 bin counts of positive finite norms


@dataclass
class SitePartial:
    """Mergeable summary of some rows of one site; vectors have one entry per flat dim."""

    n: int
    mean: np.ndarray  # float64[D]
    m2: np.ndarray  # sum((x - mean)**2)
    m3: np.ndarray
    m4: np.ndarray
    vmin: np.ndarray  # float64[D]
    vmax: np.ndarray
    near_zero: np.ndarray  # int64[D]
    nonfinite: np.ndarray  # int64[D]
    norms: NormPartial


@dataclass
class ColumnPartial:
    """Mergeable summary of some rows of one token column."""

    n: int
    vmin: int
    vmax: int
    values: np.ndarray | None  # sorted distinct values (counted columns only)
    counts: np.ndarray | None  # rows per value


# ---------------------------------------------------------------------- block kernels
_SLAB_ELEMENTS = 65536  # values per slab (64 rows of 1024): measured best on 1 MiB of L2
_MAX_SLAB_ROWS = 4096
_POWER_GROUP = 64  # rows per float32 partial of the sums of d**2, d**3, d**4
_MEAN_SLABS = 16  # slabs whose d are added elementwise in float32 before a float64 sum
_EXACT_SUM_ELEMENTS = 16384  # blocks up to this size add their float32 terms in float64
_SHIFT_BITS = 16  # significant bits of the block-local shift (see _round_shift)
_FLUSH_SLABS = 255  # slabs per flush of the uint8 near-zero counters (cannot overflow)


def _slab_rows(dims: int) -> int:
    return max(1, min(_MAX_SLAB_ROWS, _SLAB_ELEMENTS // max(1, dims)))


_F16_REBIAS = np.float32(2.0**112)  # 2**(127 - 15): float16 -> float32 exponent bias
_F16_KEEP = np.int32(-0x70002000)  # 0x8FFFE000: sign bit + the 15 shifted magnitude bits
_F16_LIMIT = 65536.0  # the fast float16 path maps inf/NaN to magnitudes >= this


_SCRATCH = threading.local()


def _scratch(name: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """A scratch array kept per thread between block tasks (contents undefined): the
    kernel's few MiB of buffers are then not mapped and page-faulted anew for every
    block. One array per ``name``, replaced when the shape or dtype changes."""
    cache: dict[str, np.ndarray] | None = getattr(_SCRATCH, "arrays", None)
    if cache is None:
        cache = _SCRATCH.arrays = {}
    arr = cache.get(name)
    if arr is None or arr.shape != shape or arr.dtype != dtype:
        arr = cache[name] = np.empty(shape, dtype)
    return arr


class _ToFloat32:
    """Converts slabs of a stored block (float32, float16, or raw bfloat16 bits as uint16)
    to float32, into a reused buffer.

    bfloat16 -> float32 is exact (the 16 bits become the top half of the float32); it is
    ``ml_dtypes``' vectorised cast. float16 -> float32 (numpy's own cast is not
    vectorised, ~25x slower): sign-extend the bits to int32, shift the magnitude into
    float32 position, keep sign and magnitude, and multiply by ``2**112`` to rebias the
    exponent. That is exact for every finite value, subnormals included; inf and NaN come
    out as finite magnitudes ``>= 65536`` (larger than any finite float16), which the
    caller detects from the block's extremes and then converts again with ``exact=True``
    (numpy's cast).
    """

    def __init__(self, dtype: np.dtype[Any], rows: int, dims: int, exact: bool = False) -> None:
        self.buf = _scratch("x32", (rows, dims), np.float32) if dtype != np.float32 else None
        self.exact = exact

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        if self.buf is None:
            return raw
        out = self.buf[: raw.shape[0]]
        if raw.dtype == np.uint16:
            np.copyto(out, raw.view(ml_dtypes.bfloat16))
        elif self.exact:
            np.copyto(out, raw)
        else:
            bits = out.view(np.int32)
            np.copyto(bits, raw.view(np.int16))
            np.left_shift(bits, 13, out=bits)
            np.bitwise_and(bits, _F16_KEEP, out=bits)
            np.multiply(out, _F16_REBIAS, out=out)
        return out


def _storage_2d(block: np.ndarray) -> np.ndarray:
    n = block.shape[0]
    flat = np.ascontiguousarray(block).reshape(n, math.prod(block.shape[1:]))
    if flat.dtype not in (np.float32, np.float16, np.uint16):
        raise TypeError(f"unexpected stored dtype {flat.dtype}")
    return flat


def as_float32(block: np.ndarray) -> np.ndarray:
    """A stored block ``(rows, *features)`` as float32 ``(rows, D)`` (bf16 bits decoded)."""
    flat = _storage_2d(block)
    conv = _ToFloat32(flat.dtype, flat.shape[0], flat.shape[1], exact=True)
    return conv(flat).copy() if flat.dtype != np.float32 else flat


@dataclass
class _Scan:
    shift: np.ndarray  # float64[D]
    power: np.ndarray  # float64[4, D]: sum((x - shift)**k), k = 1..4
    vmin: np.ndarray  # float64[D]
    vmax: np.ndarray
    near_zero: np.ndarray  # int64[D]
    norm2: np.ndarray  # float64[n]: squared row norms


class _ColumnSums:
    """Adds the column sums of slabs ``(j, k, D)`` into float64 totals ``(j, D)``:
    float32 partial sums over groups of ``group`` rows (``add.reduce``), then float64
    across groups, so float32 rounding spans ``group`` terms. ``group=1`` sums the float32
    terms in float64 directly (slower: numpy's float32 -> float64 cast is not
    vectorised). No BLAS: OpenBLAS would start threads of its own under the
    scheduler's."""

    def __init__(self, j: int, step: int, dims: int, work: type[np.floating[Any]], group: int):
        self.group = group
        self.part = _scratch(f"part{j}", (j, max(1, step // group), dims), work)
        self.wide = np.empty((j, dims), np.float64)

    def add(self, p: np.ndarray, totals: np.ndarray) -> None:
        j, k, dims = p.shape
        g = self.group
        m = k // g
        if g == 1:
            np.add(totals, np.add.reduce(p, axis=1, dtype=np.float64, out=self.wide), out=totals)
            return
        if m > 1:
            part = self.part[:, :m]
            np.add.reduce(p[:, : m * g].reshape(j, m, g, dims), axis=2, out=part)
            np.add(totals, np.add.reduce(part, axis=1, dtype=np.float64, out=self.wide), out=totals)
        elif m == 1:
            np.add(totals, np.add.reduce(p[:, :g], axis=1, out=self.part[:, 0]), out=totals)
        if m * g < k:
            np.add(totals, np.add.reduce(p[:, m * g :], axis=1, out=self.part[:, 0]), out=totals)


#: At least this many rows give a block's shift (see :func:`_block_shift`).
SHIFT_MIN_ROWS = 64


def shift_row_count(n: int, dims: int) -> int:
    """How many first rows of a block of ``n`` rows of ``dims`` values give its shift: a
    slab's worth (about 65,536 values), and at least :data:`SHIFT_MIN_ROWS`."""
    return min(n, max(_slab_rows(dims), SHIFT_MIN_ROWS))


def _block_shift(raw: np.ndarray) -> np.ndarray:
    """A block's shift, per column: the mean of its first :func:`shift_row_count` rows
    (float32 values summed in float64), rounded to ``_SHIFT_BITS`` significant bits. The
    count was a slab's worth alone, one row for sites of 65,536 values or more: a first
    row far from the rest (the first token's massive activations) then moved the shift
    far from the block mean, and the float32 power sums about it cancelled in the central
    moments (kurtosis off by 1.5e-4 relative). A median of nine rows spread over the block
    fixed that case but, a noisier estimate of the mean, cost narrow sites precision."""
    k = shift_row_count(raw.shape[0], raw.shape[1])
    return _round_shift(np.add.reduce(as_float32(raw[:k]), axis=0, dtype=np.float64) / k)


def _round_shift(c: np.ndarray) -> np.ndarray:
    """``c`` rounded to ``_SHIFT_BITS`` significant bits. Then ``x - c`` is exact in
    float32 for every float32 ``x`` from about ``|c| / 2`` to ``2**8 * |c|`` (and for all
    bfloat16 / float16 values in a wider range), instead of only within a factor 2 of
    ``c``: values stored in half precision share their low bits, so the rounding errors
    of ``x - c`` would all have the same sign and add up in the mean."""
    with np.errstate(invalid="ignore", over="ignore"):
        m, e = np.frexp(c)
        r = np.ldexp(np.round(m * 2.0**_SHIFT_BITS) / 2.0**_SHIFT_BITS, e)
    return np.where(np.isfinite(r), r, c)


def _scan(raw: np.ndarray, eps: float, work: type[np.floating[Any]], exact: bool = False) -> _Scan:
    """One sweep over a stored block ``(n, D)``: power sums about a block-local shift,
    extremes, near-zero counts and squared row norms.

    Rows are handled in slabs of ``step`` rows (about ``_SLAB_ELEMENTS`` values): about
    fifteen numpy calls per slab, each one pass over the slab into per-thread scratch
    (no temporaries, no BLAS). The slab is converted to float32; its column extremes are
    ``minimum/maximum.reduce``'d into running rows; ``|x| < eps`` is added as ``uint8``
    into a counter of the slab's shape (reduced every ``_FLUSH_SLABS`` slabs, before it
    can wrap); squared row norms are one ``vecdot``. ``d = x - shift`` (the shift
    pre-broadcast to the slab's shape: numpy's broadcasting loop is slower) and
    ``d**2, d**3, d**4`` go into a ``(3, step, D)`` buffer. Sums of ``d`` are added
    elementwise in float32 over ``_MEAN_SLABS`` slabs, then summed in float64; sums of
    the powers are float32 over groups of ``_POWER_GROUP`` rows, then float64
    (:class:`_ColumnSums`). Blocks of at most ``_EXACT_SUM_ELEMENTS`` values (cheap
    either way; merging many of them must not pile up float32 rounding) sum every
    float32 term in float64.
    """
    n, dims = raw.shape
    step = min(n, _slab_rows(dims))
    conv = _ToFloat32(raw.dtype, step, dims, exact)
    wide = work is not np.float32
    small = wide or n * dims <= _EXACT_SUM_ELEMENTS
    mean_slabs = 1 if small else _MEAN_SLABS
    sum_pow = _ColumnSums(3, step, dims, work, 1 if small else _POWER_GROUP)
    xw = _scratch("xw", (step, dims), work) if wide else None
    slots = _scratch("powers", (3, step, dims), work)  # d, d**2, d**3; then d**4 for d
    shifts = _scratch("shift", (step, dims), work)
    sum_d = _scratch("sum_d", (step, dims), work)
    sum_d.fill(0)
    absx = _scratch("abs", (step, dims), np.float32) if wide else slots[0]  # |x| before d
    mask = _scratch("mask", (step, dims), np.bool_)
    nz_acc = _scratch("near_zero", (step, dims), np.uint8)
    nz_acc.fill(0)
    totals = np.zeros((4, dims), np.float64)  # sums of d, d**4, d**2, d**3 (slot order)
    near_zero = np.zeros(dims, np.int64)
    vmin = np.empty(dims, np.float32)
    vmax = np.empty(dims, np.float32)
    row = np.empty(dims, np.float32)
    norm2 = np.empty(n, work)
    thresh = np.float32(eps)
    shifts[:] = _block_shift(raw)
    for i, lo in enumerate(range(0, n, step), start=1):
        hi = min(n, lo + step)
        k = hi - lo
        x32 = conv(raw[lo:hi])
        if lo == 0:
            np.minimum.reduce(x32, axis=0, out=vmin)
            np.maximum.reduce(x32, axis=0, out=vmax)
        else:
            np.minimum(vmin, np.minimum.reduce(x32, axis=0, out=row), out=vmin)
            np.maximum(vmax, np.maximum.reduce(x32, axis=0, out=row), out=vmax)
        m, acc = mask[:k], nz_acc[:k]
        np.less(np.absolute(x32, out=absx[:k]), thresh, out=m)
        np.add(acc, m.view(np.uint8), out=acc)
        if xw is not None:
            xs = xw[:k]
            np.copyto(xs, x32)
        else:
            xs = x32
        np.vecdot(xs, xs, out=norm2[lo:hi])
        p = slots[:, :k]
        d, q, r = p
        np.subtract(xs, shifts[:k], out=d)
        np.multiply(d, d, out=q)
        np.multiply(q, d, out=r)
        np.add(sum_d[:k], d, out=sum_d[:k])
        np.multiply(q, q, out=d)
        sum_pow.add(p, totals[1:])
        if i % mean_slabs == 0 or hi == n:
            np.add(totals[0], np.add.reduce(sum_d, axis=0, dtype=np.float64), out=totals[0])
            sum_d.fill(0)
        if i % _FLUSH_SLABS == 0 or hi == n:
            np.add(near_zero, np.add.reduce(nz_acc, axis=0, dtype=np.int64), out=near_zero)
            nz_acc.fill(0)
    return _Scan(
        shifts[0].astype(np.float64),
        totals[[0, 2, 3, 1]],
        vmin.astype(np.float64),
        vmax.astype(np.float64),
        near_zero,
        norm2.astype(np.float64, copy=False),
    )


def _norm_partial(norm2: np.ndarray, log_gamma: float) -> NormPartial:
    norms = np.sqrt(norm2)
    finite = np.isfinite(norms)
    nonfinite = int(norms.size - np.count_nonzero(finite))
    if nonfinite:
        norms = norms[finite]
    count = int(norms.size)
    if count == 0:
        return NormPartial(0, 0.0, 0.0, math.inf, -math.inf, 0, nonfinite, 0, _EMPTY)
    mean = float(norms.mean())
    m2 = float(np.square(norms - mean).sum())
    positive = norms[norms > 0]
    zeros = count - int(positive.size)
    if positive.size:
        idx = np.ceil(np.log(positive) / log_gamma).astype(np.int64)
        offset = int(idx.min())
        counts = np.bincount(idx - offset).astype(np.int64)
    else:
        offset, counts = 0, _EMPTY
    return NormPartial(
        count, mean, m2, float(norms.min()), float(norms.max()), zeros, nonfinite, offset, counts
    )


_EMPTY = np.zeros(0, np.int64)

#: Which block kernel :func:`site_block_partial` uses: ``"auto"`` (the fused numba kernel
#: of :mod:`llminstr.analysis._fused` when numba imports, else numpy), ``"fused"``
#: (numba required) or ``"numpy"``. Set from ``LLMINSTR_STATS_KERNEL``; tests set it.
KERNEL: str = os.environ.get("LLMINSTR_STATS_KERNEL", "auto")


def _fused_module() -> Any:
    """The fused-kernel module, or ``None`` for the numpy kernel (see :data:`KERNEL`)."""
    if KERNEL == "numpy":
        return None
    if KERNEL not in ("auto", "fused"):
        raise ConfigError(f"LLMINSTR_STATS_KERNEL must be auto, fused or numpy; got {KERNEL!r}")
    try:
        from llminstr.analysis import _fused
    except ImportError:
        if KERNEL == "fused":
            raise
        return None
    return _fused


#: Below this spread about the mean, float32 fourth powers (about 1e-32 and less) lose
#: precision in the subnormal range: such blocks are summarised in float64. Kurtosis of a
#: column of scale 1e-12 came out as -3.0 (impossible: excess kurtosis is at least -2).
_TINY_SPREAD = 2.0**-26


def _tiny_spread(vmin: np.ndarray, vmax: np.ndarray, center: np.ndarray) -> bool:
    """Whether a column varies, but by so little that float32 powers would underflow."""
    with np.errstate(invalid="ignore", over="ignore"):
        spread = np.maximum(vmax - center, center - vmin)
    return bool(((spread > 0) & (spread < _TINY_SPREAD)).any())


def site_block_partial(block: np.ndarray, eps: float, log_gamma: float) -> SitePartial:
    """Summarise one block ``(rows, *features)`` of stored values (float32, float16 or
    raw bfloat16 bits as uint16) into a :class:`SitePartial`."""
    raw = _storage_2d(block)
    n, dims = raw.shape
    if n == 0:
        nan = np.full(dims, np.nan)
        zero = np.zeros(dims, np.int64)
        empty = NormPartial(0, 0.0, 0.0, math.inf, -math.inf, 0, 0, 0, _EMPTY)
        return SitePartial(0, nan, nan, nan, nan, nan, nan, zero, zero, empty)
    fused = _fused_module()
    sc: _Scan | None = None
    if fused is not None:
        # The whole summary in numba, without the GIL (see _fused.summary).
        ok, mean, m2, m3, m4, vmin, vmax, near, norms = fused.summary(
            raw, shift_row_count(n, dims), eps, log_gamma
        )
        # else: NaN/inf, float32 overflow or underflow: redone below in float64
        if ok and not _tiny_spread(vmin, vmax, mean):
            return SitePartial(
                n, mean, m2, m3, m4, vmin, vmax, near, np.zeros(dims, np.int64), NormPartial(*norms)
            )
    else:
        with np.errstate(over="ignore", invalid="ignore"):
            sc = _scan(raw, eps, np.float32)
    nonfinite = np.zeros(dims, np.int64)
    if sc is None or not (
        np.isfinite(sc.power).all()
        and np.isfinite(sc.norm2).all()
        and (raw.dtype != np.float16 or max(-sc.vmin.min(), sc.vmax.max()) < _F16_LIMIT)
        and not _tiny_spread(sc.vmin, sc.vmax, sc.shift)
    ):
        # NaN/inf in the data, float32 overflow or underflow: redo this block in float64.
        with np.errstate(over="ignore", invalid="ignore"):
            sc = _scan(raw, eps, np.float64, exact=True)
        nonfinite = n - np.add.reduce(np.isfinite(as_float32(raw)), axis=0, dtype=np.int64)
    p = sc.power
    with np.errstate(over="ignore", invalid="ignore"):  # non-finite columns stay NaN/inf
        # Products rather than ``**`` (float64 ``**3`` goes through pow).
        delta = p[0] / n
        mean = sc.shift + delta
        delta2 = delta * delta
        m2 = p[1] - n * delta2
        m3 = p[2] - 3 * delta * p[1] + 2 * n * delta2 * delta
        m4 = p[3] - 4 * delta * p[2] + 6 * delta2 * p[1] - 3 * n * delta2 * delta2
    np.maximum(m2, 0.0, out=m2)
    np.maximum(m4, 0.0, out=m4)
    return SitePartial(
        n=n,
        mean=mean,
        m2=m2,
        m3=m3,
        m4=m4,
        vmin=sc.vmin,
        vmax=sc.vmax,
        near_zero=sc.near_zero,
        nonfinite=nonfinite,
        norms=_norm_partial(_refine_tiny_norms(raw, sc.norm2), log_gamma),
    )


def _refine_tiny_norms(raw: np.ndarray, norm2: np.ndarray) -> np.ndarray:
    """Recompute in float64 the squared norms of rows whose float32 norm is below 1e-15
    (:data:`TINY_NORM2`): their float32 squares underflow. ``norm2`` is float64."""
    tiny = norm2 < TINY_NORM2
    if tiny.any():
        x = as_float32(raw[tiny]).astype(np.float64)
        norm2[tiny] = np.einsum("ij,ij->i", x, x)
    return norm2


# ---------------------------------------------------------------------- merging
def _merge_norms(a: NormPartial, b: NormPartial) -> NormPartial:
    zeros, nonfinite = a.zeros + b.zeros, a.nonfinite + b.nonfinite
    if b.count == 0:
        return NormPartial(**{**a.__dict__, "zeros": zeros, "nonfinite": nonfinite})
    if a.count == 0:
        return NormPartial(**{**b.__dict__, "zeros": zeros, "nonfinite": nonfinite})
    n = a.count + b.count
    delta = b.mean - a.mean
    mean = a.mean + delta * b.count / n
    m2 = a.m2 + b.m2 + delta * delta * a.count * b.count / n
    if a.counts.size == 0:
        offset, counts = b.offset, b.counts
    elif b.counts.size == 0:
        offset, counts = a.offset, a.counts
    else:
        offset = min(a.offset, b.offset)
        end = max(a.offset + a.counts.size, b.offset + b.counts.size)
        counts = np.zeros(end - offset, np.int64)
        counts[a.offset - offset : a.offset - offset + a.counts.size] += a.counts
        counts[b.offset - offset : b.offset - offset + b.counts.size] += b.counts
    return NormPartial(
        n, mean, m2, min(a.vmin, b.vmin), max(a.vmax, b.vmax), zeros, nonfinite, offset, counts
    )


def _merge_two(a: SitePartial, b: SitePartial) -> SitePartial:
    if b.n == 0:
        return a
    if a.n == 0:
        return b
    na, nb = float(a.n), float(b.n)
    fused = _fused_module()
    if fused is not None:
        mean, m2, m3, m4 = fused.merge_moments(
            na, nb, a.mean, a.m2, a.m3, a.m4, b.mean, b.m2, b.m3, b.m4
        )
    else:
        n = na + nb
        delta = b.mean - a.mean
        d2 = delta * delta
        mean = a.mean + delta * (nb / n)
        m2 = a.m2 + b.m2 + d2 * (na * nb / n)
        m3 = (
            a.m3
            + b.m3
            + d2 * delta * (na * nb * (na - nb) / (n * n))
            + 3.0 * delta * (na * b.m2 - nb * a.m2) / n
        )
        m4 = (
            a.m4
            + b.m4
            + d2 * d2 * (na * nb * (na * na - na * nb + nb * nb) / (n**3))
            + 6.0 * d2 * (na * na * b.m2 + nb * nb * a.m2) / (n * n)
            + 4.0 * delta * (na * b.m3 - nb * a.m3) / n
        )
    return SitePartial(
        n=a.n + b.n,
        mean=mean,
        m2=m2,
        m3=m3,
        m4=m4,
        vmin=np.minimum(a.vmin, b.vmin),
        vmax=np.maximum(a.vmax, b.vmax),
        near_zero=a.near_zero + b.near_zero,
        nonfinite=a.nonfinite + b.nonfinite,
        norms=_merge_norms(a.norms, b.norms),
    )


def merge_site_partials(*parts: SitePartial) -> SitePartial:
    """Merge partials of disjoint row ranges (order does not matter)."""
    out = parts[0]
    for p in parts[1:]:
        out = _merge_two(out, p)
    return out


# ---------------------------------------------------------------------- finishing
def _quantile_from_sketch(p: NormPartial, q: float, log_gamma: float) -> float:
    if p.count == 0:
        return math.nan
    rank = math.floor(q * (p.count - 1))  # 0-based, numpy method="lower"
    if rank < p.zeros:
        return 0.0
    cum = np.cumsum(p.counts)
    i = int(np.searchsorted(cum, rank - p.zeros, side="right"))
    gamma = math.exp(log_gamma)
    value = math.exp((p.offset + i) * log_gamma) * 2.0 / (gamma + 1.0)
    return min(max(value, p.vmin), p.vmax)


def finish_partials(
    parts: Sequence[SitePartial],
    feature_shape: Sequence[int],
    outlier_factor: float,
    log_gamma: float,
    quantiles: Sequence[float],
) -> dict[str, Any]:
    """:func:`finish_site` of the merge of ``parts`` (the graph's per-site last task)."""
    return finish_site(
        merge_site_partials(*parts), feature_shape, outlier_factor, log_gamma, quantiles
    )


def finish_site(
    part: SitePartial,
    feature_shape: Sequence[int],
    outlier_factor: float,
    log_gamma: float,
    quantiles: Sequence[float],
) -> dict[str, Any]:
    """Turn a merged :class:`SitePartial` into the statistics (numpy arrays and floats)."""
    shape = tuple(int(s) for s in feature_shape)
    n = float(part.n)
    with np.errstate(divide="ignore", invalid="ignore"):
        var = part.m2 / n
        std = np.sqrt(var)
        skewness = np.sqrt(n) * part.m3 / part.m2**1.5
        kurtosis = n * part.m4 / (part.m2 * part.m2) - 3.0
        constant = part.m2 <= 0
        skewness[constant] = np.nan
        kurtosis[constant] = np.nan
        rms = np.sqrt(var + part.mean**2)
    max_abs = np.maximum(np.abs(part.vmin), np.abs(part.vmax))
    outliers, scores = _outliers(max_abs, rms, outlier_factor)
    norms = part.norms
    gamma = math.exp(log_gamma)
    per_dim = {
        "mean": part.mean,
        "std": std,
        "min": part.vmin,
        "max": part.vmax,
        "max_abs": max_abs,
        "rms": rms,
        "skewness": skewness,
        "kurtosis": kurtosis,
        "near_zero_fraction": part.near_zero / n,
        "nonfinite_count": part.nonfinite,
    }
    out: dict[str, Any] = {k: np.asarray(v).reshape(shape) for k, v in per_dim.items()}
    out["near_zero_fraction_total"] = float(part.near_zero.sum() / (n * part.mean.size))
    out["outlier_dims"] = outliers
    out["outlier_scores"] = scores
    out["row_norm"] = {
        "count": norms.count,
        "mean": norms.mean if norms.count else math.nan,
        "std": math.sqrt(norms.m2 / norms.count) if norms.count else math.nan,
        "min": norms.vmin if norms.count else math.nan,
        "max": norms.vmax if norms.count else math.nan,
        "quantiles": {float(q): _quantile_from_sketch(norms, q, log_gamma) for q in quantiles},
        "relative_accuracy": (gamma - 1.0) / (gamma + 1.0),
        "zero_count": norms.zeros,
        "nonfinite_count": norms.nonfinite,
        "histogram_bins": int(norms.counts.size),
    }
    return out


def _outliers(max_abs: np.ndarray, rms: np.ndarray, factor: float) -> tuple[np.ndarray, np.ndarray]:
    with np.errstate(divide="ignore", invalid="ignore"):
        med_max = np.nanmedian(max_abs) if np.isfinite(max_abs).any() else math.nan
        med_rms = np.nanmedian(rms) if np.isfinite(rms).any() else math.nan
        flag = (max_abs > factor * med_max) | (rms > factor * med_rms)
        score = np.fmax(max_abs / med_max, rms / med_rms)
    idx = np.flatnonzero(flag)
    order = np.argsort(-np.nan_to_num(score[idx], nan=0.0, posinf=np.inf), kind="stable")
    idx = idx[order].astype(np.int64)
    return idx, score[idx].astype(np.float64)


# ---------------------------------------------------------------------- token columns
def column_block_partial(block: np.ndarray, counted: bool) -> ColumnPartial:
    """Summarise one block of an int64 token column."""
    values = np.asarray(block).reshape(-1)
    if values.size == 0:
        return ColumnPartial(0, 0, 0, _EMPTY if counted else None, _EMPTY if counted else None)
    uniq: np.ndarray | None = None
    counts: np.ndarray | None = None
    if counted:
        uniq, c = np.unique(values, return_counts=True)
        counts = c.astype(np.int64)
    return ColumnPartial(int(values.size), int(values.min()), int(values.max()), uniq, counts)


def merge_column_partials(*parts: ColumnPartial) -> ColumnPartial:
    """Merge token-column partials of disjoint row ranges."""
    live = [p for p in parts if p.n]
    if not live:
        return parts[0]
    values: np.ndarray | None = None
    counts: np.ndarray | None = None
    if live[0].values is not None:
        allv = np.concatenate([p.values for p in live if p.values is not None])
        allc = np.concatenate([p.counts for p in live if p.counts is not None])
        values, inverse = np.unique(allv, return_inverse=True)
        counts = np.zeros(values.size, np.int64)
        np.add.at(counts, inverse.reshape(-1), allc)
    return ColumnPartial(
        sum(p.n for p in live),
        min(p.vmin for p in live),
        max(p.vmax for p in live),
        values,
        counts,
    )


def _count_summary(counts: np.ndarray) -> dict[str, float]:
    if counts.size == 0:
        return {"min": math.nan, "mean": math.nan, "max": math.nan}
    return {
        "min": int(counts.min()),
        "mean": float(counts.mean()),
        "max": int(counts.max()),
    }


def finish_tokens(parts: dict[str, ColumnPartial]) -> dict[str, Any]:
    """Token-column summary: per column min/max, plus sequence/step/token-id counts."""
    out: dict[str, Any] = {
        "rows": max((p.n for p in parts.values()), default=0),
        "columns": {c: {"min": p.vmin, "max": p.vmax} for c, p in parts.items()},
    }
    seq = parts.get("sequence")
    if seq is not None and seq.counts is not None:
        out["num_sequences"] = int(seq.counts.size)
        out["rows_per_sequence"] = _count_summary(seq.counts)
    step = parts.get("step")
    if step is not None and step.counts is not None and step.values is not None:
        out["num_steps"] = int(step.counts.size)
        out["rows_per_step"] = _count_summary(step.counts)
        out["step_counts"] = {"step": step.values, "rows": step.counts}
    tok = parts.get("token_id")
    if tok is not None and tok.counts is not None:
        out["num_distinct_tokens"] = int(tok.counts.size)
    pos = parts.get("position")
    if pos is not None and pos.n:
        out["max_position"] = pos.vmax
    return out


# ---------------------------------------------------------------------- graph building
def _check_number(name: str, value: Any, *, low: float, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise ConfigError(f"{name} must be a number; got {value!r}")
    v = float(value)
    if not (low < v < high):
        raise ConfigError(f"{name} must be in ({low}, {high}); got {value!r}")
    return v


def _check_options(
    eps: float,
    outlier_factor: float,
    relative_accuracy: float,
    quantiles: Iterable[float],
    split_every: int,
) -> tuple[float, float, float, tuple[float, ...], int]:
    eps_v = _check_number("eps", eps, low=0.0)
    if np.float32(eps_v) == 0:  # the comparison |x| < eps is made in float32
        raise ConfigError(f"eps must be at least float32's smallest value (1.4e-45); got {eps!r}")
    factor = _check_number("outlier_factor", outlier_factor, low=0.0)
    acc = _check_number("relative_accuracy", relative_accuracy, low=0.0, high=1.0)
    if acc < MIN_RELATIVE_ACCURACY:  # the histogram would need millions of bins per decade
        raise ConfigError(
            f"relative_accuracy must be at least {MIN_RELATIVE_ACCURACY:g}; got {relative_accuracy!r}"
        )
    if isinstance(quantiles, (str, bytes)) or not isinstance(quantiles, Iterable):
        raise ConfigError(f"quantiles must be a list of numbers in [0, 1]; got {quantiles!r}")
    qs = tuple(quantiles)
    for q in qs:
        if (
            isinstance(q, (bool, np.bool_))
            or not isinstance(q, (int, float, np.integer, np.floating))
            or not 0.0 <= q <= 1.0
        ):
            raise ConfigError(f"quantiles must be numbers in [0, 1]; got {q!r}")
    if (
        isinstance(split_every, (bool, np.bool_))
        or not isinstance(split_every, (int, np.integer))
        or split_every < 2
    ):
        raise ConfigError(f"split_every must be an integer >= 2; got {split_every!r}")
    return eps_v, factor, acc, tuple(float(q) for q in qs), int(split_every)


def tree_reduce(parts: list[Delayed], merge: Callable[..., Any], split_every: int) -> Delayed:
    """Merge ``parts`` ``split_every`` at a time, level by level, into one Delayed."""
    from dask.delayed import delayed

    if not parts:
        raise ConfigError("nothing to reduce: the row range selects no blocks")
    level = list(parts)
    while len(level) > 1:
        level = [
            delayed(merge, pure=True)(*level[i : i + split_every])
            for i in range(0, len(level), split_every)
        ]
    return level[0]


#: Raw (decoded) bytes of activations a statistics read task covers: whole storage chunks,
#: at least one. A task reads its chunks one at a time, so its memory is one chunk.
TASK_BYTES = 32 << 20


def _chunk_spans(
    start: int, stop: int, chunk_rows: int, per_task: int
) -> list[tuple[tuple[int, int, int], ...]]:
    """Rows ``[start, stop)`` as tasks of at most ``per_task`` storage chunks, each chunk as
    ``(index, lo, hi)``: rows ``lo:hi`` of decoded chunk ``index``."""
    spans = []
    first, last = start // chunk_rows, (stop - 1) // chunk_rows
    for t0 in range(first, last + 1, per_task):
        spans.append(
            tuple(
                (
                    i,
                    max(start, i * chunk_rows) - i * chunk_rows,
                    min(stop, (i + 1) * chunk_rows) - i * chunk_rows,
                )
                for i in range(t0, min(last + 1, t0 + per_task))
            )
        )
    return spans


def read_block_partial(
    source: Any, span: Sequence[tuple[int, int, int]], eps: float, log_gamma: float
) -> SitePartial:
    """Read the chunks of ``span`` (see :func:`_chunk_spans`) one at a time from
    ``source`` (the reader's chunk source) and summarise their rows: the block task of
    the statistics graph. Holds one decoded chunk (in a per-thread buffer) at a time."""
    # Each chunk is decoded into this thread's chunk buffer, reused from chunk to chunk
    # and task to task (a fresh buffer would be page-faulted in for every chunk).
    buf = _scratch("chunk", (source.chunk_rows, *source.feature_shape), source.dtype)
    out: SitePartial | None = None
    for index, lo, hi in span:  # merged as it goes: narrow sites put many chunks in a task
        part = site_block_partial(source.read_chunk(index, out=buf)[lo:hi], eps, log_gamma)
        out = part if out is None else _merge_two(out, part)
    assert out is not None
    return out


def read_column_partial(
    source: Any, span: Sequence[tuple[int, int, int]], counted: bool
) -> ColumnPartial:
    """Read the chunks of ``span`` of a token column and summarise their rows together:
    the block task of the token summary."""
    rows = sum(hi - lo for _, lo, hi in span)
    values = np.empty(rows, dtype=source.dtype)
    at = 0
    for index, lo, hi in span:
        values[at : at + hi - lo] = source.read_chunk(index)[lo:hi]
        at += hi - lo
    return column_block_partial(values, counted)


def statistics_for_site(
    capture: Capture | str | os.PathLike[str],
    site: str,
    *,
    rows: Any = None,
    eps: float = DEFAULT_EPS,
    outlier_factor: float = DEFAULT_OUTLIER_FACTOR,
    relative_accuracy: float = DEFAULT_RELATIVE_ACCURACY,
    quantiles: Iterable[float] = NORM_QUANTILES,
    split_every: int = DEFAULT_SPLIT_EVERY,
) -> dict[str, Any]:
    """Lazy statistics of one site over ``rows`` (see the module docstring for each).

    Returns a dict. The keys of :data:`PER_DIM_KEYS` and :data:`LAZY_KEYS` are
    ``dask.delayed`` objects: per-dimension ones compute to numpy arrays of the site's
    feature shape (float64; ``nonfinite_count`` int64), ``near_zero_fraction_total`` to a
    float, ``outlier_dims`` / ``outlier_scores`` to 1-D arrays, ``row_norm`` to a dict.
    ``site``, ``rows`` (``[start, stop]``), ``num_rows``, ``feature_shape``, ``dtype``,
    ``eps``, ``outlier_factor`` and ``passes`` are plain values. Every lazy value is a
    ``Delayed`` (no dask arrays) on purpose: ``dask.compute`` of a structure that mixes
    dask arrays and delayed objects returns its results in the wrong places in
    dask 2026.8 (see :func:`llminstr.analysis.compute`). Nothing is read until the
    dict is computed (``llminstr.analysis.compute`` or ``dask.compute``); computing any
    subset of it reads each chunk of the site once.
    """
    from dask.base import tokenize

    cap = as_capture(capture)
    (name,) = check_sites(cap, [site])
    eps_v, factor, acc, qs, fan_in = _check_options(
        eps, outlier_factor, relative_accuracy, quantiles, split_every
    )
    start, stop = resolve_rows(rows, cap.num_rows)
    info = cap.site_info(name)
    shape = tuple(int(s) for s in info["feature_shape"])
    log_gamma = math.log((1.0 + acc) / (1.0 - acc))

    fused = _fused_module()
    if fused is not None:
        fused.warm_up(info["storage_dtype"])  # compile time and memory before any block task
    # Block tasks read their chunks themselves (read, decode and scan in one task, a few
    # chunks per task): a task per chunk plus the reader's getter task per chunk cost
    # more in scheduling than the scan (docs/decisions.md). Keys are deterministic, so
    # equal requests in one compute share their tasks.
    source = cap._source(f"activations/{name}", name)
    chunk_bytes = cap.chunk_rows * math.prod(shape) * source.dtype.itemsize
    per_task = max(1, TASK_BYTES // max(1, chunk_bytes))
    token = tokenize(source, cap._root["commit_seq"], start, stop, eps_v, log_gamma, per_task)
    # The graph is assembled task by task (_common.TaskGraph): building it with
    # dask.delayed calls took as long as a quarter of a 256 MiB pass (decisions.md).
    graph = TaskGraph(f"llminstr-stats-{tokenize(token, fan_in, shape, factor, qs)}")
    blocks = [
        graph.task(
            (f"llminstr-stats-{token}", i), read_block_partial, source, span, eps_v, log_gamma
        )
        for i, span in enumerate(_chunk_spans(start, stop, cap.chunk_rows, per_task))
    ]
    # The last merge happens inside the finishing task (one task fewer per site).
    blocks = graph.reduce(blocks, merge_site_partials, fan_in, until=fan_in)
    final = graph.delayed(
        graph.task(graph.name, finish_partials, blocks, shape, factor, log_gamma, qs)
    )
    out: dict[str, Any] = {
        "site": name,
        "rows": [start, stop],
        "num_rows": stop - start,
        "feature_shape": list(shape),
        "dtype": str(info["logical_dtype"]),
        "eps": eps_v,
        "outlier_factor": factor,
        "passes": PASSES,
    }
    for key in (*PER_DIM_KEYS, *LAZY_KEYS):
        out[key] = lazy_item(final, key)
    return out


def token_summary(
    capture: Capture | str | os.PathLike[str],
    *,
    rows: Any = None,
    split_every: int = DEFAULT_SPLIT_EVERY,
) -> Delayed:
    """Lazy summary of the token columns over ``rows`` (a ``dask.delayed`` dict):
    ``rows``; ``columns`` (per column ``min``/``max``); ``num_sequences`` and
    ``rows_per_sequence``; ``num_steps``, ``rows_per_step`` and ``step_counts``
    (``{"step": values, "rows": counts}``); ``num_distinct_tokens``; ``max_position``."""
    from dask.base import tokenize

    from llminstr.format import TOKENS_GROUP

    cap = as_capture(capture)
    start, stop = resolve_rows(rows, cap.num_rows)
    _check_options(DEFAULT_EPS, 1.0, 0.5, (), split_every)
    per_task = max(1, TASK_BYTES // (cap.chunk_rows * 8))
    # Tasks read their chunks themselves, as the site statistics' do: a delayed call per
    # block of the dask array culled the whole array graph for each block (graph building
    # grew with the square of the chunk count: 33 s for 10**4 chunks).
    sources = {c: cap._source(f"{TOKENS_GROUP}/{c}", f"tokens/{c}") for c in cap.token_columns}
    seq = cap._root["commit_seq"]
    tokens = {
        c: tokenize(src, seq, start, stop, c in COUNTED_COLUMNS, per_task)
        for c, src in sources.items()
    }
    graph = TaskGraph(f"llminstr-tokens-{tokenize(list(tokens.values()), split_every)}")
    columns: dict[str, Any] = {}
    for col, source in sources.items():
        blocks = [
            graph.task(
                (f"llminstr-tokens-{tokens[col]}", i),
                read_column_partial,
                source,
                span,
                col in COUNTED_COLUMNS,
            )
            for i, span in enumerate(_chunk_spans(start, stop, cap.chunk_rows, per_task))
        ]
        (columns[col],) = graph.reduce(blocks, merge_column_partials, split_every, tag=f"-{col}")
    result: Delayed = graph.delayed(graph.task(graph.name, finish_tokens, columns))
    return result


def compute_statistics(
    capture: Capture | str | os.PathLike[str],
    sites: str | Iterable[str] | None = None,
    rows: Any = None,
    *,
    eps: float = DEFAULT_EPS,
    outlier_factor: float = DEFAULT_OUTLIER_FACTOR,
    relative_accuracy: float = DEFAULT_RELATIVE_ACCURACY,
    quantiles: Iterable[float] = NORM_QUANTILES,
    split_every: int = DEFAULT_SPLIT_EVERY,
    tokens: bool = True,
) -> dict[str, Any]:
    """Lazy statistics of several sites (all by default) plus the token-column summary.

    Despite its name this builds the graph only: it returns
    ``{"sites": {site: statistics_for_site(...)}, "tokens": token_summary(...) | None,
    "rows": [start, stop], "passes": 1}``. Compute it with ``llminstr.analysis.compute``
    (one ``dask.compute``: each chunk of each site is read once).
    """
    if not isinstance(tokens, (bool, np.bool_)):
        raise ConfigError(f"tokens must be True or False; got {tokens!r}")
    cap = as_capture(capture)
    names = check_sites(cap, sites)
    start, stop = resolve_rows(rows, cap.num_rows)
    _, _, _, qs, _ = _check_options(eps, outlier_factor, relative_accuracy, quantiles, split_every)
    per_site = {
        name: statistics_for_site(
            cap,
            name,
            rows=(start, stop),
            eps=eps,
            outlier_factor=outlier_factor,
            relative_accuracy=relative_accuracy,
            quantiles=qs,
            split_every=split_every,
        )
        for name in names
    }
    return {
        "sites": per_site,
        "tokens": token_summary(cap, rows=(start, stop), split_every=split_every)
        if tokens
        else None,
        "rows": [start, stop],
        "passes": PASSES,
    }
