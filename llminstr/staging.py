"""Device -> host staging for the capture engine: site outputs on a GPU reach the writer
through pinned host *arenas*, without ever synchronising the model's streams.

How a site output travels (see docs/decisions.md, "CUDA staging"):

- **Small outputs** (at most :data:`INLINE_BYTES` per pass; every decode step of
  ``generate``) are copied with one ``non_blocking`` copy on the stream that produced them,
  straight into the site's current arena, behind the rows of earlier passes. Being on the
  producing stream, the copy reads the output before any later in-place change, so no
  snapshot, event or stream switch is needed per site.
- **Large outputs** (a long prefill) are first snapshotted on the producing stream (a
  device-to-device clone), then copied on a dedicated copy stream that waits on an event,
  so the model keeps computing while the bytes cross the bus.
- Copies accumulate into a *batch* (several passes of small steps, or one large pass).
  A batch goes to the drain thread with one event per stream it used; the drain thread
  waits for those events only, then hands each site's rows to the writer in as few calls
  as possible (rows of consecutive passes lie next to each other in an arena).

Arenas are page-locked host buffers of one size class, pooled, and counted against the
capture's memory budget from allocation to release. They are ``mmap`` pages registered
with ``cudaHostRegister`` (so releasing one returns the memory to the system; torch's
caching host allocator would keep it) and fall back to torch's pinned allocator where
registration is unavailable. The pool never holds more than the budget leaves once the
writer's own minimum is set aside, so the writer can always make progress and the two
never wait on each other.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import mmap
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from llminstr.errors import FormatError, LlminstrError

if TYPE_CHECKING:
    from llminstr.budget import MemoryBudget
    from llminstr.capture import PassPlan

log = logging.getLogger("llminstr")

#: A site output of at most this many bytes per pass is copied on its producing stream.
INLINE_BYTES = 1 << 20
#: Copy small outputs at the end of their pass, on the copy stream, holding a reference
#: until then, instead of at once on the producing stream (sites whose output the model
#: changes in place, found on the first pass, are still copied at once). Off until it is
#: measured on a GPU: ``benchmarks/gpu_profile.py`` compares both.
DEFER_COPIES = False
#: A batch goes to the drain thread once it holds this many bytes ...
BATCH_BYTES = 4 << 20
#: ... or this many passes ...
BATCH_PASSES = 32
#: ... or is this old (seconds), checked at the end of each pass.
BATCH_SECONDS = 0.1
#: A new arena has room for this many passes like the one that needs it ...
ARENA_PASSES = 2 * BATCH_PASSES
#: ... within these bounds, and at most about 1/4 of the pool's share per site.
MIN_ARENA = 4 << 10
MAX_ARENA = 8 << 20


def _version(tensor: torch.Tensor) -> int | None:
    """The tensor's in-place version counter (None for inference tensors, which have none)."""
    try:
        return int(tensor._version)
    except RuntimeError:
        return None


def _pow2_floor(n: int) -> int:
    return 1 << max(0, int(n).bit_length() - 1)


def _pow2_ceil(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


class DeviceOps:
    """The CUDA calls the stager makes, in one place. Tests substitute a CPU stand-in
    (``tests/test_staging.py``) so the staging logic runs in CI without a GPU."""

    def __init__(self, register: bool = True) -> None:
        self._streams: dict[tuple[int, int], Any] = {}
        raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
        self._raw_stream: Callable[[int], int] | None = raw
        # register=False: arenas from torch's pinned allocator (benchmarks compare both).
        self._register_ok = register

    def handles(self, tensor: torch.Tensor) -> bool:
        return bool(tensor.is_cuda)

    def current_stream(self, device: torch.device) -> Any:
        """The current stream of ``device`` (cached by its raw handle: this runs per site)."""
        index = device.index if device.index is not None else torch.cuda.current_device()
        if self._raw_stream is None:
            return torch.cuda.current_stream(index)
        key = (index, self._raw_stream(index))
        stream = self._streams.get(key)
        if stream is None:
            stream = self._streams[key] = torch.cuda.current_stream(index)
        return stream

    def new_stream(self, device: torch.device) -> Any:
        cuda: Any = torch.cuda
        return cuda.Stream(device=device)

    def record_event(self, stream: Any) -> Any:
        # Blocking: the drain thread sleeps in synchronize() instead of spinning (a
        # spinning waiter competes with the model's thread for the CPU and the driver).
        cuda: Any = torch.cuda
        event = cuda.Event(blocking=True)
        event.record(stream)
        return event

    def use_stream(self, stream: Any) -> contextlib.AbstractContextManager[Any]:
        return torch.cuda.stream(stream)

    def record_stream(self, tensor: torch.Tensor, stream: Any) -> None:
        tensor.record_stream(stream)

    def host_copy(self, src: torch.Tensor) -> torch.Tensor:
        """A non-blocking copy of a small device tensor into pinned host memory."""
        host = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
        host.copy_(src, non_blocking=True)
        return host

    def pinned(self, nbytes: int) -> tuple[np.ndarray, torch.Tensor, Callable[[], None]]:
        """A page-locked host buffer: (numpy view, torch view, release)."""
        if self._register_ok:
            try:
                mem = mmap.mmap(-1, nbytes)
                array = np.frombuffer(mem, dtype=np.uint8)
                ptr = int(array.ctypes.data)
                cuda: Any = torch.cuda
                cudart = cuda.cudart()
                err = cudart.cudaHostRegister(ptr, nbytes, 0)
                if int(err) != 0:
                    raise RuntimeError(f"cudaHostRegister returned {err}")

                def release() -> None:
                    cudart.cudaHostUnregister(ptr)

                tensor = torch.from_numpy(array)
                if not tensor.is_pinned():  # a copy into it would not be asynchronous
                    release()
                    raise RuntimeError("registered memory is not reported as pinned")
                return array, tensor, release
            except Exception as exc:  # an older torch, or a driver that refuses
                self._register_ok = False
                log.debug("pinned arenas fall back to torch's pinned allocator: %r", exc)
        tensor = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        return tensor.numpy(), tensor, lambda: None


@dataclass(eq=False)
class _Arena:
    size: int
    array: np.ndarray  # uint8 view of the pinned bytes
    tensor: torch.Tensor  # the same bytes for torch copies
    release: Callable[[], None]
    fill: int = 0  # bytes written by the producer (model thread)
    # Pieces staged (counted by the model's thread alone, so without a lock) and pieces
    # delivered (counted under the pool lock); the arena is idle once they are equal.
    staged: int = 0
    released: int = 0
    retired: bool = False  # the producer writes no more into it

    views: dict[torch.dtype, torch.Tensor] = field(default_factory=dict)

    def typed(self, dtype: torch.dtype) -> torch.Tensor:
        """The whole arena as a flat tensor of ``dtype`` (cached: this runs per site)."""
        view = self.views.get(dtype)
        if view is None:
            view = self.views[dtype] = self.tensor.view(dtype)
        return view


@dataclass(eq=False, slots=True)
class _Piece:
    """Rows ``[row0, row0 + nrows)`` of one pass of one site, at ``arena[start:...]``."""

    site: int
    arena: _Arena
    start: int
    plan: PassPlan
    row0: int
    nrows: int
    lent: bool = False  # handed to the writer, which releases it when encoded


@dataclass(frozen=True)
class _SiteFormat:
    dtype: torch.dtype
    feature: tuple[int, ...]
    row_bytes: int
    numpy_dtype: np.dtype[Any]
    itemsize: int
    row_elems: int


@dataclass(eq=False)
class _Deferred:
    """A site output held until the end of its pass (DEFER_COPIES)."""

    site: int
    plan: PassPlan
    tensor: torch.Tensor
    rows: int
    fmt: _SiteFormat
    version: int  # the tensor's version counter at the hook
    stream: Any  # the stream that produced it


@dataclass(eq=False)
class _Batch:
    pieces: list[_Piece]
    plans: list[PassPlan]  # passes that ended in this batch: their token rows go with it
    events: list[Any]


@dataclass(eq=False)
class _Pending:
    pieces: list[_Piece] = field(default_factory=list)
    plans: list[PassPlan] = field(default_factory=list)
    streams: dict[Any, Any] = field(default_factory=dict)  # each stream copies were issued on
    last_stream: Any = None
    nbytes: int = 0
    started: float = 0.0


class Delivery(Protocol):
    """What the stager needs from the capture session (called on the drain thread)."""

    def deliver_rows(self, index: int, rows: np.ndarray) -> None: ...

    def deliver_rows_lent(
        self, index: int, rows: np.ndarray, release: Callable[[], None]
    ) -> None: ...

    def deliver_tokens(self, plans: list[PassPlan]) -> None: ...


class CudaStager:
    """Stages site outputs from the device into pinned arenas and delivers them, in
    order, from one drain thread. All public methods run on the model's thread."""

    def __init__(
        self,
        session: Delivery,
        site_names: Sequence[str],
        budget: MemoryBudget,
        ops: DeviceOps | None = None,
    ) -> None:
        self.session = session
        self.ops = ops or DeviceOps()
        self.budget = budget
        self.names = list(site_names)  # for error messages
        self.n_sites = max(1, len(self.names))
        self._formats: list[_SiteFormat | None] = [None] * self.n_sites
        self._current: list[_Arena | None] = [None] * self.n_sites
        self._copy_streams: dict[int, Any] = {}
        # DEFER_COPIES: whether each site's output is changed in place after its hook
        # (None until seen), first-pass outputs to check, and this pass's deferred copies.
        self._volatile: list[bool | None] = [None] * self.n_sites
        self._watch: list[tuple[int, torch.Tensor, int]] = []
        self._deferred: list[_Deferred] = []
        self._lock = threading.Lock()  # the arena pool
        self._free: dict[int, list[_Arena]] = {}
        self._all: set[_Arena] = set()
        self._held = 0  # bytes of arenas allocated (all counted in the budget)
        self.peak_held = 0
        self.set_cap(budget.limit // 2)
        self._pending = _Pending(started=time.perf_counter())
        self._queue: queue.Queue[_Batch | None] = queue.Queue()
        self._error: BaseException | None = None
        self.staged_bytes = 0
        self.batches = 0
        budget.add_reclaimer(self._reclaim)
        self._thread = threading.Thread(target=self._drain, name="llminstr-cuda-drain", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ pool
    def set_cap(self, cap: int) -> None:
        """Most bytes the arenas may hold (the budget less what the writer needs)."""
        cap = max(int(cap), MIN_ARENA)
        share = _pow2_floor(max(1, cap // (4 * self.n_sites)))
        with self._lock:
            self.cap = cap
            self.arena_bytes = min(MAX_ARENA, max(MIN_ARENA, share))
        self._reclaim(1 << 62, above=self.arena_bytes)

    def _reclaim(self, nbytes: int, above: int = 0) -> int:
        """Free idle arenas (up to ``nbytes``, of more than ``above`` bytes each): the
        budget's reclaimer, and the trim after a change of cap."""
        freed: list[_Arena] = []
        with self._lock:
            for size, arenas in self._free.items():
                if size <= above:
                    continue
                while arenas and sum(a.size for a in freed) < nbytes:
                    freed.append(arenas.pop())
        for arena in freed:
            self._destroy(arena)
        return sum(a.size for a in freed)

    def _destroy(self, arena: _Arena) -> None:
        arena.release()
        with self._lock:
            self._all.discard(arena)
            self._held -= arena.size
        self.budget.release(arena.size)

    def _arena(self, min_bytes: int) -> _Arena:
        """An empty arena of at least ``min_bytes``: pooled, newly allocated within the cap
        and the budget, or (after handing the drain what is staged) one given back."""
        size = max(MIN_ARENA, _pow2_ceil(min_bytes))
        while True:
            self._raise_if_failed()
            with self._lock:
                free = self._free.get(size)
                if free:
                    arena = free.pop()
                    arena.fill, arena.retired, arena.staged, arena.released = 0, False, 0, 0
                    return arena
                # Within the cap; and always one arena, so a tiny cap still makes progress.
                room = self._held + size <= self.cap or not self._all
                if room and self.budget.try_acquire(size):
                    self._held += size
                    self.peak_held = max(self.peak_held, self._held)
                    break
            # No arena: free idle ones of other sizes and the writer's pooled buffers,
            # hand the drain thread what is staged, then wait for something to come back.
            if self.budget.reclaim(size) > 0:
                continue
            self._flush()
            failure = self.budget.failure
            if failure is not None:
                raise LlminstrError(f"CUDA staging stopped: {failure!r}") from failure
            start = time.perf_counter()
            self.budget.wait(0.05)
            self.budget.add_stall(time.perf_counter() - start)
        try:
            array, tensor, release = self.ops.pinned(size)
        except BaseException:
            with self._lock:
                self._held -= size
            self.budget.release(size)
            raise
        arena = _Arena(size, array, tensor, release)
        with self._lock:
            self._all.add(arena)
        return arena

    def _give_back(self, arena: _Arena) -> None:
        """Called with the pool lock held once an arena is retired and fully delivered."""
        self._free.setdefault(arena.size, []).append(arena)

    # ------------------------------------------------------------------ producer side
    def stage_inputs(
        self, input_ids: torch.Tensor | None, mask: torch.Tensor | None
    ) -> Callable[[], tuple[np.ndarray | None, np.ndarray | None]]:
        """Copy the pass's token ids and mask to pinned memory on the producing stream;
        return a loader that waits for that copy only."""
        staged: list[torch.Tensor | None] = []
        stream = None
        for t in (input_ids, mask):
            if t is None or not self.ops.handles(t):
                staged.append(None if t is None else t.detach())
                continue
            src = t.detach()
            stream = self.ops.current_stream(src.device)
            staged.append(self.ops.host_copy(src))
        done = self.ops.record_event(stream) if stream is not None else None

        def load() -> tuple[np.ndarray | None, np.ndarray | None]:
            if done is not None:
                done.synchronize()
            ids, m = staged
            return (
                ids.numpy() if ids is not None else None,
                m.numpy() if m is not None else None,
            )

        return load

    def stage(
        self,
        index: int,
        plan: PassPlan,
        tensor: torch.Tensor,
        rows: int,
        feature: tuple[int, ...],
        fresh: bool,
    ) -> None:
        """Stage the device tensor of site ``index`` for ``plan``: ``rows`` rows of shape
        ``feature`` in its leading dimensions. ``fresh``: the tensor is the hook's own (a
        dtype conversion), not the model's. Runs once per site per pass: keep it short."""
        if self._error is not None:
            self._raise_if_failed()
        fmt = self._formats[index]
        if fmt is None or fmt.dtype != tensor.dtype or fmt.feature != feature:
            fmt = self._format(index, tensor.dtype, feature)
        if rows == 0:
            return
        if not tensor.is_contiguous():
            tensor = tensor.contiguous()
        producer = self.ops.current_stream(tensor.device)
        nbytes = rows * fmt.row_bytes
        if nbytes <= INLINE_BYTES:
            if DEFER_COPIES:
                version = _version(tensor)
                if version is not None and (fresh or self._volatile[index] is False):
                    self._deferred.append(
                        _Deferred(index, plan, tensor, rows, fmt, version, producer)
                    )
                    return
                if version is not None and self._volatile[index] is None:
                    self._watch.append((index, tensor, version))
            arena = self._current[index]
            if arena is not None and arena.size - arena.fill >= nbytes:
                # The common case: the whole pass fits behind the rows already there.
                dst = torch.as_strided(
                    arena.typed(fmt.dtype),
                    tensor.shape,
                    tensor.stride(),
                    arena.fill // fmt.itemsize,
                )
                dst.copy_(tensor, non_blocking=True)
                self._add_piece(index, arena, plan, 0, rows, nbytes, producer)
                return
            self._copy_rows(index, plan, tensor.view(rows, *feature), rows, fmt, producer)
            return
        snapshot = tensor.view(rows, *feature) if fresh else tensor.view(rows, *feature).clone()
        ready = self.ops.record_event(producer)
        copy_stream = self._copy_stream(tensor.device)
        with self.ops.use_stream(copy_stream):
            copy_stream.wait_event(ready)
            self._copy_rows(index, plan, snapshot, rows, fmt, copy_stream)
            self.ops.record_stream(snapshot, copy_stream)

    def _format(self, index: int, dtype: torch.dtype, feature: tuple[int, ...]) -> _SiteFormat:
        old = self._formats[index]
        if old is not None and (old.dtype != dtype or old.feature != feature):
            raise FormatError(
                f"site {self.names[index]!r} changed from {old.dtype} rows of shape {old.feature} to "
                f"{dtype} rows of shape {feature} between passes; rows of one site must "
                "keep their shape and dtype"
            )
        itemsize = torch.empty((), dtype=dtype).element_size()
        row_elems = int(np.prod(feature, dtype=np.int64))
        numpy_dtype = np.dtype(np.uint16 if dtype == torch.bfloat16 else str(dtype)[6:])
        fmt = _SiteFormat(dtype, feature, row_elems * itemsize, numpy_dtype, itemsize, row_elems)
        self._formats[index] = fmt
        return fmt

    def _add_piece(
        self,
        index: int,
        arena: _Arena,
        plan: PassPlan,
        row0: int,
        nrows: int,
        nbytes: int,
        stream: Any,
    ) -> None:
        arena.staged += 1
        pending = self._pending  # (a new batch if _arena had to flush)
        if pending.last_stream is not stream:
            pending.streams.setdefault(stream, stream)
            pending.last_stream = stream
        pending.pieces.append(_Piece(index, arena, arena.fill, plan, row0, nrows))
        pending.nbytes += nbytes
        arena.fill += nbytes

    def _copy_rows(
        self,
        index: int,
        plan: PassPlan,
        src: torch.Tensor,
        rows: int,
        fmt: _SiteFormat,
        stream: Any,
    ) -> None:
        """Copy ``src`` row-wise into the site's arenas, one piece per arena touched, with
        copies issued on ``stream`` (the current stream)."""
        row_bytes = fmt.row_bytes
        r = 0
        while r < rows:
            arena = self._current[index]
            if arena is None or arena.size - arena.fill < row_bytes:
                if arena is not None:
                    self._retire(arena)
                self._current[index] = None
                # Room for ARENA_PASSES passes like this one (decode steps share an
                # arena), within the pool's size per arena; at least one row.
                want = min(self.arena_bytes, (rows - r) * row_bytes * ARENA_PASSES)
                arena = self._current[index] = self._arena(max(row_bytes, want))
            take = min(rows - r, (arena.size - arena.fill) // row_bytes)
            first = arena.fill // fmt.itemsize
            dst = arena.typed(fmt.dtype)[first : first + take * fmt.row_elems]
            part = src if take == rows else src[r : r + take]
            dst.view(part.shape).copy_(part, non_blocking=True)
            self._add_piece(index, arena, plan, r, take, take * row_bytes, stream)
            r += take

    def _retire(self, arena: _Arena) -> None:
        with self._lock:
            arena.retired = True
            if arena.released == arena.staged:
                self._give_back(arena)

    def end_pass(self, plan: PassPlan, *, force: bool = False) -> None:
        """The pass finished: its token rows join the batch; send the batch if it is big
        or old enough (or ``force``)."""
        self._raise_if_failed()
        if self._watch:  # sites seen for the first time: did the model change them in place?
            for index, tensor, version in self._watch:
                self._volatile[index] = _version(tensor) != version
            self._watch.clear()
        if self._deferred:
            self._copy_deferred()
        pending = self._pending
        pending.plans.append(plan)
        if (
            force
            or pending.nbytes >= BATCH_BYTES
            or len(pending.plans) >= BATCH_PASSES
            or time.perf_counter() - pending.started >= BATCH_SECONDS
        ):
            self._flush()

    def _copy_deferred(self) -> None:
        """Issue the pass's deferred copies on the copy stream, after one event per
        producing stream; the compute stream carries no host copy."""
        items, self._deferred = self._deferred, []
        changed = sorted({self.names[d.site] for d in items if _version(d.tensor) != d.version})
        if changed:
            raise FormatError(
                f"the output of site(s) {changed} was changed in place after its hook in a "
                "later pass, though not in the first; with DEFER_COPIES its rows would be "
                "wrong. Leave DEFER_COPIES off for this model."
            )
        producers = {id(d.stream): d.stream for d in items}
        ready = [self.ops.record_event(stream) for stream in producers.values()]
        by_device: dict[int, list[_Deferred]] = {}
        for d in items:
            by_device.setdefault(d.tensor.device.index or 0, []).append(d)
        for group in by_device.values():
            copy_stream = self._copy_stream(group[0].tensor.device)
            with self.ops.use_stream(copy_stream):
                for event in ready:
                    copy_stream.wait_event(event)
                for d in group:
                    src = d.tensor.view(d.rows, *d.fmt.feature)
                    self._copy_rows(d.site, d.plan, src, d.rows, d.fmt, copy_stream)
                    self.ops.record_stream(d.tensor, copy_stream)

    def _copy_stream(self, device: torch.device) -> Any:
        index = device.index or 0
        stream = self._copy_streams.get(index)
        if stream is None:
            stream = self._copy_streams[index] = self.ops.new_stream(device)
        return stream

    def _flush(self) -> None:
        pending = self._pending
        if not pending.pieces and not pending.plans:
            pending.started = time.perf_counter()
            return
        events = [self.ops.record_event(s) for s in pending.streams.values()]
        self._pending = _Pending(started=time.perf_counter())
        self.staged_bytes += pending.nbytes
        self.batches += 1
        self._queue.put(_Batch(pending.pieces, pending.plans, events))

    def wait_idle(self) -> None:
        """Wait until the drain thread delivered every batch already sent."""
        self._queue.join()
        self._raise_if_failed()

    def close(self) -> None:
        """Deliver what is staged (also on abort: it is data already captured), stop the
        drain thread and free every arena."""
        self._deferred.clear()  # copies of a pass that did not finish
        self._watch.clear()
        try:
            for i, arena in enumerate(self._current):
                if arena is not None:
                    self._retire(arena)
                    self._current[i] = None
            self._flush()  # on abort too: these rows were captured
        finally:
            self._queue.put(None)
            self._thread.join()
            with self._lock:
                arenas = list(self._all)
                self._free.clear()
            for arena in arenas:
                self._destroy(arena)
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise LlminstrError(f"CUDA staging failed: {self._error!r}") from self._error

    # ------------------------------------------------------------------ drain thread
    def _drain(self) -> None:
        while True:
            batch = self._queue.get()
            try:
                if batch is None:
                    return
                self._wait(batch)  # also after a failure: the arenas are freed at close
                if self._error is None:
                    self._deliver(batch)
            except BaseException as exc:  # reported to the model's thread, never swallowed
                self._error = exc
                self.budget.notify()
            finally:
                if batch is not None:
                    self._done(batch)
                self._queue.task_done()

    @staticmethod
    def _wait(batch: _Batch) -> None:
        for event in batch.events:
            event.synchronize()  # waits for this batch's copies only

    def _deliver(self, batch: _Batch) -> None:
        for site, run in self._runs(batch.pieces):
            fmt = self._formats[site]
            assert fmt is not None
            rows, whole = self._rows_of(run, fmt)
            if whole:  # the writer may encode whole chunks straight from the arena
                for piece in run:
                    piece.lent = True
                self.session.deliver_rows_lent(site, rows, functools.partial(self._release, run))
            else:
                self.session.deliver_rows(site, rows)
        if batch.plans:
            self.session.deliver_tokens(batch.plans)

    def _runs(self, pieces: list[_Piece]) -> Iterator[tuple[int, list[_Piece]]]:
        """Per site, consecutive pieces that lie next to each other in one arena."""
        by_site: dict[int, list[_Piece]] = {}
        for piece in pieces:
            by_site.setdefault(piece.site, []).append(piece)
        for site, site_pieces in by_site.items():
            fmt = self._formats[site]
            assert fmt is not None
            run: list[_Piece] = []
            for piece in site_pieces:
                if run:
                    last = run[-1]
                    contiguous = (
                        piece.arena is last.arena
                        and piece.start == last.start + last.nrows * fmt.row_bytes
                    )
                    if not contiguous:
                        yield site, run
                        run = []
                run.append(piece)
            if run:
                yield site, run

    @staticmethod
    def _rows_of(run: list[_Piece], fmt: _SiteFormat) -> tuple[np.ndarray, bool]:
        """The rows of a run with the padding rows of each pass dropped, and whether they
        are the arena's own memory (nothing dropped) rather than a copy."""
        first = run[0]
        nrows = sum(p.nrows for p in run)
        raw = first.arena.array[first.start : first.start + nrows * fmt.row_bytes]
        rows = raw.view(fmt.numpy_dtype).reshape(nrows, *fmt.feature)
        if all(p.plan.resolve().keep is None for p in run):
            return rows, True
        mask = np.ones(nrows, dtype=bool)
        offset = 0
        for p in run:
            keep = p.plan.keep
            if keep is not None:
                mask[offset : offset + p.nrows] = keep[p.row0 : p.row0 + p.nrows]
            offset += p.nrows
        return rows[mask], False

    def _release(self, pieces: list[_Piece]) -> None:
        """Lent pieces are done with (any thread): their arenas may go back to the pool."""
        with self._lock:
            for piece in pieces:
                self._release_locked(piece.arena)
        self.budget.notify()

    def _release_locked(self, arena: _Arena) -> None:
        arena.released += 1
        if arena.retired and arena.released == arena.staged:
            self._give_back(arena)

    def _done(self, batch: _Batch) -> None:
        """Pieces delivered (or dropped): their arenas may go back to the pool."""
        with self._lock:
            for piece in batch.pieces:
                if not piece.lent:
                    self._release_locked(piece.arena)
        self.budget.notify()
