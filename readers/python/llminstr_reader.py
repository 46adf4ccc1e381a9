"""A standalone reader of llminstr captures (format 1.x), written from format_spec/SPEC.md.

Needs numpy plus zarr>=3 (for ``.zarr``) or h5py + hdf5plugin (for HDF5); ml_dtypes, when
installed, turns bfloat16 sites into ``ml_dtypes.bfloat16`` arrays (else raw ``uint16`` bits).
It decodes chunks through zarr-python's or HDF5's own codec pipelines, never llminstr's.

    from llminstr_reader import read_capture
    cap = read_capture("run.zarr")   # status, num_rows, sites, site_info, tokens, activations
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from typing import Any

import numpy as np

FORMAT = "llminstr-capture"
MAJOR = 1
MAX_DOC_BYTES = 16 << 20  # SPEC 9
MAX_ROW_VALUES = 1 << 24
MAX_CHUNK_BYTES = 1 << 31
MAX_CHUNK_ROWS = 1 << 24
STORAGE = {"float32": "float32", "float16": "float16", "bfloat16": "uint16"}  # SPEC 4.1
STATUS_BY_CODE = {0: "in_progress", 1: "complete", 2: "aborted"}  # SPEC 6.3
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
BLOSC_FILTER = 32001  # HDF5 registered filter id of Blosc
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,254}")  # SPEC 2.5: no "/" and no ".."


#: What reading a malformed capture raises from json, numpy, zarr or h5py.
_MALFORMED = (KeyError, TypeError, AttributeError, IndexError, ValueError, RecursionError)
_MALFORMED += (OSError, RuntimeError, SystemError, OverflowError)


class CaptureFormatError(ValueError):
    """The path is not a readable llminstr 1.x capture."""


def _parse(raw: str | bytes, where: str) -> dict[str, Any]:
    if len(raw) > MAX_DOC_BYTES:
        raise CaptureFormatError(f"{where}: document of {len(raw)} bytes exceeds 16 MiB")
    doc = json.loads(raw)
    if not isinstance(doc, dict):
        raise CaptureFormatError(f"{where}: document is not a JSON object")
    return doc


def _check_root(root: dict[str, Any], where: str) -> None:
    if root.get("format") != FORMAT:
        raise CaptureFormatError(
            f"{where} is not an llminstr capture (format={root.get('format')!r})"
        )
    version = root.get("format_version")
    if not isinstance(version, str) or not re.fullmatch(r"\d+\.\d+", version):
        raise CaptureFormatError(f"{where}: format_version {version!r} is not MAJOR.MINOR")
    if version.split(".")[0] != str(MAJOR):
        raise CaptureFormatError(f"{where}: format version {version!r} unsupported; reads 1.x only")
    counts = (root.get("committed_rows"), root.get("commit_seq"), root.get("chunk_rows"))
    if not all(type(v) is int for v in counts) or root.get("status") not in STATUS_BY_CODE.values():
        raise CaptureFormatError(
            f"{where}: committed_rows, commit_seq, chunk_rows or status invalid"
        )
    if not isinstance(root.get("token_columns"), list) or not isinstance(root.get("sites"), list):
        raise CaptureFormatError(f"{where}: token_columns and sites must be lists")
    cols = list(root["token_columns"])
    if cols[:4] != ["token_id", "sequence", "position", "step"]:
        raise CaptureFormatError(f"{where}: token_columns must start with the four required ones")
    names = [*cols, *root["sites"]]  # checked before any name is used as a path
    if not all(isinstance(x, str) and NAME.fullmatch(x) and x != "zarr.json" for x in names):
        raise CaptureFormatError(f"{where}: invalid site or column name in {names}")
    if len(set(cols)) != len(cols) or len(set(root["sites"])) != len(root["sites"]):
        raise CaptureFormatError(f"{where}: duplicate site or column names")
    if not 1 <= int(root["chunk_rows"]) <= MAX_CHUNK_ROWS or int(root["committed_rows"]) < 0:
        raise CaptureFormatError(f"{where}: chunk_rows or committed_rows out of range")


def _check_array(doc: dict[str, Any], root: dict[str, Any], key: str, rows: int) -> tuple[int, ...]:
    """Check an array document against the root and the limits; return its chunk shape."""
    feature = [int(d) for d in doc.get("feature_shape", [])]
    group, name = key.split("/", 1)
    if group == "activations":
        if STORAGE.get(doc["logical_dtype"]) != doc["storage_dtype"] or doc["name"] != name:
            raise CaptureFormatError(f"{key}: dtype pair or name does not match SPEC 3.3")
        if not 1 <= len(feature) <= 8 or min(feature) < 1:
            raise CaptureFormatError(f"{key}: feature_shape {feature} invalid")
    elif doc["storage_dtype"] != "int64" or doc["column"] != name or feature:
        raise CaptureFormatError(f"{key}: token column document does not match SPEC 3.4")
    if doc["chunk_rows"] != root["chunk_rows"]:
        raise CaptureFormatError(f"{key}: chunk_rows differs from the root's")
    values = math.prod(feature)  # Python integers: a lying shape cannot overflow
    if values > MAX_ROW_VALUES:
        raise CaptureFormatError(f"{key}: {values} values per row exceeds the limit")
    if root["chunk_rows"] * values * np.dtype(doc["storage_dtype"]).itemsize > MAX_CHUNK_BYTES:
        raise CaptureFormatError(f"{key}: a chunk exceeds 2 GiB")
    if rows < int(root["committed_rows"]):
        raise CaptureFormatError(f"{key}: holds {rows} rows, fewer than committed")
    return (int(root["chunk_rows"]), *feature)


def _check_frame(head: bytes, size: int, raw: int, blosc: bool, crc: int, where: str) -> None:
    """SPEC 4.3: a frame's sizes, checked before anything decodes it (``crc``: 4 or 0)."""
    if blosc:  # the Blosc header announces the raw size and its own length
        ok = len(head) >= 16 and 16 <= size - crc <= raw + 16
        ok = ok and int.from_bytes(head[4:8], "little") == raw
        ok = ok and int.from_bytes(head[12:16], "little") == size - crc
    else:
        ok = size == raw + crc
    if not ok:
        raise CaptureFormatError(f"{where}: corrupt chunk (frame sizes, SPEC 4.3)")


def _read_zarr(path: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, np.ndarray]]:
    import zarr

    def load(rel: str) -> dict[str, Any]:
        file = os.path.join(path, rel, "zarr.json")
        if not os.path.isfile(file):  # not a FIFO, a device or a directory
            raise CaptureFormatError(f"{file} is missing or not a regular file")
        with open(file, "rb") as fh:
            return _parse(fh.read(MAX_DOC_BYTES + 1), file)

    root = load("")["attributes"]["llminstr"]  # the root is read before any array (SPEC 7.2)
    _check_root(root, path)
    n = int(root["committed_rows"])
    docs, data = {}, {}
    for key in _keys(root):
        meta = load(key)
        doc = meta["attributes"]["llminstr"]
        chunks = _check_array(doc, root, key, int(meta["shape"][0]))
        codecs = [c["name"] for c in meta["codecs"]]
        expected = ["bytes"] + ["blosc"] * bool(doc["codec"]) + ["crc32c"] * bool(doc["checksum"])
        if (
            meta["data_type"] != doc["storage_dtype"]
            or meta["chunk_grid"]["configuration"]["chunk_shape"] != list(chunks)
            or meta["shape"][1:] != list(chunks[1:])
            or codecs != expected
            or meta["codecs"][0].get("configuration", {}).get("endian", "little") != "little"
            or (
                doc["codec"]
                and meta["codecs"][1]["configuration"]["cname"] != doc["codec"]["cname"]
            )
            or meta.get("fill_value") != 0
            or meta.get("chunk_key_encoding", {}).get("name") != "default"  # SPEC 5.3
            or meta["chunk_key_encoding"].get("configuration", {}).get("separator", "/") != "/"
        ):
            raise CaptureFormatError(f"{key}: Zarr metadata disagrees with its document (SPEC 5.2)")
        count = -(-n // chunks[0])  # zarr fills missing chunks; SPEC 5.3 forbids that
        raw = math.prod(chunks) * np.dtype(doc["storage_dtype"]).itemsize
        for k in [count - 1, *range(count - 1)] if count else []:  # the last first: a lying
            leaf = os.path.join(path, key, "c", str(k), *["0"] * (len(chunks) - 1))  # count
            if not os.path.isfile(leaf):  # fails at once
                raise CaptureFormatError(f"{key}: committed chunk {k} is missing")
            with open(leaf, "rb") as fh:
                head, size = fh.read(16), os.fstat(fh.fileno()).st_size
            _check_frame(head, size, raw, bool(doc["codec"]), 4 * bool(doc["checksum"]), leaf)
        docs[key] = doc
        data[key] = np.asarray(zarr.open_array(os.path.join(path, key), mode="r")[:n])
    return root, docs, data


def _read_hdf5(path: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, np.ndarray]]:
    import h5py
    import hdf5plugin  # noqa: F401  (registers the Blosc filter, id 32001)

    with open(path, "rb") as fh:  # SPEC 8: HDF5 skips this check for SWMR readers
        head, size = fh.read(64), os.fstat(fh.fileno()).st_size
    if head[8] in (2, 3) and head[9] in (4, 8):  # superblock v2/3: end-of-file address
        at, width = 12 + 2 * head[9], head[9]
        if len(head) < at + width or size < int.from_bytes(head[at : at + width], "little"):
            raise CaptureFormatError(f"{path}: truncated HDF5 file")
    for attempt in range(100):  # SPEC 6.4: retry while a writer's final rewrite holds the file
        try:
            f = h5py.File(path, "r", swmr=True)  # SWMR: crashed files open too (SPEC 6.4)
            break
        except OSError as exc:
            held = isinstance(exc, BlockingIOError) or "open for SWMR writing" in str(exc)
            if not held or attempt == 99:
                raise CaptureFormatError(f"{path}: HDF5 refuses to open it: {exc}") from exc
            time.sleep(0.02)
    with f:
        root = _parse(f.attrs["llminstr"], path)
        _check_root(root, path)
        rec = f["llminstr_commit"][...]
        if rec.shape != (4,):
            raise CaptureFormatError(f"{path}: commit record must hold 4 values")
        seq, rows, code = int(rec[0]), int(rec[1]), int(rec[2])
        if code not in STATUS_BY_CODE or rows < 0:
            raise CaptureFormatError(f"{path}: invalid commit record {rec.tolist()}")
        if seq >= int(root["commit_seq"]):  # the record is authoritative (SPEC 6.3)
            root.update(committed_rows=rows, status=STATUS_BY_CODE[code], commit_seq=seq)
        n = int(root["committed_rows"])
        docs, data = {}, {}
        for key in _keys(root):
            ds = f[key]
            doc = _parse(ds.attrs["llminstr"], f"{path}:{key}")
            chunks = _check_array(doc, root, key, ds.shape[0])
            plist = ds.id.get_create_plist()
            filters = {plist.get_filter(i)[0] for i in range(plist.get_nfilters())}
            if (
                ds.dtype != np.dtype(doc["storage_dtype"]).newbyteorder("<")
                or ds.chunks != chunks
                or list(ds.shape[1:]) != list(chunks[1:])
                or filters != ({BLOSC_FILTER} if doc["codec"] else set())
            ):
                raise CaptureFormatError(
                    f"{key}: HDF5 dataset disagrees with its document (SPEC 6.2)"
                )
            raw = math.prod(chunks) * ds.dtype.itemsize
            for k in range(-(-n // chunks[0])):  # HDF5's Blosc filter checks no sizes
                mask, frame = ds.id.read_direct_chunk((k * chunks[0], *[0] * (len(chunks) - 1)))
                blosc = bool(doc["codec"]) and not mask & 1  # mask bit 0: stored raw
                _check_frame(frame[:16], len(frame), raw, blosc, 0, f"{path}:{key}[{k}]")
            docs[key] = doc
            data[key] = ds[:n]  # rows >= n are never used (SPEC 7.1)
    return root, docs, data


def _keys(root: dict[str, Any]) -> list[str]:
    return [f"tokens/{c}" for c in root["token_columns"]] + [
        f"activations/{s}" for s in root["sites"]
    ]


def read_capture(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read every committed row of a capture into numpy (activations in their logical dtype).
    Raises CaptureFormatError for a file that is not a well-formed capture."""
    try:
        return _read_capture(os.fspath(path))
    except CaptureFormatError:
        raise
    except _MALFORMED as exc:  # a missing key, a wrong type, bad JSON, HDF5's errors...
        raise CaptureFormatError(
            f"{path}: malformed capture ({type(exc).__name__}: {exc})"
        ) from exc


def _read_capture(path: str) -> dict[str, Any]:
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "zarr.json")):
        root, docs, data = _read_zarr(path)
    elif not os.path.isfile(path):
        raise CaptureFormatError(f"{path} is neither a Zarr v3 directory nor a regular file")
    else:
        with open(path, "rb") as fh:
            if fh.read(8) != HDF5_SIGNATURE:
                raise CaptureFormatError(f"{path} is neither a Zarr v3 directory nor HDF5")
        root, docs, data = _read_hdf5(path)
    activations = {}
    for site in root["sites"]:
        arr = data[f"activations/{site}"]
        if docs[f"activations/{site}"]["logical_dtype"] == "bfloat16":
            try:
                import ml_dtypes

                arr = arr.view(ml_dtypes.bfloat16)
            except ImportError:  # keep the raw bits (SPEC 4.1)
                pass
        activations[site] = arr
    return {
        "format_version": root["format_version"],
        "status": root["status"],
        "num_rows": int(root["committed_rows"]),
        "sites": list(root["sites"]),
        "site_info": {s: docs[f"activations/{s}"] for s in root["sites"]},
        "tokens": {c: data[f"tokens/{c}"] for c in root["token_columns"]},
        "activations": activations,
    }
