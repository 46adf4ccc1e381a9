"""A blocking byte budget shared by every stage that holds capture data in host memory."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from llminstr.errors import ConfigError, WriterFailedError


class MemoryBudget:
    """Counts bytes held by CUDA staging arenas, chunk assemblers and the encode queue.

    ``acquire(n)`` blocks while fewer than ``n`` bytes are free (backpressure) and adds
    the time spent waiting to :attr:`stall_seconds`. ``release(n)`` gives bytes back.
    A failing pipeline calls :meth:`poison`, which wakes every waiter with an error, so a
    producer never waits forever on a writer that died.
    """

    def __init__(self, limit_bytes: int) -> None:
        if limit_bytes <= 0:
            raise ConfigError(f"memory budget must be positive; got {limit_bytes} bytes")
        self.limit = int(limit_bytes)
        self._used = 0
        self._peak = 0
        self._stall = 0.0
        self._stall_events = 0
        self._cond = threading.Condition()
        self._poison: BaseException | None = None
        self._waiters = 0
        self._reclaimers: list[Callable[[int], int]] = []

    @property
    def used(self) -> int:
        return self._used

    @property
    def peak(self) -> int:
        return self._peak

    @property
    def stall_seconds(self) -> float:
        return self._stall

    @property
    def stall_events(self) -> int:
        return self._stall_events

    @property
    def has_waiters(self) -> bool:
        """Whether a producer is blocked waiting for bytes right now."""
        return self._waiters > 0

    def add_stall(self, seconds: float, events: int = 0) -> None:
        """Count time (and ``events`` waits) a consumer of this budget spent blocked
        outside :meth:`acquire`."""
        with self._cond:
            self._stall += seconds
            self._stall_events += events

    def add_reclaimer(self, reclaim: Callable[[int], int]) -> None:
        """Register ``reclaim(n)``: asked to give back (via :meth:`release`) up to ``n``
        bytes it holds but does not need (e.g. pooled buffers) before anyone waits."""
        self._reclaimers.append(reclaim)

    def reclaim(self, nbytes: int) -> int:
        """Ask the reclaimers for ``nbytes``; returns how many they gave back."""
        freed = 0
        for reclaim in list(self._reclaimers):
            if freed >= nbytes:
                break
            freed += reclaim(nbytes - freed)
        return freed

    def try_acquire(self, nbytes: int) -> bool:
        """Reserve ``nbytes`` if they are free right now; never blocks."""
        with self._cond:
            if self._poison is None and self._used + nbytes <= self.limit:
                self._take(nbytes)
                return True
            return False

    def acquire(self, nbytes: int) -> None:
        """Reserve ``nbytes``, blocking until they are free."""
        if nbytes <= 0:
            return
        if nbytes > self.limit:
            raise ConfigError(
                f"one allocation of {nbytes} bytes exceeds the whole memory budget of "
                f"{self.limit} bytes; raise max_memory_gb or lower chunk_rows"
            )
        with self._cond:
            if self._poison is None and self._used + nbytes <= self.limit:
                self._take(nbytes)
                return
            self._waiters += 1
            self._stall_events += 1
        start = time.perf_counter()
        try:
            while True:
                self.reclaim(nbytes)  # outside the lock: reclaimers call release()
                with self._cond:
                    if self._poison is None and self._used + nbytes <= self.limit:
                        self._take(nbytes)
                        return
                    if self._poison is None:
                        self._cond.wait(timeout=0.2)
                    if self._poison is not None:
                        raise WriterFailedError(
                            f"the capture pipeline failed: {self._poison!r}"
                        ) from self._poison
                    if self._used + nbytes <= self.limit:
                        self._take(nbytes)
                        return
        finally:
            with self._cond:
                self._waiters -= 1
                self._stall += time.perf_counter() - start

    def _take(self, nbytes: int) -> None:
        self._used += nbytes
        if self._used > self._peak:
            self._peak = self._used

    def release(self, nbytes: int) -> None:
        if nbytes <= 0:
            return
        with self._cond:
            self._used -= nbytes
            if self._used < 0:  # a bookkeeping bug must not hide: fail loudly
                self._used = 0
                raise RuntimeError("memory budget released more bytes than were acquired")
            self._cond.notify_all()

    @property
    def failure(self) -> BaseException | None:
        """The error the pipeline was poisoned with, if any."""
        return self._poison

    def wait(self, timeout: float) -> None:
        """Block until bytes are released, :meth:`notify` is called, or ``timeout``."""
        with self._cond:
            self._cond.wait(timeout)

    def notify(self) -> None:
        """Wake :meth:`wait` and :meth:`acquire` waiters (something they wait on changed)."""
        with self._cond:
            self._cond.notify_all()

    def poison(self, exc: BaseException) -> None:
        with self._cond:
            self._poison = exc
            self._cond.notify_all()
