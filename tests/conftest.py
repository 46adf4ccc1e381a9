"""Shared, generic helpers for the storage tests."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

BACKEND_SUFFIXES = (".zarr", ".h5")


@pytest.fixture(params=BACKEND_SUFFIXES, ids=["zarr", "hdf5"])
def backend(request: pytest.FixtureRequest) -> str:
    """The path suffix that selects a storage backend: '.zarr' or '.h5'."""
    return str(request.param)


def token_columns(n: int, start: int = 0) -> dict[str, np.ndarray]:
    """Deterministic token columns for rows ``start .. start + n``."""
    rows = np.arange(start, start + n, dtype=np.int64)
    return {
        "token_id": rows * 7 + 3,
        "sequence": rows // 5,
        "position": rows % 5,
        "step": rows // 2,
    }


def bits(a: Any) -> np.ndarray:
    """The raw bits of an array (unsigned view), so NaNs and -0.0 compare exactly."""
    arr = np.ascontiguousarray(np.asarray(a))
    return arr.view(np.dtype(f"u{arr.dtype.itemsize}"))


def assert_bits_equal(actual: Any, expected: Any) -> None:
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    assert actual.dtype.itemsize == expected.dtype.itemsize
    np.testing.assert_array_equal(bits(actual), bits(expected))


def raw_documents(path: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The llminstr documents as stored, read without the llminstr reader:
    (root, {site: doc}, {token column: doc})."""
    path = Path(path)
    if path.is_dir():
        root = json.loads((path / "zarr.json").read_text())["attributes"]["llminstr"]

        def load(key: str) -> Any:
            return json.loads((path / key / "zarr.json").read_text())["attributes"]["llminstr"]

    else:
        import h5py

        with h5py.File(path, "r", swmr=True, libver=("v110", "v110")) as f:
            root = json.loads(f.attrs["llminstr"])
            docs = {
                key: json.loads(f[key].attrs["llminstr"])
                for key in [f"tokens/{c}" for c in root["token_columns"]]
                + [f"activations/{s}" for s in root["sites"]]
            }

        def load(key: str) -> Any:
            return docs[key]

    sites = {s: load(f"activations/{s}") for s in root["sites"]}
    tokens = {c: load(f"tokens/{c}") for c in root["token_columns"]}
    return root, sites, tokens


def validate_documents(path: Path) -> dict[str, Any]:
    """Check every stored document against the format's JSON Schemas; return the root."""
    from llminstr.format import validate_root, validate_site, validate_token

    root, sites, tokens = raw_documents(path)
    validate_root(root)
    for doc in sites.values():
        validate_site(doc)
    for doc in tokens.values():
        validate_token(doc)
    return root


def llminstr_threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.startswith("llminstr")}
