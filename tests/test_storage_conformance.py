"""Conformance suite of the capture writer and reader, run on both backends (Zarr v3, HDF5).

Every test is parametrised by the ``backend`` fixture (path suffix ``.zarr`` or ``.h5``).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from conftest import assert_bits_equal, raw_documents, token_columns, validate_documents
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import llminstr
from llminstr.errors import ConfigError, SiteNotFoundError
from llminstr.format import SiteInfo
from llminstr.reader import open_capture
from llminstr.storage.writer import CaptureWriter

ISO_Z = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
STORAGE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}
LOGICAL = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}

HYPO = settings(
    max_examples=int(os.environ.get("LLMINSTR_HYPOTHESIS_EXAMPLES", "25")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def random_bits(rng: np.random.Generator, n: int, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """Arbitrary bit patterns (NaN payloads, infinities, -0.0, subnormals included)."""
    storage = np.dtype(STORAGE[dtype])
    raw = rng.integers(0, 1 << (8 * storage.itemsize), size=(n, *shape), dtype=np.uint64)
    return raw.astype(f"u{storage.itemsize}").view(storage)


def ramp(start: int, n: int, width: int) -> np.ndarray:
    """Row r, column j holds r * 1000 + j: a value that identifies its own position."""
    r = np.arange(start, start + n, dtype=np.float32)[:, None]
    return r * 1000 + np.arange(width, dtype=np.float32)[None, :]


def unique_path(base: Path, suffix: str) -> Path:
    return base / f"cap-{uuid.uuid4().hex[:10]}{suffix}"


def check_chunks(arr: Any, n: int, chunk_rows: int) -> None:
    rows = arr.chunks[0]
    assert sum(rows) == n
    if n:
        assert all(c == chunk_rows for c in rows[:-1])
        assert 1 <= rows[-1] <= chunk_rows
        assert len(rows) == -(-n // chunk_rows)
    for dim_chunks, size in zip(arr.chunks[1:], arr.shape[1:], strict=True):
        assert dim_chunks == (size,)


# ---------------------------------------------------------------------- round trip
@st.composite
def plans(draw: st.DrawFn) -> dict[str, Any]:
    chunk_rows = draw(st.integers(1, 9))
    sites = []
    for i in range(draw(st.integers(1, 3))):
        shape = draw(
            st.one_of(
                st.tuples(st.integers(1, 6)),
                st.tuples(st.integers(1, 3), st.integers(1, 3)),
            )
        )
        sites.append((f"model.layers.{i}.out", shape, draw(st.sampled_from(list(STORAGE)))))
    multiple = draw(st.booleans())  # a row count that is a multiple of chunk_rows, or any
    n = chunk_rows * draw(st.integers(0, 4)) if multiple else draw(st.integers(0, 30))
    arrays = ["tokens", *(s[0] for s in sites)]
    batches = {}
    for name in arrays:
        cuts = sorted(draw(st.lists(st.integers(0, n), max_size=4)))
        edges = [0, *cuts, n]
        batches[name] = [b - a for a, b in itertools.pairwise(edges)]
    labels = [name for name in arrays for _ in batches[name]]
    order = draw(st.permutations(labels))
    return {
        "chunk_rows": chunk_rows,
        "sites": sites,
        "n": n,
        "codec": draw(st.sampled_from(["lz4", "zstd", None])),
        "checksum": draw(st.booleans()),
        "batches": batches,
        "order": order,
        "commit_at": draw(st.sets(st.integers(0, len(order)), max_size=3)),
        "bf16_as_ml_dtypes": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**32 - 1)),
    }


@HYPO
@given(plan=plans())
def test_round_trip_is_bit_exact(backend: str, tmp_path: Path, plan: dict[str, Any]) -> None:
    rng = np.random.default_rng(plan["seed"])
    n, chunk_rows = plan["n"], plan["chunk_rows"]
    data = {name: random_bits(rng, n, shape, dtype) for name, shape, dtype in plan["sites"]}
    tokens = {c: rng.integers(-(2**62), 2**62, size=n, dtype=np.int64) for c in token_columns(0)}
    path = unique_path(tmp_path, backend)
    infos = [SiteInfo(name, shape, dtype) for name, shape, dtype in plan["sites"]]
    offsets = dict.fromkeys(plan["batches"], 0)
    cursors = dict.fromkeys(plan["batches"], 0)

    with CaptureWriter(
        path,
        infos,
        chunk_rows=chunk_rows,
        compression=plan["codec"],
        checksum=plan["checksum"],
        encoder_threads=2,
    ) as writer:
        for step, name in enumerate(plan["order"]):
            if step in plan["commit_at"]:
                writer.commit()
            size = plan["batches"][name][cursors[name]]
            cursors[name] += 1
            lo, hi = offsets[name], offsets[name] + size
            offsets[name] = hi
            if name == "tokens":
                writer.write_tokens({c: v[lo:hi] for c, v in tokens.items()})
            else:
                rows = data[name][lo:hi].copy()
                if rows.dtype == np.uint16 and plan["bf16_as_ml_dtypes"]:
                    rows = rows.view(ml_dtypes.bfloat16)
                writer.write_site(name, rows)
                rows.view(np.uint8)[...] = 0  # the writer copied: reusing the buffer is harmless
        if len(plan["order"]) in plan["commit_at"]:
            writer.commit()
    assert writer.status == "complete"
    assert writer.committed_rows == n

    root = validate_documents(path)
    assert root["status"] == "complete" and root["committed_rows"] == n
    cap = open_capture(path)
    try:
        assert cap.status == "complete"
        assert cap.num_rows == n
        assert cap.chunk_rows == chunk_rows
        assert cap.sites == [s.name for s in infos]
        for info in infos:
            arr = cap.activations(info.name)
            assert arr.shape == (n, *info.feature_shape)
            assert arr.dtype == np.dtype(LOGICAL[info.dtype])
            check_chunks(arr, n, chunk_rows)
            assert_bits_equal(arr.compute(), data[info.name])
            raw = cap.activations(info.name, logical=False)
            assert raw.dtype == np.dtype(STORAGE[info.dtype])
            assert_bits_equal(raw.compute(), data[info.name])
            assert_bits_equal(cap.read(info.name), data[info.name])
            if n > 2:  # a slice across chunk boundaries
                assert_bits_equal(arr[1 : n - 1].compute(), data[info.name][1 : n - 1])
        for c, expected in tokens.items():
            col = cap.tokens[c]
            check_chunks(col, n, chunk_rows)
            np.testing.assert_array_equal(col.compute(), expected)
        table = cap.token_table()
        assert list(table) == list(tokens)
        for c, expected in tokens.items():
            np.testing.assert_array_equal(table[c], expected)
        assert cap.verify() == []
    finally:
        cap.close()
    check_foreign_reader(path, infos, data, tokens, n)


def check_foreign_reader(
    path: Path,
    infos: list[SiteInfo],
    data: dict[str, np.ndarray],
    tokens: dict[str, np.ndarray],
    n: int,
) -> None:
    """A plain zarr-python or h5py + hdf5plugin reader decodes the same values."""
    if path.suffix == ".zarr":
        import zarr

        for info in infos:
            arr = zarr.open_array(str(path / "activations" / info.name), mode="r")
            assert arr.shape == (n, *info.feature_shape)
            assert_bits_equal(arr[...], data[info.name])
        for c, expected in tokens.items():
            np.testing.assert_array_equal(
                zarr.open_array(str(path / "tokens" / c), mode="r")[...], expected
            )
    else:
        import h5py
        import hdf5plugin  # noqa: F401

        with h5py.File(path, "r") as f:
            for info in infos:
                ds = f["activations"][info.name]
                assert ds.shape == (n, *info.feature_shape)
                assert_bits_equal(ds[...], data[info.name])
            for c, expected in tokens.items():
                np.testing.assert_array_equal(f["tokens"][c][...], expected)


# ---------------------------------------------------------------------- exact metadata
SITE_A = SiteInfo(
    "model.layers.0.mlp",
    (4,),
    "float32",
    kind="ffn",
    layer=0,
    module_path="model.layers.0.mlp",
    module_class="GPT2MLP",
    tuple_index=None,
)
SITE_B = SiteInfo(
    "model.layers.0.attn",
    (2, 3),
    "bfloat16",
    kind="attention",
    layer=0,
    module_path="transformer.h.0.attn",
    module_class="GPT2Attention",
    tuple_index=0,
)


def write_fixed_capture(path: Path) -> None:
    with CaptureWriter(
        path,
        [SITE_A, SITE_B],
        chunk_rows=4,
        compression="lz4",
        checksum=True,
        commit_interval_s=1e9,
        model={"name": "tiny", "n_layer": 1},
        capture_config={"granularity": "all"},
    ) as w:
        w.append(
            token_columns(6),
            {
                SITE_A.name: np.ones((6, 4), np.float32),
                SITE_B.name: np.ones((6, 2, 3), ml_dtypes.bfloat16),
            },
        )
        assert w.commit() == 6


def test_exact_metadata_documents(backend: str, tmp_path: Path) -> None:
    path = tmp_path / f"fixed{backend}"
    write_fixed_capture(path)
    root, sites, tokens = raw_documents(path)
    is_zarr = backend == ".zarr"
    for key in ("created", "updated", "closed"):
        assert ISO_Z.match(root.pop(key)), key
    assert root == {
        "format": "llminstr-capture",
        "format_version": "1.0",
        "status": "complete",
        "committed_rows": 6,
        "commit_seq": 2,  # one commit() plus the close
        "error": None,
        "library": {"name": "llminstr", "version": llminstr.__version__},
        "backend": "zarr" if is_zarr else "hdf5",
        "model": {"name": "tiny", "n_layer": 1},
        "capture_config": {"granularity": "all"},
        "chunk_rows": 4,
        "compression": {
            "cname": "lz4",
            "clevel": 5,
            "shuffle": "shuffle",
            # HDF5 frames pass HDF5's filter pipeline, which knows no CRC32C trailer
            "checksum": "crc32c" if is_zarr else None,
        },
        "sites": ["model.layers.0.mlp", "model.layers.0.attn"],
        "token_columns": ["token_id", "sequence", "position", "step"],
    }
    checksum = "crc32c" if is_zarr else None
    assert sites == {
        "model.layers.0.mlp": {
            "name": "model.layers.0.mlp",
            "module_path": "model.layers.0.mlp",
            "layer": 0,
            "kind": "ffn",
            "module_class": "GPT2MLP",
            "tuple_index": None,
            "logical_dtype": "float32",
            "storage_dtype": "float32",
            "feature_shape": [4],
            "dimension_names": ["row", "feature"],
            "chunk_rows": 4,
            "codec": {
                "name": "blosc",
                "cname": "lz4",
                "clevel": 5,
                "shuffle": "shuffle",
                "typesize": 4,
                "blocksize": 0,
            },
            "checksum": checksum,
        },
        "model.layers.0.attn": {
            "name": "model.layers.0.attn",
            "module_path": "transformer.h.0.attn",
            "layer": 0,
            "kind": "attention",
            "module_class": "GPT2Attention",
            "tuple_index": 0,
            "logical_dtype": "bfloat16",
            "storage_dtype": "uint16",
            "feature_shape": [2, 3],
            "dimension_names": ["row", "feature_0", "feature_1"],
            "chunk_rows": 4,
            "codec": {
                "name": "blosc",
                "cname": "lz4",
                "clevel": 5,
                "shuffle": "shuffle",
                "typesize": 2,
                "blocksize": 0,
            },
            "checksum": checksum,
        },
    }
    descriptions = {
        "token_id": "vocabulary id of the token (-1 when unknown)",
        "sequence": "sequence id, unique within the capture",
        "position": "0-based position of the token in its sequence",
        "step": "0-based index of the forward pass that produced the row",
    }
    assert tokens == {
        c: {
            "column": c,
            "description": descriptions[c],
            "storage_dtype": "int64",
            "dimension_names": ["row"],
            "chunk_rows": 4,
            "codec": {
                "name": "blosc",
                "cname": "lz4",
                "clevel": 5,
                "shuffle": "shuffle",
                "typesize": 8,
                "blocksize": 0,
            },
            "checksum": checksum,
        }
        for c in descriptions
    }
    validate_documents(path)
    if is_zarr:
        meta = json.loads((path / "activations" / SITE_B.name / "zarr.json").read_text())
        assert meta.pop("attributes") == {"llminstr": sites[SITE_B.name]}
        assert meta == {
            "zarr_format": 3,
            "node_type": "array",
            "shape": [6, 2, 3],
            "data_type": "uint16",
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [4, 2, 3]}},
            "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
            "fill_value": 0,
            "codecs": [
                {"name": "bytes", "configuration": {"endian": "little"}},
                {
                    "name": "blosc",
                    "configuration": {
                        "typesize": 2,
                        "cname": "lz4",
                        "clevel": 5,
                        "shuffle": "shuffle",
                        "blocksize": 0,
                    },
                },
                {"name": "crc32c"},
            ],
            "dimension_names": ["row", "feature_0", "feature_1"],
            "storage_transformers": [],
        }
        group = json.loads((path / "zarr.json").read_text())
        assert set(group) == {"zarr_format", "node_type", "attributes"}
        assert group["node_type"] == "group" and group["zarr_format"] == 3
        chunk_files = sorted(
            str(p.relative_to(path / "activations" / SITE_B.name))
            for p in (path / "activations" / SITE_B.name).rglob("*")
            if p.is_file()
        )
        assert chunk_files == ["c/0/0/0", "c/1/0/0", "zarr.json"]  # no temporary files left
    else:
        import h5py

        with h5py.File(path, "r") as f:
            ds = f["activations"][SITE_B.name]
            assert ds.shape == (6, 2, 3) and ds.chunks == (4, 2, 3)
            assert ds.dtype == np.dtype("<u2") and ds.maxshape == (None, 2, 3)
            assert ds.fillvalue == 0
            assert "32001" in ds._filters  # Blosc, as registered by hdf5plugin
            assert f["llminstr_commit"][1] == 6 and f["llminstr_commit"][2] == 1
    assert not Path(str(path) + ".lock").exists()


def test_extra_token_columns_carry_their_descriptions(backend: str, tmp_path: Path) -> None:
    path = tmp_path / f"extra{backend}"
    extra = {"batch": "index of the row's batch in the data loader", "bare": ""}
    with CaptureWriter(path, [SiteInfo("s", (2,))], chunk_rows=2, extra_token_columns=extra) as w:
        cols = {c: np.arange(3) for c in ("token_id", "sequence", "position", "step", *extra)}
        w.append(cols, {"s": np.ones((3, 2), np.float32)})
    cap = open_capture(path)
    assert cap.token_columns == ["token_id", "sequence", "position", "step", "batch", "bare"]
    assert cap.token_info("batch")["description"] == extra["batch"]
    assert cap.token_info("bare")["description"] == ""
    assert (
        cap.token_info("position")["description"] == "0-based position of the token in its sequence"
    )
    with pytest.raises(SiteNotFoundError, match="no token column 'nope'"):
        cap.token_info("nope")
    # a plain list still works: llminstr's own extras keep their built-in description
    with CaptureWriter(
        tmp_path / f"list{backend}", [SiteInfo("s", (2,))], extra_token_columns=["is_padding"]
    ) as w:
        w.append(
            {
                c: np.zeros(1, np.int64)
                for c in ("token_id", "sequence", "position", "step", "is_padding")
            },
            {"s": np.ones((1, 2), np.float32)},
        )
    assert (
        open_capture(tmp_path / f"list{backend}")
        .token_info("is_padding")["description"]
        .startswith("1 on a padding row")
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("batch", "not one string"),
        ({"batch": 3}, "description of token column 'batch' must be a string"),
    ],
)
def test_extra_token_column_descriptions_are_checked(
    tmp_path: Path, extra: Any, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        CaptureWriter(tmp_path / "x.zarr", [SiteInfo("s", (2,))], extra_token_columns=extra)
    assert not (tmp_path / "x.zarr").exists()


# ---------------------------------------------------------------------- commit semantics
def test_only_committed_rows_are_visible(backend: str, tmp_path: Path) -> None:
    path = tmp_path / f"commit{backend}"
    site = SiteInfo("s", (3,))
    w = CaptureWriter(path, [site], chunk_rows=4, commit_interval_s=1e9)
    try:
        w.append(token_columns(6), {"s": ramp(0, 6, 3)})
        assert w.commit() == 6
        cap = open_capture(path)
        assert cap.status == "in_progress"
        assert cap.num_rows == 6
        np.testing.assert_array_equal(cap.activations("s").compute(), ramp(0, 6, 3))
        np.testing.assert_array_equal(cap.token_table()["token_id"], token_columns(6)["token_id"])
        validate_documents(path)

        # 7 more rows: chunk 1 gets full and goes to disk, chunk 2 is buffered. Not committed.
        w.append(token_columns(7, 6), {"s": ramp(6, 7, 3)})
        w._drain()  # let the full chunk reach the store
        cap.refresh()
        assert cap.num_rows == 6
        assert open_capture(path).num_rows == 6
        np.testing.assert_array_equal(cap.activations("s").compute(), ramp(0, 6, 3))

        assert w.commit() == 13
        cap.refresh()
        assert cap.status == "in_progress" and cap.num_rows == 13
        np.testing.assert_array_equal(cap.activations("s").compute(), ramp(0, 13, 3))
        assert cap.verify() == []
    finally:
        w.close()
    cap.refresh()
    assert cap.status == "complete" and cap.num_rows == 13
    np.testing.assert_array_equal(cap.read("s"), ramp(0, 13, 3))
    cap.close()


@pytest.mark.timeout(60)
def test_refresh_follows_a_live_capture(backend: str, tmp_path: Path) -> None:
    path = tmp_path / f"live{backend}"
    width, batches, per_batch = 5, 25, 3
    started = threading.Event()
    errors: list[BaseException] = []

    def produce() -> None:
        try:
            with CaptureWriter(path, [SiteInfo("s", (width,))], chunk_rows=4) as w:
                started.set()
                for b in range(batches):
                    lo = b * per_batch
                    w.append(token_columns(per_batch, lo), {"s": ramp(lo, per_batch, width)})
                    if b % 2:
                        w.commit()
                    time.sleep(0.005)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
            started.set()

    import dask.array

    dask.array.ones(2).sum().compute()  # dask's first compute in a process takes ~1 s
    thread = threading.Thread(target=produce)
    thread.start()
    started.wait(10)
    while not path.exists() or (backend == ".zarr" and not (path / "zarr.json").exists()):
        time.sleep(0.001)
    seen: list[int] = []
    cap = None
    while True:
        done = not thread.is_alive()
        if cap is None:
            cap = open_capture(path)
        else:
            cap.refresh()
        rows = cap.num_rows
        seen.append(rows)
        if rows:
            np.testing.assert_array_equal(cap.activations("s").compute(), ramp(0, rows, width))
            np.testing.assert_array_equal(
                cap.tokens["token_id"].compute(), token_columns(rows)["token_id"]
            )
        if done:
            break
        time.sleep(0.002)
    thread.join()
    assert not errors, errors
    cap.refresh()
    assert cap.status == "complete" and cap.num_rows == batches * per_batch
    assert seen == sorted(seen), "committed rows went backwards"
    assert len(set(seen)) > 2, f"the reader saw no intermediate commits: {seen}"
    cap.close()


LIVE_WRITER = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {tests!r})
    from conftest import token_columns
    from test_storage_conformance import ramp
    from llminstr.format import SiteInfo
    from llminstr.storage.writer import CaptureWriter

    with CaptureWriter({path!r}, [SiteInfo("s", (5,))], chunk_rows=4) as w:
        print("open", flush=True)
        sys.stdin.readline()  # wait until the reader has the capture open
        for b in range(40):
            w.append(token_columns(3, 3 * b), {{"s": ramp(3 * b, 3, 5)}})
            w.commit()
            time.sleep(0.01)
    """
)


@contextlib.contextmanager
def writer_process(template: str, path: Path) -> Iterator[tuple[Any, Any]]:
    """Run the writer script ``template`` (formatted with ``tests`` and ``path``) in a
    child process; once it has created the capture, open it here and let the writer go
    on. Yields ``(process, capture)``; the process is killed if still running after."""
    script = template.format(tests=str(Path(__file__).parent), path=str(path))
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline().strip() == "open"
        cap = open_capture(path)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        yield proc, cap
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.timeout(120)
def test_refresh_follows_a_writer_in_another_process(backend: str, tmp_path: Path) -> None:
    """A reader keeps the capture open while another process writes and closes it."""
    path = tmp_path / f"xlive{backend}"
    with writer_process(LIVE_WRITER, path) as (proc, cap):
        seen = []
        while True:
            done = proc.poll() is not None
            cap.refresh()
            seen.append(cap.num_rows)
            if cap.num_rows:
                np.testing.assert_array_equal(cap.read("s"), ramp(0, cap.num_rows, 5))
            if done:
                break
            time.sleep(0.005)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr  # closing works while a reader holds the file
    assert seen == sorted(seen) and len(set(seen)) > 2, seen
    assert cap.status == "complete" and cap.num_rows == 120
    cap.close()
    with open_capture(path) as fresh:
        assert fresh.status == "complete" and fresh.num_rows == 120
        np.testing.assert_array_equal(fresh.read("s"), ramp(0, 120, 5))


ABORTING_WRITER = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {tests!r})
    from conftest import token_columns
    from test_storage_conformance import ramp
    from llminstr.format import SiteInfo
    from llminstr.storage.writer import CaptureWriter

    w = CaptureWriter({path!r}, [SiteInfo("s", (5,))], chunk_rows=4)
    print("open", flush=True)
    sys.stdin.readline()
    for b in range(20):
        w.append(token_columns(3, 3 * b), {{"s": ramp(3 * b, 3, 5)}})
        w.commit()
        time.sleep(0.01)
    w.abort(RuntimeError("the model ran out of memory"))
    """
)


@pytest.mark.timeout(120)
def test_a_follower_does_not_cost_the_final_document(backend: str, tmp_path: Path) -> None:
    """An audit: while another process followed an HDF5 capture, the writer could not
    rewrite the root attribute at close (the follower's handle held HDF5's lock), so the
    abort's error message was lost for good. A follower that sees the final commit record
    now lets go of the file after each refresh until the attribute is rewritten."""
    path = tmp_path / f"abort{backend}"
    with writer_process(ABORTING_WRITER, path) as (proc, cap):
        while proc.poll() is None:
            cap.refresh()
            if cap.num_rows:  # reads reopen the file: they let go of it too (review)
                np.testing.assert_array_equal(cap.read("s"), ramp(0, cap.num_rows, 5))
            time.sleep(0.005)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "could not be written" not in stderr, stderr
    cap.refresh()
    assert (cap.status, cap.num_rows) == ("aborted", 60)
    assert "the model ran out of memory" in str(cap.metadata["error"])
    cap.close()


def test_exception_in_block_aborts_and_keeps_data(backend: str, tmp_path: Path) -> None:
    path = tmp_path / f"abort{backend}"
    with (
        pytest.raises(RuntimeError, match="boom"),
        CaptureWriter(path, [SiteInfo("s", (2,))], chunk_rows=4) as w,
    ):
        w.append(token_columns(5), {"s": ramp(0, 5, 2)})
        raise RuntimeError("boom")
    assert w.closed and w.status == "aborted"
    root = validate_documents(path)
    assert root["status"] == "aborted"
    assert root["error"] == "RuntimeError: boom"
    cap = open_capture(path)
    assert cap.status == "aborted" and cap.num_rows == 5
    np.testing.assert_array_equal(cap.read("s"), ramp(0, 5, 2))
    cap.close()


def test_misaligned_close_is_aborted_and_keeps_aligned_rows(backend: str, tmp_path: Path) -> None:
    from llminstr.errors import FormatError

    path = tmp_path / f"misaligned{backend}"
    w = CaptureWriter(path, [SiteInfo("a", (2,)), SiteInfo("b", (3,))], chunk_rows=4)
    w.write_tokens(token_columns(9))
    w.write_site("a", ramp(0, 9, 2))
    w.write_site("b", ramp(0, 6, 3))
    with pytest.raises(FormatError, match="different row counts") as info:
        w.close()
    assert "'activations/b': 6" in str(info.value) and "aborted" in str(info.value)
    assert w.status == "aborted"
    root = validate_documents(path)
    assert root["status"] == "aborted" and "different row counts" in root["error"]
    cap = open_capture(path)
    assert cap.status == "aborted" and cap.num_rows == 6
    np.testing.assert_array_equal(cap.read("a"), ramp(0, 6, 2))
    np.testing.assert_array_equal(cap.read("b"), ramp(0, 6, 3))
    assert cap.verify() == []
    cap.close()


CRASH_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    sys.path.insert(0, {tests!r})
    from conftest import token_columns
    from test_storage_conformance import ramp
    from llminstr.format import SiteInfo
    from llminstr.storage.writer import CaptureWriter

    w = CaptureWriter({path!r}, [SiteInfo("s", (3,)), SiteInfo("t", (2, 2), "float16")],
                      chunk_rows=4, commit_interval_s=1e9)
    w.append(token_columns(10), {{"s": ramp(0, 10, 3), "t": np.full((10, 2, 2), 1.5, "f2")}})
    assert w.commit() == 10
    w.append(token_columns(9, 10), {{"s": ramp(10, 9, 3), "t": np.full((9, 2, 2), 2.5, "f2")}})
    w._drain()  # full chunks of the uncommitted rows are on disk
    print("ready", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


@pytest.mark.timeout(120)
def test_crash_keeps_committed_rows_and_frees_the_lock(backend: str, tmp_path: Path) -> None:
    path = tmp_path / f"crash{backend}"
    script = CRASH_SCRIPT.format(tests=str(Path(__file__).parent), path=str(path))
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=90
    )
    assert proc.returncode == -9, proc.stderr
    assert "ready" in proc.stdout

    validate_documents(path)
    cap = open_capture(path)  # deliberately left open: a reopen must not see stale data
    assert cap.status == "in_progress"
    assert cap.num_rows == 10
    np.testing.assert_array_equal(cap.read("s"), ramp(0, 10, 3))
    np.testing.assert_array_equal(cap.read("t"), np.full((10, 2, 2), 1.5, "f2"))
    np.testing.assert_array_equal(cap.token_table()["step"], token_columns(10)["step"])
    assert cap.verify() == []

    # The dead writer's lock does not block a new writer.
    with CaptureWriter(path, [SiteInfo("s", (3,))], chunk_rows=4, overwrite=True) as w:
        w.append(token_columns(3), {"s": ramp(100, 3, 3)})
    fresh = open_capture(path)
    assert fresh.status == "complete" and fresh.num_rows == 3
    np.testing.assert_array_equal(fresh.read("s"), ramp(100, 3, 3))
    fresh.close()
    cap.close()


# ---------------------------------------------------------------------- analysis surfaces
def test_to_xarray(backend: str, tmp_path: Path) -> None:
    path = tmp_path / f"xr{backend}"
    with CaptureWriter(
        path, [SiteInfo("mlp", (4,)), SiteInfo("attn", (2, 3), "bfloat16")], chunk_rows=3
    ) as w:
        w.append(
            token_columns(7),
            {
                "mlp": ramp(0, 7, 4),
                "attn": ramp(0, 7, 6).reshape(7, 2, 3).astype(ml_dtypes.bfloat16),
            },
        )
    with open_capture(path) as cap:
        ds = cap.to_xarray()
        assert set(ds.data_vars) == {"mlp", "attn"}
        assert ds["mlp"].dims == ("row", "mlp.feature")
        assert ds["attn"].dims == ("row", "attn.feature_0", "attn.feature_1")
        assert ds.sizes["row"] == 7
        assert set(ds.coords) >= {"token_id", "sequence", "position", "step"}
        assert ds.coords["token_id"].dims == ("row",)
        np.testing.assert_array_equal(ds.coords["position"].values, token_columns(7)["position"])
        np.testing.assert_array_equal(ds["mlp"].values, ramp(0, 7, 4))
        assert ds["attn"].dtype == np.dtype(ml_dtypes.bfloat16)
        assert ds["mlp"].attrs["kind"] == "other"
        assert json.loads(ds.attrs["llminstr"])["committed_rows"] == 7
        # selecting rows by a token coordinate
        seq0 = ds["mlp"].isel(row=(ds.coords["sequence"] == 0).values)
        np.testing.assert_array_equal(seq0.values, ramp(0, 5, 4))


def test_block_rows_group_chunks_into_fewer_dask_blocks(backend: str, tmp_path: Path) -> None:
    """``block_rows`` makes fewer, larger dask blocks (a dask array costs memory per
    block: about 48 bytes, and 730 per block in each graph); the values are the same and
    a whole-array reduction still reads each chunk once. One block per chunk by default."""
    path = tmp_path / f"b{backend}"
    x = ramp(0, 50, 4)
    with CaptureWriter(path, [SiteInfo("a", (4,))], chunk_rows=4) as w:
        w.append(token_columns(50), {"a": x})
    with open_capture(path) as cap:
        check_chunks(cap.activations("a"), 50, 4)
        grouped = cap.activations("a", block_rows=16)
        assert grouped.chunks[0] == (16, 16, 16, 2)
        src_type = type(cap._source("activations/a", "a"))
        reads: dict[int, int] = {}
        real = src_type.read_chunk

        def counting(self: Any, index: int, *args: Any, **kwargs: Any) -> Any:
            reads[index] = reads.get(index, 0) + 1
            return real(self, index, *args, **kwargs)

        src_type.read_chunk = counting  # type: ignore[method-assign]
        try:
            np.testing.assert_array_equal(grouped.sum(axis=0).compute(), x.sum(axis=0))
        finally:
            src_type.read_chunk = real  # type: ignore[method-assign]
        assert reads == {i: 1 for i in range(13)}
        ds = cap.to_xarray(block_rows=16)
        assert ds["a"].chunks[0] == (16, 16, 16, 2)
        assert ds.coords["step"].chunks[0] == (16, 16, 16, 2)
        np.testing.assert_array_equal(ds["a"].values, x)
        np.testing.assert_array_equal(ds.coords["position"].values, token_columns(50)["position"])
        for bad in (0, -4, 2.5, True, "16"):
            with pytest.raises(ConfigError, match="block_rows"):
                cap.activations("a", block_rows=bad)  # type: ignore[arg-type]
            with pytest.raises(ConfigError, match="block_rows"):
                cap.to_xarray(block_rows=bad)  # type: ignore[arg-type]


@pytest.mark.timeout(120)
def test_distributed_sum_matches_numpy(backend: str, tmp_path: Path) -> None:
    from distributed import Client, LocalCluster

    path = tmp_path / f"dist{backend}"
    rng = np.random.default_rng(0)
    data = rng.integers(-50, 50, size=(37, 16)).astype(np.float32)  # exact sums
    with CaptureWriter(path, [SiteInfo("s", (16,))], chunk_rows=5, compression="zstd") as w:
        w.append(token_columns(37), {"s": data})
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
        open_capture(path) as cap,
    ):
        arr = cap.activations("s")
        total = client.compute(arr.sum(axis=0)).result()
        np.testing.assert_array_equal(total, data.sum(axis=0))
        tok = client.compute(cap.tokens["token_id"].sum()).result()
        assert tok == token_columns(37)["token_id"].sum()


def test_writer_threads_and_lock_are_released(backend: str, tmp_path: Path) -> None:
    from conftest import llminstr_threads

    before = llminstr_threads()
    path = tmp_path / f"threads{backend}"
    with CaptureWriter(path, [SiteInfo("s", (2,))], chunk_rows=2) as w:
        w.append(token_columns(5), {"s": ramp(0, 5, 2)})
    assert llminstr_threads() <= before
    assert not Path(str(path) + ".lock").exists()
    assert os.listdir(tmp_path) == [path.name]


@pytest.mark.timeout(30)
def test_unclosed_writer_releases_its_lock_when_collected(backend: str, tmp_path: Path) -> None:
    import gc

    path = tmp_path / f"gc{backend}"
    w = CaptureWriter(path, [SiteInfo("s", (2,))], chunk_rows=2)
    w.append(token_columns(3), {"s": ramp(0, 3, 2)})
    w.commit()
    del w
    gc.collect()
    with open_capture(path) as cap:  # like a crash: the last commit, still in progress
        assert cap.status == "in_progress" and cap.num_rows == 3
    with CaptureWriter(path, [SiteInfo("s", (2,))], overwrite=True) as w2:
        w2.append(token_columns(1), {"s": ramp(0, 1, 2)})


@pytest.mark.parametrize("history", ["fresh", "after_full_chunks", "after_commit"])
def test_tail_chunk_is_zero_past_the_data(backend: str, tmp_path: Path, history: str) -> None:
    """SPEC 4.2: rows of the last chunk past the data are zeros, whatever the chunk
    buffer held before (a pooled buffer that held a full chunk, a tail already committed)."""
    path = tmp_path / f"c{backend}"
    chunk, width = 8, 5
    n = {"fresh": 3, "after_full_chunks": 4 * chunk + 3, "after_commit": chunk + 6}[history]
    x = np.arange(1, n * width + 1, dtype=np.float32).reshape(n, width)
    with CaptureWriter(path, [SiteInfo("a", (width,))], chunk_rows=chunk) as w:
        if history == "after_commit":
            w.append(token_columns(chunk + 6), {"a": x})
            w.commit()  # the tail (6 rows) is written once; then rows 6.. are rewritten
        else:
            for lo in range(0, n, 3):
                hi = min(n, lo + 3)
                w.append(token_columns(hi - lo, lo), {"a": x[lo:hi]})
    with open_capture(path) as cap:
        assert cap.num_rows == n
        src = cap._source("activations/a", "a")
        last = (n - 1) // chunk
        stored = src.read_chunk(last)
        fill = n - last * chunk
        np.testing.assert_array_equal(stored[:fill], x[last * chunk :])
        np.testing.assert_array_equal(stored[fill:], 0)
        tok = cap._source("tokens/position", "tokens/position").read_chunk(last)
        np.testing.assert_array_equal(tok[fill:], 0)


def test_tail_from_a_dirty_pooled_buffer_is_zeroed(
    backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reused chunk buffer still holds an old chunk's rows: closing zeroes them."""
    from llminstr.storage import writer as writer_mod

    def dirty(self: Any, decl: Any) -> np.ndarray:
        self.budget.acquire(decl.chunk_bytes)
        return np.full(decl.chunk_shape, 7, decl.storage_dtype)

    monkeypatch.setattr(writer_mod.CaptureWriter, "_new_buffer", dirty)
    path = tmp_path / f"c{backend}"
    x = np.arange(1, 16, dtype=np.float32).reshape(3, 5)
    with CaptureWriter(path, [SiteInfo("a", (5,))], chunk_rows=8) as w:
        w.append(token_columns(3), {"a": x})
    with open_capture(path) as cap:
        stored = cap._source("activations/a", "a").read_chunk(0)
        np.testing.assert_array_equal(stored[:3], x)
        np.testing.assert_array_equal(stored[3:], 0)
        for col in cap.token_columns:
            np.testing.assert_array_equal(
                cap._source(f"tokens/{col}", f"tokens/{col}").read_chunk(0)[3:], 0
            )


def test_stats_stored_bytes_equal_the_frames_on_disk(backend: str, tmp_path: Path) -> None:
    """``stats().stored_bytes`` counts each chunk's last frame: a commit's tail frame is
    replaced when its chunk fills, and the count must follow (it is kept as a running
    total, not a per-chunk table that grew with the capture)."""
    from llminstr.tools import stored_bytes

    path = tmp_path / f"c{backend}"
    rng = np.random.default_rng(3)
    x = rng.standard_normal((45, 6)).astype(np.float32)
    w = CaptureWriter(path, [SiteInfo("a", (6,))], chunk_rows=8, commit_interval_s=1e9)
    for lo, hi in ((0, 3), (3, 5), (5, 19), (19, 20), (20, 45)):
        w.append(token_columns(hi - lo, lo), {"a": x[lo:hi]})
        w.commit()  # a tail frame of chunks 0, 0, 2, 2, 5, later replaced but the last

    def on_disk() -> int:
        cap = open_capture(path)
        keys = ["activations/a"] + [f"tokens/{c}" for c in cap.token_columns]
        return sum(stored_bytes(cap, key) for key in keys)

    assert w.stats().stored_bytes == on_disk()
    w.close()
    if backend == ".zarr":
        # (HDF5 re-encodes each dataset's last chunk through its own filter when close
        # shrinks the datasets to the committed rows, so its sizes there are HDF5's.)
        assert w.stats().stored_bytes == on_disk()
    assert np.array_equal(open_capture(path).read("a"), x)
