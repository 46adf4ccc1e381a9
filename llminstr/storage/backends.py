"""Store backends: where frames and metadata documents land (Zarr v3 directory or HDF5 file).

A backend is told the layout once (:meth:`StoreBackend.create`), then receives
pre-encoded chunk frames (:meth:`write_chunk`, callable from any thread) and commit
records (:meth:`publish`). It never encodes data itself.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np

from llminstr.format import (
    ACTIVATIONS_GROUP,
    ATTR_KEY,
    COMMIT_DATASET,
    STATUS_CODES,
    TOKENS_GROUP,
    CodecConfig,
)

T = TypeVar("T")


@dataclass(frozen=True)
class ArrayDecl:
    """One stored array: a token column or a site."""

    group: str  # TOKENS_GROUP or ACTIVATIONS_GROUP
    name: str
    storage_dtype: str
    feature_shape: tuple[int, ...]
    chunk_rows: int
    document: dict[str, Any]  # the llminstr attribute document of the array

    @property
    def key(self) -> str:
        return f"{self.group}/{self.name}"

    @property
    def chunk_shape(self) -> tuple[int, ...]:
        return (self.chunk_rows, *self.feature_shape)

    @property
    def chunk_bytes(self) -> int:
        return math.prod(self.chunk_shape) * np.dtype(self.storage_dtype).itemsize


def _dumps(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, indent=2, allow_nan=False).encode()


_ROWS_MARK = 8_370_216_643_199_317  # a row count no capture reaches (> 2**52)


class _ShapeTemplate:
    """``_dumps`` of an array document, re-rendered for a new ``shape[0]`` by substituting
    one number: every commit rewrites some forty array documents, and json's indented
    (pure Python) encoder took half of a short capture's closing time (measured). Falls
    back to ``_dumps`` when the mark cannot be placed unambiguously."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        rows = doc["shape"][0]
        doc["shape"][0] = _ROWS_MARK
        try:
            text = _dumps(doc)
        finally:
            doc["shape"][0] = rows
        mark = str(_ROWS_MARK).encode()
        self.parts = text.split(mark) if text.count(mark) == 1 else None

    def render(self, rows: int) -> bytes:
        self.doc["shape"][0] = rows
        if self.parts is None:
            return _dumps(self.doc)
        return str(int(rows)).encode().join(self.parts)


def _group_document() -> dict[str, Any]:
    return {"attributes": {}, "zarr_format": 3, "node_type": "group"}


def zarr_array_document(decl: ArrayDecl, codec: CodecConfig) -> dict[str, Any]:
    """The ``zarr.json`` of one array (format spec, section 5.2), with ``shape[0] == 0``."""
    dtype = np.dtype(decl.storage_dtype)
    codecs: list[dict[str, Any]] = [{"name": "bytes", "configuration": {"endian": "little"}}]
    if codec.cname is not None:
        codecs.append(
            {
                "name": "blosc",
                "configuration": {
                    "typesize": dtype.itemsize,
                    "cname": codec.cname,
                    "clevel": int(codec.clevel or 1),
                    "shuffle": "shuffle",
                    "blocksize": 0,
                },
            }
        )
    if codec.checksum:
        codecs.append({"name": "crc32c"})
    return {
        "shape": [0, *decl.feature_shape],
        "data_type": dtype.name,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(decl.chunk_shape)}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": 0.0 if dtype.kind == "f" else 0,
        "codecs": codecs,
        "attributes": {ATTR_KEY: decl.document},
        "dimension_names": list(decl.document["dimension_names"]),
        "zarr_format": 3,
        "node_type": "array",
        "storage_transformers": [],
    }


def atomic_write(path: Path, data: bytes, *, fsync: bool = False) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new content, never a mix."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with _replacing(tmp, path):
        with open(tmp, "wb") as fh:
            fh.write(data)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)


@contextlib.contextmanager
def _replacing(tmp: Path, target: Path) -> Iterator[None]:
    """Around writing ``tmp`` and renaming it over ``target``: a failure removes ``tmp``
    (it holds space on a full disk), and an ``OSError`` names ``target``."""
    try:
        yield
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError):
            raise _with_path(exc, target) from exc
        raise


def _with_path(exc: OSError, path: Path) -> OSError:
    """``exc`` naming ``path`` when it names no file (``os.writev`` and ``os.write`` give
    ``[Errno 28] No space left on device`` alone)."""
    if exc.filename is not None or exc.errno is None:
        return exc
    try:
        return type(exc)(exc.errno, exc.strerror, str(path))
    except TypeError:  # a subclass with another constructor
        return exc


class StoreBackend(ABC):
    """Contract of a storage backend. ``write_chunk`` is thread-safe; the rest is called
    from one thread at a time (the writer serialises publishes)."""

    name: str

    @abstractmethod
    def create(self, root: dict[str, Any], arrays: Sequence[ArrayDecl], codec: CodecConfig) -> None:
        """Lay out groups and empty arrays, with ``root`` as the root metadata document."""

    @abstractmethod
    def write_chunk(
        self, array: ArrayDecl, index: int, parts: Sequence[bytes | memoryview], extent: int
    ) -> None:
        """Store the frame of chunk ``index`` (replacing any earlier frame of it).
        ``extent`` is the number of rows the array must at least hold afterwards."""

    def write_chunk_async(
        self, array: ArrayDecl, index: int, parts: Sequence[bytes | memoryview], extent: int
    ) -> Future[None] | None:
        """Like :meth:`write_chunk` but may return at once with a future of the write. The
        caller keeps the memory behind ``parts`` alive until the future is done. ``None``
        means the backend has no such path: call :meth:`write_chunk`. Writes complete in
        the order they were issued."""
        return None

    @abstractmethod
    def publish(self, root: dict[str, Any]) -> None:
        """Make ``root['committed_rows']`` and ``root['status']`` visible to readers, atomically,
        after every chunk written before the call."""

    @abstractmethod
    def close(self, root: dict[str, Any]) -> None:
        """Publish the final document and release every handle. Idempotent."""

    def discard(self) -> None:
        """Remove what a failed :meth:`create` made (after :meth:`abandon`): only what this
        backend created itself, never a path that existed before."""
        if not self._created:
            return
        with contextlib.suppress(OSError):
            if self.path.is_dir() and not self.path.is_symlink():
                shutil.rmtree(self.path)
            else:
                self.path.unlink()

    _created = False
    path: Path

    def abandon(self) -> None:  # noqa: B027 (optional hook, nothing to do by default)
        """Release threads and handles without publishing (after a failure). Idempotent."""


class ZarrBackend(StoreBackend):
    """Zarr v3 directory store. Chunk frames are written as files under the keys of the
    ``default`` chunk key encoding (``c/<row chunk>/0/...``); metadata documents are
    replaced atomically (temporary file + rename)."""

    name = "zarr"

    def __init__(self, path: Path, *, fsync: bool = False) -> None:
        self.path = path
        self.fsync = fsync
        self._array_docs: dict[str, _ShapeTemplate] = {}
        self._published_rows: dict[str, int] = {}
        self._last_dir: dict[str, Path] = {}
        # Per array, the chunk whose last frame was partial (a commit's tail): the only
        # chunk that is ever stored twice, and only between drained commits.
        self._partial: dict[str, int] = {}

    def create(self, root: dict[str, Any], arrays: Sequence[ArrayDecl], codec: CodecConfig) -> None:
        # The Zarr v3 documents are written directly (the spec, section 5, gives their exact
        # content and tests compare them with zarr-python's own): creating forty arrays
        # through zarr's API took ~0.3 s, all of it on the first forward pass of a capture.
        self.path.mkdir(parents=False, exist_ok=False)
        self._created = True
        self._root_doc: dict[str, Any] = {
            "attributes": {ATTR_KEY: root},
            "zarr_format": 3,
            "node_type": "group",
        }
        for group in (TOKENS_GROUP, ACTIVATIONS_GROUP):
            (self.path / group).mkdir()
            atomic_write(self.path / group / "zarr.json", _dumps(_group_document()))
        for decl in arrays:
            template = _ShapeTemplate(zarr_array_document(decl, codec))
            (self.path / decl.key).mkdir()
            atomic_write(self.path / decl.key / "zarr.json", template.render(0))
            self._array_docs[decl.key] = template
            self._published_rows[decl.key] = 0
        # The root document goes last: until it exists the directory is not a capture.
        atomic_write(self.path / "zarr.json", _dumps(self._root_doc))

    def write_chunk(
        self, array: ArrayDecl, index: int, parts: Sequence[bytes | memoryview], extent: int
    ) -> None:
        key_parts: list[str] = ["c", str(index)] + ["0"] * len(array.feature_shape)
        dirs, leaf = key_parts[:-1], key_parts[-1]
        folder = self.path / array.key
        for part in dirs:
            folder = folder / part
        if self._last_dir.get(array.key) != folder:
            # Per array only the last folder is remembered (a set of every folder made
            # grew with the capture: millions of paths for a billion rows); a folder that
            # exists already costs one mkdir call that fails with EEXIST.
            folder.mkdir(parents=True, exist_ok=True)
            self._last_dir[array.key] = folder
        target = folder / leaf
        rewrite = self._partial.get(array.key) == index
        if extent < (index + 1) * array.chunk_rows:
            # Marked before the write: any later frame of this chunk is a rewrite, even
            # one that starts while this one is still being written.
            self._partial[array.key] = index
        if rewrite:
            # A new frame of a chunk stored before (a commit's zero-padded tail): a reader
            # may be reading the old one, so it goes in by atomic replace.
            tmp = folder / f".{leaf}.{threading.get_ident()}.tmp"
            with _replacing(tmp, target):
                self._write_file(tmp, parts)
                os.replace(tmp, target)
        else:
            # A chunk's first frame is written in place (SPEC 7.2): no published row lies
            # in it until a later publish, which comes after this write returns. A failed
            # write removes the file. One rename and one directory entry fewer per chunk.
            with _replacing(target, target):
                self._write_file(target, parts)

    def _write_file(self, path: Path, parts: Sequence[bytes | memoryview]) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            views = [memoryview(p) for p in parts]
            total = sum(v.nbytes for v in views)
            written = os.writev(fd, views)
            while written < total:  # short write: finish it part by part
                flat = b"".join(bytes(v) for v in views)
                written += os.write(fd, flat[written:])
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def publish(self, root: dict[str, Any]) -> None:
        rows = int(root["committed_rows"])
        for key, template in self._array_docs.items():
            if self._published_rows[key] != rows:
                atomic_write(self.path / key / "zarr.json", template.render(rows), fsync=self.fsync)
                self._published_rows[key] = rows
        self._root_doc["attributes"][ATTR_KEY] = root
        atomic_write(self.path / "zarr.json", _dumps(self._root_doc), fsync=self.fsync)

    def close(self, root: dict[str, Any]) -> None:
        # Encoder threads write their own frames: measured against a single I/O thread
        # (as HDF5 needs), parallel file writes were as fast or faster.
        self.publish(root)


class HDF5Backend(StoreBackend):
    """HDF5 file in SWMR mode (``libver=("v110", "v110")``). Every h5py call runs on one
    dedicated thread; chunk frames go in with ``write_direct_chunk``. The live commit record
    is the ``llminstr_commit`` dataset; the root attribute is rewritten at close."""

    name = "hdf5"

    def __init__(self, path: Path, *, fsync: bool = False) -> None:
        self.path = path
        self.fsync = fsync
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llminstr-hdf5")
        self._file: Any = None
        self._datasets: dict[str, Any] = {}
        self._extent: dict[str, int] = {}
        self._closed = False

    def _call(self, fn: Any, *args: Any) -> Any:
        return self._thread.submit(fn, *args).result()

    def create(self, root: dict[str, Any], arrays: Sequence[ArrayDecl], codec: CodecConfig) -> None:
        self._call(self._create, root, list(arrays), codec)

    def _create(self, root: dict[str, Any], arrays: list[ArrayDecl], codec: CodecConfig) -> None:
        import h5py
        import hdf5plugin

        f = h5py.File(self.path, "w-", libver=("v110", "v110"))
        self._created = True
        self._file = f
        f.attrs[ATTR_KEY] = json.dumps(root, allow_nan=False)
        groups = {
            TOKENS_GROUP: f.create_group(TOKENS_GROUP),
            ACTIVATIONS_GROUP: f.create_group(ACTIVATIONS_GROUP),
        }
        filters: dict[str, Any] = {}
        if codec.cname is not None:
            filters = dict(
                hdf5plugin.Blosc(
                    cname=cast(Any, codec.cname),
                    clevel=int(codec.clevel or 1),
                    shuffle=hdf5plugin.Blosc.SHUFFLE,
                )
            )
        for decl in arrays:
            ds = groups[decl.group].create_dataset(
                decl.name,
                shape=(0, *decl.feature_shape),
                maxshape=(None, *decl.feature_shape),
                chunks=decl.chunk_shape,
                dtype=np.dtype(decl.storage_dtype).newbyteorder("<"),
                fillvalue=0,
                **filters,
            )
            ds.attrs[ATTR_KEY] = json.dumps(decl.document, allow_nan=False)
            self._datasets[decl.key] = ds
            self._extent[decl.key] = 0
        f.create_dataset(COMMIT_DATASET, data=np.zeros(4, dtype="<i8"))
        f.swmr_mode = True
        f.flush()

    def write_chunk(
        self, array: ArrayDecl, index: int, parts: Sequence[bytes | memoryview], extent: int
    ) -> None:
        frame = b"".join(parts) if len(parts) > 1 else bytes(parts[0])
        self._call(self._write_chunk, array, index, frame, extent)

    def write_chunk_async(
        self, array: ArrayDecl, index: int, parts: Sequence[bytes | memoryview], extent: int
    ) -> Future[None]:
        # The encoder hands the frame to the HDF5 thread and goes on compressing: waiting
        # for each write kept the encoders idle most of the time (measured). A one-part
        # frame goes as it is, not copied: the caller keeps it (and, for raw chunks, the
        # chunk buffer it views, which the budget counts) until the future is done. A copy
        # of raw chunks was memory the budget never saw (2.3x the budget, an audit found).
        frame = b"".join(parts) if len(parts) > 1 else parts[0]
        return self._thread.submit(self._write_chunk, array, index, frame, extent)

    def _write_chunk(
        self, array: ArrayDecl, index: int, frame: bytes | memoryview, extent: int
    ) -> None:
        ds = self._datasets[array.key]
        needed = (index + 1) * array.chunk_rows
        if self._extent[array.key] < needed:
            ds.resize(needed, axis=0)
            self._extent[array.key] = needed
        offset = (index * array.chunk_rows, *(0 for _ in array.feature_shape))
        ds.id.write_direct_chunk(offset, frame)

    def publish(self, root: dict[str, Any]) -> None:
        self._call(self._publish, copy.deepcopy(root))

    def _publish(self, root: dict[str, Any]) -> None:
        rows = int(root["committed_rows"])
        for key, ds in self._datasets.items():
            if self._extent[key] < rows:
                ds.resize(rows, axis=0)
                self._extent[key] = rows
        f = self._file
        for ds in self._datasets.values():
            ds.flush()
        record = np.array(
            [int(root["commit_seq"]), rows, STATUS_CODES[root["status"]], _now_ms()], dtype="<i8"
        )
        f[COMMIT_DATASET][...] = record
        f[COMMIT_DATASET].flush()
        f.flush()
        if self.fsync:
            os.fsync(f.id.get_vfd_handle())

    def close(self, root: dict[str, Any]) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._file is not None:
                from llminstr.reader import forget_hdf5

                forget_hdf5(self.path)  # a reader's handle in this process shares the file
                self._call(self._final, copy.deepcopy(root))
        finally:
            self._thread.shutdown(wait=True)

    def _final(self, root: dict[str, Any]) -> None:
        import h5py

        try:
            rows = int(root["committed_rows"])
            for ds in self._datasets.values():  # drop uncommitted rows from the final extent
                if ds.shape[0] != rows:
                    ds.resize(rows, axis=0)
            self._publish(root)
        finally:
            self._file.close()
            self._file = None
            self._datasets.clear()
        # SWMR forbids attribute changes; reopen without it to record the final document.
        # A reader that has the file open (e.g. one following the live capture) holds
        # HDF5's file lock: retry a while, then keep the commit record as the final word
        # (it already says the final status and row count; readers trust it).
        # A file reopened without SWMR is marked open-for-writing until it is closed; if
        # that close fails (a full disk), no SWMR reader can open the file any more. So
        # the rewrite is skipped where the disk may not take it: the record stands.
        document = json.dumps(root, allow_nan=False)
        try:
            free = shutil.disk_usage(self.path.parent).free
        except OSError:
            free = 0
        if free < _FINAL_FREE_BYTES + 4 * len(document):
            import warnings

            warnings.warn(
                f"{str(self.path)!r}: only {free} bytes free, so the final root metadata was "
                f"not rewritten; the commit record carries the final status {root['status']!r} "
                f"and {root['committed_rows']} rows",
                RuntimeWarning,
                stacklevel=1,
            )
            return
        from llminstr.reader import forget_hdf5

        for attempt in range(_FINAL_ATTEMPTS):
            try:
                with h5py.File(self.path, "r+", libver=("v110", "v110")) as f:
                    f.attrs[ATTR_KEY] = document
                return
            except OSError as exc:
                # Another process's reader holds HDF5's lock (BlockingIOError), or a reader
                # in this process opened the file again since close() let go of its handle
                # ("already open for read-only"): let go again and retry a while. The
                # rewrite is a SHOULD (section 7.3): when it cannot be done, the commit
                # record already says the final status and row count.
                held = isinstance(exc, BlockingIOError) or "already open" in str(exc)
                if not held or attempt + 1 == _FINAL_ATTEMPTS:
                    import warnings

                    warnings.warn(
                        f"{str(self.path)!r}: the final root metadata could not be written "
                        f"({exc}); the commit record carries the final status "
                        f"{root['status']!r} and {root['committed_rows']} rows",
                        RuntimeWarning,
                        stacklevel=1,
                    )
                    return
                if not isinstance(exc, BlockingIOError):
                    forget_hdf5(self.path)
                time.sleep(_FINAL_RETRY_S)

    def abandon(self) -> None:
        """Close handles without publishing (used when creation itself failed)."""
        if self._closed:
            return
        self._closed = True

        def _close() -> None:
            if self._file is not None:
                self._file.close()
                self._file = None

        try:
            self._thread.submit(_close).result()
        finally:
            self._thread.shutdown(wait=True)


_FINAL_ATTEMPTS = 20
#: Free disk space below which the final non-SWMR rewrite is not attempted (see _final).
_FINAL_FREE_BYTES = 64 << 20
_FINAL_RETRY_S = 0.05


def _now_ms() -> int:
    return int(time.time() * 1000)
