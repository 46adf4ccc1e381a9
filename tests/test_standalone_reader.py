"""The standalone reader (readers/python/llminstr_reader.py, written from SPEC.md and decoding
through zarr-python / HDF5 rather than llminstr's frame decoder) must return exactly what
``llminstr.reader.open_capture`` returns: for every golden fixture, and for fresh captures
across dtypes, codecs and backends."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import ml_dtypes
import numpy as np
import pytest

from llminstr.errors import LlminstrError
from llminstr.format import SiteInfo
from llminstr.reader import open_capture
from llminstr.storage.writer import CaptureWriter

ROOT = Path(__file__).resolve().parents[1]
READER_PATH = ROOT / "readers" / "python" / "llminstr_reader.py"
FIXTURES = ROOT / "format_spec" / "fixtures"
FIXTURE_NAMES = sorted(
    json.loads((FIXTURES / "expected.json").read_text(encoding="utf-8"))["fixtures"]
)
BITS = {2: "<u2", 4: "<u4", 8: "<i8"}


def _load_reader() -> ModuleType:
    spec = importlib.util.spec_from_file_location("llminstr_reader_standalone", READER_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


reader = _load_reader()


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(BITS[a.dtype.itemsize])


def assert_same_as_llminstr(path: Path) -> dict[str, Any]:
    got = reader.read_capture(path)
    assert set(got) == {
        "format_version",
        "status",
        "num_rows",
        "sites",
        "site_info",
        "tokens",
        "activations",
    }
    with open_capture(path) as cap:
        assert got["format_version"] == cap.format_version
        assert got["status"] == cap.status
        assert got["num_rows"] == cap.num_rows
        assert got["sites"] == cap.sites
        assert got["site_info"] == {s: cap.site_info(s) for s in cap.sites}
        table = cap.token_table()
        assert list(got["tokens"]) == list(table)
        for col, values in table.items():
            assert got["tokens"][col].dtype == values.dtype == np.int64
            assert got["tokens"][col].tolist() == values.tolist(), col
        assert list(got["activations"]) == cap.sites
        for site in cap.sites:
            ours, theirs = cap.read(site), got["activations"][site]
            assert theirs.dtype == ours.dtype, site
            assert (
                theirs.shape == ours.shape == (cap.num_rows, *cap.site_info(site)["feature_shape"])
            )
            assert np.array_equal(bits(theirs), bits(ours)), site  # bit for bit, NaN included
    return got


# ---------------------------------------------------------------------- the reader itself
def test_reader_does_not_import_llminstr() -> None:
    source = READER_PATH.read_text(encoding="utf-8")
    imported: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
            assert node.level == 0, "relative imports would reach into a package"
    assert "llminstr" not in imported
    assert imported <= {"__future__", "json", "math", "os", "re", "time", "typing", "numpy", "zarr",
                        "h5py", "hdf5plugin", "ml_dtypes"}  # fmt: skip
    assert "importlib" not in source and "__import__" not in source


def test_reader_runs_where_llminstr_cannot_be_imported() -> None:
    script = (
        "import sys, importlib.util\n"
        "sys.modules['llminstr'] = None  # any 'import llminstr' now fails\n"
        f"spec = importlib.util.spec_from_file_location('r', {str(READER_PATH)!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        f"for p in {[str(FIXTURES / n) for n in FIXTURE_NAMES]!r}:\n"
        "    c = m.read_capture(p); print(c['status'], c['num_rows'])\n"
        "assert not any(k.startswith('llminstr.') for k in sys.modules)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == len(FIXTURE_NAMES)


# ---------------------------------------------------------------------- golden fixtures
@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture_reads_the_same(name: str) -> None:
    assert_same_as_llminstr(FIXTURES / name)


# ---------------------------------------------------------------------- fresh captures
SITES = [
    ("model.layers.0.attn", (16,), "attention", 0),
    ("model.layers.0.mlp", (3, 4), "ffn", 0),
    ("model.layers.1", (7,), "residual", 1),
]
CASES = [  # dtype, compression, checksum
    ("float32", "lz4", True),
    ("float16", "zstd", True),
    ("bfloat16", "lz4", False),
    ("bfloat16", None, True),
    ("float32", None, False),
]


def _data(n: int, dtype: str, seed: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    tokens = {
        "token_id": rng.integers(-1, 50_000, n),
        "sequence": np.arange(n) % 3,
        "position": np.arange(n) // 3,
        "step": np.arange(n) // 5,
        "batch": rng.integers(0, 4, n),
    }
    acts = {}
    for name, shape, _, _ in SITES:
        x = (rng.standard_normal((n, *shape)) * 3).astype(np.float32)
        x.reshape(n, -1)[0, :3] = [np.nan, -0.0, np.inf]
        acts[name] = x.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
    return tokens, acts


def _writer(path: Path, dtype: str, compression: str | None, checksum: bool) -> CaptureWriter:
    sites = [SiteInfo(n, s, dtype, kind=k, layer=lay) for n, s, k, lay in SITES]
    return CaptureWriter(
        path,
        sites,
        compression=compression,  # type: ignore[arg-type]
        checksum=checksum,
        chunk_rows=8,
        encoder_threads=2,
        commit_interval_s=1e9,
        extra_token_columns=["batch"],
    )


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
@pytest.mark.parametrize(("dtype", "compression", "checksum"), CASES)
def test_fresh_capture_reads_the_same(
    tmp_path: Path, suffix: str, dtype: str, compression: str | None, checksum: bool
) -> None:
    n = 29  # not a multiple of chunk_rows
    tokens, acts = _data(n, dtype, seed=len(dtype) + n)
    path = tmp_path / f"cap{suffix}"
    with _writer(path, dtype, compression, checksum) as w:
        for lo, hi in ((0, 5), (5, 21), (21, n)):
            w.append(
                {c: v[lo:hi] for c, v in tokens.items()}, {s: v[lo:hi] for s, v in acts.items()}
            )
            if hi == 5:
                w.commit()
    got = assert_same_as_llminstr(path)
    assert (got["status"], got["num_rows"]) == ("complete", n)
    for site, values in acts.items():  # and both equal what was written
        assert np.array_equal(bits(got["activations"][site]), bits(values))
    for col, values in tokens.items():
        assert got["tokens"][col].tolist() == values.tolist()


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_live_and_aborted_captures_read_the_same(tmp_path: Path, suffix: str) -> None:
    n = 21
    tokens, acts = _data(n, "float16", seed=7)
    path = tmp_path / f"live{suffix}"
    w = _writer(path, "float16", "zstd", True)
    try:
        w.append({c: v[:10] for c, v in tokens.items()}, {s: v[:10] for s, v in acts.items()})
        w.commit()
        w.append({c: v[10:] for c, v in tokens.items()}, {s: v[10:] for s, v in acts.items()})
        w._drain()  # uncommitted full chunks are now on disk; readers must not see them
        got = assert_same_as_llminstr(path)
        assert (got["status"], got["num_rows"]) == ("in_progress", 10)
        w.write_tokens({c: v[:3] for c, v in tokens.items()})  # misaligned: tokens only
    finally:
        w.abort("stopped by the test")
    got = assert_same_as_llminstr(path)
    assert (got["status"], got["num_rows"]) == ("aborted", n)


# ---------------------------------------------------------------------- damaged copies
def _edit_json(path: Path, edit: Any) -> None:
    doc = json.loads(path.read_bytes())
    edit(doc)
    path.write_text(json.dumps(doc), encoding="utf-8")


def _root(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["attributes"]["llminstr"]  # type: ignore[no-any-return]


SITE = "activations/model.layers.0.mlp"
DAMAGE = {
    "unknown major version": ("zarr.json", lambda d: _root(d).update(format_version="2.0")),
    "not a capture": ("zarr.json", lambda d: _root(d).update(format="something-else")),
    "site name escaping the store": ("zarr.json", lambda d: _root(d)["sites"].append("../x")),
    "array shorter than committed": (f"{SITE}/zarr.json", lambda d: d["shape"].__setitem__(0, 3)),
    "codec chain unlike the document": (f"{SITE}/zarr.json", lambda d: d["codecs"].pop()),
    "big-endian bytes codec": (
        f"{SITE}/zarr.json",
        lambda d: d["codecs"][0]["configuration"].update(endian="big"),
    ),
    "missing committed chunk": (f"{SITE}/c/1/0", None),
    "dotted chunk keys": (
        f"{SITE}/zarr.json",
        lambda d: d.update(
            chunk_key_encoding={"name": "default", "configuration": {"separator": "."}}
        ),
    ),
    "v2 chunk keys": (f"{SITE}/zarr.json", lambda d: d.update(chunk_key_encoding={"name": "v2"})),
    "feature shape whose product overflows int64": (
        f"{SITE}/zarr.json",
        lambda d: d["attributes"]["llminstr"].update(feature_shape=[2**32, 2**32]),
    ),
    "committed_rows as a string": ("zarr.json", lambda d: _root(d).update(committed_rows="10")),
    "unknown status": ("zarr.json", lambda d: _root(d).update(status="done")),
    "format_version without a minor": ("zarr.json", lambda d: _root(d).update(format_version="1")),
    "duplicate site": ("zarr.json", lambda d: _root(d)["sites"].append(_root(d)["sites"][0])),
    "root without its site list": ("zarr.json", lambda d: _root(d).pop("sites")),
    "zarr format 2 array": (f"{SITE}/zarr.json", lambda d: d.update(zarr_format=2)),
    "storage transformer": (
        f"{SITE}/zarr.json",
        lambda d: d.update(storage_transformers=[{"name": "sharding"}]),
    ),
    "Blosc codec unlike the document": (
        f"{SITE}/zarr.json",
        lambda d: d["codecs"][1]["configuration"].update(cname="zstd"),
    ),
    "array document that is a FIFO": (f"{SITE}/zarr.json", "fifo"),
    "array document linked to /dev/zero": (f"{SITE}/zarr.json", "devzero"),
    "sites as an object": ("zarr.json", lambda d: _root(d).update(sites={})),
    "fill value beyond the dtype": (f"{SITE}/zarr.json", lambda d: d.update(fill_value=2**64)),
    "chunk file of 3 GiB (sparse)": (f"{SITE}/c/0/0", "sparse"),
    "chunk file cut inside its frame": (f"{SITE}/c/0/0", "cut"),
}


def _damaged_copy(tmp_path: Path, damage: str) -> Path:
    path = tmp_path / "cap.zarr"
    shutil.copytree(FIXTURES / "complete_fp32_lz4.zarr", path)
    rel, edit = DAMAGE[damage]
    if edit is None:
        (path / rel).unlink()
    elif edit == "fifo":
        (path / rel).unlink()
        os.mkfifo(path / rel)  # opening it for reading would block until a writer comes
    elif edit == "sparse":  # no disk used; a reader that reads it whole takes 3 GiB
        os.truncate(path / rel, 3 << 30)
    elif edit == "cut":
        os.truncate(path / rel, 40)
    elif edit == "devzero":
        (path / rel).unlink()
        (path / rel).symlink_to("/dev/zero")  # size 0 to stat, endless to read
    else:
        _edit_json(path / rel, edit)
    return path


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_standalone_reader_rejects_damage(tmp_path: Path, damage: str) -> None:
    with pytest.raises(reader.CaptureFormatError):
        reader.read_capture(_damaged_copy(tmp_path, damage))


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_llminstr_rejects_the_same_damage(tmp_path: Path, damage: str) -> None:
    path = _damaged_copy(tmp_path, damage)
    # at open or at the first read
    with pytest.raises(LlminstrError), open_capture(path) as cap:
        cap.token_table()
        for site in cap.sites:
            cap.read(site)


def _h5_with_frame(tmp_path: Path, frame: bytes, mask: int) -> Path:
    """An HDF5 capture whose chunk 0 of one site is replaced by ``frame``."""
    import h5py

    path = tmp_path / "c.h5"
    with _writer(path, "float32", "lz4", False) as w:
        tokens, acts = _data(40, "float32", 0)
        w.append(tokens, acts)
    with h5py.File(path, "r+") as f:
        ds = f["activations"][next(iter(f["activations"]))]
        ds.id.write_direct_chunk((0,) * ds.ndim, frame, filter_mask=mask)
    return path


@pytest.mark.parametrize(
    ("frame", "mask"),
    [
        (
            b"\x02\x01\x13\x04"
            + (10**6).to_bytes(4, "little")
            + b"\0" * 4
            + (112).to_bytes(4, "little")
            + b"\0" * 4,
            0,
        ),
        (b"\x00" * 109, 1),  # stored raw, but not a chunk's size
    ],
    ids=["blosc frame shorter than its header says", "raw chunk of the wrong size"],
)
def test_damaged_hdf5_frames_are_refused_by_both_readers(
    tmp_path: Path, frame: bytes, mask: int
) -> None:
    """HDF5's Blosc filter checks no sizes: the standalone reader returned garbage rows."""
    path = _h5_with_frame(tmp_path, frame, mask)
    with pytest.raises(reader.CaptureFormatError, match="corrupt chunk"):
        reader.read_capture(path)
    with pytest.raises(LlminstrError), open_capture(path) as cap:
        for site in cap.sites:
            cap.read(site)


def test_hdf5_file_cut_inside_its_superblock(tmp_path: Path) -> None:
    whole = (FIXTURES / "complete_fp32_lz4.h5").read_bytes()
    path = tmp_path / "cut.h5"
    path.write_bytes(whole[:16])
    with pytest.raises(reader.CaptureFormatError, match="truncated"):
        reader.read_capture(path)
