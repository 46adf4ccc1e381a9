"""The analyze_activations / compute surface: shape of the result, option errors, and
runs on dask.distributed clusters that match the local scheduler."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import token_columns
from dask.delayed import Delayed

from llminstr.analysis import PARTS, analyze_activations, compute, default_sae_site
from llminstr.analysis.statistics import PER_DIM_KEYS
from llminstr.errors import CaptureNotFoundError, ConfigError, SiteNotFoundError
from llminstr.format import SiteInfo
from llminstr.reader import open_capture
from llminstr.storage.writer import CaptureWriter

N = 240


@pytest.fixture(scope="module")
def capture_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("api") / "c.zarr"
    rng = np.random.default_rng(1)
    sites = [
        SiteInfo("layers.0.attn", (8,), kind="attention", layer=0),
        SiteInfo("layers.0", (8,), "bfloat16", kind="residual", layer=0),
        SiteInfo("layers.1", (8,), kind="residual", layer=1),
        SiteInfo("layers.2", (8,), "float16", kind="residual", layer=2),
        SiteInfo("layers.2.mlp", (2, 4), kind="ffn", layer=2),
    ]
    base = rng.standard_normal((N, 8)).astype(np.float32)
    data: dict[str, Any] = {
        "layers.0.attn": base * 0.5,
        "layers.0": base.astype("float32"),
        "layers.1": base + 0.3 * rng.standard_normal((N, 8)).astype(np.float32),
        "layers.2": (base * 2).astype(np.float16),
        "layers.2.mlp": np.maximum(base, 0).reshape(N, 2, 4),
    }
    import ml_dtypes

    data["layers.0"] = data["layers.0"].astype(ml_dtypes.bfloat16)
    with CaptureWriter(path, sites, chunk_rows=32) as w:
        w.append(token_columns(N), data)
    return path


def test_result_shape_and_capture_summary(capture_path: Path) -> None:
    result = analyze_activations(capture_path, include=("statistics",))
    assert set(result) == {"capture", "statistics", "sae_features", "causal_graph"}
    assert result["sae_features"] is None and result["causal_graph"] is None
    summary = result["capture"]
    json.dumps(summary)  # JSON-able
    assert summary["path"] == str(capture_path)
    assert summary["status"] == "complete" and summary["num_rows"] == N
    assert summary["sites"] == open_capture(capture_path).sites
    assert summary["rows"] == [0, N]
    stats = result["statistics"]
    assert set(stats) == {"sites", "tokens", "rows", "passes"}
    assert list(stats["sites"]) == summary["sites"]
    for per_site in stats["sites"].values():
        for key in PER_DIM_KEYS:
            assert isinstance(per_site[key], Delayed)
    out = compute(result)
    assert out["capture"] == summary
    s = out["statistics"]["sites"]["layers.2.mlp"]
    assert s["mean"].shape == (2, 4) and s["num_rows"] == N
    assert out["statistics"]["tokens"]["rows"] == N


def test_sites_and_rows_selection(capture_path: Path) -> None:
    result = analyze_activations(
        capture_path, sites="layers.1", rows=slice(10, 100), include="statistics"
    )
    assert result["capture"]["sites"] == ["layers.1"]
    out = compute(result, scheduler="synchronous")
    assert list(out["statistics"]["sites"]) == ["layers.1"]
    x = open_capture(capture_path).read("layers.1", 10, 100).astype(np.float64)
    np.testing.assert_allclose(
        out["statistics"]["sites"]["layers.1"]["mean"], x.mean(0), rtol=1e-6, atol=1e-7
    )
    assert out["statistics"]["tokens"]["rows"] == 90


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"sites": ["nope"]}, SiteNotFoundError, r"no site 'nope'; sites: \['layers.0.attn'"),
        ({"sites": []}, ConfigError, "at least one site"),
        ({"sites": ["layers.1", "layers.1"]}, ConfigError, "listed twice"),
        ({"include": ("statistics", "pca")}, ConfigError, r"unknown \['pca'\]"),
        ({"include": 3}, ConfigError, "include must be"),
        ({"rows": slice(0, 10, 2)}, ConfigError, "step 1"),
        ({"rows": (5, 5)}, ConfigError, "selects no rows"),
        ({"rows": (0, 1, 2)}, ConfigError, "rows must be None"),
        ({"rows": ("a", 4)}, ConfigError, "integers or None"),
        ({"rows": 7}, ConfigError, "rows must be None"),
        ({"sae_options": [1]}, ConfigError, "sae_options must be a mapping"),
        ({"causal_options": "x"}, ConfigError, "causal_options must be a mapping"),
        ({"statistics_options": {"bins": 3}}, ConfigError, r"unknown \['bins'\]"),
        ({"statistics_options": {"eps": -1.0}}, ConfigError, "eps must be in"),
        ({"statistics_options": {"relative_accuracy": 1.5}}, ConfigError, "relative_accuracy"),
        ({"statistics_options": {"quantiles": [1.5]}}, ConfigError, "quantiles"),
        ({"statistics_options": {"split_every": 1}}, ConfigError, "split_every"),
    ],
)
def test_option_errors(
    capture_path: Path, kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    kwargs.setdefault("include", ("statistics",))
    with pytest.raises(error, match=match):
        analyze_activations(capture_path, **kwargs)


def test_capture_without_rows(tmp_path: Path) -> None:
    path = tmp_path / "empty.zarr"
    with CaptureWriter(path, [SiteInfo("a", (2,))], chunk_rows=4):
        pass
    with pytest.raises(ConfigError, match="no committed rows"):
        analyze_activations(path)


def test_empty_include_gives_only_the_summary(capture_path: Path) -> None:
    result = analyze_activations(capture_path, include=())
    assert result["statistics"] is None and result["sae_features"] is None
    assert compute(result) == result


def test_missing_capture_and_bad_path_type(tmp_path: Path) -> None:
    with pytest.raises(CaptureNotFoundError):
        analyze_activations(tmp_path / "absent.zarr")
    with pytest.raises(ConfigError, match="data_path must be a path"):
        analyze_activations(42)  # type: ignore[arg-type]


def test_default_sae_site(capture_path: Path, tmp_path: Path) -> None:
    cap = open_capture(capture_path)
    assert default_sae_site(cap) == "layers.1"  # middle of residual layers 0, 1, 2
    assert default_sae_site(cap, ["layers.0", "layers.2"]) == "layers.0"
    assert default_sae_site(cap, ["layers.0.attn", "layers.2.mlp"]) == "layers.2.mlp"
    path = tmp_path / "other.zarr"
    with CaptureWriter(path, [SiteInfo("a", (2,)), SiteInfo("b", (2,))], chunk_rows=4) as w:
        w.append(
            token_columns(3), {"a": np.zeros((3, 2), np.float32), "b": np.zeros((3, 2), np.float32)}
        )
    assert default_sae_site(open_capture(path)) == "b"


def test_compute_places_mixed_collections_correctly() -> None:
    """dask 2026.8 returns results grouped by collection type; compute() must not."""
    import dask.array as da
    from dask import delayed

    x1, x2 = da.ones(2) * 1, da.ones(2) * 2
    y1, y2 = delayed(int)(1), delayed(int)(2)
    out = compute({"a": [x1, y1, x2, y2], "b": "plain", "c": (y2, x1)})
    assert out["a"][1] == 1 and out["a"][3] == 2 and out["b"] == "plain"
    np.testing.assert_array_equal(out["a"][0], [1, 1])
    np.testing.assert_array_equal(out["a"][2], [2, 2])
    assert out["c"][0] == 2
    assert compute({"nothing": 1}) == {"nothing": 1}


def test_framework_method_forwards(capture_path: Path) -> None:
    from llminstr.framework import InstrumentationFramework

    fw = InstrumentationFramework()
    result = fw.analyze_activations(capture_path, include=["statistics"], sites=["layers.1"])
    assert result["capture"]["sites"] == ["layers.1"]


def assert_same(a: Any, b: Any, path: str = "") -> None:
    """Deep equality of computed results (numpy arrays bitwise, NaN == NaN)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), path
        for k in a:
            assert_same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        np.testing.assert_array_equal(a, b, err_msg=path)
    elif isinstance(a, float) and np.isnan(a):
        assert np.isnan(b), path
    else:
        assert a == b, path


@pytest.mark.timeout(120)
@pytest.mark.parametrize("processes", [False, True], ids=["threads", "processes"])
def test_distributed_matches_local(capture_path: Path, processes: bool) -> None:
    from distributed import Client, LocalCluster

    result = analyze_activations(capture_path, rows=(5, 230), include=("statistics",))
    local = compute(result, scheduler="threads")
    with (
        LocalCluster(
            n_workers=1,
            threads_per_worker=2,
            processes=processes,
            dashboard_address=None,
        ) as cluster,
        Client(cluster),
    ):
        remote = compute(result)  # the active client is Dask's default scheduler
    assert_same(remote, local)


def test_all_parts(capture_path: Path) -> None:
    """With the SAE and causal modules present, every part is lazy and computes in one go."""
    pytest.importorskip("llminstr.analysis.sae")
    pytest.importorskip("llminstr.analysis.causal")
    result = analyze_activations(
        capture_path,
        sae_options={"n_features": 16, "k": 2, "steps": 3, "batch_size": 32, "init_rows": 64},
        causal_options={"rank": 2},
    )
    assert set(PARTS) <= set(result)
    for part in PARTS:
        assert result[part] is not None
    out = compute(result, scheduler="threads")
    assert out["sae_features"]["site"] == "layers.1"
    assert {"graph", "edges", "method"} <= set(out["causal_graph"])
    assert out["causal_graph"]["method"] == "observational"


def test_default_include_leaves_out_the_graph_of_one_site(tmp_path: Path) -> None:
    """By default a one-site capture (or a one-row range) has no causal graph, with a note;
    asked for by name, the graph's error says what to do."""
    from conftest import token_columns

    from llminstr.errors import ConfigError
    from llminstr.format import SiteInfo
    from llminstr.storage.writer import CaptureWriter

    path = tmp_path / "one.zarr"
    x = np.random.default_rng(0).standard_normal((40, 6)).astype(np.float32)
    with CaptureWriter(path, [SiteInfo("s", (6,))], chunk_rows=16) as w:
        w.append(token_columns(40), {"s": x})
    out = compute(analyze_activations(path, sae_options={"n_features": 8, "k": 2, "steps": 3}))
    assert out["causal_graph"] is None and out["statistics"] is not None
    assert "no causal graph: it needs at least two sites" in out["capture"]["notes"][0]
    with pytest.raises(ConfigError, match="leave 'causal_graph' out of include"):
        analyze_activations(path, include=("causal_graph",))
