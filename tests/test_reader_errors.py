"""Errors of the reader: every damaged or foreign input raises an LlminstrError subclass
with a clear message, never a bare TypeError / KeyError / crash."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import token_columns
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llminstr.errors import (
    CaptureNotFoundError,
    ConfigError,
    CorruptChunkError,
    FormatError,
    LlminstrError,
    NotACaptureError,
    SiteNotFoundError,
    UnsupportedVersionError,
)
from llminstr.format import MAX_DOCUMENT_BYTES, SiteInfo
from llminstr.reader import open_capture
from llminstr.storage.writer import CaptureWriter

ROWS, CHUNK = 10, 4  # chunks 0, 1 full; chunk 2 holds 2 rows
#: Every array of make_capture's captures.
ARRAYS = ("activations/a", "activations/b", *(f"tokens/{c}" for c in token_columns(0)))


def ramp(n: int, width: int) -> np.ndarray:
    r = np.arange(n, dtype=np.float32)[:, None]
    return r * 1000 + np.arange(width, dtype=np.float32)[None, :]


def make_capture(path: Path, **kwargs: Any) -> Path:
    with CaptureWriter(
        path, [SiteInfo("a", (4,)), SiteInfo("b", (2, 3), "float16")], chunk_rows=CHUNK, **kwargs
    ) as w:
        w.append(
            token_columns(ROWS),
            {"a": ramp(ROWS, 4), "b": ramp(ROWS, 6).reshape(ROWS, 2, 3).astype(np.float16)},
        )
    return path


@pytest.fixture
def capture(backend: str, tmp_path: Path) -> Path:
    return make_capture(tmp_path / f"cap{backend}")


# ---------------------------------------------------------------------- metadata editing
def edit_zarr_json(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


def edit_root(capture: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    if capture.is_dir():
        edit_zarr_json(capture / "zarr.json", lambda d: edit(d["attributes"]["llminstr"]))
    else:
        import h5py

        with h5py.File(capture, "r+") as f:
            doc = json.loads(f.attrs["llminstr"])
            edit(doc)
            f.attrs["llminstr"] = json.dumps(doc)


def edit_array_doc(capture: Path, key: str, edit: Callable[[dict[str, Any]], None]) -> None:
    if capture.is_dir():
        edit_zarr_json(capture / key / "zarr.json", lambda d: edit(d["attributes"]["llminstr"]))
    else:
        import h5py

        with h5py.File(capture, "r+") as f:
            doc = json.loads(f[key].attrs["llminstr"])
            edit(doc)
            f[key].attrs["llminstr"] = json.dumps(doc)


def open_and_read(path: Path) -> None:
    with open_capture(path) as cap:
        for name in cap.sites:
            cap.activations(name).compute()
        cap.token_table()


# ---------------------------------------------------------------------- not a capture
def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.zarr"
    with pytest.raises(CaptureNotFoundError) as info:
        open_capture(missing)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, LlminstrError)
    assert str(missing) in str(info.value) and "does not exist" in str(info.value)


def test_random_directory(tmp_path: Path) -> None:
    (tmp_path / "d.zarr").mkdir()
    (tmp_path / "d.zarr" / "notes.txt").write_text("hello")
    with pytest.raises(
        NotACaptureError, match=r"without zarr\.json: not a Zarr v3 capture"
    ) as info:
        open_capture(tmp_path / "d.zarr")
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("content", [b"", b"hello world", os.urandom(4096), b"\x89HDF"])
def test_random_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "f.h5"
    path.write_bytes(content)
    with pytest.raises(NotACaptureError, match="neither a Zarr v3 directory nor an HDF5 file"):
        open_capture(path)


def test_hdf5_signature_but_garbage(tmp_path: Path) -> None:
    path = tmp_path / "f.h5"
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + os.urandom(2048))
    with pytest.raises(NotACaptureError, match="could not be opened as HDF5"):
        open_capture(path)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("length", [12, 16, 24, 35])
def test_hdf5_ending_inside_its_superblock(tmp_path: Path, length: int) -> None:
    """HDF5's SWMR open of a file cut inside its superblock never returned."""
    whole = make_capture(tmp_path / "c.h5").read_bytes()
    path = tmp_path / "cut.h5"
    path.write_bytes(whole[:length])
    with pytest.raises(NotACaptureError, match="ends inside its superblock"):
        open_capture(path)


FIXTURE_H5 = Path(__file__).parents[1] / "format_spec" / "fixtures" / "complete_fp32_lz4.h5"


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("offset", "mask"), [(69, 0x80), (187, 0x80), (403, 0x80), (51, 0xFF)])
def test_hdf5_damaged_metadata_fails_fast(tmp_path: Path, offset: int, mask: int) -> None:
    """One flipped byte in an HDF5 object header: HDF5 retried the checksum with a sleep
    that doubles each time, 100 times by default for SWMR readers (the open ran for
    hours), or h5py raised a bare RuntimeError (bad header version)."""
    data = bytearray(FIXTURE_H5.read_bytes())
    data[offset] ^= mask
    path = tmp_path / "flip.h5"
    path.write_bytes(bytes(data))
    started = time.monotonic()
    with pytest.raises((FormatError, NotACaptureError)):
        open_and_read(path)
    assert time.monotonic() - started < 20


def test_plain_zarr_group(tmp_path: Path) -> None:
    import zarr

    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w", zarr_format=3)
    group.attrs["other"] = 1
    group.create_array("x", shape=(4,), dtype="f4")
    with pytest.raises(NotACaptureError, match="Zarr store without the 'llminstr' root attribute"):
        open_capture(tmp_path / "g.zarr")
    zarr.open_array(str(tmp_path / "a.zarr"), mode="w", shape=(3,), dtype="i4")
    with pytest.raises(NotACaptureError):
        open_capture(tmp_path / "a.zarr")


@pytest.mark.parametrize(
    "root",
    [{"format": "something-else"}, "a string", 42, [1, 2], {"format_version": "1.0"}],
)
def test_foreign_llminstr_attribute(tmp_path: Path, root: Any) -> None:
    import zarr

    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w", zarr_format=3)
    group.attrs["llminstr"] = root
    with pytest.raises(NotACaptureError, match="is not an llminstr capture"):
        open_capture(tmp_path / "g.zarr")


def test_plain_hdf5_file(tmp_path: Path) -> None:
    import h5py

    with h5py.File(tmp_path / "p.h5", "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(NotACaptureError, match="HDF5 file without the 'llminstr' root attribute"):
        open_capture(tmp_path / "p.h5")


def test_zarr_json_not_json(tmp_path: Path) -> None:
    (tmp_path / "g.zarr").mkdir()
    (tmp_path / "g.zarr" / "zarr.json").write_bytes(b"{not json")
    with pytest.raises(FormatError, match="metadata is not valid JSON"):
        open_capture(tmp_path / "g.zarr")


# ---------------------------------------------------------------------- versions
def test_unknown_major_version(capture: Path) -> None:
    edit_root(capture, lambda d: d.update(format_version="2.0"))
    with pytest.raises(UnsupportedVersionError) as info:
        open_capture(capture)
    assert isinstance(info.value, ValueError)
    msg = str(info.value)
    assert "uses format version 2.0" in msg and "major version 1 only" in msg
    assert "Upgrade llminstr" in msg


def test_newer_minor_version_is_read(capture: Path) -> None:
    edit_root(capture, lambda d: d.update(format_version="1.7", new_field={"x": 1}))
    with open_capture(capture) as cap:
        assert cap.format_version == "1.7"
        np.testing.assert_array_equal(cap.read("a"), ramp(ROWS, 4))


@pytest.mark.parametrize("version", ["one", "1", "1.0.0", 1.0, None])
def test_malformed_version(capture: Path, version: Any) -> None:
    edit_root(capture, lambda d: d.update(format_version=version))
    with pytest.raises(FormatError, match=r"format_version must look like '1\.0'"):
        open_capture(capture)


# ---------------------------------------------------------------------- sites
def test_missing_site(capture: Path) -> None:
    with open_capture(capture) as cap:
        for call in (cap.activations, cap.read, cap.site_info):
            with pytest.raises(SiteNotFoundError) as info:
                call("mlp")
            assert isinstance(info.value, KeyError)
            assert "has no site 'mlp'; sites: ['a', 'b']" in str(info.value)
        with pytest.raises(SiteNotFoundError, match="no token column 'nope'; columns: "):
            cap.tokens["nope"]


# ---------------------------------------------------------------------- corrupt chunks
def zarr_chunk(capture: Path, site: str, index: int) -> Path:
    zeros = ["0", "0"] if site == "b" else ["0"]
    return capture.joinpath("activations", site, "c", str(index), *zeros)


def check_corrupt(capture: Path, site: str, index: int, detail: str) -> None:
    with open_capture(capture) as cap:
        with pytest.raises(CorruptChunkError) as info:
            cap.activations(site).compute()
        err = info.value
        assert isinstance(err, OSError) and isinstance(err, LlminstrError)
        assert err.site == site and err.chunk == index
        assert f"chunk {index} of site {site!r} is corrupt" in str(err)
        assert detail in str(err)
        # the other chunks still read
        good = next(i for i in range(3) if i != index)
        cap.activations(site)[good * CHUNK : good * CHUNK + 1].compute()
        problems = cap.verify()
        assert len(problems) == 1 and f"chunk {index} of site {site!r}" in problems[0]


@pytest.mark.parametrize("offset", [0, 5, 20, -6, -1])
def test_zarr_flipped_bytes(tmp_path: Path, offset: int) -> None:
    capture = make_capture(tmp_path / "c.zarr")
    chunk = zarr_chunk(capture, "a", 1)
    data = bytearray(chunk.read_bytes())
    data[offset] ^= 0xFF
    chunk.write_bytes(bytes(data))
    check_corrupt(capture, "a", 1, "CRC32C mismatch")


@pytest.mark.parametrize("offset", [4, 12])  # Blosc header: nbytes, cbytes
def test_zarr_flipped_header_without_checksum(tmp_path: Path, offset: int) -> None:
    capture = make_capture(tmp_path / "c.zarr", checksum=False)
    chunk = zarr_chunk(capture, "b", 2)
    data = bytearray(chunk.read_bytes())
    data[offset] ^= 0x10
    chunk.write_bytes(bytes(data))
    check_corrupt(capture, "b", 2, "Blosc")


@pytest.mark.parametrize("checksum", [True, False])
@pytest.mark.parametrize("keep", [0, 3, 10, -1])
def test_zarr_truncated_chunk(tmp_path: Path, checksum: bool, keep: int) -> None:
    capture = make_capture(tmp_path / "c.zarr", checksum=checksum)
    chunk = zarr_chunk(capture, "a", 0)
    data = chunk.read_bytes()
    chunk.write_bytes(data[:keep])
    check_corrupt(capture, "a", 0, "")


def test_zarr_truncated_raw_chunk(tmp_path: Path) -> None:
    capture = make_capture(tmp_path / "c.zarr", compression=None, checksum=False)
    chunk = zarr_chunk(capture, "a", 1)
    chunk.write_bytes(chunk.read_bytes()[:-4])
    check_corrupt(capture, "a", 1, "raw chunk holds 60 bytes")


def test_zarr_oversized_chunk(tmp_path: Path) -> None:
    capture = make_capture(tmp_path / "c.zarr")
    chunk = zarr_chunk(capture, "a", 1)
    chunk.write_bytes(os.urandom(10_000))
    check_corrupt(capture, "a", 1, "exceeds")


def test_zarr_deleted_chunk(tmp_path: Path) -> None:
    capture = make_capture(tmp_path / "c.zarr")
    zarr_chunk(capture, "a", 1).unlink()
    check_corrupt(capture, "a", 1, "missing from the store")


def test_zarr_deleted_last_chunk_is_refused_at_open(tmp_path: Path) -> None:
    """The chunk of the last committed row is looked up at open (one lookup per array)."""
    capture = make_capture(tmp_path / "c.zarr")
    zarr_chunk(capture, "a", 2).unlink()
    with pytest.raises(
        FormatError, match="activations/a does not store chunk 2, which holds row 9"
    ):
        open_capture(capture)


def test_corrupt_token_chunk(tmp_path: Path) -> None:
    capture = make_capture(tmp_path / "c.zarr")
    chunk = capture / "tokens" / "position" / "c" / "1"
    chunk.write_bytes(chunk.read_bytes()[:-1] + b"\x00")
    with open_capture(capture) as cap:
        with pytest.raises(CorruptChunkError, match="chunk 1 of site 'tokens/position'"):
            cap.tokens["position"].compute()
        assert cap.verify() == [
            "chunk 1 of site 'tokens/position' is corrupt: " + cap.verify()[0].split(": ", 1)[1]
        ]


@pytest.mark.parametrize(
    ("garbage", "detail"),
    [
        (b"\x00" * 8, "shorter than its header"),
        (os.urandom(64), "Blosc"),
        (b"\x02\x01\x21\x04" + (64).to_bytes(4, "little") + bytes(8), "Blosc"),
    ],
)
def test_hdf5_garbage_chunk(tmp_path: Path, garbage: bytes, detail: str) -> None:
    import h5py

    capture = make_capture(tmp_path / "c.h5")
    with h5py.File(capture, "r+") as f:
        f["activations/a"].id.write_direct_chunk((CHUNK, 0), garbage)
    check_corrupt(capture, "a", 1, detail)


# ---------------------------------------------------------------------- inconsistent metadata
ZARR_EDITS: dict[str, tuple[str, Callable[[dict[str, Any]], None], str]] = {
    "feature shape": (
        "activations/a",
        lambda d: d.update(shape=[ROWS, 5]),
        "its feature shape should be [4]",
    ),
    "chunk shape": (
        "activations/a",
        lambda d: d["chunk_grid"]["configuration"].update(chunk_shape=[8, 4]),
        "has chunk shape [8, 4]; its metadata says [4, 4]",
    ),
    "data type": (
        "activations/b",
        lambda d: d.update(data_type="float32"),
        "has data type 'float32'; its metadata says 'float16'",
    ),
    "codecs": (
        "activations/a",
        lambda d: d.update(codecs=d["codecs"][:2]),
        "has codecs ['bytes', 'blosc']; its metadata implies ['bytes', 'blosc', 'crc32c']",
    ),
    "short array": (
        "tokens/step",
        lambda d: d.update(shape=[ROWS - 1]),
        "holds 9 rows but 10 are committed",
    ),
    "site chunk_rows": (
        "activations/a",
        lambda d: d["attributes"]["llminstr"].update(chunk_rows=8),
        "chunk shape [4, 4]; its metadata says [8, 4]",
    ),
    "logical dtype": (
        "activations/b",
        lambda d: d["attributes"]["llminstr"].update(logical_dtype="float32"),
        "does not match the format schema",
    ),
    "array is a group": (
        "activations/a",
        lambda d: d.update(node_type="group"),
        "is not a Zarr array",
    ),
    "lost attribute": (
        "activations/a",
        lambda d: d.update(attributes={}),
        "lacks its 'llminstr' attribute",
    ),
}


@pytest.mark.parametrize("case", sorted(ZARR_EDITS))
def test_zarr_inconsistent_metadata(tmp_path: Path, case: str) -> None:
    capture = make_capture(tmp_path / "c.zarr")
    key, edit, needle = ZARR_EDITS[case]
    edit_zarr_json(capture / key / "zarr.json", edit)
    with pytest.raises(FormatError) as info:
        open_capture(capture)
    assert needle in str(info.value)
    assert str(capture) in str(info.value)


def test_rows_beyond_the_format_limits(tmp_path: Path) -> None:
    """A consistent but huge declared shape is refused before anything is allocated."""
    capture = make_capture(tmp_path / "c.zarr")
    big = [4096, 8192]

    def edit(d: dict[str, Any]) -> None:
        d["shape"] = [ROWS, *big]
        d["chunk_grid"]["configuration"]["chunk_shape"] = [CHUNK, *big]
        d["dimension_names"] = ["row", "feature_0", "feature_1"]
        d["attributes"]["llminstr"].update(
            feature_shape=big, dimension_names=["row", "feature_0", "feature_1"]
        )

    edit_zarr_json(capture / "activations" / "a" / "zarr.json", edit)
    with pytest.raises(FormatError, match="above the format limits"):
        open_capture(capture)


@pytest.mark.parametrize("dims", [["row"], ["row", "feature", "x"], ["row", "row"]])
def test_bad_dimension_names(capture: Path, dims: list[str]) -> None:
    edit_array_doc(capture, "activations/a", lambda d: d.update(dimension_names=dims))
    with pytest.raises(
        FormatError, match=r"distinct dimension names|does not match the format schema"
    ):
        open_capture(capture)


def test_array_document_of_another_array(capture: Path) -> None:
    edit_array_doc(capture, "activations/a", lambda d: d.update(name="b"))
    with pytest.raises(FormatError, match="activations/a has the metadata of 'b'"):
        open_capture(capture)


def test_zarr_foreign_chunk_key_encoding(tmp_path: Path) -> None:
    capture = make_capture(tmp_path / "c.zarr")
    edit_zarr_json(
        capture / "activations" / "a" / "zarr.json",
        lambda d: d.update(chunk_key_encoding={"name": "v2", "configuration": {"separator": "."}}),
    )
    with pytest.raises(FormatError, match="chunk key encoding"):
        open_capture(capture)


def test_failed_refresh_keeps_the_last_good_state(capture: Path) -> None:
    cap = open_capture(capture)
    cap.close()  # drops the cached HDF5 handle, so that the file can be edited
    edit_root(capture, lambda d: d.update(format_version="9.0"))
    with pytest.raises(UnsupportedVersionError):
        cap.refresh()
    assert cap.num_rows == ROWS and cap.format_version == "1.0"
    np.testing.assert_array_equal(cap.read("a"), ramp(ROWS, 4))
    cap.close()


def test_committed_rows_beyond_array_length(capture: Path) -> None:
    if capture.is_dir():
        edit_root(capture, lambda d: d.update(committed_rows=ROWS + 5))
    else:
        import h5py

        with h5py.File(capture, "r+") as f:
            f["llminstr_commit"][1] = ROWS + 5
    with pytest.raises(FormatError, match=f"holds {ROWS} rows but {ROWS + 5} are committed"):
        open_capture(capture)


def test_site_document_disagrees_with_root(capture: Path) -> None:
    edit_array_doc(capture, "activations/a", lambda d: d.update(chunk_rows=2))
    with pytest.raises(FormatError, match="chunk"):
        open_capture(capture)


def test_root_lists_a_missing_array(capture: Path) -> None:
    edit_root(capture, lambda d: d["sites"].append("ghost"))
    with pytest.raises(FormatError, match="ghost"):
        open_capture(capture)


def test_hdf5_dataset_disagrees_with_document(tmp_path: Path) -> None:
    capture = make_capture(tmp_path / "c.h5")
    edit_array_doc(capture, "activations/b", lambda d: d.update(feature_shape=[3, 2]))
    with pytest.raises(FormatError, match="activations/b has chunks"):
        open_capture(capture)
    capture = make_capture(tmp_path / "d.h5")
    edit_array_doc(
        capture,
        "activations/b",
        lambda d: d.update(storage_dtype="float32", logical_dtype="float32"),
    )
    with pytest.raises(FormatError, match="has dtype float16; its metadata says float32"):
        open_capture(capture)


def test_hdf5_bad_commit_record(tmp_path: Path) -> None:
    import h5py

    capture = make_capture(tmp_path / "c.h5")
    with h5py.File(capture, "r+") as f:
        f["llminstr_commit"][2] = 7
    with pytest.raises(FormatError, match="invalid commit record"):
        open_capture(capture)
    capture = make_capture(tmp_path / "d.h5")
    with h5py.File(capture, "r+") as f:
        del f["llminstr_commit"]
    with pytest.raises(FormatError, match="dataset llminstr_commit is missing"):
        open_capture(capture)


def test_oversized_metadata_document(capture: Path) -> None:
    padding = "x" * (MAX_DOCUMENT_BYTES + 10)
    edit_root(capture, lambda d: d["model"].update(padding=padding))
    with pytest.raises(FormatError, match=r"metadata limit|exceeds the limit") as info:
        open_capture(capture)
    assert str(capture) in str(info.value)


def test_oversized_array_document(tmp_path: Path) -> None:
    capture = make_capture(tmp_path / "c.zarr")
    path = capture / "activations" / "a" / "zarr.json"
    path.write_text(path.read_text() + " " * MAX_DOCUMENT_BYTES)
    with pytest.raises(FormatError, match="above the metadata limit"):
        open_capture(capture)


# ---------------------------------------------------------------------- fuzzed metadata
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-3, 2**40)
    | st.floats(allow_nan=False)
    | st.text(max_size=5)
    | st.sampled_from(["float32", "uint16", "lz4", "1.0", "2.0", "complete", "row"]),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)


def paths_of(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += paths_of(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += paths_of(v, (*prefix, i))
    return out


def set_at(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return None if value is DELETE else value
    node = doc
    for key in path[:-1]:
        node = node[key]
    if value is DELETE and isinstance(node, dict):
        del node[path[-1]]
    else:
        node[path[-1]] = None if value is DELETE else value
    return doc


DELETE = object()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("pristine")
    return {s: make_capture(base / f"p{s}") for s in (".zarr", ".h5")}


@settings(
    max_examples=int(os.environ.get("LLMINSTR_HYPOTHESIS_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_fuzzed_metadata_raises_only_llminstr_errors(
    backend: str, pristine: dict[str, Path], tmp_path: Path, data: st.DataObject
) -> None:
    import shutil
    import uuid

    target = tmp_path / f"f{uuid.uuid4().hex[:8]}{backend}"
    if backend == ".zarr":
        shutil.copytree(pristine[backend], target)
        key = data.draw(
            st.sampled_from(["", "activations/a", "activations/b", "tokens/token_id"]), "key"
        )
        meta_path = target / key / "zarr.json"
        doc = json.loads(meta_path.read_text())
    else:
        import h5py

        shutil.copy(pristine[backend], target)
        key = data.draw(st.sampled_from(["", "activations/a", "tokens/step"]), "key")
        with h5py.File(target, "r") as f:
            doc = json.loads((f[key] if key else f).attrs["llminstr"])
    where = data.draw(st.sampled_from(paths_of(doc)), "where")
    value = data.draw(JSON_VALUES | st.just(DELETE), "value")
    doc = set_at(doc, where, value)
    if backend == ".zarr":
        meta_path.write_text(json.dumps(doc))
    else:
        with h5py.File(target, "r+") as f:
            (f[key] if key else f).attrs["llminstr"] = json.dumps(doc)
    try:
        with open_capture(target) as cap:
            for name in cap.sites:
                cap.activations(name).compute()
            cap.token_table()
            cap.verify()
            cap.to_xarray()
    except LlminstrError:
        pass


def test_root_backend_and_compression_must_match_the_arrays(tmp_path):  # type: ignore[no-untyped-def]
    import json

    import numpy as np

    from llminstr.errors import FormatError
    from llminstr.format import SiteInfo
    from llminstr.reader import open_capture
    from llminstr.storage.writer import CaptureWriter

    for field, value, message in (
        ("backend", "hdf5", "backend"),
        ("compression", None, "compression summary"),
    ):
        path = tmp_path / f"{field}.zarr"
        with CaptureWriter(path, [SiteInfo("s", (4,))], chunk_rows=4) as w:
            w.append(
                {"token_id": [1], "sequence": [0], "position": [0], "step": [0]},
                {"s": np.ones((1, 4), np.float32)},
            )
        meta = json.loads((path / "zarr.json").read_text())
        doc = meta["attributes"]["llminstr"]
        if field == "backend":
            doc["backend"] = value
        else:
            doc["compression"]["cname"] = "zstd"
        (path / "zarr.json").write_text(json.dumps(meta))
        with pytest.raises(FormatError, match=message):
            open_capture(path)


def test_writer_refuses_what_the_schema_refuses(tmp_path):  # type: ignore[no-untyped-def]
    from llminstr.errors import ConfigError
    from llminstr.format import SiteInfo, check_name
    from llminstr.storage.writer import CaptureWriter

    with pytest.raises(ConfigError, match="1 to 8"):
        SiteInfo("s", (1,) * 9)
    with pytest.raises(ConfigError, match="chunk_rows must be an integer in"):
        CaptureWriter(tmp_path / "c.zarr", [SiteInfo("s", (1,))], chunk_rows=(1 << 24) + 1)
    with pytest.raises(ConfigError, match="site name"):
        check_name("abc\n")


def test_non_finite_model_metadata_is_written_as_strict_json(tmp_path):  # type: ignore[no-untyped-def]
    import json

    import numpy as np

    from llminstr.format import SiteInfo
    from llminstr.reader import open_capture
    from llminstr.storage.writer import CaptureWriter

    for suffix in ("zarr", "h5"):
        path = tmp_path / f"c.{suffix}"
        with CaptureWriter(
            path, [SiteInfo("s", (2,))], model={"x": float("nan"), "y": (1, 2)}
        ) as w:
            w.append(
                {"token_id": [1], "sequence": [0], "position": [0], "step": [0]},
                {"s": np.ones((1, 2), np.float32)},
            )
        assert open_capture(path).metadata["model"] == {"x": None, "y": [1, 2]}
        if suffix == "zarr":
            json.loads((path / "zarr.json").read_text(), parse_constant=lambda c: pytest.fail(c))


def test_zarr_huge_chunk_file_is_refused_before_reading(tmp_path: Path) -> None:
    """An oversized chunk file is rejected from its size alone: no buffer for it is
    allocated and nothing is read (a 1 GiB sparse file here)."""
    import threading

    from llminstr import reader

    capture = make_capture(tmp_path / "c.zarr")
    with open(zarr_chunk(capture, "a", 1), "r+b") as fh:
        fh.truncate(1 << 30)
    seen: dict[str, Any] = {}

    def read() -> None:  # a fresh thread: its frame buffer starts empty
        with open_capture(capture) as cap:
            src = cap._source("activations/a", "a")
            try:
                src.read_chunk(1)
            except CorruptChunkError as exc:
                seen["error"] = exc
            seen["buffer"] = getattr(reader._FRAME_BUFFER, "buf", None)

    thread = threading.Thread(target=read)
    thread.start()
    thread.join()
    assert f"frame of {1 << 30} bytes exceeds" in str(seen["error"])
    assert seen["buffer"] is None


def test_read_chunk_into_a_buffer(backend: str, tmp_path: Path) -> None:
    capture = make_capture(tmp_path / f"c{backend}")
    with open_capture(capture) as cap:
        for site, shape, dtype in (("a", (CHUNK, 4), np.float32), ("b", (CHUNK, 2, 3), np.float16)):
            src = cap._source(f"activations/{site}", site)
            out = np.full(shape, 7, dtype)
            for index in range(3):
                got = src.read_chunk(index, out=out)
                assert got is out
                np.testing.assert_array_equal(out, src.read_chunk(index))
            np.testing.assert_array_equal(
                src.read_chunk(0, out=out)[:CHUNK].reshape(CHUNK, -1),
                ramp(CHUNK, 4 if site == "a" else 6).astype(dtype),
            )
            for bad in (
                np.empty((CHUNK + 1, *shape[1:]), dtype),
                np.empty(shape, np.float64),
                np.empty(shape[::-1], dtype).T,
            ):
                with pytest.raises(ValueError, match="out must be a C-contiguous"):
                    src.read_chunk(0, out=bad)


def test_sources_tokenize_by_identity_without_pickling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sources give Dask their identity (``__dask_tokenize__``): Dask never falls back to
    pickling them to tokenize, equal sources tokenize equal and different ones apart."""
    import dask.tokenize
    from dask.base import tokenize

    capture = make_capture(tmp_path / "c.zarr")
    pickled: list[Any] = []
    original = dask.tokenize._normalize_pickle

    def recording(o: object) -> tuple[Any, ...]:
        pickled.append(o)
        return original(o)

    monkeypatch.setattr(dask.tokenize, "_normalize_pickle", recording)
    with open_capture(capture) as cap, open_capture(capture) as again:
        a, b = cap._source("activations/a", "a"), again._source("activations/a", "a")
        assert tokenize(a) == tokenize(b)
        assert tokenize(a) != tokenize(cap._source("activations/b", "b"))
        a.rows -= 1
        assert tokenize(a) != tokenize(b)
    assert pickled == []


def test_zarr_chunk_file_growing_while_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunk file that holds more bytes than its size said when opened (written in place
    by someone else) is refused with a message that says so."""
    from llminstr import reader

    capture = make_capture(tmp_path / "c.zarr")
    chunk = zarr_chunk(capture, "a", 1)
    real = chunk.stat().st_size
    original = os.fstat

    def small_fstat(fd: int) -> os.stat_result:
        st = original(fd)
        if st.st_size == real:  # pretend the file was 10 bytes shorter when opened
            fields = list(st)
            fields[6] = real - 10
            return os.stat_result(fields)
        return st

    monkeypatch.setattr(reader.os, "fstat", small_fstat)
    with open_capture(capture) as cap, pytest.raises(CorruptChunkError, match="grew past its"):
        cap._source("activations/a", "a").read_chunk(1)


# ---------------------------------------------------------------------- eager row ranges
def test_read_and_token_table_follow_slice_rules(capture: Path) -> None:
    """``read`` and ``token_table`` take ``[start, stop)`` as Python slices do."""
    cap = open_capture(capture)
    full_a = ramp(ROWS, 4)
    full_ids = token_columns(ROWS)["token_id"]
    for start, stop in [
        (0, None),
        (-3, None),
        (0, -1),
        (-3, -1),
        (2, 7),
        (7, 2),
        (-99, 99),
        (3, 3),
    ]:
        np.testing.assert_array_equal(cap.read("a", start, stop), full_a[start:stop])
        np.testing.assert_array_equal(
            cap.token_table(start, stop)["token_id"], full_ids[start:stop]
        )
    assert cap.read("b", -2).shape == (2, 2, 3)
    for bad in (2.5, "1", True):
        with pytest.raises(ConfigError, match="row bounds must be integers"):
            cap.read("a", bad, 4)  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="row bounds must be integers"):
            cap.token_table(0, bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------------- hostile files
@contextlib.contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail instead of hanging (a FIFO or an HDF5 file that never grows)."""

    def expired(*_: Any) -> None:
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_hdf5_filter_the_metadata_does_not_name_is_refused(tmp_path: Path) -> None:
    """HDF5's own shuffle on a raw dataset: read directly, the chunks would come back
    still shuffled, so the reader checks the filter pipeline (section 6.2)."""
    import h5py

    capture = make_capture(tmp_path / "c.h5", compression=None)
    with h5py.File(capture, "r+") as f:
        old = f["tokens/step"]
        data, attrs, chunks = old[...], dict(old.attrs), old.chunks
        del f["tokens/step"]
        new = f.create_dataset(
            "tokens/step", data=data, chunks=chunks, maxshape=(None,), shuffle=True
        )
        new.attrs.update(attrs)
    with pytest.raises(
        FormatError, match=r"tokens/step has HDF5 filters \[2\]; its metadata implies \[\]"
    ):
        open_capture(capture)


def test_special_files_are_refused_without_blocking(tmp_path: Path) -> None:
    capture = make_capture(tmp_path / "c.zarr")
    doc = capture / "activations" / "a" / "zarr.json"
    doc.unlink()
    os.mkfifo(doc)
    with deadline(20), pytest.raises(FormatError, match=r"zarr\.json is not a regular file"):
        open_capture(capture)
    doc.unlink()
    doc.symlink_to("/dev/zero")
    with deadline(20), pytest.raises(FormatError, match=r"zarr\.json is not a regular file"):
        open_capture(capture)

    capture = make_capture(tmp_path / "d.zarr")
    zarr_chunk(capture, "a", 1).unlink()
    os.mkfifo(zarr_chunk(capture, "a", 1))
    with deadline(20):
        check_corrupt(capture, "a", 1, "not a regular file")
    zarr_chunk(capture, "a", 1).unlink()
    zarr_chunk(capture, "a", 1).mkdir()
    check_corrupt(capture, "a", 1, "not a regular file")
    zarr_chunk(capture, "a", 1).rmdir()
    zarr_chunk(capture, "a", 1).parent.rmdir()
    zarr_chunk(capture, "a", 1).parent.write_bytes(b"a file where a directory should be")
    check_corrupt(capture, "a", 1, "cannot be read")
    doc = capture / "activations" / "b" / "zarr.json"
    doc.unlink()
    doc.mkdir()
    with pytest.raises(FormatError, match=r"zarr\.json is not a regular file"):
        open_capture(capture)
    fifo = tmp_path / "pipe.h5"
    os.mkfifo(fifo)
    with deadline(20), pytest.raises(NotACaptureError, match="is not a regular file"):
        open_capture(fifo)


def test_truncated_hdf5_is_refused_not_waited_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HDF5 skips its end-of-file check for SWMR readers and then retries reads past the
    end without end; the reader compares the file with its superblock first."""
    import llminstr.reader as reader_mod

    monkeypatch.setattr(reader_mod, "HDF5_GROW_WAIT_S", 0.2)
    capture = make_capture(tmp_path / "c.h5")
    data = capture.read_bytes()
    for keep in (2048, len(data) // 2):
        cut = tmp_path / f"cut{keep}.h5"
        cut.write_bytes(data[:keep])
        with deadline(30), pytest.raises(NotACaptureError, match="truncated HDF5 file"):
            open_capture(cut)


def test_row_count_claimed_by_metadata_alone_is_refused(backend: str, tmp_path: Path) -> None:
    """2**40 rows claimed in a file of a few kilobytes: refused at open, before a lazy
    array with one task per claimed chunk is built."""
    capture = make_capture(tmp_path / f"c{backend}")
    huge = 1 << 40
    if backend == ".zarr":
        edit_root(capture, lambda d: d.update(committed_rows=huge))
        for key in ARRAYS:
            edit_zarr_json(capture / key / "zarr.json", lambda d: d["shape"].__setitem__(0, huge))
    else:
        import h5py

        with h5py.File(capture, "r+") as f:
            for key in ARRAYS:
                f[key].resize(huge, axis=0)
            f["llminstr_commit"][1] = huge
    with pytest.raises(FormatError, match="does not store chunk 274877906943"):
        open_capture(capture)
    edit_root(capture, lambda d: d.update(committed_rows=1 << 70, commit_seq=1 << 40))
    with pytest.raises(FormatError, match="above the format limit"):
        open_capture(capture)


@pytest.mark.parametrize("shape", [[2**32, 2**32], [2**64], [2**62, 4]])
def test_feature_shape_whose_product_overflows_int64_is_refused(
    capture: Path, shape: list[int]
) -> None:
    edit_array_doc(capture, "activations/a", lambda d: d.update(feature_shape=shape))
    with pytest.raises(FormatError):
        open_capture(capture)


def test_deeply_nested_metadata_is_a_format_error(capture: Path) -> None:
    deep = "[" * 200_000 + "]" * 200_000
    if capture.is_dir():
        doc = json.loads((capture / "zarr.json").read_text())
        text = json.dumps(doc).replace(
            '"attributes": {', '"deep": ' + deep + ', "attributes": {', 1
        )
        (capture / "zarr.json").write_text(text)
    else:
        import h5py

        with h5py.File(capture, "r+") as f:
            f.attrs["llminstr"] = f.attrs["llminstr"][:-1] + ', "deep": ' + deep + "}"
    with pytest.raises(FormatError, match="nested too deeply"):
        open_capture(capture)


def test_hdf5_structure_damage_is_a_format_error(tmp_path: Path) -> None:
    import h5py

    def damaged(name: str, edit: Callable[[Any], None]) -> Path:
        path = make_capture(tmp_path / f"{name}.h5")
        with h5py.File(path, "r+") as f:
            edit(f)
        return path

    cases: list[tuple[Path, str]] = [
        (
            damaged("intattr", lambda f: f["activations/a"].attrs.__setitem__("llminstr", 7)),
            "must be a string holding JSON",
        ),
        (
            damaged(
                "group", lambda f: (f.__delitem__("activations/a"), f.create_group("activations/a"))
            ),
            "activations/a is not an HDF5 dataset",
        ),
        (
            damaged(
                "commitgroup",
                lambda f: (f.__delitem__("llminstr_commit"), f.create_group("llminstr_commit")),
            ),
            "llminstr_commit is not an HDF5 dataset",
        ),
        (
            damaged(
                "dangling",
                lambda f: (
                    f.__delitem__("activations/a"),
                    f.__setitem__("activations/a", h5py.SoftLink("/nowhere")),
                ),
            ),
            "activations/a",
        ),
        (
            damaged(
                "cycle",
                lambda f: (
                    f.__delitem__("activations/a"),
                    f.__setitem__("activations/a", h5py.SoftLink("/activations/a")),
                ),
            ),
            "activations/a",
        ),
    ]
    for path, message in cases:
        with pytest.raises(FormatError, match=message):
            open_capture(path)


def test_token_column_feature_shape_key_is_ignored(capture: Path) -> None:
    """An unknown key is ignored (section 10): a token column stays 1-D."""
    edit_array_doc(capture, "tokens/step", lambda d: d.update(feature_shape=[3]))
    with open_capture(capture) as cap:
        np.testing.assert_array_equal(cap.token_table()["step"], token_columns(ROWS)["step"])
        assert cap.tokens["step"].shape == (ROWS,)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["sites"].__setitem__(0, "a\n"), r"'a\\n' is not a valid name"),
        (lambda d: d.update(format_version="1.0\n"), "format_version must look like"),
    ],
)
def test_trailing_newline_in_names_and_version_is_refused(
    capture: Path, edit: Callable[[dict[str, Any]], None], message: str
) -> None:
    edit_root(capture, edit)
    with pytest.raises(FormatError, match=message):
        open_capture(capture)


def test_to_xarray_with_names_shared_by_sites_and_columns(tmp_path: Path) -> None:
    """A site ``h`` beside a token column ``h``, and a site named ``row``: legal names that
    would collide in one xarray Dataset."""
    path = tmp_path / "c.zarr"
    sites = [SiteInfo("h", (2,)), SiteInfo("row", (3,)), SiteInfo("h.feature", (1,))]
    extra = {"h": np.arange(4, dtype=np.int64) * 7}
    with CaptureWriter(path, sites, chunk_rows=2, extra_token_columns=["h"]) as w:
        w.append(
            {**token_columns(4), **extra},
            {
                "h": np.ones((4, 2), np.float32),
                "row": np.zeros((4, 3), np.float32),
                "h.feature": np.full((4, 1), 5, np.float32),
            },
        )
    ds = open_capture(path).to_xarray()
    assert set(ds.data_vars) == {"h", "row", "h.feature"}
    np.testing.assert_array_equal(ds["tokens/h"].values, extra["h"])
    assert ds["h"].dims == ("row_", "h.feature_") and ds["row"].dims == ("row_", "row.feature")
    np.testing.assert_array_equal(ds["h.feature"].values, np.full((4, 1), 5, np.float32))


def test_to_xarray_with_a_token_column_named_row(tmp_path: Path) -> None:
    """A token column ``row`` became the coordinate ``row_``, and ``ds["row"]`` the plain
    index; it is ``tokens/row`` now, like a column named after a site."""
    path = tmp_path / "c.zarr"
    extra = {"row": np.arange(4, dtype=np.int64) * 3}
    with CaptureWriter(path, [SiteInfo("s", (2,))], chunk_rows=2, extra_token_columns=["row"]) as w:
        w.append({**token_columns(4), **extra}, {"s": np.ones((4, 2), np.float32)})
    ds = open_capture(path).to_xarray()
    assert ds["s"].dims == ("row", "s.feature")
    np.testing.assert_array_equal(ds["tokens/row"].values, extra["row"])
    assert "row_" not in ds.coords


def test_hdf5_reads_stay_right_beside_another_handle_of_the_dataset(tmp_path: Path) -> None:
    """H5Drefresh while another handle of the same dataset is open corrupts HDF5's shared
    chunk index (other chunks then read as chunk 0). Reads used to refresh, and a previous
    read's handle could still be open (freed after the lock): wrong data under load. Reads
    no longer refresh, and a finished capture is never refreshed."""
    from llminstr import reader as reader_mod

    capture = make_capture(tmp_path / "c.h5", compression=None)
    with open_capture(capture) as cap:
        held = reader_mod._h5_file(str(capture))["activations/a"]  # a second open handle
        for _ in range(3):
            np.testing.assert_array_equal(cap.read("a"), ramp(ROWS, 4))
            cap.refresh()
            np.testing.assert_array_equal(cap.activations("a").compute(), ramp(ROWS, 4))
        del held


def test_root_without_error_key_reads_as_null(capture: Path) -> None:
    """Section 3.2: readers MUST treat a missing ``error`` as null."""
    edit_root(capture, lambda d: d.pop("error"))
    with open_capture(capture) as cap:
        assert cap.metadata["error"] is None and cap.num_rows == ROWS


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(fill_value=1.5), "has fill_value 1.5; the format uses 0"),
        (lambda d: d.update(dimension_names=["row", "x"]), "has dimension_names"),
        (lambda d: d["attributes"].update(note=float("nan")), "NaN is not JSON"),
    ],
)
def test_zarr_array_metadata_the_spec_fixes(
    tmp_path: Path, edit: Callable[[dict[str, Any]], None], message: str
) -> None:
    capture = make_capture(tmp_path / "c.zarr")
    edit_zarr_json(capture / "activations" / "a" / "zarr.json", edit)
    with pytest.raises(FormatError, match=message):
        open_capture(capture)


def test_hdf5_dataset_must_be_unlimited_with_zero_fill(tmp_path: Path) -> None:
    import h5py

    capture = make_capture(tmp_path / "c.h5", compression=None)
    with h5py.File(capture, "r+") as f:
        old = f["tokens/step"]
        data, attrs, chunks = old[...], dict(old.attrs), old.chunks
        del f["tokens/step"]
        new = f.create_dataset("tokens/step", data=data, chunks=chunks, maxshape=(len(data),))
        new.attrs.update(attrs)
    with pytest.raises(FormatError, match="must be unlimited along rows with fill value 0"):
        open_capture(capture)


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_refresh_in_one_thread_while_others_read(tmp_path: Path, suffix: str) -> None:
    """refresh() emptied the shared tables before refilling them: other threads' reads of
    the same Capture failed with SiteNotFoundError thousands of times a second."""
    errors: list[BaseException] = []
    path = tmp_path / f"c{suffix}"
    x = np.arange(64 * 4, dtype=np.float32).reshape(64, 4)
    with CaptureWriter(path, [SiteInfo("a", (4,)), SiteInfo("b", (4,))], chunk_rows=8) as w:
        w.append(token_columns(64), {"a": x, "b": x + 1})
    cap = open_capture(path)
    stop = threading.Event()

    def refresher() -> None:
        while not stop.is_set():
            cap.refresh()

    def reader_loop() -> None:
        try:
            while not stop.is_set():
                assert np.array_equal(cap.read("a", 8, 24), x[8:24])
                assert cap.site_info("b")["name"] == "b"
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=refresher), threading.Thread(target=reader_loop)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    cap.close()
    assert not errors, errors[:3]


def test_hdf5_handles_are_shared_by_real_path_and_bounded(tmp_path: Path) -> None:
    from llminstr import reader

    paths = []
    for i in range(reader.HDF5_MAX_OPEN_FILES + 4):
        path = tmp_path / f"c{i}.h5"
        with CaptureWriter(path, [SiteInfo("a", (2,))], chunk_rows=4) as w:
            w.append(token_columns(4), {"a": np.full((4, 2), i, np.float32)})
        paths.append(path)
    link = tmp_path / "link.h5"
    link.symlink_to(paths[0])
    caps = [open_capture(paths[0]), open_capture(link), open_capture(f"{tmp_path}/./c0.h5")]
    assert sum(1 for k in reader._H5_FILES if k == os.path.realpath(paths[0])) == 1
    many = [open_capture(p) for p in paths]  # never closed: the cache stays bounded
    assert len(reader._H5_FILES) <= reader.HDF5_MAX_OPEN_FILES
    assert all(c.read("a")[0, 0] == i for i, c in enumerate(many))  # evicted ones reopen
    for c in caps + many:
        c.close()


def test_the_writer_closes_a_same_process_readers_handle_at_close(tmp_path: Path) -> None:
    """A reader's handle in the writer's process shares HDF5's file: it kept the finished
    file open and marked, and other processes' plain h5py opens failed."""
    from llminstr import reader

    path = tmp_path / "c.h5"
    w = CaptureWriter(path, [SiteInfo("a", (2,))], chunk_rows=4)
    w.append(token_columns(8), {"a": np.ones((8, 2), np.float32)})
    w.commit()
    live = open_capture(path)  # follows the live capture from the writer's process
    assert live.num_rows == 8
    w.close()
    assert os.path.realpath(path) not in reader._H5_FILES
    code = "import sys, h5py; f = h5py.File(sys.argv[1], 'r'); print(f['llminstr_commit'][1])"
    done = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and done.stdout.strip() == "8", done.stderr
    live.refresh()
    assert (live.status, live.num_rows) == ("complete", 8)
    live.close()


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_a_capture_replaced_at_its_path_is_not_read_as_the_old_one(
    tmp_path: Path, suffix: str
) -> None:
    """A Capture kept while overwrite=True rewrote its path read the new capture's values,
    uncommitted rows included, with no error."""
    path = tmp_path / f"c{suffix}"
    with CaptureWriter(path, [SiteInfo("a", (2,))], chunk_rows=4) as w:
        w.append(token_columns(8), {"a": np.zeros((8, 2), np.float32)})
    old = open_capture(path)
    lazy = old.activations("a")
    time.sleep(0.01)  # a different `created` time, to the millisecond
    with CaptureWriter(path, [SiteInfo("a", (2,))], chunk_rows=4, overwrite=True) as w:
        w.append(token_columns(8), {"a": np.ones((8, 2), np.float32)})
    with pytest.raises(FormatError, match="now holds another capture than the one opened"):
        old.refresh()
    # Reads notice too. (A Zarr directory may get its inode back: its tokens group
    # document, written once per capture, tells the two apart.)
    with pytest.raises(FormatError, match="now holds another capture"):
        lazy.compute()
    old.close()
    assert open_capture(path).read("a")[0, 0] == 1.0


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_a_capture_survives_fork_pickle_and_copy(tmp_path: Path, suffix: str) -> None:
    """The replacement check compares the path's inode with the one seen by the opening
    process; a forked child refused an unchanged capture, and the refresh lock made a
    Capture impossible to pickle or copy."""
    import copy
    import pickle

    path = tmp_path / f"c{suffix}"
    x = np.arange(40, dtype=np.float32).reshape(10, 4)
    with CaptureWriter(path, [SiteInfo("a", (4,))], chunk_rows=4) as w:
        w.append(token_columns(10), {"a": x})
    cap = open_capture(path)
    pid = os.fork()
    if pid == 0:  # the child: exit code 0 only if refresh and read work
        code = 1
        try:
            cap.refresh()
            code = 0 if np.array_equal(cap.read("a"), x) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    for other in (pickle.loads(pickle.dumps(cap)), copy.deepcopy(cap)):
        other.refresh()
        assert np.array_equal(other.read("a"), x)
    cap.close()


def test_hdf5_chunk_lookup_goes_through_the_chunk_index(tmp_path: Path) -> None:
    """The last committed chunk is looked up with ``H5Dget_chunk_storage_size`` (an index
    lookup) on h5py's own HDF5: h5py's ``get_chunk_info_by_coord`` walked every chunk, so
    each open and refresh of a live capture grew with its length (an audit: 10.7 ms at
    10,000 chunks per array, 29.7 ms at 40,000; now 4.5 and 4.8 ms)."""
    import h5py

    from llminstr import reader as reader_mod

    assert reader_mod._hdf5_lib() is not None  # the ctypes path, not the fallback
    with h5py.File(tmp_path / "holes.h5", "w") as f:
        ds = f.create_dataset("x", shape=(40, 3), maxshape=(None, 3), chunks=(4, 3), dtype="<i8")
        ds[0:4] = 1
        ds[8:12] = 2
        stored = [reader_mod._hdf5_chunk_stored(ds, (4 * k, 0)) for k in range(10)]
    assert stored == [True, False, True] + [False] * 7


def test_hdf5_chunk_lookup_beside_another_thread_using_h5py(tmp_path: Path) -> None:
    """The lookup calls HDF5 through ctypes, which releases the GIL; this HDF5 build is not
    thread-safe, and h5py serialises only its own calls. Without h5py's lock around the
    call, another thread's h5py work crashed the process (a review: a segmentation fault
    within a second). Run in a child process, so that a crash fails the test."""
    code = textwrap.dedent(
        """
        import sys, threading, time
        import h5py, numpy as np
        from llminstr import reader
        d = sys.argv[1]
        f1 = h5py.File(d + "/a.h5", "w")
        ds = f1.create_dataset("x", shape=(4000, 3), maxshape=(None, 3), chunks=(4, 3), dtype="<i8")
        ds[:] = 1
        f2 = h5py.File(d + "/b.h5", "w")
        stop = time.monotonic() + 2.0
        wrong = []
        def lookups():
            while time.monotonic() < stop:
                for k in range(0, 4000, 4 * 37):
                    if not reader._hdf5_chunk_stored(ds, (k, 0)):
                        wrong.append(k)
        def h5work():
            i = 0
            while time.monotonic() < stop:
                g = f2.create_dataset(f"y{i}", data=np.arange(12).reshape(4, 3), chunks=(2, 3))
                g.attrs["a"] = i
                g[...]
                del f2[f"y{i}"]
                i += 1
        threads = [threading.Thread(target=lookups), threading.Thread(target=h5work)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        print("wrong", len(wrong))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert done.stdout.strip() == "wrong 0"
