"""MemoryBudget: blocking, accounting, poisoning, and reclaiming pooled writer buffers."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import token_columns

from llminstr.budget import MemoryBudget
from llminstr.errors import ConfigError, WriterFailedError
from llminstr.format import SiteInfo
from llminstr.storage.writer import CaptureWriter


def test_acquire_blocks_until_release_and_counts_stall() -> None:
    b = MemoryBudget(100)
    b.acquire(80)
    done = threading.Event()

    def take() -> None:
        b.acquire(40)
        done.set()

    t = threading.Thread(target=take)
    t.start()
    time.sleep(0.2)
    assert not done.is_set() and b.has_waiters
    b.release(50)
    t.join(timeout=5)
    assert done.is_set()
    assert (b.used, b.peak) == (70, 80)
    assert b.stall_events == 1 and b.stall_seconds >= 0.15


def test_poison_wakes_waiters_with_the_cause() -> None:
    b = MemoryBudget(10)
    b.acquire(10)
    errors: list[BaseException] = []

    def take() -> None:
        try:
            b.acquire(5)
        except WriterFailedError as exc:
            errors.append(exc)

    t = threading.Thread(target=take)
    t.start()
    time.sleep(0.1)
    b.poison(OSError("disk full"))
    t.join(timeout=5)
    assert len(errors) == 1 and isinstance(errors[0].__cause__, OSError)


def test_limits_are_checked() -> None:
    with pytest.raises(ConfigError, match="must be positive"):
        MemoryBudget(0)
    with pytest.raises(ConfigError, match="exceeds the whole memory budget"):
        MemoryBudget(10).acquire(11)
    b = MemoryBudget(10)
    with pytest.raises(RuntimeError, match="released more bytes"):
        b.release(1)


def test_pooled_writer_buffers_are_reclaimed_for_another_consumer(tmp_path: Path) -> None:
    """The writer keeps finished chunk buffers for reuse (inside the budget); a second
    consumer of the same budget (the CUDA stager's slabs) must get them back, not wait."""
    budget = MemoryBudget(8 << 20)
    w = CaptureWriter(
        tmp_path / "c.zarr",
        [SiteInfo("s", (1024,))],
        chunk_rows=64,
        budget=budget,
        encoder_threads=1,
    )
    rows = np.ones((64 * 20, 1024), np.float32)
    n = len(rows)
    w.append(
        {
            "token_id": np.zeros(n, int),
            "sequence": np.zeros(n, int),
            "position": np.arange(n),
            "step": np.zeros(n, int),
        },
        {"s": rows},
    )
    w.commit()
    assert w._pooled_bytes > 0, "finished buffers should be pooled"
    held = budget.used
    assert held >= w._pooled_bytes
    # Everything not pooled is free; ask for more than that: only reclaiming can satisfy it.
    want = budget.limit - held + w._pooled_bytes
    got = threading.Event()

    def take() -> None:
        budget.acquire(want)
        got.set()

    t = threading.Thread(target=take)
    t.start()
    t.join(timeout=5)
    assert got.is_set(), "pooled buffers were not reclaimed"
    assert w._pooled_bytes == 0
    budget.release(want)
    w.close()
    assert budget.used == 0  # every byte given back at close


def test_try_acquire_never_blocks() -> None:
    b = MemoryBudget(10)
    assert b.try_acquire(6)
    assert not b.try_acquire(5)
    assert b.used == 6 and b.stall_events == 0
    b.poison(RuntimeError("x"))
    assert not b.try_acquire(1)


def test_commit_tails_are_not_pooled(tmp_path: Path) -> None:
    """A commit's zero-padded tail buffer is released once encoded, not pooled: pooled,
    every commit added one buffer per array until the pool held half the budget."""
    with CaptureWriter(
        tmp_path / "c.zarr",
        [SiteInfo("a", (4,))],
        chunk_rows=4,
        memory_budget_bytes=64 << 20,
        commit_interval_s=1e9,
    ) as w:
        for i in range(200):
            w.append(token_columns(1, i), {"a": np.full((1, 4), i, np.float32)})
            w.commit()
        pooled = sum(len(v) for v in w._pool.values())
        assert pooled <= 2 * len(w._states), pooled
