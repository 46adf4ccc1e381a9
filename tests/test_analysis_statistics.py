"""Statistics of llminstr.analysis.statistics against direct float64 numpy computations."""

from __future__ import annotations

import collections
import itertools
import threading
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from conftest import token_columns
from hypothesis import given, settings
from hypothesis import strategies as st

from llminstr.analysis import analyze_activations, compute
from llminstr.analysis.statistics import (
    LAZY_KEYS,
    NORM_QUANTILES,
    PASSES,
    PER_DIM_KEYS,
    compute_statistics,
    finish_site,
    merge_site_partials,
    site_block_partial,
    statistics_for_site,
    token_summary,
)
from llminstr.errors import ConfigError
from llminstr.format import SiteInfo
from llminstr.reader import _Source, open_capture
from llminstr.storage.writer import CaptureWriter

EPS = 1e-3
ACC = 0.005


def make_data(n: int, d: int, seed: int = 0) -> np.ndarray:
    """float32 rows with the shapes that break naive statistics: a dim with a huge mean
    and a small spread, a heavy-tailed dim, a 50x outlier dim, exact zeros and tiny
    values, and a constant dim."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)) * 2.0 + 0.5
    x[:, 0] = 1000.0 + rng.standard_normal(n) * 0.5  # |mean| / std = 2000
    x[:, 1] = rng.standard_t(3, n)  # heavy tails
    x[:, 2] *= 50.0  # outlier dim
    x[:, 3] = 0.0
    x[rng.random(n) < 0.3, 4] = 0.0  # near-zero entries
    x[: n // 2, 5] = rng.standard_normal(n // 2) * 1e-4  # tiny values, around EPS
    x[:, 6] = 7.25  # constant dim
    return x.astype(np.float32)


def write(
    path: Path,
    sites: dict[str, np.ndarray],
    dtypes: dict[str, str] | None = None,
    chunk_rows: int = 64,
    tokens: dict[str, np.ndarray] | None = None,
) -> None:
    dtypes = dtypes or {}
    n = len(next(iter(sites.values())))
    infos = [SiteInfo(k, v.shape[1:], dtypes.get(k, "float32")) for k, v in sites.items()]
    stored = {}
    for k, v in sites.items():
        kind = dtypes.get(k, "float32")
        stored[k] = v.astype(ml_dtypes.bfloat16) if kind == "bfloat16" else v.astype(kind)
    with CaptureWriter(path, infos, chunk_rows=chunk_rows) as w:
        w.append(tokens if tokens is not None else token_columns(n), stored)


def reference(x32: np.ndarray, eps: float = EPS, factor: float = 6.0) -> dict[str, Any]:
    """Direct float64 statistics of float32 rows (same definitions as the module)."""
    n = x32.shape[0]
    flat32 = x32.reshape(n, -1)
    x = flat32.astype(np.float64)
    mean = x.mean(0)
    c = x - mean
    m2, m3, m4 = (c**2).mean(0), (c**3).mean(0), (c**4).mean(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        skew = m3 / m2**1.5
        kurt = m4 / m2**2 - 3.0
    skew[m2 == 0] = np.nan
    kurt[m2 == 0] = np.nan
    max_abs = np.abs(x).max(0)
    rms = np.sqrt((x**2).mean(0))
    outliers = np.flatnonzero(
        (max_abs > factor * np.median(max_abs)) | (rms > factor * np.median(rms))
    )
    norms = np.sqrt((x**2).sum(1))
    return {
        "mean": mean,
        "std": np.sqrt(m2),
        "min": x.min(0),
        "max": x.max(0),
        "max_abs": max_abs,
        "rms": rms,
        "skewness": skew,
        "kurtosis": kurt,
        "near_zero_fraction": (np.abs(flat32) < np.float32(eps)).mean(0),
        "near_zero_count": (np.abs(flat32) < np.float32(eps)).sum(0),
        "outliers": set(outliers.tolist()),
        "norms": norms,
    }


def check_site(stats: dict[str, Any], x32: np.ndarray, eps: float = EPS) -> None:
    ref = reference(x32, eps)
    shape = x32.shape[1:]
    n = x32.shape[0]
    for key in PER_DIM_KEYS:
        assert stats[key].shape == shape, key
    flat = {k: np.asarray(stats[k]).reshape(-1) for k in PER_DIM_KEYS}
    assert stats["num_rows"] == n
    np.testing.assert_allclose(flat["mean"], ref["mean"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(flat["std"], ref["std"], rtol=1e-5, atol=1e-9)
    np.testing.assert_array_equal(flat["min"], ref["min"])
    np.testing.assert_array_equal(flat["max"], ref["max"])
    np.testing.assert_array_equal(flat["max_abs"], ref["max_abs"])
    np.testing.assert_allclose(flat["rms"], ref["rms"], rtol=1e-6)
    np.testing.assert_allclose(flat["skewness"], ref["skewness"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(flat["kurtosis"], ref["kurtosis"], rtol=1e-4, atol=1e-4)
    # near-zero counts are exact: the fraction is count / n in float64
    np.testing.assert_array_equal(flat["near_zero_fraction"], ref["near_zero_count"] / n)
    assert stats["near_zero_fraction_total"] == pytest.approx(
        ref["near_zero_count"].sum() / ref["near_zero_count"].size / n, rel=1e-12
    )
    np.testing.assert_array_equal(flat["nonfinite_count"], 0)
    assert set(np.asarray(stats["outlier_dims"]).tolist()) == ref["outliers"]

    norms = ref["norms"]
    rn = stats["row_norm"]
    assert rn["count"] == n and rn["nonfinite_count"] == 0
    assert rn["mean"] == pytest.approx(norms.mean(), rel=1e-6)
    # norms are float32 sums of squares: their spread is resolved to ~1e-6 of their mean
    assert rn["std"] == pytest.approx(norms.std(), rel=1e-4, abs=1e-6 * norms.mean())
    assert rn["min"] == pytest.approx(norms.min(), rel=1e-6)
    assert rn["max"] == pytest.approx(norms.max(), rel=1e-6)
    assert set(rn["quantiles"]) == set(NORM_QUANTILES)
    for q, v in rn["quantiles"].items():
        want = np.quantile(norms, q, method="lower")
        # within the sketch's relative accuracy (plus float32 rounding of the norms)
        assert abs(v - want) <= (rn["relative_accuracy"] + 1e-6) * want, (q, v, want)


@pytest.fixture
def data() -> np.ndarray:
    return make_data(1000, 24)


def test_float32_matches_numpy(backend: str, tmp_path: Path, data: np.ndarray) -> None:
    path = tmp_path / f"c{backend}"
    write(path, {"s": data})
    with open_capture(path) as cap:
        out = compute(compute_statistics(cap, eps=EPS))
    check_site(out["sites"]["s"], data)
    assert out["passes"] == PASSES == 1
    assert out["rows"] == [0, 1000]
    s = out["sites"]["s"]
    # the mean-1000 dim is the most extreme (by rms), then the 50x dim (by max |x|)
    assert s["outlier_dims"].tolist()[:2] == [0, 2]
    assert np.isnan(s["kurtosis"][6]) and s["std"][6] == 0.0  # constant dim
    assert s["near_zero_fraction"][3] == 1.0


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_sites(tmp_path: Path, dtype: str, data: np.ndarray) -> None:
    data = data.copy()
    data[:, 0] -= 990.0  # keep bf16's 8-bit mantissa from flattening the big-mean dim
    path = tmp_path / "c.zarr"
    write(path, {"h": data}, {"h": dtype})
    stored = data.astype(ml_dtypes.bfloat16) if dtype == "bfloat16" else data.astype(dtype)
    with open_capture(path) as cap:
        out = compute(statistics_for_site(cap, "h", eps=EPS))
    assert out["dtype"] == dtype
    check_site(out, stored.astype(np.float32))


def test_multi_dim_features_and_row_subsets(tmp_path: Path) -> None:
    x = make_data(700, 16, seed=3).reshape(700, 2, 8)
    path = tmp_path / "c.h5"
    write(path, {"a": x}, chunk_rows=50)
    with open_capture(path) as cap:
        for rows, (lo, hi) in [
            ((37, 613), (37, 613)),
            (slice(-120, None), (580, 700)),
            (slice(100, 150), (100, 150)),  # exactly one chunk
            ((0, 1), (0, 1)),
        ]:
            out = compute(statistics_for_site(cap, "a", rows=rows, eps=EPS))
            assert out["rows"] == [lo, hi]
            sub = x[lo:hi]
            if hi - lo > 1:
                check_site(out, sub)
            else:
                np.testing.assert_array_equal(out["mean"], sub[0])
                assert np.isnan(out["kurtosis"]).all()


def test_nonfinite_and_float32_overflow(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((300, 6)).astype(np.float32)
    x[:, 1] *= 3e9  # x**4 overflows float32: the block is redone in float64
    x[10, 2] = np.nan
    x[200, 3] = np.inf
    path = tmp_path / "c.zarr"
    write(path, {"s": x}, chunk_rows=64)
    with open_capture(path) as cap:
        out = compute(statistics_for_site(cap, "s"))
    np.testing.assert_array_equal(out["nonfinite_count"], [0, 0, 1, 1, 0, 0])
    ok = [0, 1, 4, 5]
    check_ok = reference(x[:, ok])
    np.testing.assert_allclose(out["mean"][ok], check_ok["mean"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out["kurtosis"][ok], check_ok["kurtosis"], rtol=1e-4, atol=1e-4)
    assert np.isnan(out["mean"][2]) and not np.isfinite(out["mean"][3])
    rn = out["row_norm"]
    assert rn["nonfinite_count"] == 2 and rn["count"] == 298
    norms = np.sqrt((x.astype(np.float64) ** 2).sum(1))
    finite = norms[np.isfinite(norms)]
    assert rn["mean"] == pytest.approx(finite.mean(), rel=1e-6)
    assert rn["quantiles"][0.5] == pytest.approx(
        np.quantile(finite, 0.5, method="lower"), rel=ACC + 1e-6
    )


def test_zero_rows_in_norm_quantiles(tmp_path: Path) -> None:
    x = np.ones((100, 4), np.float32)
    x[:40] = 0.0
    path = tmp_path / "c.zarr"
    write(path, {"s": x}, chunk_rows=16)
    with open_capture(path) as cap:
        rn = compute(statistics_for_site(cap, "s"))["row_norm"]
    assert rn["zero_count"] == 40
    assert rn["quantiles"][0.25] == 0.0
    assert rn["quantiles"][0.5] == 2.0 and rn["quantiles"][0.99] == 2.0  # clamped to max


def test_token_summary(tmp_path: Path) -> None:
    # 3 prompts of lengths 5, 3, 4 in one prefill step, then 2 decode steps of 3 rows
    seq = np.array([0] * 5 + [1] * 3 + [2] * 4 + [0, 1, 2, 0, 1, 2])
    pos = np.array([*range(5), *range(3), *range(4), 5, 3, 4, 6, 4, 5])
    step = np.array([0] * 12 + [1] * 3 + [2] * 3)
    tok = np.arange(18) % 11
    cols = {"token_id": tok, "sequence": seq, "position": pos, "step": step}
    path = tmp_path / "c.zarr"
    write(path, {"s": np.zeros((18, 2), np.float32)}, chunk_rows=4, tokens=cols)
    with open_capture(path) as cap:
        t = compute(token_summary(cap))
        sub = compute(token_summary(cap, rows=(12, 18)))
    assert t["rows"] == 18
    assert t["columns"]["position"] == {"min": 0, "max": 6}
    assert t["num_sequences"] == 3
    assert t["rows_per_sequence"] == {"min": 5, "mean": 6.0, "max": 7}
    assert t["num_steps"] == 3
    np.testing.assert_array_equal(t["step_counts"]["step"], [0, 1, 2])
    np.testing.assert_array_equal(t["step_counts"]["rows"], [12, 3, 3])
    assert t["rows_per_step"] == {"min": 3, "mean": 6.0, "max": 12}
    assert t["num_distinct_tokens"] == 11
    assert t["max_position"] == 6
    assert sub["rows"] == 6 and sub["num_steps"] == 2 and sub["num_sequences"] == 3


class ReadCounter:
    """Counts ``_Source.read_chunk`` calls per (array, chunk index)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.counts: collections.Counter[tuple[str, int]] = collections.Counter()
        lock = threading.Lock()
        original = _Source.read_chunk

        def counting(src: _Source, index: int, out: np.ndarray | None = None) -> np.ndarray:
            with lock:
                self.counts[(src.key, index)] += 1
            return original(src, index, out=out)

        monkeypatch.setattr(_Source, "read_chunk", counting)


@pytest.mark.parametrize("rows", [None, (70, 333)])
def test_graph_is_lazy_and_reads_each_chunk_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rows: tuple[int, int] | None
) -> None:
    x = make_data(400, 8)
    path = tmp_path / "c.zarr"
    write(path, {"a": x, "b": x[:, :4] * 2, "c": x[:, :3]}, {"b": "bfloat16"}, chunk_rows=32)
    reads = ReadCounter(monkeypatch)
    result = analyze_activations(
        path, rows=rows, include=("statistics",), statistics_options={"eps": EPS}
    )
    # a second, independent graph over the same site shares the same block keys
    result["extra"] = statistics_for_site(result["capture"]["path"], "a", rows=rows, eps=EPS)
    assert sum(reads.counts.values()) == 0  # building the graph reads nothing
    out = compute(result, scheduler="threads", num_workers=2)
    lo, hi = rows or (0, 400)
    touched = range(lo // 32, (hi - 1) // 32 + 1)
    keys = [f"activations/{s}" for s in "abc"] + [
        f"tokens/{c}" for c in ("token_id", "sequence", "position", "step")
    ]
    assert dict(reads.counts) == {(k, i): 1 for k in keys for i in touched}
    assert max(reads.counts.values()) <= PASSES
    np.testing.assert_allclose(out["statistics"]["sites"]["a"]["mean"], out["extra"]["mean"])
    check_site(out["statistics"]["sites"]["a"], x[lo:hi])


def test_dask_compute_directly_gives_the_same(tmp_path: Path, data: np.ndarray) -> None:
    """All lazy values are Delayed, so plain dask.compute places every result right."""
    import dask

    path = tmp_path / "c.zarr"
    write(path, {"a": data, "b": data[:, ::-1].copy()})
    result = analyze_activations(path, include=("statistics",))
    (direct,) = dask.compute(result)
    ours = compute(result)
    for site in ("a", "b"):
        for key in PER_DIM_KEYS:
            np.testing.assert_array_equal(
                direct["statistics"]["sites"][site][key], ours["statistics"]["sites"][site][key]
            )
    np.testing.assert_allclose(
        ours["statistics"]["sites"]["b"]["mean"], data[:, ::-1].mean(0), rtol=1e-5, atol=1e-5
    )


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.integers(1, 40), min_size=1, max_size=6),
    st.integers(0, 2**32 - 1),
    st.sampled_from([np.float32, np.float16, np.uint16]),
)
def test_merging_is_split_invariant(sizes: list[int], seed: int, dtype: type) -> None:
    """Blocks of any sizes, merged in any grouping, give the whole-array statistics."""
    rng = np.random.default_rng(seed)
    n = sum(sizes)
    x = rng.standard_normal((n, 5)) * rng.uniform(0.1, 10, 5) + rng.uniform(-5, 5, 5)
    x32 = x.astype(np.float32)
    if dtype is np.uint16:
        stored = x32.astype(ml_dtypes.bfloat16).view(np.uint16)
        x32 = stored.view(ml_dtypes.bfloat16).astype(np.float32)
    else:
        stored = x32.astype(dtype)
        x32 = stored.astype(np.float32)
    lg = float(np.log((1 + ACC) / (1 - ACC)))
    bounds = np.cumsum([0, *sizes])
    parts = [site_block_partial(stored[a:b], EPS, lg) for a, b in itertools.pairwise(bounds)]
    whole = site_block_partial(stored, EPS, lg)
    empty = site_block_partial(stored[:0], EPS, lg)
    merged = merge_site_partials(empty, *parts[::-1], empty)
    fin = finish_site(merged, (5,), 6.0, lg, NORM_QUANTILES)
    ref = finish_site(whole, (5,), 6.0, lg, NORM_QUANTILES)
    direct = reference(x32)
    np.testing.assert_allclose(fin["mean"], direct["mean"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(fin["std"], ref["std"], rtol=1e-6)
    np.testing.assert_allclose(fin["kurtosis"], ref["kurtosis"], rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(fin["near_zero_fraction"], ref["near_zero_fraction"])
    assert fin["row_norm"]["quantiles"] == ref["row_norm"]["quantiles"]


def test_float16_extremes_subnormals_and_nonfinite(tmp_path: Path) -> None:
    """The fast float16 decode is exact for subnormals and the largest finite values;
    blocks holding inf/NaN are decoded again exactly."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal((200, 4)).astype(np.float16)
    x[:, 0] = np.float16(65504.0) * np.sign(rng.standard_normal(200)).astype(np.float16)
    x[:, 1] = (rng.integers(-1023, 1024, 200) * 2.0**-24).astype(np.float16)  # subnormals
    path = tmp_path / "c.zarr"
    write(path, {"h": x}, {"h": "float16"}, chunk_rows=64)
    with open_capture(path) as cap:
        out = compute(statistics_for_site(cap, "h"))
    check_site(out, x.astype(np.float32), eps=1e-6)

    y = x.copy()
    y[5, 2] = np.inf
    y[70, 3] = np.nan
    path2 = tmp_path / "d.zarr"
    write(path2, {"h": y}, {"h": "float16"}, chunk_rows=64)
    with open_capture(path2) as cap:
        out = compute(statistics_for_site(cap, "h"))
    np.testing.assert_array_equal(out["nonfinite_count"], [0, 0, 1, 1])
    assert out["max"][2] == np.inf and np.isnan(out["mean"][3])
    ref = reference(y[:, :2].astype(np.float32))
    np.testing.assert_allclose(out["mean"][:2], ref["mean"], rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(out["kurtosis"][:2], ref["kurtosis"], rtol=1e-4, atol=1e-4)
    assert out["row_norm"]["nonfinite_count"] == 2


@pytest.mark.parametrize(
    ("n", "d", "flush"),
    [
        (1, 24, 255),
        (100, 3000, 255),  # slabs of a few rows (one float32 group each) and a short tail
        (100, 3000, 2),  # ... with the float32 accumulators flushed between slabs
        (1000, 8, 255),  # a small block: float32 terms summed in float64
        (5000, 16, 255),  # two slabs: float32 groups of _SUM_ROWS rows plus a tail group
        (10000, 8, 1),  # several grouped slabs, a tail slab, a flush after every slab
    ],
)
@pytest.mark.parametrize("kernel", ["numpy", "auto"])
def test_block_kernel_slab_layouts(
    monkeypatch: pytest.MonkeyPatch, n: int, d: int, flush: int, kernel: str
) -> None:
    """Every way the kernel cuts a block into slabs and float32 groups gives the direct
    float64 statistics (float32, float16 and bfloat16 storage)."""
    from llminstr.analysis import statistics as stats_mod

    monkeypatch.setattr(stats_mod, "KERNEL", kernel)
    monkeypatch.setattr(stats_mod, "_FLUSH_SLABS", flush)
    monkeypatch.setattr(stats_mod, "_MEAN_SLABS", flush)
    x = make_data(n, d, seed=n + d)
    x[:, 7 % d] = 1e4 + x[:, 7 % d]  # another large-mean dim (|mean| / std ~ 5000)
    lg = float(np.log((1 + ACC) / (1 - ACC)))
    for stored in (x, x.astype(np.float16), x.astype(ml_dtypes.bfloat16).view(np.uint16)):
        x32 = (
            stored.view(ml_dtypes.bfloat16).astype(np.float32)
            if stored.dtype == np.uint16
            else stored.astype(np.float32)
        )
        fin = finish_site(site_block_partial(stored, EPS, lg), (d,), 6.0, lg, NORM_QUANTILES)
        ref = reference(x32)
        np.testing.assert_array_equal(fin["min"], ref["min"])
        np.testing.assert_array_equal(fin["max"], ref["max"])
        np.testing.assert_array_equal(fin["near_zero_fraction"], ref["near_zero_count"] / n)
        np.testing.assert_array_equal(fin["nonfinite_count"], 0)
        np.testing.assert_allclose(fin["mean"], ref["mean"], rtol=1e-6, atol=1e-6)
        rms = np.sqrt((x32.astype(np.float64) ** 2).mean(0))
        np.testing.assert_allclose(fin["rms"], rms, rtol=1e-6)
        if n > 1:
            np.testing.assert_allclose(fin["std"], ref["std"], rtol=1e-5, atol=1e-9)
            np.testing.assert_allclose(fin["skewness"], ref["skewness"], rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(fin["kurtosis"], ref["kurtosis"], rtol=1e-4, atol=1e-4)
        rn = fin["row_norm"]
        assert rn["count"] == n
        assert rn["mean"] == pytest.approx(ref["norms"].mean(), rel=1e-6)
        assert rn["max"] == pytest.approx(ref["norms"].max(), rel=1e-6)


def test_bfloat16_extremes_and_nonfinite() -> None:
    """bfloat16 blocks: the largest finite values (whose float32 x**4 overflows) and
    subnormals are exact; inf/NaN are counted and the rest of the block is unaffected."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((300, 5)).astype(np.float32)
    x[:, 0] = 3.0e38 * np.sign(rng.standard_normal(300))  # near the bfloat16 maximum
    x[:, 1] = rng.integers(-100, 100, 300) * 2.0**-133  # bfloat16 subnormals
    bits = x.astype(ml_dtypes.bfloat16).view(np.uint16)
    lg = float(np.log((1 + ACC) / (1 - ACC)))
    x32 = bits.view(ml_dtypes.bfloat16).astype(np.float32)
    fin = finish_site(site_block_partial(bits, 1e-40, lg), (5,), 6.0, lg, NORM_QUANTILES)
    x64 = x32.astype(np.float64)
    np.testing.assert_array_equal(fin["min"], x64.min(0))
    np.testing.assert_array_equal(fin["max"], x64.max(0))
    np.testing.assert_array_equal(
        fin["near_zero_fraction"], (np.abs(x32) < np.float32(1e-40)).mean(0)
    )
    np.testing.assert_allclose(fin["mean"], x64.mean(0), rtol=1e-6, atol=1e-45)
    np.testing.assert_allclose(fin["std"], x64.std(0), rtol=1e-5)
    norms = np.sqrt((x64**2).sum(1))  # beyond float32: the block was redone in float64
    assert fin["row_norm"]["count"] == 300
    assert fin["row_norm"]["max"] == pytest.approx(norms.max(), rel=1e-6)

    y = bits.copy()
    y[3, 2] = np.float32(np.inf).astype(ml_dtypes.bfloat16).view(np.uint16)
    y[250, 4] = np.float32(np.nan).astype(ml_dtypes.bfloat16).view(np.uint16)
    fin = finish_site(site_block_partial(y, EPS, lg), (5,), 6.0, lg, NORM_QUANTILES)
    np.testing.assert_array_equal(fin["nonfinite_count"], [0, 0, 1, 0, 1])
    assert fin["max"][2] == np.inf and np.isnan(fin["mean"][4])
    np.testing.assert_allclose(fin["mean"][3], x64[:, 3].mean(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(fin["kurtosis"][3], reference(x32[:, 3:4])["kurtosis"], rtol=1e-4)
    assert fin["row_norm"]["nonfinite_count"] == 2


# ---------------------------------------------------------------------- fused kernel
def _stored_block(kind: str, n: int, d: int, seed: int, nonfinite: bool) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)) * rng.uniform(0.01, 10, d) + rng.uniform(-50, 50, d)
    x[:, d // 2] += 3e3  # a massive-activation dim
    x[rng.integers(0, n, 4), rng.integers(0, d, 4)] = 500.0  # outliers
    x[rng.integers(0, n, 6), rng.integers(0, d, 6)] = 0.0  # near-zero entries
    if nonfinite:
        x[rng.integers(0, n), 1] = np.inf
        x[rng.integers(0, n), 2] = np.nan
        x[rng.integers(0, n), 3] = -np.inf
    x32 = x.astype(np.float32)
    if kind == "float16":
        return np.clip(x32, -6e4, 6e4).astype(np.float16)
    if kind == "bfloat16":
        return x32.astype(ml_dtypes.bfloat16).view(np.uint16)
    return x32


@pytest.mark.parametrize("kind", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize(("n", "d"), [(1, 7), (3, 5), (37, 9), (301, 64), (2000, 130)])
@pytest.mark.parametrize("nonfinite", [False, True])
def test_fused_kernel_matches_numpy_kernel(
    monkeypatch: pytest.MonkeyPatch, kind: str, n: int, d: int, nonfinite: bool
) -> None:
    """The numba kernel and the numpy kernel give the same block partials."""
    pytest.importorskip("numba")
    from llminstr.analysis import statistics as stats_mod

    stored = _stored_block(kind, n, d, seed=n * d, nonfinite=nonfinite)
    lg = float(np.log((1 + ACC) / (1 - ACC)))
    parts = {}
    for kernel in ("fused", "numpy"):
        monkeypatch.setattr(stats_mod, "KERNEL", kernel)
        parts[kernel] = site_block_partial(stored, EPS, lg)
    a, b = parts["fused"], parts["numpy"]
    assert a.n == b.n == n
    np.testing.assert_array_equal(a.vmin, b.vmin)
    np.testing.assert_array_equal(a.vmax, b.vmax)
    np.testing.assert_array_equal(a.near_zero, b.near_zero)
    np.testing.assert_array_equal(a.nonfinite, b.nonfinite)
    assert (a.nonfinite.sum() > 0) == nonfinite
    np.testing.assert_allclose(a.mean, b.mean, rtol=1e-6, atol=0, equal_nan=True)
    spread = np.sqrt(np.abs(b.m2) / n) + 1e-30
    scale = np.maximum(np.abs(b.mean), spread)

    def close(x: np.ndarray, y: np.ndarray, rtol: float, atol: np.ndarray) -> None:
        same_nan = np.isnan(x) == np.isnan(y)
        ok = np.isnan(y) | (np.abs(x - y) <= rtol * np.abs(y) + atol)
        assert same_nan.all() and ok.all(), (x, y)

    close(a.m2, b.m2, 1e-5, 1e-6 * n * scale**2)
    close(a.m3, b.m3, 1e-4, 1e-4 * n * spread**3)
    close(a.m4, b.m4, 1e-4, 1e-4 * n * spread**4)
    na, nb = a.norms, b.norms
    assert (na.count, na.zeros, na.nonfinite) == (nb.count, nb.zeros, nb.nonfinite)
    if nb.count:
        assert na.mean == pytest.approx(nb.mean, rel=1e-6)
        assert na.vmin == pytest.approx(nb.vmin, rel=1e-6)
        assert na.vmax == pytest.approx(nb.vmax, rel=1e-6)
        assert na.counts.sum() == nb.counts.sum()
        # float32 vs float64 squared norms: a norm may land in the neighbouring bin.
        lo = min(na.offset, nb.offset)
        hi = max(na.offset + na.counts.size, nb.offset + nb.counts.size)
        ca, cb = np.zeros(hi - lo, np.int64), np.zeros(hi - lo, np.int64)
        ca[na.offset - lo : na.offset - lo + na.counts.size] = na.counts
        cb[nb.offset - lo : nb.offset - lo + nb.counts.size] = nb.counts
        assert np.abs(np.cumsum(ca) - np.cumsum(cb)).max() <= max(1, n // 100)


def test_fused_kernel_float32_overflow_range(monkeypatch: pytest.MonkeyPatch) -> None:
    """Values whose float32 x**4 overflows stay finite in the fused kernel's float64
    sums and agree with the numpy kernel (which redoes such blocks in float64)."""
    pytest.importorskip("numba")
    from llminstr.analysis import statistics as stats_mod

    rng = np.random.default_rng(3)
    x = (rng.standard_normal((257, 6)) * 1e12).astype(np.float32)
    x[:, 0] = 3e38
    lg = float(np.log((1 + ACC) / (1 - ACC)))
    parts = {}
    for kernel in ("fused", "numpy"):
        monkeypatch.setattr(stats_mod, "KERNEL", kernel)
        parts[kernel] = finish_site(site_block_partial(x, EPS, lg), (6,), 6.0, lg, NORM_QUANTILES)
    a, b = parts["fused"], parts["numpy"]
    for key in ("mean", "std", "min", "max", "rms"):
        np.testing.assert_allclose(a[key], b[key], rtol=1e-6)
    np.testing.assert_allclose(a["kurtosis"][1:], b["kurtosis"][1:], rtol=1e-4)
    assert a["row_norm"]["max"] == pytest.approx(b["row_norm"]["max"], rel=1e-6)


def test_kernel_setting_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    from llminstr.analysis import statistics as stats_mod
    from llminstr.errors import ConfigError

    monkeypatch.setattr(stats_mod, "KERNEL", "gpu")
    with pytest.raises(ConfigError):
        site_block_partial(np.zeros((2, 3), np.float32), EPS, 0.01)


# ---------------------------------------------------------------------- graph shape
def test_chunk_spans_cover_the_rows_exactly() -> None:
    from llminstr.analysis.statistics import _chunk_spans

    assert _chunk_spans(0, 100, 32, 2) == [((0, 0, 32), (1, 0, 32)), ((2, 0, 32), (3, 0, 4))]
    assert _chunk_spans(70, 333, 32, 3) == [
        ((2, 6, 32), (3, 0, 32), (4, 0, 32)),
        ((5, 0, 32), (6, 0, 32), (7, 0, 32)),
        ((8, 0, 32), (9, 0, 32), (10, 0, 13)),
    ]
    assert _chunk_spans(5, 6, 32, 4) == [((0, 5, 6),)]
    for start, stop, cr, per in [(0, 1, 1, 1), (3, 1000, 7, 5), (64, 128, 64, 1)]:
        rows = [
            r
            for span in _chunk_spans(start, stop, cr, per)
            for i, lo, hi in span
            for r in range(i * cr + lo, i * cr + hi)
        ]
        assert rows == list(range(start, stop))
        assert all(len(span) <= per for span in _chunk_spans(start, stop, cr, per))


def test_block_tasks_group_chunks_and_read_each_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A block task reads a few chunks (TASK_BYTES of them) one at a time; the graph has
    one block task per group, and the result equals the one-chunk-per-task graph's."""
    from llminstr.analysis import statistics as stats_mod

    x = make_data(1000, 8)
    path = tmp_path / "c.zarr"
    write(path, {"a": x}, chunk_rows=32)  # 32 chunks of 1 KiB
    outs = {}
    for task_bytes in (1, 5 * 32 * 8 * 4):  # 1 chunk per task; 5 chunks per task
        monkeypatch.setattr(stats_mod, "TASK_BYTES", task_bytes)
        reads = ReadCounter(monkeypatch)
        site = statistics_for_site(path, "a", eps=EPS)
        graph = dict(site["mean"].parent.__dask_graph__())
        blocks = [
            k
            for k in graph
            if isinstance(k, tuple) and "llminstr-stats-" in k[0] and "-merge" not in k[0]
        ]
        assert len(blocks) == (32 if task_bytes == 1 else 7)
        outs[task_bytes] = compute(site, scheduler="threads", num_workers=2)
        assert dict(reads.counts) == {("activations/a", i): 1 for i in range(32)}
    one, grouped = outs.values()
    for key in PER_DIM_KEYS:
        np.testing.assert_allclose(grouped[key], one[key], rtol=1e-12, atol=1e-12)
    check_site(grouped, x)


def test_lazy_items_compute_their_parent_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``compute`` answers the per-statistic lazy items from their parent (one task per
    site), and plain ``dask.compute`` gives the same values."""
    import dask
    from dask.callbacks import Callback

    from llminstr.analysis import statistics as stats_mod

    x = make_data(200, 8)
    path = tmp_path / "c.zarr"
    write(path, {"a": x}, chunk_rows=32)
    site = statistics_for_site(path, "a", eps=EPS)
    calls: list[int] = []
    original = stats_mod.finish_site

    def counting(*args: Any) -> Any:
        calls.append(1)
        return original(*args)

    # finish_site is looked up when the graph is built
    monkeypatch.setattr(stats_mod, "finish_site", counting)
    counted = statistics_for_site(path, "a", eps=EPS, outlier_factor=4.0)
    ran: list[Any] = []
    with Callback(posttask=lambda key, *rest: ran.append(key)):
        ours = compute({"s": counted, "n": [counted["mean"], (counted["std"],)]})
    assert len(calls) == 1
    # no per-item task ran: the items were taken from the parent's value
    items = {counted[k].key for k in (*PER_DIM_KEYS, *LAZY_KEYS)}
    assert ran and not items & set(ran)
    assert isinstance(ours["n"], list) and isinstance(ours["n"][1], tuple)
    np.testing.assert_array_equal(ours["n"][0], ours["s"]["mean"])
    (plain,) = dask.compute(site)
    mine = compute(site)
    for key in (*PER_DIM_KEYS, "outlier_dims", "near_zero_fraction_total"):
        np.testing.assert_array_equal(np.asarray(mine[key]), np.asarray(plain[key]))
    assert mine["row_norm"] == plain["row_norm"]


def test_fused_and_numpy_merges_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    """The numba moment merge and the numpy one give the same merged partials."""
    pytest.importorskip("numba")
    from llminstr.analysis import statistics as stats_mod

    rng = np.random.default_rng(5)
    x = (rng.standard_normal((301, 9)) * rng.uniform(0.1, 5, 9) + rng.uniform(-40, 40, 9)).astype(
        np.float32
    )
    lg = float(np.log((1 + ACC) / (1 - ACC)))
    parts = [
        site_block_partial(x[a:b], EPS, lg) for a, b in [(0, 1), (1, 64), (64, 200), (200, 301)]
    ]
    merged = {}
    for kernel in ("fused", "numpy"):
        monkeypatch.setattr(stats_mod, "KERNEL", kernel)
        merged[kernel] = merge_site_partials(*parts)
    a, b = merged["fused"], merged["numpy"]
    assert a.n == b.n == 301
    for key in ("mean", "m2", "m3", "m4"):
        np.testing.assert_allclose(getattr(a, key), getattr(b, key), rtol=1e-12, atol=1e-9)
    for key in ("vmin", "vmax", "near_zero", "nonfinite"):
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key))
    ref = reference(x)
    fin = finish_site(a, (9,), 6.0, lg, NORM_QUANTILES)
    np.testing.assert_allclose(fin["mean"], ref["mean"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(fin["kurtosis"], ref["kurtosis"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("half", [True, False])
def test_fused_16bit_decoder_is_exact_for_every_pattern(half: bool) -> None:
    """All 65536 float16 / bfloat16 bit patterns: finite values decode exactly; float16
    inf/NaN come out with magnitude >= 65536 (the caller's cue), bfloat16 NaN stays NaN."""
    pytest.importorskip("numba")
    from llminstr.analysis import _fused

    patterns = np.arange(65536, dtype=np.uint16).view(np.int16)
    bits = np.empty(65536, np.int32)
    vals = bits.view(np.float32)
    _fused._decode(patterns, bits, vals, half)
    typed = patterns.view(np.float16) if half else patterns.view(ml_dtypes.bfloat16)
    ref = typed.astype(np.float32)
    finite = np.isfinite(ref)
    np.testing.assert_array_equal(vals[finite].view(np.int32), ref[finite].view(np.int32))
    if half:
        assert (np.abs(vals[~finite]) >= 65536).all()
    else:
        np.testing.assert_array_equal(vals[~finite].view(np.int32), ref[~finite].view(np.int32))


@pytest.mark.parametrize("kernel", ["fused", "numpy"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tiny_columns_keep_their_higher_moments(
    kernel: str, dtype: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Columns of scale 1e-9 to 1e-15: float32 fourth powers underflow there (kurtosis came
    out near -3, below the bound of -2), so such blocks are summarised in float64."""
    if kernel == "fused":
        pytest.importorskip("numba")
    from llminstr.analysis import statistics as stats_mod

    monkeypatch.setattr(stats_mod, "KERNEL", kernel)
    rng = np.random.default_rng(7)
    scales = np.array([1.0, 1e-9, 1e-10, 1e-11, 1e-12, 1e-15])
    x = (rng.standard_t(5, size=(700, scales.size)) * scales).astype(np.float32)
    if dtype == "bfloat16":
        x = x.astype(ml_dtypes.bfloat16).astype(np.float32)  # the values bf16 stores
    write(tmp_path / "c.zarr", {"s": x}, chunk_rows=64, dtypes={"s": dtype})
    out = compute(statistics_for_site(open_capture(tmp_path / "c.zarr"), "s"))
    ref = reference(x)
    np.testing.assert_allclose(out["kurtosis"], ref["kurtosis"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["skewness"], ref["skewness"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["std"], ref["std"], rtol=1e-5)


@pytest.mark.parametrize("kernel", ["fused", "numpy"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_norms_of_tiny_rows_do_not_underflow(
    kernel: str, dtype: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows of 1e-24 values: their float32 squares underflow, and their norms came out 0
    (counted as zero norms). They are recomputed in float64."""
    if kernel == "fused":
        pytest.importorskip("numba")
    from llminstr.analysis import statistics as stats_mod

    monkeypatch.setattr(stats_mod, "KERNEL", kernel)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((256, 16)).astype(np.float32)
    scale = 1e-6 if dtype == "float16" else 1e-24  # float16 holds nothing near 1e-24
    x[::32] *= np.float32(scale)
    stored = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
    x = x.astype(stored[dtype]).astype(np.float32)  # the values the capture holds
    write(tmp_path / "c.zarr", {"s": x}, chunk_rows=64, dtypes={"s": dtype})
    out = compute(statistics_for_site(open_capture(tmp_path / "c.zarr"), "s"))
    norms = np.sqrt((x.astype(np.float64) ** 2).sum(axis=1))
    rn = out["row_norm"]
    assert rn["zero_count"] == 0
    np.testing.assert_allclose(rn["min"], norms.min(), rtol=1e-6)
    np.testing.assert_allclose(rn["max"], norms.max(), rtol=1e-6)
    for q, value in rn["quantiles"].items():
        want = np.quantile(norms, q, method="lower")
        assert abs(value - want) <= rn["relative_accuracy"] * want * (1 + 1e-9), (q, value, want)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"relative_accuracy": 1e-12}, "relative_accuracy must be at least"),
        ({"eps": 1e-50}, "eps must be at least"),
        ({"quantiles": 0.5}, "quantiles must be a list"),
        ({"quantiles": None}, "quantiles must be a list"),
        ({"tokens": "no"}, "tokens must be True or False"),
        ({"sites": 5}, "sites must be a site name or a list"),
    ],
)
def test_statistics_options_are_checked_when_the_graph_is_built(
    tmp_path: Path, options: dict[str, Any], match: str
) -> None:
    write(tmp_path / "c.zarr", {"s": np.ones((8, 4), np.float32)}, chunk_rows=4)
    with pytest.raises(ConfigError, match=match):
        compute_statistics(open_capture(tmp_path / "c.zarr"), **options)


def test_numpy_numbers_are_accepted_as_statistics_options(tmp_path: Path) -> None:
    write(tmp_path / "c.zarr", {"s": np.ones((8, 4), np.float32)}, chunk_rows=4)
    out = compute(
        compute_statistics(
            open_capture(tmp_path / "c.zarr"),
            quantiles=[np.float32(0.5)],
            split_every=np.int64(4),
            tokens=np.bool_(False),
        )
    )
    assert list(out["sites"]["s"]["row_norm"]["quantiles"]) == [0.5]
    assert out["tokens"] is None


def test_token_summary_graph_does_not_grow_with_the_chunk_count(tmp_path: Path) -> None:
    """The token summary made a delayed call per chunk of each column's dask array, and each
    call culled the whole array graph: building took 6.5 s for 4000 chunks (quadratic).
    Its tasks now read their chunks themselves, 32 MiB of rows per task."""
    rows, chunk = 1000 * 16, 16
    x = np.ones((rows, 2), np.float32)
    write(tmp_path / "c.zarr", {"s": x}, chunk_rows=chunk)
    cap = open_capture(tmp_path / "c.zarr")
    summary = token_summary(cap)
    tasks = len(dict(summary.__dask_graph__()))
    assert tasks <= 2 * len(cap.token_columns) + 1, tasks  # one read task per column here
    out = compute(summary)
    assert out["rows"] == rows
    assert out["num_steps"] == int(np.unique(cap.token_table()["step"]).size)


@pytest.mark.parametrize("kernel", ["fused", "numpy"])
@pytest.mark.parametrize("kind", ["float32", "float16"])
def test_a_first_row_far_from_the_rest_does_not_cost_moment_precision(
    monkeypatch: pytest.MonkeyPatch, kernel: str, kind: str
) -> None:
    """A block's shift was the mean of its first rows, one row for sites of 65,536
    features or more: a first row far from the rest (the first token's massive
    activations) moved it away from the block mean, and the float32 power sums about it
    cancelled in the central moments (kurtosis off by 1.5e-4 relative). The shift is now
    the mean of at least 64 first rows."""
    if kernel == "fused":
        pytest.importorskip("numba")
    from llminstr.analysis import statistics as stats_mod

    monkeypatch.setattr(stats_mod, "KERNEL", kernel)
    rng = np.random.default_rng(11)
    n, d = 64, 1 << 16
    x = rng.standard_normal((n, d)).astype(kind)
    x[0] = 30.0
    lg = float(np.log((1 + ACC) / (1 - ACC)))
    fin = finish_site(site_block_partial(x, EPS, lg), (d,), 6.0, lg, NORM_QUANTILES)
    f = x.astype(np.float64)
    dev = f - f.mean(axis=0)
    m2 = (dev**2).mean(axis=0)
    np.testing.assert_allclose(fin["std"], np.sqrt(m2), rtol=1e-6)
    np.testing.assert_allclose(fin["skewness"], (dev**3).mean(axis=0) / m2**1.5, rtol=2e-5)
    np.testing.assert_allclose(fin["kurtosis"], (dev**4).mean(axis=0) / m2**2 - 3, rtol=2e-5)
