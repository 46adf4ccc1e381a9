"""The capture writer: assembles rows into chunks, encodes them in parallel, commits.

Data flow (one direction)::

    write_site / write_tokens ─► per-array chunk buffer ─► encoder threads ─► backend
        (producer, copies)          (full chunk)          (Blosc, GIL free)   (frame write)

Rows become visible to readers only through a *commit*: every frame they live in is
written first, then the committed row count is published atomically. Row ``i`` of every
site and of every token column is the same token; the committed count is the smallest
number of rows that every array holds on disk.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import os
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import numpy as np

from llminstr.budget import MemoryBudget
from llminstr.errors import (
    CaptureExistsError,
    CaptureLockedError,
    ConfigError,
    FormatError,
    LlminstrError,
    SiteNotFoundError,
    WriterClosedError,
    WriterFailedError,
)
from llminstr.format import (
    ACTIVATIONS_GROUP,
    MAX_BLOSC_CHUNK_BYTES,
    MAX_CHUNK_BYTES,
    MAX_CHUNK_ROWS,
    MAX_DOCUMENT_BYTES,
    TOKEN_COLUMNS,
    TOKENS_GROUP,
    CodecConfig,
    SiteInfo,
    check_name,
    root_document,
    site_document,
    token_document,
    utc_now,
)
from llminstr.storage.backends import ArrayDecl, HDF5Backend, StoreBackend, ZarrBackend
from llminstr.storage.codec import ChunkCodec

#: Full chunks that may wait for an encoder: one per array plus this many per encoder
#: thread; the producer waits (counted as stall) beyond that. A deeper queue only adds
#: chunk buffers that are fresh memory, whose first touch page-faults in the producer's
#: copy (docs/decisions.md has the measurements). The memory budget still bounds
#: everything else (partial chunks of every array, frames waiting to be written).
QUEUED_CHUNKS_PER_THREAD = 2
DEFAULT_CHUNK_BYTES = 4 << 20  # aim for ~4 MiB raw per chunk of the widest array
MIN_CHUNK_ROWS = 16
MAX_AUTO_CHUNK_ROWS = 1 << 16
PER_THREAD_GBPS = 1.0  # conservative Blosc-lz4 rate of one core (DESIGN.md measured ~1.25)


def backend_for_path(path: Path, backend: str | None) -> str:
    """``.zarr`` -> zarr, ``.h5``/``.hdf5`` -> hdf5, unless ``backend`` names one."""
    if backend is not None:
        if backend not in ("zarr", "hdf5"):
            raise ConfigError(f"backend must be one of 'zarr', 'hdf5', None; got {backend!r}")
        return backend
    suffix = path.suffix.lower()
    if suffix == ".zarr":
        return "zarr"
    if suffix in (".h5", ".hdf5"):
        return "hdf5"
    raise ConfigError(
        f"cannot tell the backend from the path {str(path)!r}: use a '.zarr', '.h5' or '.hdf5' "
        "suffix, or pass backend='zarr' or backend='hdf5'"
    )


def auto_chunk_rows(row_bytes: Sequence[int], budget_bytes: int) -> int:
    """Rows per chunk: ~4 MiB for the widest array, and small enough that one chunk buffer
    per array plus as many in flight again fits in a quarter of the budget. At least
    ``MIN_CHUNK_ROWS`` where that rule allows it, else as many as it allows (at least one):
    rows so wide that the budget holds only a few are chunked one or two at a time rather
    than refused."""
    widest = max(row_bytes)
    total = sum(row_bytes)
    fits = budget_bytes // (4 * 2 * total)
    rows = min(DEFAULT_CHUNK_BYTES // widest, fits, MAX_AUTO_CHUNK_ROWS)
    rows = max(rows, min(MIN_CHUNK_ROWS, fits), 1)
    return int(2 ** math.floor(math.log2(rows)))


_INT64_MAX = np.iinfo(np.int64).max
_DOCUMENT_MARGIN = 1 << 16  # bytes a root document may grow by between creation and close


def encoder_threads_for(target_gbps: float | None, requested: int | None) -> int:
    if requested is not None:
        if (
            isinstance(requested, bool)
            or not isinstance(requested, int)
            or not 1 <= requested <= 256
        ):
            raise ConfigError(
                f"encoder_threads must be an integer in [1, 256] or None; got {requested!r}"
            )
        return requested
    cores = os.cpu_count() or 1
    if target_gbps is None:
        return cores
    return max(1, min(cores, math.ceil(target_gbps / PER_THREAD_GBPS)))


class _Lease:
    """Counts the chunks encoded from one lent block of rows; calls ``release`` once, when
    the last is done (the lending call holds one count of its own until it returns)."""

    def __init__(self, release: Callable[[], None]) -> None:
        self._release = release
        self._count = 1
        self._lock = threading.Lock()

    def hold(self) -> None:
        with self._lock:
            self._count += 1

    def drop(self) -> None:
        with self._lock:
            self._count -= 1
            done = self._count == 0
        if done:
            self._release()


@dataclass
class _ArrayState:
    decl: ArrayDecl
    buffer: np.ndarray | None = None
    fill: int = 0
    chunk_index: int = 0  # index of the chunk the buffer will become
    rows: int = 0  # rows appended (accepted from the producer)
    done: set[int] = field(default_factory=set)  # full chunks written out of order
    full_done: int = 0  # contiguous full chunks on disk
    durable: int = 0  # contiguous rows on disk
    stored_bytes: int = 0  # bytes of the frames on disk
    # (index, bytes) of the last frame stored for a partial chunk (a commit's tail): the
    # one chunk whose frame is replaced later. A dict of every frame's size grew with the
    # capture (tens of millions of entries for a billion rows).
    tail: tuple[int, int] | None = None


@dataclass(frozen=True)
class WriterStats:
    rows: int  # committed rows
    raw_bytes: int  # bytes of the committed rows as stored (uncompressed), all arrays
    stored_bytes: int  # bytes of the frames on disk, all arrays
    activation_raw_bytes: int  # raw bytes of the committed rows, sites only
    seconds: float
    stall_seconds: float
    stall_events: int
    peak_buffered_bytes: int
    chunks_written: int
    encoder_threads: int
    chunk_rows: int

    @property
    def compression_ratio(self) -> float:
        return self.raw_bytes / self.stored_bytes if self.stored_bytes else float("nan")

    @property
    def gbps(self) -> float:
        return self.raw_bytes / self.seconds / 1e9 if self.seconds > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "raw_bytes": self.raw_bytes,
            "stored_bytes": self.stored_bytes,
            "activation_raw_bytes": self.activation_raw_bytes,
            "compression_ratio": self.compression_ratio,
            "seconds": self.seconds,
            "gbps": self.gbps,
            "stall_seconds": self.stall_seconds,
            "stall_events": self.stall_events,
            "peak_buffered_bytes": self.peak_buffered_bytes,
            "chunks_written": self.chunks_written,
            "encoder_threads": self.encoder_threads,
            "chunk_rows": self.chunk_rows,
        }


class _PathLock:
    """An exclusive ``flock`` on ``<path>.lock`` beside the capture; released by the OS if
    the process dies, so a crashed writer never blocks the next one."""

    def __init__(self, path: Path) -> None:
        import fcntl

        self.lock_path = path.with_name(path.name + ".lock")
        # A reader asking whether a writer is live holds a shared lock for microseconds
        # (reader.writer_live): a lock refused for that long is retried.
        deadline = time.monotonic() + 0.5
        while True:
            self._fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(self._fd)
                if time.monotonic() < deadline:
                    time.sleep(0.01)
                    continue
                raise CaptureLockedError(
                    f"another writer holds {str(path)!r} (lock file {str(self.lock_path)!r}); "
                    "two writers on one capture are refused"
                ) from None
            # The holder unlinks the lock file on release: if we locked a file that is no
            # longer the one at lock_path, a third writer may lock the new one. Retry.
            try:
                if os.stat(self.lock_path).st_ino == os.fstat(self._fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(self._fd)

    def release(self) -> None:
        if self._fd < 0:
            return
        try:
            self.lock_path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)  # closing drops the flock
            self._fd = -1


class CaptureWriter:
    """Write an llminstr capture (format 1.0) to ``path``.

    Declare every site up front; then, in any order and any batch sizes, append rows with
    :meth:`write_tokens` and :meth:`write_site` (or both at once with :meth:`append`).
    Row ``i`` of each array must describe the same token. :meth:`commit` makes every row
    that all arrays hold visible to readers; :meth:`close` commits and marks the capture
    ``complete`` (or ``aborted``). Used as a context manager, an exception in the block
    closes the capture as ``aborted`` and propagates.

    ``memory_budget_bytes`` (or a shared ``budget``) caps the bytes held in chunk buffers
    and frames in flight; a producer that would exceed it blocks until the encoders catch
    up. An error in a worker thread is raised, as :class:`WriterFailedError` with the
    original as its cause, from the next producer call.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        sites: Sequence[SiteInfo],
        *,
        compression: Literal["lz4", "zstd"] | None = "lz4",
        compression_level: int | None = None,
        checksum: bool = True,
        chunk_rows: int | None = None,
        memory_budget_bytes: int | None = None,
        budget: MemoryBudget | None = None,
        encoder_threads: int | None = None,
        target_throughput_gbps: float | None = None,
        commit_interval_s: float = 10.0,
        backend: Literal["zarr", "hdf5"] | None = None,
        overwrite: bool = False,
        model: Mapping[str, Any] | None = None,
        capture_config: Mapping[str, Any] | None = None,
        extra_token_columns: Sequence[str] | Mapping[str, str] = (),
        fsync: bool = False,
    ) -> None:
        from llminstr import __version__

        self.path = Path(path)
        self.backend_name = backend_for_path(self.path, backend)
        sites = list(sites)
        if not sites:
            raise ConfigError("a capture needs at least one site; got none")
        names = [s.name for s in sites]
        if len(set(names)) != len(names):
            dupes = sorted({n for n in names if names.count(n) > 1})
            raise ConfigError(f"site names must be unique; repeated: {dupes}")
        # HDF5 frames go through the HDF5 filter pipeline on read, which knows no CRC32C
        # trailer: HDF5 captures carry no per-chunk checksum (recorded as null).
        self.codec_config = CodecConfig(
            compression, compression_level, checksum and self.backend_name == "zarr"
        )
        self._codec = ChunkCodec(self.codec_config)
        token_cols = [c for c, _ in TOKEN_COLUMNS]
        if isinstance(extra_token_columns, str):
            raise ConfigError(
                "extra_token_columns must be a list of column names or a mapping of name to "
                f"description, not one string ({extra_token_columns!r})"
            )
        descriptions: dict[str, str] = {}
        for extra in extra_token_columns:
            check_name(extra)
            if extra in token_cols:
                raise ConfigError(f"token column {extra!r} is declared twice")
            token_cols.append(extra)
            if isinstance(extra_token_columns, Mapping):
                text = extra_token_columns[extra]
                if not isinstance(text, str):
                    raise ConfigError(
                        f"the description of token column {extra!r} must be a string; got "
                        f"{type(text).__name__}"
                    )
                descriptions[extra] = text
        if budget is None:
            budget = MemoryBudget(1 << 30 if memory_budget_bytes is None else memory_budget_bytes)
        self.budget = budget
        row_bytes = [s.row_bytes for s in sites] + [8] * len(token_cols)
        if chunk_rows is None:
            chunk_rows = auto_chunk_rows(row_bytes, budget.limit)
        if (
            isinstance(chunk_rows, bool)
            or not isinstance(chunk_rows, int)
            or not 1 <= chunk_rows <= MAX_CHUNK_ROWS
        ):
            raise ConfigError(
                f"chunk_rows must be an integer in [1, {MAX_CHUNK_ROWS}]; got {chunk_rows!r}"
            )
        self.chunk_rows = chunk_rows
        widest = max(row_bytes) * chunk_rows
        # Blosc1 compresses at most 2**31 - 1 - 16 bytes (its MAX_BUFFERSIZE)
        limit = MAX_CHUNK_BYTES if self.codec_config.cname is None else MAX_BLOSC_CHUNK_BYTES
        if widest > limit:
            raise ConfigError(
                f"a chunk of {chunk_rows} rows of the widest site is {widest} bytes; the limit "
                f"is {limit}. Lower chunk_rows."
            )
        # One buffer per array, plus room for the widest chunk and its frame in flight.
        floor = sum(row_bytes) * chunk_rows + 2 * self._codec.frame_bound(widest) + widest
        self.floor_bytes = floor  # the least budget the writer needs to make progress
        if floor > budget.limit:
            raise ConfigError(
                f"memory budget of {budget.limit / 1e9:.3g} GB is too small for {len(sites)} sites "
                f"with chunk_rows={chunk_rows}: at least {floor / 1e9:.3g} GB is needed. Raise "
                "max_memory_gb or lower chunk_rows."
            )
        self.encoder_threads = encoder_threads_for(target_throughput_gbps, encoder_threads)
        self.commit_interval_s = float(commit_interval_s)
        self.sites = sites
        self._site_by_name = {s.name: s for s in sites}

        arrays: list[ArrayDecl] = [
            ArrayDecl(
                TOKENS_GROUP,
                col,
                "int64",
                (),
                chunk_rows,
                token_document(col, self.codec_config, chunk_rows, descriptions.get(col)),
            )
            for col in token_cols
        ]
        arrays += [
            ArrayDecl(
                ACTIVATIONS_GROUP,
                s.name,
                s.storage_dtype,
                s.feature_shape,
                chunk_rows,
                site_document(s, self.codec_config, chunk_rows),
            )
            for s in sites
        ]
        self._states = {a.key: _ArrayState(a) for a in arrays}
        self._token_keys = [f"{TOKENS_GROUP}/{c}" for c in token_cols]
        self.token_columns = token_cols
        self._root = root_document(
            backend=self.backend_name,
            sites=sites,
            token_columns=token_cols,
            chunk_rows=chunk_rows,
            codec=self.codec_config,
            model=dict(model) if model is not None else None,
            capture_config=dict(capture_config) if capture_config is not None else None,
            library_version=__version__,
        )
        # Section 9: no document above 16 MiB (readers refuse it). The root grows a little
        # as it is published (counts, timestamps, an error message): keep a margin.
        for what, doc in [("root", self._root), *((a.key, a.document) for a in arrays)]:
            size = len(json.dumps(doc, allow_nan=False).encode("utf-8"))
            if size > MAX_DOCUMENT_BYTES - _DOCUMENT_MARGIN:
                raise ConfigError(
                    f"the {what} metadata document would be {size} bytes, above the format's "
                    f"{MAX_DOCUMENT_BYTES}-byte limit (less a {_DOCUMENT_MARGIN}-byte margin): "
                    "pass a smaller model description or capture_config"
                )

        if self.path.exists() and not overwrite:
            raise CaptureExistsError(
                f"{str(self.path)!r} already exists; pass overwrite=True to replace it"
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = _PathLock(self.path)
        self._backend: StoreBackend
        try:
            if self.path.exists():
                if not overwrite:  # created while we waited for the lock
                    raise CaptureExistsError(
                        f"{str(self.path)!r} already exists; pass overwrite=True to replace it"
                    )
                _remove_capture(self.path)
            self._backend = (
                ZarrBackend(self.path, fsync=fsync)
                if self.backend_name == "zarr"
                else HDF5Backend(self.path, fsync=fsync)
            )
            self._backend.create(self._root, arrays, self.codec_config)
        except BaseException as exc:
            backend = getattr(self, "_backend", None)
            if backend is not None:
                backend.abandon()
                # A half-made capture (no root document: a full disk, say) is no capture:
                # left behind, it would make overwrite=True refuse the path.
                backend.discard()
            self._lock.release()
            if isinstance(exc, OSError) and not isinstance(exc, LlminstrError):
                try:
                    named = type(exc)(
                        exc.errno, f"cannot create the capture {str(self.path)!r}: {exc}"
                    )
                except TypeError:
                    named = OSError(
                        exc.errno, f"cannot create the capture {str(self.path)!r}: {exc}"
                    )
                raise named from exc
            raise

        self._pool_lock = threading.Lock()
        self._pool: dict[tuple[tuple[int, ...], str], list[np.ndarray]] = {}
        self._pooled_bytes = 0
        # Pooled buffers stay inside the budget and are reclaimed the moment anyone would
        # wait for memory, so the pool may hold up to half of it.
        self._pool_limit = budget.limit // 2
        self._lent: dict[int, _Lease] = {}  # id of a lent chunk view -> its lease
        budget.add_reclaimer(self._reclaim)
        self._executor = ThreadPoolExecutor(
            self.encoder_threads, thread_name_prefix="llminstr-encode"
        )
        # Full chunks waiting for (or in) encoding: one per array (all arrays fill their
        # chunks in the same forward pass, a burst the queue should absorb) plus
        # QUEUED_CHUNKS_PER_THREAD per encoder.
        self.queue_chunks = len(self._states) + QUEUED_CHUNKS_PER_THREAD * self.encoder_threads
        self._queue_slots = threading.Semaphore(self.queue_chunks)
        self._producer_lock = threading.RLock()
        self._state_lock = threading.Lock()
        self._publish_lock = threading.Lock()
        self._pending: set[Future[None]] = set()
        self._tails_in_flight = False  # see _flush_tails
        self._error: BaseException | None = None
        self._closed = False
        self._published_rows = 0
        self._last_publish = time.monotonic()
        self._last_tail_commit = time.monotonic()
        self._started = time.perf_counter()
        self._finished: float | None = None
        self._chunks_written = 0
        self._finalizer = weakref.finalize(self, _emergency_close, self._executor, self._lock)

    # ------------------------------------------------------------------ producer API
    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def committed_rows(self) -> int:
        return self._published_rows

    @property
    def status(self) -> str:
        return str(self._root["status"])

    def rows_appended(self, name: str | None = None) -> int:
        """Rows accepted so far for one site / token column, or the aligned minimum."""
        if name is None:
            return min(s.rows for s in self._states.values())
        return self._state(name).rows

    def _state(self, name: str) -> _ArrayState:
        state = self._states.get(f"{ACTIVATIONS_GROUP}/{name}") or self._states.get(
            f"{TOKENS_GROUP}/{name}"
        )
        if state is None:
            raise SiteNotFoundError(
                f"no site or token column named {name!r}; sites: {[s.name for s in self.sites]}"
            )
        return state

    def _check_open(self) -> None:
        if self._error is not None:
            raise WriterFailedError(
                f"the writer of {str(self.path)!r} failed: {self._error!r}"
            ) from self._error
        if self._closed:
            raise WriterClosedError(f"the writer of {str(self.path)!r} is closed")

    def write_site(self, name: str, rows: Any) -> None:
        """Append rows of site ``name``: an array of shape ``(n, *feature_shape)``.

        float32/float16 arrays must match the site's dtype; a bfloat16 site takes an
        ``ml_dtypes.bfloat16`` array or its raw ``uint16`` bits. The data are copied before
        the call returns, so the caller may reuse its buffer.
        """
        arr = self._site_rows(name, rows)
        self._append(self._states[f"{ACTIVATIONS_GROUP}/{name}"], arr)

    def write_site_lent(self, name: str, rows: Any, release: Callable[[], None]) -> None:
        """Like :meth:`write_site`, but whole chunks of ``rows`` that start on a chunk
        boundary are encoded straight from the caller's memory instead of being copied.
        The caller keeps ``rows`` unchanged until ``release()`` is called, exactly once:
        when the last lent chunk is encoded, failed or dropped (at once if none was lent).
        The rows' bytes are not counted in the budget here: the lender counts them."""
        lease = _Lease(release)
        try:
            arr = self._site_rows(name, rows)
            self._append(self._states[f"{ACTIVATIONS_GROUP}/{name}"], arr, lease)
        finally:
            lease.drop()  # the call's own hold

    def _site_rows(self, name: str, rows: Any) -> np.ndarray:
        """Check rows of one site; return them as an array of the storage dtype (no copy)."""
        site = self._site_by_name.get(name)
        if site is None:
            raise SiteNotFoundError(
                f"no site named {name!r} in this capture; declared: {[s.name for s in self.sites]}"
            )
        arr = np.asarray(rows)
        if arr.shape[1:] != site.feature_shape or arr.ndim != len(site.feature_shape) + 1:
            raise FormatError(
                f"site {name!r} expects rows of shape (n, {', '.join(map(str, site.feature_shape))}); "
                f"got {arr.shape}"
            )
        storage = np.dtype(site.storage_dtype)
        if arr.dtype != storage:
            if site.dtype == "bfloat16" and arr.dtype.name == "bfloat16":
                arr = arr.view(np.uint16)
            else:
                raise FormatError(
                    f"site {name!r} stores {site.dtype}; got an array of dtype {arr.dtype}. "
                    "Cast before writing."
                )
        return arr

    def write_tokens(self, columns: Mapping[str, Any]) -> None:
        """Append rows of the token columns: every declared column, same length, integers."""
        arrays = self._token_rows(columns)
        with self._producer_lock:
            for c in self.token_columns:
                self._append(self._states[f"{TOKENS_GROUP}/{c}"], arrays[c])

    def _token_rows(self, columns: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Check one block of token columns; return them as little-endian int64 arrays."""
        missing = [c for c in self.token_columns if c not in columns]
        unknown = [c for c in columns if c not in self.token_columns]
        if missing or unknown:
            raise FormatError(
                f"write_tokens needs exactly the columns {self.token_columns}; "
                f"missing {missing}, unknown {unknown}"
            )
        arrays = {c: np.asarray(columns[c]) for c in self.token_columns}
        lengths = {c: a.shape for c, a in arrays.items()}
        first = arrays[self.token_columns[0]]
        if any(a.ndim != 1 or a.shape != first.shape for a in arrays.values()):
            raise FormatError(
                f"token columns must be 1-D and of equal length; got shapes {lengths}"
            )
        for c, a in arrays.items():
            if a.size and not np.issubdtype(a.dtype, np.integer):
                raise FormatError(f"token column {c!r} must hold integers; got dtype {a.dtype}")
            # uint64 values past int64 would wrap to negative ids without a word
            if a.size and a.dtype.kind == "u" and a.dtype.itemsize == 8 and a.max() > _INT64_MAX:
                raise FormatError(
                    f"token column {c!r} holds {int(a.max())}, beyond int64 (the stored type)"
                )
        return {c: a.astype("<i8", copy=False) for c, a in arrays.items()}

    def append(self, tokens: Mapping[str, Any], activations: Mapping[str, Any]) -> None:
        """Append one aligned block: token columns plus every site, all with ``n`` rows.

        The whole block is checked first: a block that is refused appends nothing."""
        token_rows = self._token_rows(tokens)
        site_rows = {name: self._site_rows(name, rows) for name, rows in activations.items()}
        n = {len(a) for a in token_rows.values()} | {len(a) for a in site_rows.values()}
        if len(n) > 1:
            raise FormatError(f"append needs the same number of rows everywhere; got {sorted(n)}")
        missing = [s.name for s in self.sites if s.name not in activations]
        if missing:
            raise FormatError(f"append needs every site; missing {missing}")
        with self._producer_lock:
            for c in self.token_columns:
                self._append(self._states[f"{TOKENS_GROUP}/{c}"], token_rows[c])
            for name, arr in site_rows.items():
                self._append(self._states[f"{ACTIVATIONS_GROUP}/{name}"], arr)

    def _append(self, state: _ArrayState, data: np.ndarray, lease: _Lease | None = None) -> None:
        with self._producer_lock:
            self._check_open()
            if self._tails_in_flight:  # a commit interrupted while its tails were written
                self._drain()
                self._tails_in_flight = False
            n = data.shape[0]
            offset = 0
            chunk_rows = self.chunk_rows
            while offset < n:
                if lease is not None and state.fill == 0 and n - offset >= chunk_rows:
                    # A whole chunk of lent rows: encode it where it lies.
                    index = state.chunk_index
                    state.chunk_index += 1
                    state.rows += chunk_rows
                    view = data[offset : offset + chunk_rows]
                    offset += chunk_rows
                    lease.hold()
                    self._lent[id(view)] = lease
                    self._submit(state, index, view, chunk_rows, full=True)
                    continue
                if state.buffer is None:
                    state.buffer = self._new_buffer(state.decl)
                take = min(n - offset, chunk_rows - state.fill)
                state.buffer[state.fill : state.fill + take] = data[offset : offset + take]
                state.fill += take
                state.rows += take
                offset += take
                if state.fill == chunk_rows:
                    buf, state.buffer = state.buffer, None
                    index = state.chunk_index
                    state.chunk_index += 1
                    state.fill = 0
                    self._submit(state, index, buf, chunk_rows, full=True)
            if time.monotonic() - self._last_tail_commit >= self.commit_interval_s:
                self.commit()

    def _submit(
        self, state: _ArrayState, index: int, buf: np.ndarray, nrows: int, *, full: bool
    ) -> None:
        # Full chunks take a queue slot (see QUEUED_CHUNKS_PER_THREAD). Tails, submitted by
        # commit and close, which wait for every frame anyway, do not.
        slot = full
        if slot and not self._queue_slots.acquire(blocking=False):
            waited = time.perf_counter()
            while not self._queue_slots.acquire(timeout=0.5):
                self._check_open()
            self.budget.add_stall(time.perf_counter() - waited, events=1)
        reserve = self._codec.frame_bound(buf.nbytes)
        try:
            self.budget.acquire(reserve)
        except BaseException:
            if slot:
                self._queue_slots.release()
            self._drop(buf)
            raise
        try:
            future = self._executor.submit(
                self._encode_and_write, state, index, buf, nrows, full, reserve, slot
            )
        except BaseException:
            if slot:
                self._queue_slots.release()
            self.budget.release(reserve)
            self._drop(buf)
            raise
        with self._state_lock:
            self._pending.add(future)
        future.add_done_callback(self._forget)
        future.add_done_callback(functools.partial(self._if_cancelled, buf, reserve, slot))

    def _if_cancelled(
        self, buf: np.ndarray, reserve: int, slot: bool, future: Future[None]
    ) -> None:
        """An encode task cancelled before it ran (an interrupted close) gives back what
        :meth:`_submit` took for it: its queue slot, its frame reserve, its buffer or lease."""
        if not future.cancelled():
            return
        if slot:
            self._queue_slots.release()
        self.budget.release(reserve)
        self._drop(buf)

    def _forget(self, future: Future[None]) -> None:
        with self._state_lock:
            self._pending.discard(future)

    # ------------------------------------------------------------------ workers
    def _encode_and_write(
        self,
        state: _ArrayState,
        index: int,
        buf: np.ndarray,
        nrows: int,
        full: bool,
        reserve: int,
        slot: bool,
    ) -> None:
        raw = buf.nbytes
        frame_bytes = 0
        try:
            if self._error is not None:
                return
            parts = self._codec.encode(buf)
            if slot:
                self._queue_slots.release()
                slot = False
            frame_bytes = sum(memoryview(p).nbytes for p in parts)
            if self.codec_config.cname is not None:
                self._recycle(buf, pool=full)  # the raw chunk is not needed once compressed
                raw = 0
            extent = index * self.chunk_rows + nrows
            written = self._backend.write_chunk_async(state.decl, index, parts, extent)
            if written is not None:
                del parts
                # Finish when the write does; until then the bytes stay reserved.
                done: Future[None] = Future()
                with self._state_lock:
                    self._pending.add(done)
                done.add_done_callback(self._forget)
                written.add_done_callback(
                    functools.partial(
                        self._write_done,
                        done,
                        state,
                        index,
                        nrows,
                        full,
                        frame_bytes,
                        buf if raw else None,
                        reserve,
                    )
                )
                raw = reserve = 0
                return
            self._backend.write_chunk(state.decl, index, parts, extent)
            del parts
            if raw:
                self._recycle(buf, pool=full)
                raw = 0
            self._chunk_done(state, index, nrows, full, frame_bytes)
        except BaseException as exc:  # reported to the producer, never swallowed
            self._fail(exc)
        finally:
            if slot:
                self._queue_slots.release()
            self.budget.release(reserve)
            if raw:
                self._drop(buf)

    def _write_done(
        self,
        done: Future[None],
        state: _ArrayState,
        index: int,
        nrows: int,
        full: bool,
        frame_bytes: int,
        buf: np.ndarray | None,
        reserve: int,
        written: Future[None],
    ) -> None:
        try:
            written.result()
            # This runs on the backend's own thread, which a publish would wait on: the
            # producer's periodic commit publishes these rows instead.
            self._chunk_done(state, index, nrows, full, frame_bytes, may_publish=False)
        except BaseException as exc:  # reported to the producer, never swallowed
            self._fail(exc)
        finally:
            if buf is not None:
                self._recycle(buf, pool=full)
            self.budget.release(reserve)
            done.set_result(None)

    # Chunk buffers are reused: a fresh numpy buffer of several MiB is a new mmap, and the
    # producer's first copy into it page-faults on every page (measured ~4x a warm copy).
    # Pooled buffers keep their budget reservation; the budget takes them back through
    # the reclaimer whenever someone would otherwise wait.
    def _new_buffer(self, decl: ArrayDecl) -> np.ndarray:
        key = (decl.chunk_shape, decl.storage_dtype)
        with self._pool_lock:
            free = self._pool.get(key)
            if free:
                buf = free.pop()
                self._pooled_bytes -= buf.nbytes
                return buf
        self.budget.acquire(decl.chunk_bytes)
        return np.empty(decl.chunk_shape, dtype=decl.storage_dtype)

    def _drop(self, buf: np.ndarray) -> None:
        """Give up a chunk buffer without pooling it: its bytes, or its lease."""
        lease = self._lent.pop(id(buf), None)
        if lease is not None:
            lease.drop()
        else:
            self.budget.release(buf.nbytes)

    def _recycle(self, buf: np.ndarray, *, pool: bool = True) -> None:
        """Done with a chunk buffer: back to its lender, into the pool, or released.
        ``pool=False`` for a commit's zero-padded tail: pooled, the tails of every commit
        filled the pool up to its limit (half the budget) with buffers no full chunk
        needed, an audit found."""
        if not pool:
            self._drop(buf)
            return
        lease = self._lent.pop(id(buf), None)
        if lease is not None:  # lent memory goes back to its lender, never to the pool
            lease.drop()
            return
        with self._pool_lock:
            if (
                not self._closed
                and not self.budget.has_waiters
                and self._pooled_bytes + buf.nbytes <= self._pool_limit
            ):
                self._pool.setdefault((buf.shape, buf.dtype.name), []).append(buf)
                self._pooled_bytes += buf.nbytes
                return
        self.budget.release(buf.nbytes)

    def _reclaim(self, nbytes: int) -> int:
        freed = 0
        with self._pool_lock:
            for free in self._pool.values():
                while free and freed < nbytes:
                    freed += free.pop().nbytes
            self._pooled_bytes -= freed
        self.budget.release(freed)
        return freed

    def _chunk_done(
        self,
        state: _ArrayState,
        index: int,
        nrows: int,
        full: bool,
        frame_bytes: int,
        *,
        may_publish: bool = True,
    ) -> None:
        with self._state_lock:
            self._chunks_written += 1
            if state.tail is not None and state.tail[0] == index:
                state.stored_bytes -= state.tail[1]  # the tail's frame was replaced
                state.tail = None
            state.stored_bytes += frame_bytes
            if full:
                state.done.add(index)
                while state.full_done in state.done:
                    state.done.discard(state.full_done)
                    state.full_done += 1
                state.durable = max(state.durable, state.full_done * self.chunk_rows)
            else:
                state.tail = (index, frame_bytes)
                if index == state.full_done:
                    state.durable = max(state.durable, index * self.chunk_rows + nrows)
        if may_publish and time.monotonic() - self._last_publish >= self.commit_interval_s:
            self._publish()

    def _fail(self, exc: BaseException) -> None:
        with self._state_lock:
            if self._error is None:
                self._error = exc
        self.budget.poison(exc)

    def _publish(self, status: str | None = None, error: str | None = None) -> None:
        with self._publish_lock:
            with self._state_lock:
                rows = min(s.durable for s in self._states.values())
            rows = max(rows, self._published_rows)
            if status is None and rows == self._published_rows:
                self._last_publish = time.monotonic()
                return
            # A new document, adopted only once published: a failed publish (a transient
            # I/O error) leaves commit_seq and status as the disk has them, so the next
            # publish still grows commit_seq by exactly 1 (section 3.2).
            root = copy.deepcopy(self._root)
            root["committed_rows"] = rows
            root["commit_seq"] = int(root["commit_seq"]) + 1
            root["updated"] = utc_now()
            if status is not None:
                root["status"] = status
                root["closed"] = root["updated"]
                root["error"] = error
            if status is not None:
                self._backend.close(root)
            else:
                self._backend.publish(root)
            self._root = root
            self._published_rows = rows
            self._last_publish = time.monotonic()

    def _drain(self) -> None:
        while True:
            with self._state_lock:
                pending = list(self._pending)
            if not pending:
                return
            for f in pending:
                f.result()

    # ------------------------------------------------------------------ commit / close
    def commit(self) -> int:
        """Write every partial chunk, wait for all frames, publish. Returns committed rows."""
        with self._producer_lock:
            self._check_open()
            self._flush_tails()
            self._check_open()
            self._publish()
            self._last_tail_commit = time.monotonic()
            return self._published_rows

    def _flush_tails(self) -> None:
        self._drain()
        # Until the tails below are on disk, no frame may go out for their chunks: a Ctrl-C
        # that stops the drain below leaves this set, and the next append drains first.
        self._tails_in_flight = True
        for state in self._states.values():
            if state.fill and state.buffer is not None:
                # np.zeros maps untouched pages to the kernel's zero page: the padding of a
                # short tail costs neither a memset nor page faults (a capture's first commit
                # pads every array's first chunk).
                self.budget.acquire(state.decl.chunk_bytes)
                tail = np.zeros(state.decl.chunk_shape, dtype=state.decl.storage_dtype)
                tail[: state.fill] = state.buffer[: state.fill]
                self._submit(state, state.chunk_index, tail, state.fill, full=False)
        self._drain()
        self._tails_in_flight = False

    def close(
        self, status: Literal["complete", "aborted"] = "complete", error: str | None = None
    ) -> None:
        """Flush, commit and mark the capture ``status``. Idempotent.

        Closing as ``complete`` requires every array to hold the same number of rows; if
        they differ, the aligned rows are kept, the capture is marked ``aborted`` and
        :class:`FormatError` is raised. ``status`` and ``error`` are checked before
        anything is written (a document the schema refuses would make the capture
        unreadable).
        """
        if status not in ("complete", "aborted"):
            raise ConfigError(f"status must be 'complete' or 'aborted'; got {status!r}")
        if error is not None and not isinstance(error, str):
            raise ConfigError(
                f"error must be a message (str) or None; got {type(error).__name__} "
                "(abort() also takes the exception itself)"
            )
        with self._producer_lock:
            if self._closed:
                return
            misaligned: str | None = None
            # Ctrl-C (or SystemExit) while closing: stop waiting, publish what is durable
            # as aborted, and re-raise it as it is: the writer itself did not fail.
            interrupt: BaseException | None = None
            try:
                if self._error is None:
                    try:
                        self._flush_tails()
                    except (KeyboardInterrupt, SystemExit) as exc:
                        interrupt = exc
                        status, error = "aborted", f"interrupted while closing: {exc!r}"
                        # Stop waiting for what has not started; what is being encoded or
                        # written finishes and is published below (a second interrupt
                        # here still reaches the cleanup in ``finally``).
                        self._executor.shutdown(wait=False, cancel_futures=True)
                        with self._state_lock:
                            running = list(self._pending)
                        wait_futures(running)
                    except BaseException as exc:
                        self._fail(exc)
                counts = {s.decl.key: s.rows for s in self._states.values()}
                if status == "complete" and len(set(counts.values())) > 1:
                    misaligned = f"arrays hold different row counts at close: {counts}"
                    status, error = "aborted", misaligned
                if self._error is not None:
                    status = "aborted"
                    error = error or f"writer failed: {self._error!r}"
                try:
                    self._publish(status=status, error=error)
                except (KeyboardInterrupt, SystemExit) as exc:
                    interrupt = interrupt or exc
                except BaseException as exc:
                    self._fail(exc)
            finally:
                self._closed = True
                self._finished = time.perf_counter()
                # Each step runs even if the one before is interrupted (a second Ctrl-C):
                # the path's lock must not outlive the writer.
                try:
                    self._executor.shutdown(wait=True)
                finally:
                    try:
                        self._backend.abandon()
                    finally:
                        try:
                            self._release_buffers()
                        finally:
                            self._lock.release()
                            self._finalizer.detach()
            if interrupt is not None:
                raise interrupt
            if self._error is not None:
                raise WriterFailedError(
                    f"the writer of {str(self.path)!r} failed; rows up to the last commit "
                    f"({self._published_rows}) are kept: {self._error!r}"
                ) from self._error
            if misaligned is not None:
                raise FormatError(misaligned + "; the capture was closed as 'aborted'")

    def abort(self, error: str | BaseException | None = None) -> None:
        """Close as ``aborted``, keeping every row that all arrays hold. ``error`` (a message
        or the exception itself) is recorded in the capture."""
        if isinstance(error, BaseException):
            error = f"{type(error).__name__}: {error}"
        self.close("aborted", error)

    def _release_buffers(self) -> None:
        self._reclaim(self._pooled_bytes)
        for state in self._states.values():
            if state.buffer is not None:
                self.budget.release(state.decl.chunk_bytes)
                state.buffer = None

    def __enter__(self) -> CaptureWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.close("complete")
        else:
            # The exception from the block is the one the caller needs; it propagates.
            with contextlib.suppress(WriterFailedError):
                self.close("aborted", f"{type(exc).__name__}: {exc}")

    # ------------------------------------------------------------------ stats
    def stats(self) -> WriterStats:
        with self._state_lock:
            stored = sum(s.stored_bytes for s in self._states.values())
        rows = self._published_rows
        raw = sum(rows * s.decl.chunk_bytes // self.chunk_rows for s in self._states.values())
        act_raw = sum(
            rows * s.decl.chunk_bytes // self.chunk_rows
            for s in self._states.values()
            if s.decl.group == ACTIVATIONS_GROUP
        )
        end = self._finished if self._finished is not None else time.perf_counter()
        return WriterStats(
            rows=rows,
            raw_bytes=raw,
            stored_bytes=stored,
            activation_raw_bytes=act_raw,
            seconds=end - self._started,
            stall_seconds=self.budget.stall_seconds,
            stall_events=self.budget.stall_events,
            peak_buffered_bytes=self.budget.peak,
            chunks_written=self._chunks_written,
            encoder_threads=self.encoder_threads,
            chunk_rows=self.chunk_rows,
        )


def _emergency_close(pool: ThreadPoolExecutor, lock: _PathLock) -> None:
    """Last resort when a writer is garbage collected unclosed: stop threads, drop the lock.
    The capture keeps its last commit (status stays ``in_progress``, like a crash)."""
    pool.shutdown(wait=False, cancel_futures=True)
    lock.release()


def _remove_capture(path: Path) -> None:
    import shutil

    if path.is_dir():
        if not (path / "zarr.json").exists():
            raise CaptureExistsError(
                f"refusing to overwrite {str(path)!r}: it is a directory that is not a Zarr store"
            )
        shutil.rmtree(path)
    else:
        path.unlink()
