"""Read llminstr captures (format 1.x) from either backend, as lazy Dask arrays.

Every capture file is untrusted input: metadata documents are size-bounded and checked
against the JSON Schemas, shapes are cross-checked, chunk frames are decoded with their
size verified (and their CRC32C, when present), and failures raise :class:`LlminstrError`
subclasses that name the site and chunk.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import stat
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import numpy as np

from llminstr.errors import (
    CaptureLockedError,
    CaptureNotFoundError,
    ConfigError,
    CorruptChunkError,
    FormatError,
    LlminstrError,
    NotACaptureError,
    SiteNotFoundError,
)
from llminstr.format import (
    ACTIVATIONS_GROUP,
    ATTR_KEY,
    COMMIT_DATASET,
    MAX_CHUNK_BYTES,
    MAX_DOCUMENT_BYTES,
    MAX_FEATURE_ELEMENTS,
    MAX_ROWS,
    STATUS_CODES,
    STORAGE_DTYPE,
    TOKENS_GROUP,
    parse_document,
    utc_text,
    validate_root,
    validate_site,
    validate_token,
)
from llminstr.storage.codec import decode_frame

_STATUS_BY_CODE = {v: k for k, v in STATUS_CODES.items()}
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def detect_backend(path: Path) -> str:
    if not path.exists():
        raise CaptureNotFoundError(f"no capture at {str(path)!r}: the path does not exist")
    if path.is_dir():
        if (path / "zarr.json").is_file():
            return "zarr"
        raise NotACaptureError(
            f"{str(path)!r} is a directory without zarr.json: not a Zarr v3 capture"
        )
    with _open_regular(path, f"{str(path)!r}", NotACaptureError) as fh:
        head = fh.read(8)
    if head == HDF5_SIGNATURE:
        return "hdf5"
    raise NotACaptureError(f"{str(path)!r} is neither a Zarr v3 directory nor an HDF5 file")


def _open_regular(path: str | os.PathLike[str], what: str, error: type[Exception]) -> Any:
    """Open ``path`` for reading only if it is a regular file (after symlinks): a FIFO
    would block the open and a device (``/dev/zero``) has no end. Raises ``error`` with a
    message naming ``what`` otherwise; ``FileNotFoundError`` passes through."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise error(f"{what} is not a regular file")
        os.set_blocking(fd, True)
        return open(fd, "rb", buffering=0, closefd=True)
    except BaseException:
        os.close(fd)
        raise


def _hdf5_end_of_file(path: str) -> tuple[int, int] | None:
    """``(file size, end-of-file address)`` from an HDF5 superblock at offset 0, or None
    when the superblock is not one this function knows (versions 0 to 3). A file that
    ends inside its superblock is refused at once (a writer writes the superblock whole
    when it creates the file; HDF5's SWMR open of such a file never returns)."""
    with _open_regular(path, repr(path), NotACaptureError) as fh:
        size = os.fstat(fh.fileno()).st_size
        head = fh.read(96)
    if len(head) < 12 or head[:8] != HDF5_SIGNATURE:
        return None
    version = head[8]
    if version in (0, 1):
        offsets = head[13]
        # signature 8, versions and sizes 8, K values 4, flags 4, (v1: K 2 + reserved 2),
        # then base, free-space, end-of-file and driver addresses
        at = 24 + (4 if version == 1 else 0) + 2 * offsets
    elif version in (2, 3):
        offsets = head[9]
        at = 12 + 2 * offsets  # then base, extension, end-of-file, root addresses
    else:
        return None
    if offsets not in (2, 4, 8):
        return None
    if len(head) < at + offsets:
        raise NotACaptureError(
            f"{path!r} is a truncated HDF5 file: it ends inside its superblock ({size} bytes)"
        )
    return size, int.from_bytes(head[at : at + offsets], "little")


#: How long a reader waits for an HDF5 file shorter than its superblock says to grow (a
#: live SWMR writer) before calling it truncated. HDF5 skips this check for SWMR readers
#: and then retries its reads past the end without end.
HDF5_GROW_WAIT_S = 2.0


#: How long a reader retries an HDF5 file that another program holds locked (opened for
#: writing without SWMR) before giving up with :class:`CaptureLockedError`.
HDF5_LOCK_WAIT_S = 2.0

#: HDF5's messages for a file whose superblock says "open for writing without SWMR".
_H5_WRITE_MARKS = ("not already open for SWMR writing", "already open for write")


#: HDF5's metadata read attempts for llminstr's SWMR readers. A metadata block whose
#: checksum fails is read again, with a sleep that doubles each time and no cap: HDF5's
#: default of 100 attempts for SWMR readers makes one damaged byte an open that does not
#: return for days. 28 attempts sleep about 0.27 s in all, ample for a torn read of a
#: block a live writer is rewriting (microseconds).
HDF5_METADATA_READ_ATTEMPTS = 28

_H5_LIB: list[Any] = []  # [ctypes library or None], found once


def _hdf5_lib() -> Any:
    """The HDF5 library that h5py uses, through ctypes, for the two calls h5py does not
    wrap (``H5Pset_metadata_read_attempts``, ``H5Dget_chunk_storage_size``), or None where
    it cannot be found. Only copies already loaded are tried (``RTLD_NOLOAD``), h5py's own
    first, and one is taken only if it knows a property list h5py just made
    (``H5Iis_valid``): another copy of HDF5 in the process (pytables', netCDF4's) would not."""
    if _H5_LIB:
        return _H5_LIB[0]
    import ctypes
    import glob

    import h5py

    here = os.path.dirname(h5py.__file__)
    candidates = []
    for pattern in ("../h5py.libs/libhdf5-*", ".dylibs/libhdf5.*"):
        candidates += sorted(glob.glob(os.path.join(here, pattern)))
    try:
        with open("/proc/self/maps") as fh:
            for line in fh:
                path = line.split()[-1] if "/" in line else ""
                name = os.path.basename(path)
                if name.startswith("libhdf5") and not name.startswith("libhdf5_hl"):
                    candidates.append(path)
    except OSError:
        pass
    probe = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    found = None
    for path in dict.fromkeys(os.path.realpath(c) for c in candidates):
        try:
            lib = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
            valid = lib.H5Iis_valid
            attempts, chunk_size = lib.H5Pset_metadata_read_attempts, lib.H5Dget_chunk_storage_size
        except (OSError, AttributeError):
            continue
        valid.argtypes, valid.restype = [ctypes.c_int64], ctypes.c_int
        with _h5py_lock():
            known = valid(probe.id)
        if known <= 0:
            continue  # another copy of HDF5: h5py's identifiers mean nothing to it
        attempts.argtypes, attempts.restype = [ctypes.c_int64, ctypes.c_uint], ctypes.c_int
        size_p = ctypes.POINTER(ctypes.c_uint64)
        chunk_size.argtypes, chunk_size.restype = [ctypes.c_int64, size_p, size_p], ctypes.c_int
        found = lib
        break
    _H5_LIB.append(found)
    return found


def _h5py_lock() -> Any:
    """h5py's global lock, held around every call into HDF5 that does not go through h5py:
    this HDF5 build is not thread-safe, and h5py serialises its own calls with this lock
    only. A ctypes call releases the GIL, so without it another thread's h5py call (a
    writer's HDF5 thread) entered HDF5 at the same time: a segmentation fault, in review."""
    from h5py import _objects

    return _objects.phil


def _hdf5_attempts_setter() -> Any:
    """``H5Pset_metadata_read_attempts`` of h5py's HDF5 (see :func:`_hdf5_lib`), or None:
    then HDF5's default applies."""
    lib = _hdf5_lib()
    return None if lib is None else lib.H5Pset_metadata_read_attempts


def _hdf5_chunk_stored(dataset: Any, offset: Sequence[int]) -> bool:
    """Whether ``dataset`` (h5py, chunked) stores the chunk at ``offset`` (inside its
    extent). ``H5Dget_chunk_storage_size`` looks the chunk up in the chunk index; h5py's
    ``get_chunk_info_by_coord`` walked every chunk of HDF5 2.0's index (about 100 ns per
    chunk: 5 s per array and refresh at a million chunks, an audit measured)."""
    lib = _hdf5_lib()
    if lib is not None:
        import ctypes

        where = (ctypes.c_uint64 * len(offset))(*offset)
        size = ctypes.c_uint64(0)
        with _h5py_lock():
            found = lib.H5Dget_chunk_storage_size(dataset.id.id, where, ctypes.byref(size))
        if found >= 0:
            return size.value > 0
    # (no library, or HDF5 refused the lookup: h5py's walk says what it finds)
    return dataset.id.get_chunk_info_by_coord(tuple(offset)).byte_offset is not None


def _open_swmr_reader(path: str) -> Any:
    """``h5py.File(path, "r", swmr=True, libver=("v110", "v110"))`` with
    :data:`HDF5_METADATA_READ_ATTEMPTS` where the HDF5 library allows setting it."""
    import h5py

    setter = _hdf5_attempts_setter()
    if setter is None:
        return h5py.File(path, "r", swmr=True, libver=("v110", "v110"))
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    fapl.set_libver_bounds(h5py.h5f.LIBVER_V110, h5py.h5f.LIBVER_V110)
    with _h5py_lock():
        done = setter(fapl.id, HDF5_METADATA_READ_ATTEMPTS)
    if done < 0:
        return h5py.File(path, "r", swmr=True, libver=("v110", "v110"))
    fid = h5py.h5f.open(os.fsencode(path), h5py.h5f.ACC_RDONLY | h5py.h5f.ACC_SWMR_READ, fapl=fapl)
    return h5py.File(fid)


def _check_hdf5_length(path: str) -> None:
    deadline = time.monotonic() + HDF5_GROW_WAIT_S
    while True:
        found = _hdf5_end_of_file(path)
        if found is None or found[0] >= found[1]:
            return
        if time.monotonic() >= deadline:
            raise NotACaptureError(
                f"{path!r} is a truncated HDF5 file: it holds {found[0]} bytes and its "
                f"superblock says {found[1]}"
            )
        time.sleep(0.05)


def _with_error_key(root: Any) -> Any:
    """Section 3.2: readers treat a missing ``error`` as null (writers must write it, so
    the schema requires it)."""
    if isinstance(root, dict):
        root.setdefault("error", None)
    return root


def _feature_shape(key: str, doc: dict[str, Any]) -> tuple[int, ...]:
    """An array's feature shape: the site's, or none for a token column (an unknown
    ``feature_shape`` key in a token column's document is ignored, as section 10 says)."""
    if key.startswith(f"{TOKENS_GROUP}/"):
        return ()
    return tuple(int(d) for d in doc["feature_shape"])


# ---------------------------------------------------------------------- chunk sources
class _Source:
    """Reads decoded chunks of one array. Picklable (holds only paths and metadata), so
    Dask graphs built on it run on distributed workers too."""

    def __init__(
        self,
        path: str,
        backend: str,
        key: str,
        site: str,
        doc: dict[str, Any],
        rows: int,
        identity: tuple[int, ...] | None = None,
    ) -> None:
        self.path = path
        # (pid, st_dev, st_ino) of the capture when it was opened: in that process, a read
        # checks that the path still names the same file or directory (a capture replaced
        # at the same path, overwrite=True, was read silently, uncommitted rows included).
        self.identity = identity
        self.backend = backend
        self.key = key
        self.site = site
        self.rows = rows
        self.chunk_rows = int(doc["chunk_rows"])
        self.feature_shape = _feature_shape(key, doc)
        self.dtype = np.dtype(doc["storage_dtype"]).newbyteorder("<")
        codec = doc["codec"]
        self.cname = codec["cname"] if codec else None
        self.checksum = doc["checksum"] == "crc32c"
        self.shape = (rows, *self.feature_shape)
        self.ndim = len(self.shape)

    def __dask_tokenize__(self) -> tuple[Any, ...]:
        # Without it Dask would tokenize the source by pickling it, for every task that
        # takes it as an argument (slow, and llminstr keeps pickle out of its own paths).
        return (
            "llminstr-source",
            self.path,
            self.backend,
            self.key,
            self.rows,
            self.chunk_rows,
            self.feature_shape,
            self.dtype.str,
            self.cname,
            self.checksum,
        )

    def read_chunk(self, index: int, out: np.ndarray | None = None) -> np.ndarray:
        """Decoded chunk ``index`` (full ``chunk_rows`` rows): a new array, or ``out``
        (C-contiguous, the chunk's shape and stored dtype) filled and returned."""
        chunk_shape = (self.chunk_rows, *self.feature_shape)
        if out is not None and (
            out.shape != chunk_shape or out.dtype != self.dtype or not out.flags.c_contiguous
        ):
            raise ValueError(
                f"out must be a C-contiguous {self.dtype} array of shape {chunk_shape}; "
                f"got {out.dtype} {out.shape}"
            )
        cname = self.cname
        limit = math.prod(chunk_shape) * self.dtype.itemsize + 64
        frame: bytes | memoryview | None
        if self.identity is not None and self.identity[0] == os.getpid():
            _check_identity(self.path, self.identity)
        try:
            if self.backend == "zarr":
                frame = _read_zarr_frame(self.path, self.key, index, len(self.feature_shape), limit)
            else:
                mask, frame = _read_hdf5_frame(
                    self.path, self.key, index, self.chunk_rows, len(self.feature_shape)
                )
                # HDF5 may store a chunk with its (optional) Blosc filter skipped, e.g. when it
                # rewrites the edge chunk on resize; bit 0 of the filter mask says so.
                if mask == 1 and cname is not None:
                    cname = None
                elif mask != 0:
                    raise CorruptChunkError(self.site, index, f"unexpected HDF5 filter mask {mask}")
        except FileNotFoundError:
            raise CorruptChunkError(
                self.site, index, "the chunk is missing from the store"
            ) from None
        except _NotAFile:
            raise CorruptChunkError(self.site, index, "the chunk is not a regular file") from None
        except CorruptChunkError:
            raise
        except OSError as exc:  # a directory where the chunk should be, and the like
            raise CorruptChunkError(self.site, index, f"the chunk cannot be read ({exc})") from None
        except _FrameTooLarge as exc:
            detail = (
                f"the chunk file grew past its {exc.size} bytes while it was read"
                if exc.grew
                else f"frame of {exc.size} bytes exceeds {limit}"
            )
            raise CorruptChunkError(self.site, index, detail) from None
        if frame is None:
            raise CorruptChunkError(self.site, index, "the chunk is missing from the store")
        if len(frame) > limit:
            raise CorruptChunkError(
                self.site, index, f"frame of {len(frame)} bytes exceeds {limit}"
            )
        try:
            return decode_frame(
                frame,
                cname=cname,
                checksum=self.checksum,
                dtype=self.dtype,
                chunk_shape=chunk_shape,
                out=out,
            )
        except (ValueError, RuntimeError) as exc:
            raise CorruptChunkError(self.site, index, str(exc)) from exc

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        start, stop = max(0, start), min(stop, self.rows)
        cr = self.chunk_rows
        if stop > start and start // cr == (stop - 1) // cr:
            # Within one chunk (every Dask block): the decoded chunk is ours, no copy.
            index = start // cr
            return self.read_chunk(index)[start - index * cr : stop - index * cr]
        out = np.empty((max(0, stop - start), *self.feature_shape), dtype=self.dtype)
        if stop <= start:
            return out
        for index in range(start // cr, (stop - 1) // cr + 1):
            chunk = self.read_chunk(index)
            lo, hi = max(start, index * cr), min(stop, (index + 1) * cr)
            out[lo - start : hi - start] = chunk[lo - index * cr : hi - index * cr]
        return out

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        rows = key[0] if key else slice(None)
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            idx = np.arange(self.rows)[rows]
            if idx.size == 0:
                return np.empty((0, *self.feature_shape), dtype=self.dtype)[
                    key[1:] if len(key) > 1 else ()
                ]
            block = self.read_rows(int(idx.min()), int(idx.max()) + 1)[idx - int(idx.min())]
            return block[(slice(None), *key[1:])] if len(key) > 1 else block
        start, stop, _ = rows.indices(self.rows)
        block = self.read_rows(start, stop)
        return block[(slice(None), *key[1:])] if len(key) > 1 else block


def _identity(path: str | os.PathLike[str]) -> tuple[int, ...] | None:
    """What tells the capture at ``path`` from another one put there later: the process,
    and the device and inode of the path; for a Zarr directory also the inode and
    modification time of its ``tokens`` group document, which is written once, when the
    capture is created (a directory removed and made again can get its inode back: an
    audit saw it, and a stale graph then read the new capture's rows)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    group: tuple[int, ...] = ()
    if stat.S_ISDIR(st.st_mode):
        try:
            g = os.stat(os.path.join(path, TOKENS_GROUP, "zarr.json"))
            group = (g.st_ino, g.st_mtime_ns)
        except OSError:
            group = (-1, -1)
    return (os.getpid(), st.st_dev, st.st_ino, *group)


def _check_identity(
    path: str, identity: tuple[int, ...], now: tuple[int, ...] | None = None
) -> None:
    """Refuse ``path`` when it no longer names what ``identity`` saw (``now``: its current
    identity, if already taken)."""
    now = _identity(path) if now is None else now
    if now is not None and now != identity:
        raise FormatError(
            f"{path!r} now holds another capture than the one opened (it was replaced at the "
            "same path); open it again"
        )


class _NotAFile(Exception):
    pass


class _FrameTooLarge(Exception):
    def __init__(self, size: int, grew: bool = False) -> None:
        super().__init__(size)
        self.size = size
        self.grew = grew  # the file held more bytes than its size said when opened


_FRAME_BUFFER = threading.local()


def _read_zarr_frame(path: str, key: str, index: int, feature_ndim: int, limit: int) -> memoryview:
    """The stored bytes of one chunk file, in this thread's frame buffer (valid until the
    thread reads its next frame). The file's size is checked against ``limit`` before
    anything is read. Reusing the buffer matters: a fresh multi-MiB buffer per chunk is
    mapped and page-faulted anew every time, which cost about as much as decompressing
    it (measured on the development VM)."""
    parts = [path, key, "c", str(index), *("0" for _ in range(feature_ndim))]
    with _open_regular(os.path.join(*parts), "chunk", _NotAFile) as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > limit:
            raise _FrameTooLarge(size)
        buf: bytearray | None = getattr(_FRAME_BUFFER, "buf", None)
        if buf is None or len(buf) < size + 1:
            buf = _FRAME_BUFFER.buf = bytearray(size + 1)
        view = memoryview(buf)
        got = 0
        # One byte more than the file's size: a file that grew since fstat shows up.
        while got <= size:
            n = fh.readinto(view[got : size + 1])
            if not n:
                break
            got += n
    if got > size:
        # Chunk files are replaced by rename, never grown in place: someone else wrote it.
        raise _FrameTooLarge(size, grew=True)
    return view[:got]


# Open handles by real path (every spelling of a path, symlinks included, shares one: HDF5
# shares one file and one metadata cache between handles of a file anyway, and a second
# handle was taken for fresh and skipped the refresh its cache needed) -> (file, (dev, ino)).
_H5_FILES: dict[str, tuple[Any, tuple[int, int]]] = {}
#: Handles that need no refresh: opened after the capture was finished (or refreshed once
#: since), so nothing in the file can change under them.
_H5_SETTLED: set[int] = set()
_H5_LOCK = threading.RLock()
#: Real paths of HDF5 captures whose live writer has published its final commit record
#: but not yet rewritten the root attribute: handles to them are closed after each use,
#: so that this process does not stop that rewrite (section 7.3).
_H5_RELEASE: set[str] = set()
#: HDF5 files a process keeps open for reading at most; the least recently used is closed.
HDF5_MAX_OPEN_FILES = 16


def writer_live(path: str | os.PathLike[str]) -> bool:
    """Whether a writer holds the capture at ``path`` open, on this host (SPEC 7.5): its
    lock file ``<path>.lock`` exists and a non-blocking ``flock`` on it fails. The path is
    tried as given and with symbolic links resolved (a writer puts its lock file beside
    the path it was given). An ``in_progress`` capture with no live writer is a crashed
    one. ``flock`` may not see a writer on another host of a network file system."""
    import fcntl

    spellings = {os.path.abspath(path), os.path.realpath(path)}
    for spelling in spellings:
        try:
            fd = os.open(spelling + ".lock", os.O_RDONLY)  # never created here (SPEC 7.5)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            continue
        finally:
            os.close(fd)  # (drops a lock just taken)
    return False


def _h5_file(path: str) -> Any:
    import hdf5plugin  # noqa: F401  (registers the Blosc filter for direct reads too)

    st = os.stat(path)
    identity = (st.st_dev, st.st_ino)
    path = os.path.realpath(path)
    cached = _H5_FILES.get(path)
    if cached is not None:
        f, seen = cached
        if f.id.valid and seen == identity:
            _H5_FILES[path] = _H5_FILES.pop(path)  # most recently used last
            return f
        # The path now names another file (the capture was replaced): drop the stale handle.
        if f.id.valid:
            f.close()
    _check_hdf5_length(path)
    deadline = time.monotonic() + HDF5_LOCK_WAIT_S
    while True:
        try:
            f = _open_swmr_reader(path)
            break
        except OSError as exc:
            # HDF5's file lock (or, with locking off, the superblock's open-for-writing
            # mark) of a program that has the file open for writing without SWMR:
            # llminstr's own writer does so for milliseconds at close (section 7.3).
            held = isinstance(exc, BlockingIOError) or any(m in str(exc) for m in _H5_WRITE_MARKS)
            if not held or time.monotonic() >= deadline:
                raise
            time.sleep(0.02)
    _H5_FILES.pop(path, None)
    _H5_FILES[path] = (f, identity)
    _H5_SETTLED.discard(id(f))
    while len(_H5_FILES) > HDF5_MAX_OPEN_FILES:  # a Capture never closed keeps no handle forever
        oldest = next(iter(_H5_FILES))
        _forget_hdf5_locked(oldest)
    return f


def _forget_hdf5_locked(real_path: str) -> None:
    cached = _H5_FILES.pop(real_path, None)
    if cached is not None:
        _H5_SETTLED.discard(id(cached[0]))
        if cached[0].id.valid:
            cached[0].close()


def forget_hdf5(path: str | os.PathLike[str]) -> None:
    """Close llminstr's cached read handle of the HDF5 file at ``path``, if any (the next
    read reopens it). The writer calls this at close: in one process HDF5 shares a file
    between handles, and a reader's handle kept the finished file open and marked."""
    with _H5_LOCK:
        _forget_hdf5_locked(os.path.realpath(path))


def _read_hdf5_frame(
    path: str, key: str, index: int, chunk_rows: int, feature_ndim: int
) -> tuple[int, bytes | None]:
    # No H5Drefresh here: Capture.refresh() refreshes every dataset after reading the commit
    # record, so the chunks of committed rows are visible to reads. Refreshing per read was
    # a data race: H5Drefresh while another handle of the same dataset is still open (a
    # previous read's, freed by Python after the lock) corrupts the shared chunk index, and
    # reads returned chunk 0's bytes for other chunks (seen under load with two threads in
    # CI; reproduced with h5py alone).
    with _H5_LOCK:
        f = _h5_file(path)
        ds = f[key]
        try:
            offset = (index * chunk_rows, *(0 for _ in range(feature_ndim)))
            if offset[0] >= ds.shape[0]:
                return 0, None
            try:
                mask, frame = ds.id.read_direct_chunk(offset)
            except (KeyError, OSError, ValueError):
                return 0, None
        finally:
            del ds  # closed under the lock: one open handle per dataset at a time
            # (an empty set costs no realpath: this runs for every chunk read)
            if _H5_RELEASE and (real := os.path.realpath(path)) in _H5_RELEASE:
                del f  # the writer is about to rewrite the root attribute
                _forget_hdf5_locked(real)
    return int(mask), bytes(frame)


def _dig(doc: Any, *keys: str) -> Any:
    """``doc[k1][k2]...``, or None where a level is missing or not a JSON object."""
    for key in keys:
        if not isinstance(doc, dict):
            return None
        doc = doc.get(key)
    return doc


def _array_doc(key: str, doc: Any, where: str) -> dict[str, Any]:
    """Check the llminstr document of one array against its schema and its name."""
    if not isinstance(doc, dict):
        raise FormatError(f"{where}: array {key} lacks its '{ATTR_KEY}' attribute")
    group, name = key.split("/", 1)
    if group == ACTIVATIONS_GROUP:
        validate_site(doc, f"{where}: {key}")
        if STORAGE_DTYPE[doc["logical_dtype"]] != doc["storage_dtype"]:
            raise FormatError(
                f"{where}: {key} stores {doc['storage_dtype']} for {doc['logical_dtype']}"
            )
        values = math.prod(int(d) for d in doc["feature_shape"])  # Python ints: no overflow
        raw_chunk = values * doc["chunk_rows"] * np.dtype(doc["storage_dtype"]).itemsize
        if values > MAX_FEATURE_ELEMENTS or raw_chunk > MAX_CHUNK_BYTES:
            raise FormatError(
                f"{where}: {key} has rows of {values} values ({raw_chunk} bytes per chunk), "
                f"above the format limits ({MAX_FEATURE_ELEMENTS} values, {MAX_CHUNK_BYTES} bytes)"
            )
        dims = doc["dimension_names"]
        if len(dims) != len(doc["feature_shape"]) + 1 or len(set(dims)) != len(dims):
            raise FormatError(
                f"{where}: {key} needs {len(doc['feature_shape']) + 1} distinct dimension "
                f"names; got {dims}"
            )
        named = doc["name"]
    else:
        validate_token(doc, f"{where}: {key}")
        named = doc["column"]
    if named != name:
        raise FormatError(f"{where}: array {key} has the metadata of {named!r}")
    return doc


# ---------------------------------------------------------------------- HDF5 structure
#: HDF5's registered id of the Blosc filter (section 6.2).
BLOSC_FILTER_ID = 32001


def _h5_text(raw: Any, where: str) -> str | bytes:
    """An HDF5 attribute that must hold a JSON document (a string)."""
    if isinstance(raw, (str, bytes)):
        return raw
    if isinstance(raw, np.ndarray) and raw.shape == () and isinstance(raw.item(), (str, bytes)):
        return raw.item()  # type: ignore[no-any-return]
    raise FormatError(
        f"{where}: the '{ATTR_KEY}' attribute must be a string holding JSON; got "
        f"{type(raw).__name__}"
    )


def _h5_dataset(f: Any, key: str, where: str) -> Any:
    """``f[key]`` as a dataset, with the ways HDF5 can fail to give one (missing, a
    group, a dangling or cyclic link) reported as :class:`FormatError`."""
    import h5py

    try:
        link = f.get(key, getlink=True)
        obj = f[key] if link is not None else None
    except (KeyError, RuntimeError, OSError, ValueError) as exc:
        raise FormatError(f"{where}: dataset {key} cannot be opened ({exc})") from None
    if obj is None:
        raise FormatError(f"{where}: dataset {key} is missing")
    if not isinstance(obj, h5py.Dataset):
        raise FormatError(f"{where}: {key} is not an HDF5 dataset")
    return obj


def _check_h5_filters(ds: Any, key: str, doc: dict[str, Any], where: str) -> None:
    """Section 6.2: the filter pipeline is the Blosc filter alone, or empty for raw chunks.
    Any other filter (HDF5's shuffle, deflate, Fletcher32...) would change the stored
    bytes under this reader, which reads chunks directly."""
    plist = ds.id.get_create_plist()
    found = [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]
    expected = [BLOSC_FILTER_ID] if doc.get("codec") else []
    if found != expected:
        raise FormatError(
            f"{where}: dataset {key} has HDF5 filters {found}; its metadata implies {expected}"
        )


# ---------------------------------------------------------------------- capture
class Capture:
    """A read-only view of a capture. Obtain one with :func:`open_capture`.

    Only committed rows are visible. :meth:`refresh` re-reads the commit record, so a
    reader can follow a capture while it is being written.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.backend = detect_backend(self.path)
        self._array_docs: dict[str, dict[str, Any]] = {}
        self._array_lengths: dict[str, int] = {}
        # refresh() fills these, then swaps them in: readers in other threads keep the last
        # complete tables meanwhile (emptying the live tables first made sites vanish).
        self._new_docs: dict[str, dict[str, Any]] = {}
        self._new_lengths: dict[str, int] = {}
        self._refresh_lock = threading.Lock()
        self._identity: tuple[int, ...] | None = None  # see _Source.identity
        try:
            self.refresh()
        except BaseException:
            self.close()  # no HDF5 handle stays open on a file that was refused
            raise

    # -- metadata loading
    def refresh(self) -> None:
        """Re-read metadata and the commit record (a live capture may have grown)."""
        where = str(self.path)
        # Load into fresh tables; a failed refresh leaves the last good state in place, and
        # other threads read the last good state until the new one is complete.
        with self._refresh_lock:
            identity = _identity(self.path)
            old = getattr(self, "_root", None)
            if (
                old is not None
                and self._identity is not None
                and self._identity[0] == os.getpid()  # (a forked child sees another pid)
            ):
                _check_identity(where, self._identity, identity)
            self._new_docs, self._new_lengths = {}, {}
            self._release_hdf5 = False  # set by _hdf5_read_root
            load = self._zarr_root if self.backend == "zarr" else self._hdf5_root
            root_doc = load(where)
            validate_root(root_doc, where)
            if old is not None and root_doc["created"] != old["created"]:
                raise FormatError(
                    f"{where!r} now holds another capture than the one opened (created "
                    f"{root_doc['created']}, not {old['created']}); open it again"
                )
            self._identity = identity
            self._check_layout(root_doc)
            self._check_last_chunks(root_doc)
            if self.backend == "hdf5":
                real = os.path.realpath(self.path)
                with _H5_LOCK:
                    if self._release_hdf5:  # see _hdf5_read_root
                        _H5_RELEASE.add(real)
                        _forget_hdf5_locked(real)
                    else:
                        _H5_RELEASE.discard(real)
            # (the docs first: a capture's sites never change, so the old root fits them)
            self._array_docs, self._array_lengths = self._new_docs, self._new_lengths
            self._root = root_doc

    def _zarr_root(self, where: str) -> dict[str, Any]:
        meta = self._zarr_json(self.path / "zarr.json", where)
        attrs = meta.get("attributes", {}) if isinstance(meta, dict) else {}
        root = attrs.get(ATTR_KEY) if isinstance(attrs, dict) else None
        if root is None:
            raise NotACaptureError(
                f"{where} is a Zarr store without the '{ATTR_KEY}' root attribute"
            )
        validate_root(_with_error_key(root), where)  # before any of its fields is used
        names = [(TOKENS_GROUP, c) for c in root["token_columns"]] + [
            (ACTIVATIONS_GROUP, s) for s in root["sites"]
        ]
        for group, name in names:
            key = f"{group}/{name}"
            ameta = self._zarr_json(
                self.path / group / str(name) / "zarr.json", f"{where}: array {key}"
            )
            if not isinstance(ameta, dict) or ameta.get("node_type") != "array":
                raise FormatError(f"{where}: {key} is not a Zarr array")
            attributes = ameta.get("attributes")
            doc = _array_doc(
                key, attributes.get(ATTR_KEY) if isinstance(attributes, dict) else None, where
            )
            shape = ameta.get("shape")
            if (
                not isinstance(shape, list)
                or not shape
                or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
                or not 0 <= shape[0] <= MAX_ROWS
            ):
                raise FormatError(f"{where}: {key} has an invalid shape {shape!r}")
            self._new_docs[key] = doc
            self._new_lengths[key] = int(shape[0])
            self._check_zarr_array(key, ameta, doc, where)
        return root  # type: ignore[no-any-return]

    @staticmethod
    def _zarr_json(path: Path, where: str) -> Any:
        try:
            with _open_regular(path, f"{where}: {path.name}", FormatError) as fh:
                size = os.fstat(fh.fileno()).st_size
                if size > MAX_DOCUMENT_BYTES:
                    raise FormatError(f"{where}: {path} is {size} bytes, above the metadata limit")
                raw = fh.read(MAX_DOCUMENT_BYTES + 1)  # bounded even if the file grows
        except FileNotFoundError:
            raise FormatError(f"{where}: {path.name} is missing") from None
        except OSError as exc:  # a directory on the path, permissions
            raise FormatError(f"{where}: {path.name} cannot be read ({exc})") from None
        return parse_document(raw, where)

    def _check_zarr_array(self, key: str, meta: dict[str, Any], doc: Any, where: str) -> None:
        chunk_shape = _dig(meta, "chunk_grid", "configuration", "chunk_shape")
        features = list(_feature_shape(key, doc))
        expected_chunks = [doc.get("chunk_rows"), *features]
        if _dig(meta, "chunk_grid", "name") != "regular" or chunk_shape != expected_chunks:
            raise FormatError(
                f"{where}: array {key} has chunk shape {chunk_shape}; its metadata says {expected_chunks}"
            )
        if meta.get("data_type") != doc.get("storage_dtype"):
            raise FormatError(
                f"{where}: array {key} has data type {meta.get('data_type')!r}; its metadata says "
                f"{doc.get('storage_dtype')!r}"
            )
        if list(meta.get("shape", [])[1:]) != features:
            raise FormatError(
                f"{where}: array {key} has shape {meta.get('shape')}; its feature shape should be "
                f"{features}"
            )
        # This reader reads chunks at the keys of the default '/' encoding, little endian.
        if _dig(meta, "chunk_key_encoding", "name") != "default" or _dig(
            meta, "chunk_key_encoding", "configuration", "separator"
        ) not in (None, "/"):
            raise FormatError(
                f"{where}: array {key} has chunk key encoding {meta.get('chunk_key_encoding')!r}; "
                "the format uses the default encoding with separator '/'"
            )
        fill = meta.get("fill_value")
        if isinstance(fill, bool) or not isinstance(fill, (int, float)) or fill != 0:
            raise FormatError(f"{where}: array {key} has fill_value {fill!r}; the format uses 0")
        names_expected = doc.get("dimension_names") if features else ["row"]
        if meta.get("dimension_names") != names_expected:
            raise FormatError(
                f"{where}: array {key} has dimension_names {meta.get('dimension_names')!r}; "
                f"its metadata says {names_expected!r}"
            )
        if meta.get("zarr_format") != 3 or meta.get("storage_transformers") not in (None, []):
            raise FormatError(
                f"{where}: array {key} must be a Zarr v3 array without storage transformers"
            )
        codecs = meta.get("codecs")
        names = (
            [c.get("name") if isinstance(c, dict) else None for c in codecs]
            if isinstance(codecs, list)
            else None
        )
        codec = doc.get("codec")
        if codec and names and len(names) > 1 and names[1] == "blosc":
            blosc = _dig(meta["codecs"][1], "configuration")
            blosc = blosc if isinstance(blosc, dict) else {}
            if (blosc.get("cname"), blosc.get("clevel"), blosc.get("shuffle")) != (
                codec.get("cname"),
                codec.get("clevel"),
                codec.get("shuffle"),
            ):
                raise FormatError(
                    f"{where}: array {key} has Blosc settings {blosc}; its metadata says {codec}"
                )
        if names and _dig(meta["codecs"][0], "configuration", "endian") != "little":
            raise FormatError(f"{where}: array {key} must use the 'bytes' codec, little endian")
        expected = (
            ["bytes"]
            + (["blosc"] if doc.get("codec") else [])
            + (["crc32c"] if doc.get("checksum") else [])
        )
        if names != expected:
            raise FormatError(
                f"{where}: array {key} has codecs {names}; its metadata implies {expected}"
            )

    def _hdf5_root(self, where: str) -> dict[str, Any]:

        with _H5_LOCK:
            known = _H5_FILES.get(os.path.realpath(self.path))
            try:
                f = _h5_file(str(self.path))
            except BlockingIOError as exc:
                raise CaptureLockedError(
                    f"{where} is locked by a program that has it open for writing without "
                    f"SWMR (waited {HDF5_LOCK_WAIT_S:g} s); try again when it has closed it"
                ) from exc
            except (OSError, RuntimeError) as exc:  # h5py raises either for a damaged file
                if any(mark in str(exc) for mark in _H5_WRITE_MARKS):
                    raise CaptureLockedError(
                        f"{where} is marked open for writing by a program that does not use "
                        "SWMR, so HDF5 refuses to open it for reading. Either such a program "
                        "is writing it now, or one was killed while it had the file open (a "
                        "llminstr writer does so for a few milliseconds at close, SPEC section "
                        "7.3). If nothing is writing it, `llminstr repair PATH` clears the mark "
                        f"and keeps every committed row. ({exc})"
                    ) from exc
                raise NotACaptureError(f"{where} could not be opened as HDF5: {exc}") from exc
            try:
                root = self._hdf5_read_root(f, known, where)
            except LlminstrError:
                raise
            except (OSError, RuntimeError, KeyError, ValueError, TypeError) as exc:
                # h5py's errors for damaged metadata (bad object headers, checksums that
                # stay wrong, cyclic links) are the file's fault, not the caller's
                raise FormatError(
                    f"{where}: HDF5 cannot read the capture's metadata ({exc})"
                ) from exc
        return root

    def _hdf5_read_root(self, f: Any, known: Any, where: str) -> dict[str, Any]:
        """The root document of an open HDF5 capture, with the commit record applied, and
        every array's document checked (called under ``_H5_LOCK``)."""
        raw = f.attrs.get(ATTR_KEY)
        if raw is None:
            raise NotACaptureError(
                f"{where} is an HDF5 file without the '{ATTR_KEY}' root attribute"
            )
        root = parse_document(_h5_text(raw, where), where)
        validate_root(_with_error_key(root), where)  # before any of its fields is used
        # H5Drefresh shows a live writer's new commits. It is only safe while no other
        # handle of the same dataset is open in the process: it corrupts HDF5's shared
        # chunk index otherwise (reads then return other chunks' bytes; reproduced with
        # h5py alone). llminstr's own handles are opened and closed under _H5_LOCK, and
        # reads never refresh (see _read_hdf5_frame).
        # A handle just opened, or one that already saw the final commit record, shows
        # everything: refreshing it is needless, and risky beside foreign handles.
        fresh = known is None or known[0] is not f
        refresh = not fresh and id(f) not in _H5_SETTLED
        rec_ds = _h5_dataset(f, COMMIT_DATASET, where)
        if refresh:
            rec_ds.id.refresh()
        if rec_ds.shape != (4,):
            raise FormatError(f"{where}: {COMMIT_DATASET} must have shape (4,); got {rec_ds.shape}")
        rec = rec_ds[...]
        del rec_ds  # handles are closed under the lock (see _read_hdf5_frame)
        if not np.issubdtype(rec.dtype, np.integer):
            raise FormatError(f"{where}: {COMMIT_DATASET} must hold integers; got {rec.dtype}")
        seq, rows, code, when = int(rec[0]), int(rec[1]), int(rec[2]), int(rec[3])
        if code not in _STATUS_BY_CODE or rows < 0 or seq < 0:
            raise FormatError(f"{where}: invalid commit record {rec.tolist()}")
        # The commit record is authoritative while it is newer than the root attribute.
        stale_attribute = seq > int(root["commit_seq"])
        if seq >= int(root["commit_seq"]):
            root["committed_rows"] = rows
            root["status"] = _STATUS_BY_CODE[code]
            root["commit_seq"] = seq
            if stale_attribute and when > 0:  # the record's time of publish (ms)
                # (informative, SPEC 6.3: a time datetime cannot hold is left out)
                with contextlib.suppress(ValueError, OverflowError, OSError):
                    root["updated"] = utc_text(datetime.fromtimestamp(when / 1000, UTC))
        names = [(TOKENS_GROUP, c) for c in root["token_columns"]] + [
            (ACTIVATIONS_GROUP, s) for s in root["sites"]
        ]
        for group, name in names:
            key = f"{group}/{name}"
            ds = _h5_dataset(f, key, where)
            if refresh:
                ds.id.refresh()  # after the commit record: every committed chunk is visible
            doc = _array_doc(
                key,
                parse_document(
                    _h5_text(ds.attrs.get(ATTR_KEY, "null"), f"{where}: {key}"),
                    f"{where}: {key}",
                ),
                where,
            )
            features = list(_feature_shape(key, doc))
            if list(ds.chunks or []) != [doc.get("chunk_rows"), *features]:
                raise FormatError(
                    f"{where}: dataset {key} has chunks {ds.chunks}; its metadata says "
                    f"{[doc.get('chunk_rows'), *features]}"
                )
            _check_h5_filters(ds, key, doc, where)
            if ds.maxshape[0] is not None or np.any(ds.fillvalue != 0):
                raise FormatError(
                    f"{where}: dataset {key} must be unlimited along rows with fill value 0; "
                    f"got maxshape {ds.maxshape} and fill value {ds.fillvalue!r}"
                )
            if list(ds.shape[1:]) != features:
                raise FormatError(
                    f"{where}: dataset {key} has shape {ds.shape}, unlike its metadata"
                )
            if np.dtype(ds.dtype).name != doc.get("storage_dtype") or ds.dtype.byteorder == ">":
                raise FormatError(
                    f"{where}: dataset {key} has dtype {ds.dtype}; its metadata says {doc.get('storage_dtype')}"
                )
            self._new_docs[key] = doc
            self._new_lengths[key] = int(ds.shape[0])
            del ds
        if root["status"] != "in_progress":
            if stale_attribute and writer_live(self.path):
                # The writer has published its final record and is about to rewrite the
                # root attribute without SWMR (section 7.3), which a handle kept open
                # here would stop, in another process for good (its error message was
                # then lost, an audit found): let go of the file after this read.
                self._release_hdf5 = True
            else:
                _H5_SETTLED.add(id(f))  # the writer is done: the file no longer changes
        return cast(dict[str, Any], root)

    def _check_layout(self, root: dict[str, Any]) -> None:
        where = str(self.path)
        rows = int(root["committed_rows"])
        chunk_rows = int(root["chunk_rows"])
        if root["backend"] != self.backend:
            raise FormatError(
                f"{where}: the root document says backend {root['backend']!r} but the container "
                f"is {self.backend!r}"
            )
        comp = root["compression"]
        for key, doc in self._new_docs.items():
            codec = doc["codec"]
            got = (codec["cname"], codec["clevel"]) if codec else (None, None)
            if got != (comp["cname"], comp["clevel"]) or doc["checksum"] != comp["checksum"]:
                raise FormatError(
                    f"{where}: {key} uses codec {got} with checksum {doc['checksum']!r}; the root "
                    f"compression summary says ({comp['cname']!r}, {comp['clevel']!r}) with "
                    f"checksum {comp['checksum']!r}"
                )
            if doc["chunk_rows"] != chunk_rows:
                raise FormatError(
                    f"{where}: {key} has chunk_rows {doc['chunk_rows']}; the capture uses {chunk_rows}"
                )
            if self._new_lengths[key] < rows:
                raise FormatError(
                    f"{where}: {key} holds {self._new_lengths[key]} rows but {rows} are committed"
                )

    def _check_last_chunks(self, root: dict[str, Any]) -> None:
        """Every array stores the chunk of its last committed row (section 5.3 / 6: every
        chunk holding a committed row exists). Checked at open, one lookup per array, so a
        row count that only the metadata claims is refused before anything is built per
        chunk (a lazy array of 2**40 claimed rows would exhaust memory)."""
        rows = int(root["committed_rows"])
        if rows == 0:
            return
        where = str(self.path)
        last = (rows - 1) // int(root["chunk_rows"])
        if self.backend == "zarr":
            for key, doc in self._new_docs.items():
                parts = [key, "c", str(last), *("0" for _ in _feature_shape(key, doc))]
                try:
                    present = stat.S_ISREG(os.stat(self.path.joinpath(*parts)).st_mode)
                except OSError:
                    present = False
                if not present:
                    raise FormatError(
                        f"{where}: {rows} rows are committed but {key} does not store chunk "
                        f"{last}, which holds row {rows - 1}"
                    )
            return
        with _H5_LOCK:
            f = _h5_file(str(self.path))
            for key, doc in self._new_docs.items():
                offset = (last * int(root["chunk_rows"]), *(0 for _ in _feature_shape(key, doc)))
                if not _hdf5_chunk_stored(f[key], offset):
                    raise FormatError(
                        f"{where}: {rows} rows are committed but {key} does not store chunk "
                        f"{last}, which holds row {rows - 1}"
                    )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_refresh_lock"]  # (a lock cannot be pickled or copied)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._refresh_lock = threading.Lock()

    # -- public surface
    @property
    def metadata(self) -> dict[str, Any]:
        """The root metadata document (a copy)."""
        return json.loads(json.dumps(self._root))  # type: ignore[no-any-return]

    @property
    def format_version(self) -> str:
        return str(self._root["format_version"])

    @property
    def status(self) -> str:
        return str(self._root["status"])

    @property
    def num_rows(self) -> int:
        return int(self._root["committed_rows"])

    @property
    def chunk_rows(self) -> int:
        return int(self._root["chunk_rows"])

    @property
    def sites(self) -> list[str]:
        return list(self._root["sites"])

    @property
    def token_columns(self) -> list[str]:
        return list(self._root["token_columns"])

    def site_info(self, name: str) -> dict[str, Any]:
        key = f"{ACTIVATIONS_GROUP}/{name}"
        if key not in self._array_docs or name not in self._root["sites"]:
            raise SiteNotFoundError(
                f"capture {str(self.path)!r} has no site {name!r}; sites: {self.sites}"
            )
        return dict(self._array_docs[key])

    def token_info(self, column: str) -> dict[str, Any]:
        """The document of token column ``column`` (its ``description`` says what it holds)."""
        key = f"{TOKENS_GROUP}/{column}"
        if key not in self._array_docs or column not in self._root["token_columns"]:
            raise SiteNotFoundError(
                f"capture {str(self.path)!r} has no token column {column!r}; "
                f"columns: {self.token_columns}"
            )
        return dict(self._array_docs[key])

    def _source(self, key: str, label: str) -> _Source:
        return _Source(
            str(self.path),
            self.backend,
            key,
            label,
            self._array_docs[key],
            self.num_rows,
            self._identity,
        )

    def _block_rows(self, block_rows: int | None) -> int:
        """Rows per block of a dask array this capture returns: ``block_rows`` (checked),
        or one storage chunk."""
        if block_rows is None:
            return self.chunk_rows
        if (
            isinstance(block_rows, bool)
            or not isinstance(block_rows, (int, np.integer))
            or not 1 <= block_rows <= MAX_ROWS
        ):
            raise ConfigError(f"block_rows must be a positive integer or None; got {block_rows!r}")
        return int(block_rows)

    def activations(self, name: str, *, logical: bool = True, block_rows: int | None = None) -> Any:
        """Lazy ``dask.array`` of shape ``(num_rows, *feature_shape)``.

        One dask block per storage chunk by default: a slice reads only the chunks it
        covers (dask 2026.8 reads a whole block for any slice of it). A dask array costs
        about 48 bytes per block and each graph on it about 730, which adds up for
        captures of millions of chunks: ``block_rows`` (a multiple of ``chunk_rows``
        reads each chunk once) then makes fewer, larger blocks.
        bfloat16 sites come back as ``ml_dtypes.bfloat16`` (``logical=False``: raw uint16).
        """
        import dask.array

        da: Any = dask.array

        info = self.site_info(name)
        src = self._source(f"{ACTIVATIONS_GROUP}/{name}", name)
        rows_per_block = self._block_rows(block_rows)
        seq = self._root["commit_seq"]
        arr = da.from_array(
            src,
            chunks=(rows_per_block, *src.feature_shape),
            asarray=False,
            lock=False,
            fancy=False,
            meta=np.empty((0,) * src.ndim, dtype=src.dtype),
            name=f"llminstr-{_token(self.path, name, self.num_rows, seq, rows_per_block)}",
        )
        if logical and info["logical_dtype"] == "bfloat16":
            import ml_dtypes

            arr = arr.view(ml_dtypes.bfloat16)
        return arr

    def _row_range(self, start: Any, stop: Any) -> tuple[int, int]:
        """``[start, stop)`` of committed rows under Python's slice rules; non-integer
        bounds are refused."""
        for bound in (start, stop):
            if bound is not None and (
                isinstance(bound, bool) or not isinstance(bound, (int, np.integer))
            ):
                raise ConfigError(f"row bounds must be integers or None; got {bound!r}")
        lo, hi, _ = slice(
            None if start is None else int(start), None if stop is None else int(stop)
        ).indices(self.num_rows)
        return lo, max(lo, hi)

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Eagerly read rows ``[start, stop)`` of a site (logical dtype) into numpy. The
        bounds follow Python's slice rules over the committed rows (negative counts from the
        end, out-of-range bounds are clipped)."""
        info = self.site_info(name)
        start, stop = self._row_range(start, stop)
        out = self._source(f"{ACTIVATIONS_GROUP}/{name}", name).read_rows(start, stop)
        if info["logical_dtype"] == "bfloat16":
            import ml_dtypes

            return out.view(ml_dtypes.bfloat16)
        return out

    @property
    def tokens(self) -> Mapping[str, Any]:
        """Token columns: name -> lazy dask array of length ``num_rows`` (int64), one
        block per storage chunk."""
        return _Tokens(self)

    def token_table(self, start: int = 0, stop: int | None = None) -> dict[str, np.ndarray]:
        """Eagerly read rows ``[start, stop)`` of every token column (slice rules, as
        :meth:`read`)."""
        start, stop = self._row_range(start, stop)
        return {
            c: self._source(f"{TOKENS_GROUP}/{c}", f"tokens/{c}").read_rows(start, stop)
            for c in self.token_columns
        }

    def verify(self) -> list[str]:
        """Decode every committed chunk of every array; return a list of problems (empty: OK)."""
        problems: list[str] = []
        nchunks = -(-self.num_rows // self.chunk_rows)
        for key in self._array_docs:
            label = key.split("/", 1)[1] if key.startswith(ACTIVATIONS_GROUP) else key
            src = self._source(key, label)
            for i in range(nchunks):
                try:
                    src.read_chunk(i)
                except CorruptChunkError as exc:
                    problems.append(str(exc))
        return problems

    def to_xarray(self, *, block_rows: int | None = None) -> Any:
        """An ``xarray.Dataset``: one variable per site over dims ``row`` and
        ``<site>.feature``; token columns as coordinates on ``row``. Names stay unique when
        sites and columns share them (all are legal): a token column named like a site or
        like the row dimension becomes the coordinate ``tokens/<column>``, and a dimension
        named like a variable gets ``_`` appended. ``block_rows`` as for
        :meth:`activations`, for every array (one block per storage chunk by default)."""
        import xarray as xr

        self._block_rows(block_rows)  # checked before anything is built
        tokens = _Tokens(self)

        taken = set(self.sites)

        def unique(name: str) -> str:
            while name in taken:
                name += "_"
            taken.add(name)
            return name

        row = unique("row")
        coords = {
            unique(c if c not in self.sites and c != row else f"tokens/{c}"): (
                row,
                tokens.array(c, block_rows),
            )
            for c in self.token_columns
        }
        data_vars = {}
        for name in self.sites:
            info = self.site_info(name)
            dims = [row, *(unique(f"{name}.{d}") for d in info["dimension_names"][1:])]
            data_vars[name] = (
                dims,
                self.activations(name, block_rows=block_rows),
                {
                    k: v
                    for k, v in info.items()
                    if v is not None and not isinstance(v, (dict, list))
                },
            )
        attrs = {"llminstr": json.dumps(self._root)}
        return xr.Dataset(data_vars=data_vars, coords=coords, attrs=attrs)

    def __repr__(self) -> str:
        return (
            f"<llminstr Capture {str(self.path)!r} v{self.format_version} {self.status} "
            f"rows={self.num_rows} sites={len(self.sites)} backend={self.backend}>"
        )

    def close(self) -> None:
        if self.backend == "hdf5":
            forget_hdf5(self.path)

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Tokens(Mapping[str, Any]):
    def __init__(self, capture: Capture) -> None:
        self._capture = capture

    def __getitem__(self, column: str) -> Any:
        return self.array(column)

    def array(self, column: str, block_rows: int | None = None) -> Any:
        import dask.array

        da: Any = dask.array

        cap = self._capture
        if column not in cap.token_columns:
            raise SiteNotFoundError(f"no token column {column!r}; columns: {cap.token_columns}")
        src = cap._source(f"{TOKENS_GROUP}/{column}", f"tokens/{column}")
        rows_per_block = cap._block_rows(block_rows)
        seq = cap._root["commit_seq"]
        return da.from_array(
            src,
            chunks=(rows_per_block,),
            asarray=False,
            lock=False,
            fancy=False,
            meta=np.empty((0,), dtype=src.dtype),
            name=f"llminstr-tok-{_token(cap.path, column, cap.num_rows, seq, rows_per_block)}",
        )

    def __iter__(self) -> Iterator[str]:
        return iter(self._capture.token_columns)

    def __len__(self) -> int:
        return len(self._capture.token_columns)


def _token(path: Path, name: str, rows: int, seq: Any, block_rows: int) -> str:
    import hashlib

    text = f"{path.resolve()}|{name}|{rows}|{seq}|{block_rows}"
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def open_capture(path: str | os.PathLike[str]) -> Capture:
    """Open a capture read-only (either backend). Only committed rows are visible."""
    return Capture(path)
