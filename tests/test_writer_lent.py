"""CaptureWriter.write_site_lent: whole chunks encoded from the caller's memory, the
release called exactly once, never before the writer is done with the rows."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import token_columns

from llminstr.errors import WriterFailedError
from llminstr.format import SiteInfo
from llminstr.reader import open_capture
from llminstr.storage import backends as backends_mod
from llminstr.storage import codec as codec_mod
from llminstr.storage.writer import CaptureWriter


def _rows(n: int, start: int = 0) -> np.ndarray:
    return (np.arange(start * 16, (start + n) * 16, dtype=np.float32) * 0.5).reshape(n, 16)


class _Release:
    def __init__(self, lent: np.ndarray) -> None:
        self.calls = 0
        self.lent = lent
        self.done = threading.Event()

    def __call__(self) -> None:
        self.calls += 1
        self.lent[:] = np.nan  # the writer must not read the rows after this
        self.done.set()


def test_whole_chunks_are_encoded_in_place(backend: str, tmp_path: Path) -> None:
    path = tmp_path / f"c{backend}"
    w = CaptureWriter(path, [SiteInfo("a", (16,))], chunk_rows=8)
    lent = _rows(20)
    release = _Release(lent)
    copies: list[str] = []
    original = w._new_buffer

    def counting(decl: Any) -> np.ndarray:
        copies.append(decl.name)
        return original(decl)

    w._new_buffer = counting  # type: ignore[method-assign]
    w.write_tokens(token_columns(20))
    w.write_site_lent("a", lent, release)
    # 2 whole chunks lent; the 4 remaining rows were copied into one chunk buffer
    assert copies.count("a") == 1
    w.close()
    assert release.calls == 1
    with open_capture(path) as cap:
        np.testing.assert_array_equal(cap.read("a"), _rows(20))


def test_rows_that_fill_no_whole_chunk_are_copied_and_released_at_once(tmp_path: Path) -> None:
    w = CaptureWriter(tmp_path / "c.zarr", [SiteInfo("a", (16,))], chunk_rows=8)
    w.write_tokens(token_columns(3))
    w.write_site("a", _rows(3))
    lent = _rows(10, 3)
    release = _Release(lent)
    w.write_tokens(token_columns(10, 3))
    # 5 rows complete the open chunk, 5 start the next: no whole chunk to lend
    w.write_site_lent("a", lent, release)
    assert release.calls == 1
    w.close()
    with open_capture(tmp_path / "c.zarr") as cap:
        np.testing.assert_array_equal(cap.read("a"), _rows(13))


@pytest.mark.parametrize("group", ["tokens", "activations"])
def test_release_comes_once_even_when_the_write_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, group: str
) -> None:
    """Failing token writes stop the writer before anything is lent; failing site writes
    fail the lent chunks themselves."""
    disk_full = OSError(28, "disk full")
    original = backends_mod.ZarrBackend.write_chunk

    def failing(self: Any, decl: Any, *args: Any) -> None:
        if decl.group == group:
            raise disk_full
        original(self, decl, *args)

    monkeypatch.setattr(backends_mod.ZarrBackend, "write_chunk", failing)
    w = CaptureWriter(tmp_path / "c.zarr", [SiteInfo("a", (16,))], chunk_rows=8)
    lent = _rows(32)
    release = _Release(lent)
    with contextlib.suppress(WriterFailedError):  # the failure may surface here or later
        w.write_tokens(token_columns(32))
    with contextlib.suppress(WriterFailedError):
        w.write_site_lent("a", lent, release)
    with pytest.raises(WriterFailedError):
        w.close()
    assert release.done.wait(10)
    assert release.calls == 1


def test_a_refused_block_is_released_too(tmp_path: Path) -> None:
    w = CaptureWriter(tmp_path / "c.zarr", [SiteInfo("a", (16,))], chunk_rows=8)
    lent = np.zeros((8, 15), np.float32)
    release = _Release(lent)
    with pytest.raises(ValueError, match="expects rows of shape"):
        w.write_site_lent("a", lent, release)
    assert release.calls == 1
    w.close()


def test_lent_chunks_are_not_charged_to_the_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the encoder held, two whole chunks wait in the queue: copied, the budget
    counts their two chunk buffers; lent, it does not (the lender counts them)."""
    gate = threading.Event()
    original = codec_mod.ChunkCodec.encode

    def held(self: Any, buf: Any) -> Any:
        if buf.ndim == 2:  # the site's chunks wait; the token columns' go through
            gate.wait(10)
        return original(self, buf)

    monkeypatch.setattr(codec_mod.ChunkCodec, "encode", held)
    used = {}
    for mode in ("copied", "lent"):
        gate.clear()
        w = CaptureWriter(
            tmp_path / f"{mode}.zarr",
            [SiteInfo("a", (1024,))],
            chunk_rows=256,
            memory_budget_bytes=1 << 26,
            encoder_threads=1,
        )
        data = np.ones((512, 1024), np.float32)  # two chunks of 1 MiB
        release = _Release(data)
        w.write_tokens(token_columns(len(data)))
        w.commit()  # the token frames are written: both modes start from the same state
        before = w.budget.used
        if mode == "lent":
            w.write_site_lent("a", data, release)
        else:
            w.write_site("a", data)
        used[mode] = w.budget.used - before
        gate.set()
        w.close()
        assert release.calls == (mode == "lent")
    assert used["copied"] - used["lent"] == 2 * 256 * 1024 * 4, used
