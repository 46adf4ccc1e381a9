"""Golden fixtures of format 1.0 (format_spec/fixtures/): llminstr must read every one exactly
as format_spec/fixtures/expected.json says, and every stored document must match the
published JSON Schemas. The fixtures are never regenerated (see the README there)."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import h5py
import hdf5plugin  # noqa: F401  (registers Blosc for h5py)
import jsonschema
import numpy as np
import pytest

from llminstr.reader import open_capture

ROOT = Path(__file__).resolve().parents[1]
SPEC_DIR = ROOT / "format_spec"
FIXTURES = SPEC_DIR / "fixtures"
EXPECTED: dict[str, Any] = json.loads((FIXTURES / "expected.json").read_text(encoding="utf-8"))
NAMES = sorted(EXPECTED["fixtures"])
BITS = {2: "<u2", 4: "<u4", 8: "<i8"}
STATUS_CODES = {"in_progress": 0, "complete": 1, "aborted": 2}


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(BITS[a.dtype.itemsize])


def sha256(a: np.ndarray) -> str:
    return hashlib.sha256(bits(a).tobytes()).hexdigest()


def raw_documents(path: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]], Any]:
    """Root document, array documents by key, and (HDF5) the commit record, read without
    llminstr: straight from zarr.json files or HDF5 attributes."""
    if path.suffix == ".zarr":
        root = json.loads((path / "zarr.json").read_bytes())["attributes"]["llminstr"]
        keys = [f"tokens/{c}" for c in root["token_columns"]] + [
            f"activations/{s}" for s in root["sites"]
        ]
        docs = {
            k: json.loads((path / k / "zarr.json").read_bytes())["attributes"]["llminstr"]
            for k in keys
        }
        return root, docs, None
    with h5py.File(path, "r", swmr=True) as f:
        root = json.loads(f.attrs["llminstr"])
        keys = [f"tokens/{c}" for c in root["token_columns"]] + [
            f"activations/{s}" for s in root["sites"]
        ]
        docs = {k: json.loads(f[k].attrs["llminstr"]) for k in keys}
        return root, docs, f["llminstr_commit"][...].tolist()


def schema(name: str) -> jsonschema.Draft202012Validator:
    text = (SPEC_DIR / "schema" / name).read_text(encoding="utf-8")
    return jsonschema.Draft202012Validator(json.loads(text))


def test_fixture_set_is_complete() -> None:
    assert len(NAMES) == 10
    for stem in ("complete_fp32_lz4", "complete_fp16_zstd", "complete_bf16_none",
                 "aborted_fp32_none", "crashed_bf16_zstd"):  # fmt: skip
        assert {f"{stem}.zarr", f"{stem}.h5"} <= set(NAMES)
    for name in NAMES:
        assert (FIXTURES / name).exists(), name


@pytest.mark.parametrize("name", NAMES)
def test_open_capture_matches_expected(name: str) -> None:
    exp = EXPECTED["fixtures"][name]
    with open_capture(FIXTURES / name) as cap:
        assert cap.backend == exp["backend"]
        assert cap.format_version == "1.0"
        assert cap.status == exp["status"]
        assert cap.num_rows == exp["num_rows"]
        assert cap.chunk_rows == exp["chunk_rows"]
        assert cap.sites == exp["sites"]
        assert cap.token_columns == exp["token_columns"]
        meta = cap.metadata
        assert {k: meta[k] for k in exp["root"]} == exp["root"]
        for site, a in exp["activations"].items():
            assert cap.site_info(site) == exp["site_documents"][site]
            got = cap.read(site)
            assert got.dtype.name == a["logical_dtype"]
            assert list(got.shape) == a["shape"]
            assert bits(got).tolist() == a["bits"]
            assert sha256(got) == a["sha256"]
            flat = got.reshape(-1)
            for i, text in a["samples"]:
                assert repr(float(flat[i])) == text
            lazy = cap.activations(site).compute()  # the Dask path reads the same bits
            assert lazy.dtype == got.dtype and bits(lazy).tolist() == a["bits"]
        table = cap.token_table()
        assert list(table) == exp["token_columns"]
        for col, values in exp["tokens"].items():
            assert table[col].dtype == np.int64
            assert table[col].tolist() == values
            assert cap.tokens[col].compute().tolist() == values
        assert cap.verify() == []


@pytest.mark.parametrize("name", NAMES)
def test_stored_documents_match_schema_and_expected(name: str) -> None:
    exp = EXPECTED["fixtures"][name]
    root, docs, record = raw_documents(FIXTURES / name)
    schema("root.schema.json").validate(root)
    site_schema, token_schema = schema("site.schema.json"), schema("token.schema.json")
    for key, doc in docs.items():
        group, item = key.split("/", 1)
        if group == "activations":
            site_schema.validate(doc)
            assert doc == exp["site_documents"][item]
        else:
            token_schema.validate(doc)
            assert doc == exp["token_documents"][item]
    if exp["backend"] == "hdf5":
        assert record[:3] == exp["commit_record"]
        assert record[3] > 0  # publish time, unix ms
        if exp["status"] == "in_progress":
            # SWMR forbids attribute writes: the root attribute keeps its creation values
            assert (root["status"], root["committed_rows"], root["commit_seq"]) == (
                "in_progress",
                0,
                0,
            )
            return
    assert {k: root[k] for k in exp["root"]} == exp["root"]


def test_published_schemas_are_the_package_schemas() -> None:
    published = sorted(p.name for p in (SPEC_DIR / "schema").glob("*.json"))
    assert published == ["root.schema.json", "site.schema.json", "token.schema.json"]
    for name in published:
        package = ROOT / "llminstr" / "schema" / name
        assert (SPEC_DIR / "schema" / name).read_bytes() == package.read_bytes(), name


def test_fixtures_hold_no_lock_or_temporary_files_and_stay_small() -> None:
    files = [p for p in FIXTURES.rglob("*") if p.is_file()]
    assert not [p for p in files if p.name.endswith(".lock") or p.name.startswith(".")]
    assert sum(p.stat().st_size for p in files) < 2_000_000


def test_crashed_fixtures_hold_uncommitted_rows() -> None:
    """The crash fixtures really exercise 'ignore rows beyond committed_rows' (SPEC 7.1)."""
    n = EXPECTED["fixtures"]["crashed_bf16_zstd.h5"]["num_rows"]
    with h5py.File(FIXTURES / "crashed_bf16_zstd.h5", "r", swmr=True) as f:
        step = f["tokens/step"]
        assert step.shape[0] > n
        assert step[n:].tolist() != [0] * (step.shape[0] - n)  # real, uncommitted rows
    zarr_site = FIXTURES / "crashed_bf16_zstd.zarr" / "activations" / "model.layers.0.mlp"
    assert json.loads((zarr_site / "zarr.json").read_bytes())["shape"][0] == n
    assert (zarr_site / "c" / "2" / "0").is_file()  # a chunk wholly past the commit


def test_crashed_hdf5_fixture_needs_swmr_to_open() -> None:
    """SPEC 6.4: a crashed SWMR writer leaves the file marked open; only SWMR readers open it."""
    with pytest.raises(OSError):
        h5py.File(FIXTURES / "crashed_bf16_zstd.h5", "r").close()
    h5py.File(FIXTURES / "crashed_bf16_zstd.h5", "r", swmr=True).close()


def test_make_fixtures_refuses_to_overwrite() -> None:
    before = (FIXTURES / "expected.json").read_bytes()
    proc = subprocess.run(
        [sys.executable, str(FIXTURES / "make_fixtures.py")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode != 0
    assert "refusing to overwrite golden fixtures" in proc.stderr
    assert (FIXTURES / "expected.json").read_bytes() == before


def test_spec_example_reader_reads_every_fixture() -> None:
    """SPEC.md section 11's minimal reader must keep working on the golden fixtures."""
    text = (SPEC_DIR / "SPEC.md").read_text(encoding="utf-8")
    match = re.search(r"^## 11\..*?```python\n(.*?)```", text, re.S | re.M)
    assert match is not None
    namespace: dict[str, Any] = {}
    exec(compile(match[1], "SPEC.md#11", "exec"), namespace)
    for name in NAMES:
        exp = EXPECTED["fixtures"][name]
        status, n, tokens, acts = namespace["read"](str(FIXTURES / name))
        assert (status, n) == (exp["status"], exp["num_rows"]), name
        assert {c: v.tolist() for c, v in tokens.items()} == exp["tokens"]
        for site, a in exp["activations"].items():
            got = acts[site]
            if a["logical_dtype"] == "bfloat16":  # widened to float32 by the example
                got = (got.view("<u4") >> 16).astype("<u2")
            assert bits(got).tolist() == a["bits"], (name, site)
