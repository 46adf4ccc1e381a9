"""Errors of the capture writer: right classes, clear messages, no hangs, no leaks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from conftest import llminstr_threads, token_columns

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
from llminstr.format import SiteInfo
from llminstr.reader import open_capture
from llminstr.storage import backends as backends_mod
from llminstr.storage import codec as codec_mod
from llminstr.storage import writer as writer_mod
from llminstr.storage.writer import CaptureWriter, auto_chunk_rows


def rows(n: int, width: int, start: int = 0) -> np.ndarray:
    r = np.arange(start, start + n, dtype=np.float32)[:, None]
    return r * 1000 + np.arange(width, dtype=np.float32)[None, :]


@pytest.fixture
def writer(backend: str, tmp_path: Path) -> Any:
    w = CaptureWriter(tmp_path / f"cap{backend}", [SiteInfo("a", (4,)), SiteInfo("b", (2, 3))])
    yield w
    w.close("aborted")


def check_class(exc: BaseException, builtin: type[BaseException]) -> None:
    assert isinstance(exc, LlminstrError)
    assert isinstance(exc, builtin)


# ---------------------------------------------------------------------- producer input
@pytest.mark.parametrize(
    ("site", "data", "needle"),
    [
        ("a", np.zeros((3, 5), np.float32), "expects rows of shape (n, 4); got (3, 5)"),
        ("a", np.zeros(4, np.float32), "expects rows of shape (n, 4); got (4,)"),
        ("a", np.zeros((2, 4, 1), np.float32), "got (2, 4, 1)"),
        ("b", np.zeros((2, 3, 2), np.float32), "expects rows of shape (n, 2, 3); got (2, 3, 2)"),
        ("b", np.zeros((2, 6), np.float32), "got (2, 6)"),
    ],
)
def test_bad_shape(writer: CaptureWriter, site: str, data: np.ndarray, needle: str) -> None:
    with pytest.raises(FormatError) as info:
        writer.write_site(site, data)
    check_class(info.value, ValueError)
    assert needle in str(info.value)
    assert repr(site) in str(info.value)
    assert writer.rows_appended(site) == 0


@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int32, ml_dtypes.bfloat16])
def test_wrong_dtype(writer: CaptureWriter, dtype: Any) -> None:
    with pytest.raises(FormatError) as info:
        writer.write_site("a", np.zeros((2, 4), dtype))
    check_class(info.value, ValueError)
    msg = str(info.value)
    assert "site 'a' stores float32" in msg
    assert f"dtype {np.dtype(dtype)}" in msg
    assert "Cast before writing" in msg


def test_wrong_dtype_for_bfloat16_site(tmp_path: Path) -> None:
    with CaptureWriter(tmp_path / "c.zarr", [SiteInfo("h", (2,), "bfloat16")]) as w:
        with pytest.raises(FormatError, match="stores bfloat16; got an array of dtype float32"):
            w.write_site("h", np.zeros((1, 2), np.float32))
        w.write_site("h", np.zeros((1, 2), ml_dtypes.bfloat16))  # both spellings accepted
        w.write_site("h", np.zeros((1, 2), np.uint16))
        w.write_tokens(token_columns(2))


def test_unknown_site(writer: CaptureWriter) -> None:
    with pytest.raises(SiteNotFoundError) as info:
        writer.write_site("c", np.zeros((1, 4), np.float32))
    check_class(info.value, KeyError)
    assert str(info.value) == "no site named 'c' in this capture; declared: ['a', 'b']"
    with pytest.raises(SiteNotFoundError, match="no site or token column named 'zz'"):
        writer.rows_appended("zz")


@pytest.mark.parametrize(
    ("columns", "needle"),
    [
        ({"token_id": [1]}, "missing ['sequence', 'position', 'step']"),
        ({**token_columns(1), "extra": [1]}, "unknown ['extra']"),
        ({**token_columns(2), "step": [0]}, "1-D and of equal length"),
        ({**token_columns(1), "step": [[0]]}, "1-D and of equal length"),
        ({**token_columns(2), "position": [0.5, 1.0]}, "'position' must hold integers"),
    ],
)
def test_bad_token_columns(writer: CaptureWriter, columns: dict[str, Any], needle: str) -> None:
    with pytest.raises(FormatError) as info:
        writer.write_tokens(columns)
    check_class(info.value, ValueError)
    assert needle in str(info.value)
    assert writer.rows_appended("token_id") == 0


def test_append_checks_everything_before_writing(writer: CaptureWriter) -> None:
    ok = {"a": np.zeros((2, 4), np.float32), "b": np.zeros((2, 2, 3), np.float32)}
    with pytest.raises(FormatError, match=r"same number of rows everywhere; got \[2, 3\]"):
        writer.append(token_columns(2), {**ok, "b": np.zeros((3, 2, 3), np.float32)})
    with pytest.raises(FormatError, match=r"needs every site; missing \['b'\]"):
        writer.append(token_columns(2), {"a": ok["a"]})
    # A bad block is refused as a whole: nothing is appended anywhere, so rows stay aligned.
    with pytest.raises(SiteNotFoundError, match="no site named 'c'"):
        writer.append(token_columns(2), {**ok, "c": np.zeros((2, 4), np.float32)})
    with pytest.raises(FormatError, match="stores float32"):
        writer.append(token_columns(2), {**ok, "b": np.zeros((2, 2, 3), np.float64)})
    with pytest.raises(FormatError, match="expects rows of shape"):
        writer.append(token_columns(2), {**ok, "b": np.zeros((2, 3, 2), np.float32)})
    with pytest.raises(FormatError, match="must hold integers"):
        writer.append({**token_columns(2), "step": [0.5, 1.5]}, ok)
    assert {writer.rows_appended(n) for n in ["a", "b", "token_id", "step"]} == {0}
    writer.append(token_columns(2), ok)
    assert writer.commit() == 2


# ---------------------------------------------------------------------- declarations
@pytest.mark.parametrize(
    "name", ["", ".", "..", ".hidden", "-x", "a/b", "a b", "ü", "x" * 256, None, 3]
)
def test_bad_site_names(name: Any) -> None:
    with pytest.raises(ConfigError) as info:
        SiteInfo(name, (4,))
    check_class(info.value, ValueError)
    assert "a site name must be 1-255 characters" in str(info.value)
    assert repr(name) in str(info.value)


@pytest.mark.parametrize("shape", [(), (0,), (4, -1), (1 << 25,)])
def test_bad_feature_shapes(shape: tuple[int, ...]) -> None:
    with pytest.raises(ConfigError, match=r"site 'x': .*(feature_shape must be|exceeds)"):
        SiteInfo("x", shape)


def test_bad_site_dtype_kind_layer() -> None:
    with pytest.raises(
        ConfigError, match="activation dtype must be one of float32, float16, bfloat16; got 'int8'"
    ):
        SiteInfo("x", (4,), "int8")
    with pytest.raises(ConfigError, match="site kind must be one of"):
        SiteInfo("x", (4,), kind="mlp")
    with pytest.raises(ConfigError, match="layer must be a non-negative integer"):
        SiteInfo("x", (4,), layer=-1)


def test_duplicate_and_missing_sites(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        CaptureWriter(tmp_path / "d.zarr", [SiteInfo("a", (4,)), SiteInfo("a", (2,))])
    check_class(info.value, ValueError)
    assert str(info.value) == "site names must be unique; repeated: ['a']"
    with pytest.raises(ConfigError, match="at least one site"):
        CaptureWriter(tmp_path / "d.zarr", [])
    with pytest.raises(ConfigError, match="token column 'step' is declared twice"):
        CaptureWriter(tmp_path / "d.zarr", [SiteInfo("a", (4,))], extra_token_columns=["step"])
    assert not (tmp_path / "d.zarr").exists()


@pytest.mark.parametrize("chunk_rows", [0, -3, 2.5, True, "8"])
def test_bad_chunk_rows(tmp_path: Path, chunk_rows: Any) -> None:
    with pytest.raises(ConfigError) as info:
        CaptureWriter(tmp_path / "c.zarr", [SiteInfo("a", (4,))], chunk_rows=chunk_rows)
    check_class(info.value, ValueError)
    assert f"chunk_rows must be an integer in [1, 16777216]; got {chunk_rows!r}" == str(info.value)
    assert not (tmp_path / "c.zarr").exists()


def test_chunk_too_large(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"the limit is 2147483631\. Lower chunk_rows"):
        CaptureWriter(  # lz4: Blosc1's own limit
            tmp_path / "c.zarr",
            [SiteInfo("a", (1 << 20,))],
            chunk_rows=1 << 10,
            memory_budget_bytes=1 << 40,
        )
    with pytest.raises(ConfigError, match=r"the limit is 2147483648\. Lower chunk_rows"):
        CaptureWriter(  # raw chunks: the format's limit
            tmp_path / "c.zarr",
            [SiteInfo("a", (1 << 20,))],
            chunk_rows=1 << 10,
            compression=None,
            memory_budget_bytes=1 << 40,
        )


@pytest.mark.parametrize("budget", [1000, 0, -1])
def test_budget_too_small(tmp_path: Path, budget: int) -> None:
    with pytest.raises(ConfigError) as info:
        CaptureWriter(
            tmp_path / "c.zarr",
            [SiteInfo("a", (1024,)), SiteInfo("b", (1024,))],
            chunk_rows=64,
            memory_budget_bytes=budget,
        )
    check_class(info.value, ValueError)
    msg = str(info.value)
    if budget > 0:
        assert "is too small for 2 sites with chunk_rows=64: at least" in msg
        assert "Raise max_memory_gb or lower chunk_rows" in msg
    else:
        assert "memory budget must be positive" in msg
    assert not (tmp_path / "c.zarr").exists()
    assert not (tmp_path / "c.zarr.lock").exists()


def test_budget_floor_is_enough(tmp_path: Path) -> None:
    """The 'at least' figure of the error is a budget that works."""
    import re

    kwargs: dict[str, Any] = {"chunk_rows": 16}
    sites = [SiteInfo("a", (64,)), SiteInfo("b", (32,))]
    with pytest.raises(ConfigError) as info:
        CaptureWriter(tmp_path / "c.zarr", sites, memory_budget_bytes=100, **kwargs)
    needed = float(re.search(r"at least ([0-9.e+-]+) GB", str(info.value)).group(1)) * 1e9
    with CaptureWriter(
        tmp_path / "c.zarr", sites, memory_budget_bytes=int(needed * 1.001) + 1, **kwargs
    ) as w:
        for i in range(20):
            w.append(token_columns(7, 7 * i), {"a": rows(7, 64, 7 * i), "b": rows(7, 32, 7 * i)})
    with open_capture(tmp_path / "c.zarr") as cap:
        np.testing.assert_array_equal(cap.read("a"), rows(140, 64))


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"compression": "gzip"}, "compression must be one of 'lz4', 'zstd', None; got 'gzip'"),
        ({"compression_level": 0}, "compression level must be an integer in [1, 9]; got 0"),
        ({"compression_level": 10}, "compression level must be an integer in [1, 9]; got 10"),
        ({"backend": "parquet"}, "backend must be one of 'zarr', 'hdf5', None; got 'parquet'"),
    ],
)
def test_bad_options(tmp_path: Path, kwargs: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        CaptureWriter(tmp_path / "c.zarr", [SiteInfo("a", (4,))], **kwargs)
    assert needle in str(info.value)


@pytest.mark.parametrize("name", ["run.txt", "run", "run.zarr.bak"])
def test_unknown_backend_suffix(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError) as info:
        CaptureWriter(tmp_path / name, [SiteInfo("a", (4,))])
    check_class(info.value, ValueError)
    assert "cannot tell the backend from the path" in str(info.value)
    assert "'.zarr', '.h5' or '.hdf5'" in str(info.value)
    assert not (tmp_path / name).exists()


def test_explicit_backend_overrides_suffix(tmp_path: Path) -> None:
    with CaptureWriter(tmp_path / "run.bin", [SiteInfo("a", (4,))], backend="hdf5") as w:
        w.append(token_columns(1), {"a": rows(1, 4)})
    with open_capture(tmp_path / "run.bin") as cap:
        assert cap.backend == "hdf5" and cap.num_rows == 1


# ---------------------------------------------------------------------- paths and locks
def test_existing_path_without_overwrite(backend: str, tmp_path: Path) -> None:
    path = tmp_path / f"c{backend}"
    with CaptureWriter(path, [SiteInfo("a", (4,))]) as w:
        w.append(token_columns(2), {"a": rows(2, 4)})
    with pytest.raises(CaptureExistsError) as info:
        CaptureWriter(path, [SiteInfo("a", (4,))])
    check_class(info.value, FileExistsError)
    assert "already exists; pass overwrite=True to replace it" in str(info.value)
    with open_capture(path) as cap:  # untouched
        assert cap.num_rows == 2 and cap.status == "complete"


def test_overwrite_refuses_a_foreign_directory(tmp_path: Path) -> None:
    target = tmp_path / "data.zarr"
    target.mkdir()
    (target / "precious.txt").write_text("keep me")
    with pytest.raises(CaptureExistsError, match="is a directory that is not a Zarr store"):
        CaptureWriter(target, [SiteInfo("a", (4,))], overwrite=True)
    assert (target / "precious.txt").read_text() == "keep me"
    assert not (tmp_path / "data.zarr.lock").exists()


def test_two_writers_in_one_process(backend: str, tmp_path: Path) -> None:
    path = tmp_path / f"c{backend}"
    with CaptureWriter(path, [SiteInfo("a", (4,))], chunk_rows=2) as first:
        first.append(token_columns(3), {"a": rows(3, 4)})
        first.commit()
        with pytest.raises(CaptureLockedError) as info:
            CaptureWriter(path, [SiteInfo("a", (4,))], overwrite=True)
        check_class(info.value, BlockingIOError)
        assert "another writer holds" in str(info.value)
        assert "two writers on one capture are refused" in str(info.value)
        first.append(token_columns(2, 3), {"a": rows(2, 4, 3)})  # the first one is unharmed
    with open_capture(path) as cap:
        assert cap.status == "complete" and cap.num_rows == 5
        np.testing.assert_array_equal(cap.read("a"), rows(5, 4))


SECOND_WRITER = textwrap.dedent(
    """
    import sys
    from llminstr.format import SiteInfo
    from llminstr.storage.writer import CaptureWriter
    try:
        CaptureWriter(sys.argv[1], [SiteInfo("a", (4,))], overwrite=True)
    except Exception as exc:
        print(type(exc).__name__, isinstance(exc, BlockingIOError), exc)
    else:
        print("no error")
    """
)


@pytest.mark.timeout(60)
def test_two_writers_in_two_processes(backend: str, tmp_path: Path) -> None:
    path = tmp_path / f"c{backend}"
    with CaptureWriter(path, [SiteInfo("a", (4,))]) as w:
        w.append(token_columns(3), {"a": rows(3, 4)})
        w.commit()
        proc = subprocess.run(
            [sys.executable, "-c", SECOND_WRITER, str(path)],
            capture_output=True,
            text=True,
            timeout=50,
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("CaptureLockedError True another writer holds"), proc.stdout
    with open_capture(path) as cap:
        assert cap.status == "complete" and cap.num_rows == 3


def test_writing_after_close(backend: str, tmp_path: Path) -> None:
    w = CaptureWriter(tmp_path / f"c{backend}", [SiteInfo("a", (4,))])
    w.append(token_columns(1), {"a": rows(1, 4)})
    w.close()
    w.close()  # idempotent
    calls = [
        lambda: w.write_site("a", rows(1, 4)),
        lambda: w.write_tokens(token_columns(1)),
        lambda: w.append(token_columns(1), {"a": rows(1, 4)}),
        w.commit,
    ]
    for call in calls:
        with pytest.raises(WriterClosedError) as info:
            call()
        check_class(info.value, RuntimeError)
        assert "is closed" in str(info.value)


# ---------------------------------------------------------------------- worker failure
class FailOnNth:
    """Wraps a function; the ``n``-th call (1-based, across threads) raises ``exc``."""

    def __init__(self, original: Any, n: int, exc: BaseException, delay: float = 0.0) -> None:
        self.original, self.n, self.exc, self.delay = original, n, exc, delay
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            self.calls += 1
            call = self.calls
        if self.delay:
            time.sleep(self.delay)
        if call == self.n:
            raise self.exc
        return self.original(*args, **kwargs)


def backend_class(suffix: str) -> type:
    return backends_mod.ZarrBackend if suffix == ".zarr" else backends_mod.HDF5Backend


def write_method(suffix: str) -> str:
    """The backend method that performs one chunk write (HDF5: on its own thread)."""
    return "write_chunk" if suffix == ".zarr" else "_write_chunk"


def check_released(path: Path, threads_before: set[str]) -> None:
    deadline = time.monotonic() + 5
    while llminstr_threads() - threads_before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert llminstr_threads() <= threads_before, llminstr_threads() - threads_before
    assert not Path(str(path) + ".lock").exists()
    # The lock is free: another writer may take the path over.
    with CaptureWriter(path, [SiteInfo("z", (1,))], overwrite=True) as w:
        w.append(token_columns(1), {"z": np.zeros((1, 1), np.float32)})


@pytest.mark.timeout(30)
@pytest.mark.parametrize("where", ["write_chunk", "encode"])
def test_worker_failure_reaches_the_producer(
    backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    path = tmp_path / f"c{backend}"
    before = llminstr_threads()
    disk_full = OSError(28, "disk full")
    committed_chunks = 3  # 12 rows with chunk_rows=4, one site + 4 token columns
    n = committed_chunks * 5 + 2
    if where == "write_chunk":
        cls = backend_class(backend)
        fail = FailOnNth(getattr(cls, write_method(backend)), n, disk_full)
        monkeypatch.setattr(cls, write_method(backend), lambda self, *a: fail(self, *a))
    else:
        fail = FailOnNth(codec_mod.ChunkCodec.encode, n, disk_full)
        monkeypatch.setattr(codec_mod.ChunkCodec, "encode", lambda self, *a: fail(self, *a))

    w = CaptureWriter(path, [SiteInfo("a", (8,))], chunk_rows=4, commit_interval_s=1e9)
    w.append(token_columns(12), {"a": rows(12, 8)})
    assert w.commit() == 12
    start = time.monotonic()
    with pytest.raises(WriterFailedError) as info:
        for i in range(10_000):
            w.append(token_columns(2, 12 + 2 * i), {"a": rows(2, 8, 12 + 2 * i)})
            time.sleep(0.001)
    assert time.monotonic() - start < 10
    err = info.value
    check_class(err, RuntimeError)
    assert err.__cause__ is disk_full
    assert "failed" in str(err) and "disk full" in str(err)
    # every later call says the same, including close
    with pytest.raises(WriterFailedError) as again:
        w.write_site("a", rows(1, 8))
    assert again.value.__cause__ is disk_full
    with pytest.raises(WriterFailedError, match="rows up to the last commit") as closing:
        w.close()
    assert closing.value.__cause__ is disk_full
    assert w.status == "aborted"
    with open_capture(path) as cap:
        assert cap.status == "aborted"
        assert cap.num_rows >= 12
        np.testing.assert_array_equal(cap.read("a"), rows(cap.num_rows, 8))
        assert "disk full" in cap.metadata["error"]
        assert cap.verify() == []
    check_released(path, before)


@pytest.mark.timeout(30)
def test_worker_failure_reported_by_close(
    backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / f"c{backend}"
    before = llminstr_threads()
    disk_full = OSError("disk full")
    cls = backend_class(backend)
    fail = FailOnNth(
        getattr(cls, write_method(backend)), 6, disk_full
    )  # the first chunk written at close
    monkeypatch.setattr(cls, write_method(backend), lambda self, *a: fail(self, *a))
    w = CaptureWriter(path, [SiteInfo("a", (8,))], chunk_rows=4, commit_interval_s=1e9)
    w.append(token_columns(3), {"a": rows(3, 8)})
    assert w.commit() == 3  # 5 partial chunks
    # chunk 0 is full: its 5 frames are written now, asynchronously. The failure reaches
    # the producer at its next wait for the pipeline (here, possibly this append) or at
    # close, whichever comes first; close reports it in any case.
    try:
        w.append(token_columns(3, 3), {"a": rows(3, 8, 3)})
    except WriterFailedError as exc:
        assert exc.__cause__ is disk_full
    with pytest.raises(WriterFailedError) as info:
        w.close()
    assert info.value.__cause__ is disk_full
    with open_capture(path) as cap:
        assert cap.status == "aborted" and cap.num_rows == 3
        np.testing.assert_array_equal(cap.read("a"), rows(3, 8))
    check_released(path, before)


@pytest.mark.timeout(30)
def test_failure_wakes_a_producer_blocked_on_the_budget(
    backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / f"c{backend}"
    before = llminstr_threads()
    disk_full = OSError("disk full")
    cls = backend_class(backend)
    # Slow writes keep the budget full; the 12th write fails after a while.
    fail = FailOnNth(getattr(cls, write_method(backend)), 12, disk_full, delay=0.05)
    monkeypatch.setattr(cls, write_method(backend), lambda self, *a: fail(self, *a))
    site = SiteInfo("a", (256,))
    w = CaptureWriter(path, [site], chunk_rows=8, memory_budget_bytes=40_000, encoder_threads=1)
    start = time.monotonic()
    with pytest.raises(WriterFailedError) as info:
        for i in range(10_000):
            w.append(token_columns(8, 8 * i), {"a": rows(8, 256, 8 * i)})
    assert time.monotonic() - start < 10
    assert info.value.__cause__ is disk_full
    assert w.stats().stall_seconds > 0
    with pytest.raises(WriterFailedError):
        w.close()
    check_released(path, before)


@pytest.mark.timeout(30)
def test_context_manager_with_failed_worker(
    backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / f"c{backend}"
    before = llminstr_threads()
    disk_full = OSError("disk full")
    cls = backend_class(backend)
    fail = FailOnNth(getattr(cls, write_method(backend)), 1, disk_full)
    monkeypatch.setattr(cls, write_method(backend), lambda self, *a: fail(self, *a))
    with (
        pytest.raises(WriterFailedError) as info,
        CaptureWriter(path, [SiteInfo("a", (2,))], chunk_rows=1) as w,
    ):
        for i in range(10_000):
            w.append(token_columns(1, i), {"a": rows(1, 2, i)})
            time.sleep(0.001)
    assert info.value.__cause__ is disk_full
    with open_capture(path) as cap:
        assert cap.status == "aborted"
    check_released(path, before)


# ---------------------------------------------------------------------- backpressure
@pytest.mark.timeout(60)
def test_backpressure_blocks_without_losing_data(
    backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / f"c{backend}"
    cls = backend_class(backend)
    original = getattr(cls, write_method(backend))

    def slow_write(self: Any, *args: Any) -> None:
        time.sleep(0.004)
        original(self, *args)

    monkeypatch.setattr(cls, write_method(backend), slow_write)
    sites = [SiteInfo("a", (256,)), SiteInfo("b", (64,), "bfloat16")]
    budget = 48_000
    rng = np.random.default_rng(1)
    n = 8 * 40
    a = rng.standard_normal((n, 256)).astype(np.float32)
    b = rng.standard_normal((n, 64)).astype(ml_dtypes.bfloat16)
    with CaptureWriter(
        path, sites, chunk_rows=8, memory_budget_bytes=budget, encoder_threads=2
    ) as w:
        for lo in range(0, n, 5):
            hi = min(n, lo + 5)
            w.append(token_columns(hi - lo, lo), {"a": a[lo:hi], "b": b[lo:hi]})
    stats = w.stats()
    assert stats.stall_seconds > 0
    assert stats.stall_events > 0
    assert 0 < stats.peak_buffered_bytes <= budget == w.budget.limit
    assert w.budget.used == 0  # every byte given back
    assert stats.rows == n
    with open_capture(path) as cap:
        assert cap.status == "complete" and cap.num_rows == n
        np.testing.assert_array_equal(cap.read("a"), a)
        np.testing.assert_array_equal(cap.read("b").view(np.uint16), b.view(np.uint16))
        np.testing.assert_array_equal(cap.token_table()["token_id"], token_columns(n)["token_id"])


@pytest.mark.timeout(60)
def test_encode_queue_is_bounded_per_encoder_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """However large the budget, at most one full chunk per array plus
    QUEUED_CHUNKS_PER_THREAD per encoder thread wait for encoding; the producer waits
    beyond that (counted as stall), nothing is lost."""
    from llminstr.storage import writer as writer_mod

    threads = 2
    arrays = 1 + 4  # one site, four token columns
    bound = arrays + writer_mod.QUEUED_CHUNKS_PER_THREAD * threads
    gate = threading.Event()
    lock = threading.Lock()
    queued = [0, 0]  # now, most seen
    original_submit = writer_mod.CaptureWriter._submit
    original_encode = writer_mod.CaptureWriter._encode_and_write

    def submit(self: Any, *args: Any, **kwargs: Any) -> None:
        original_submit(self, *args, **kwargs)
        with lock:
            queued[0] += 1
            queued[1] = max(queued[1], queued[0])

    def encode(self: Any, *args: Any) -> None:
        gate.wait(timeout=0.005)  # encoders far slower than the producer
        with lock:
            queued[0] -= 1
        original_encode(self, *args)

    monkeypatch.setattr(writer_mod.CaptureWriter, "_submit", submit)
    monkeypatch.setattr(writer_mod.CaptureWriter, "_encode_and_write", encode)
    n = 8 * 30
    x = np.arange(n * 16, dtype=np.float32).reshape(n, 16)
    path = tmp_path / "c.zarr"
    with CaptureWriter(
        path,
        [SiteInfo("a", (16,))],
        chunk_rows=8,
        memory_budget_bytes=1 << 30,
        encoder_threads=threads,
    ) as w:
        for lo in range(0, n, 8):
            w.append(token_columns(8, lo), {"a": x[lo : lo + 8]})
    assert w.queue_chunks == bound
    # the counter moves after the real submit/encode calls: allow one chunk of slack each
    assert bound <= queued[1] <= bound + threads + 1
    assert w.stats().stall_seconds > 0
    with open_capture(path) as cap:
        np.testing.assert_array_equal(cap.read("a"), x)


# ---------------------------------------------------------------------- close arguments
def test_close_and_abort_arguments_are_checked_before_anything_is_written(tmp_path: Path) -> None:
    """A status or error the schema refuses would make the whole capture unreadable."""
    path = tmp_path / "c.zarr"
    w = CaptureWriter(path, [SiteInfo("s", (2,))], chunk_rows=4)
    w.append(token_columns(5), {"s": rows(5, 2)})
    with pytest.raises(ConfigError, match="status must be 'complete' or 'aborted'; got 'done'"):
        w.close("done")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="error must be a message"):
        w.close("aborted", {"why": 1})  # type: ignore[arg-type]
    assert not w.closed
    w.abort(RuntimeError("boom"))  # the exception itself is recorded as its message
    cap = open_capture(path)
    assert (cap.status, cap.num_rows, cap.metadata["error"]) == ("aborted", 5, "RuntimeError: boom")


def test_bad_encoder_threads_leave_nothing_behind(tmp_path: Path) -> None:
    path = tmp_path / "c.h5"
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="encoder_threads must be an integer"):
            CaptureWriter(path, [SiteInfo("s", (2,))], encoder_threads=bad)  # type: ignore[arg-type]
        assert not path.exists() and not Path(str(path) + ".lock").exists()
    CaptureWriter(path, [SiteInfo("s", (2,))]).close()  # the path is not locked


def test_hdf5_raw_frames_reach_the_file_without_an_uncounted_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Raw (uncompressed) frames are views of budgeted chunk buffers: a copy per frame was
    memory the budget did not see."""
    kinds: list[type] = []
    real = backends_mod.HDF5Backend._write_chunk

    def spy(self: Any, array: Any, index: int, frame: Any, extent: int) -> None:
        kinds.append(type(frame))
        real(self, array, index, frame, extent)

    monkeypatch.setattr(backends_mod.HDF5Backend, "_write_chunk", spy)
    path = tmp_path / "c.h5"
    with CaptureWriter(path, [SiteInfo("s", (3,))], chunk_rows=4, compression=None) as w:
        w.append(token_columns(10), {"s": rows(10, 3)})
    assert kinds and all(k is memoryview for k in kinds)
    np.testing.assert_array_equal(open_capture(path).read("s"), rows(10, 3))


def test_hdf5_final_rewrite_is_skipped_when_the_disk_is_nearly_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reopened without SWMR, the file is marked open-for-writing until closed; a close that
    fails on a full disk would leave it unreadable. The commit record stands instead."""
    monkeypatch.setattr(backends_mod, "_FINAL_FREE_BYTES", 1 << 62)
    path = tmp_path / "c.h5"
    with (
        pytest.warns(RuntimeWarning, match="the final root metadata was not rewritten"),
        CaptureWriter(path, [SiteInfo("s", (2,))], chunk_rows=4) as w,
    ):
        w.append(token_columns(6), {"s": rows(6, 2)})
    cap = open_capture(path)
    assert (cap.status, cap.num_rows) == ("complete", 6)
    np.testing.assert_array_equal(cap.read("s"), rows(6, 2))


def test_failed_publish_does_not_skip_a_commit_seq(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Section 3.2: commit_seq grows by exactly 1 per publish, also across a publish that
    failed (a transient I/O error on the root document)."""
    path = tmp_path / "c.zarr"
    w = CaptureWriter(path, [SiteInfo("s", (2,))], chunk_rows=4)
    w.append(token_columns(4), {"s": rows(4, 2)})
    w.commit()
    assert open_capture(path).metadata["commit_seq"] == 1
    real = backends_mod.ZarrBackend.publish
    calls = [0]

    def flaky(self: Any, root: Any) -> None:
        calls[0] += 1
        if calls[0] == 1:
            raise OSError(5, "Input/output error")
        real(self, root)

    monkeypatch.setattr(backends_mod.ZarrBackend, "publish", flaky)
    w.append(token_columns(4, 4), {"s": rows(4, 2, 4)})
    with pytest.raises(OSError, match="Input/output error"):
        w.commit()
    assert w.status == "in_progress" and open_capture(path).metadata["commit_seq"] == 1
    w.commit()
    cap = open_capture(path)
    assert (cap.metadata["commit_seq"], cap.num_rows) == (2, 8)
    w.close()
    assert open_capture(path).metadata["commit_seq"] == 3


def test_uint64_token_ids_beyond_int64_are_refused(tmp_path: Path) -> None:
    w = CaptureWriter(tmp_path / "c.zarr", [SiteInfo("s", (2,))], chunk_rows=4)
    tokens = token_columns(2)
    tokens["token_id"] = np.array([5, 2**63 + 5], dtype=np.uint64)
    with pytest.raises(FormatError, match=r"holds 9223372036854775813, beyond int64"):
        w.append(tokens, {"s": rows(2, 2)})
    tokens["token_id"] = np.array([5, 7], dtype=np.uint64)  # in range: stored as int64
    w.append(tokens, {"s": rows(2, 2)})
    w.close()
    assert open_capture(tmp_path / "c.zarr").token_table()["token_id"].tolist() == [5, 7]


def test_writer_refuses_what_the_spec_rules_out_before_creating_anything(tmp_path: Path) -> None:
    """Section 9 limits and section 3.3 types, checked before the path is created."""
    path = tmp_path / "c.zarr"
    cases: list[tuple[Any, str]] = [
        (lambda: SiteInfo("zarr.json", (2,)), "not be 'zarr.json'"),
        (lambda: SiteInfo("s", (2,), layer=1.5), "layer must be a non-negative integer"),
        (lambda: SiteInfo("s", (2,), tuple_index=-1), "tuple_index must be a non-negative"),
        (
            lambda: CaptureWriter(
                path, [SiteInfo("s", (2,))], capture_config={"x": "y" * (17 << 20)}
            ),
            "root metadata document would be",
        ),
        (
            lambda: CaptureWriter(
                path, [SiteInfo("s", (1 << 20,))], chunk_rows=512, compression="lz4"
            ),
            "the limit is 2147483631",
        ),
    ]
    for make, message in cases:
        with pytest.raises(ConfigError, match=message):
            make()
        assert not path.exists()


@pytest.mark.parametrize(
    ("row_bytes", "budget", "expected"),
    [
        ([3072] * 4 + [8] * 4, 1 << 30, 1024),  # ~4 MiB of the widest array
        ([4_000_000] + [8] * 4, 50_000_000, 1),  # rows so wide the budget holds few
        ([400_000] + [8] * 4, 50_000_000, 8),  # the budget's rule allows 15: not forced to 16
        ([100] + [8] * 4, 1 << 30, 32768),
        ([8] * 5, 1 << 40, 65536),  # capped
    ],
)
def test_auto_chunk_rows(row_bytes: list[int], budget: int, expected: int) -> None:
    assert auto_chunk_rows(row_bytes, budget) == expected


def test_automatic_chunks_fit_rows_wider_than_the_minimum_allows(tmp_path: Path) -> None:
    """A 1e6-feature site in a 50 MB budget: 16-row chunks (the old forced minimum) need
    256 MB and were refused; automatic chunking now picks what the budget holds."""
    site = SiteInfo("wide", (1_000_000,))
    with CaptureWriter(tmp_path / "w.zarr", [site], memory_budget_bytes=50_000_000) as w:
        assert w.chunk_rows == 1
        rows = np.arange(3 * 1_000_000, dtype=np.float32).reshape(3, -1)
        w.append(
            {c: np.arange(3) for c in ("token_id", "sequence", "position", "step")}, {"wide": rows}
        )
        assert w.budget.peak <= 50_000_000
    assert np.array_equal(open_capture(tmp_path / "w.zarr").read("wide"), rows)


# ---------------------------------------------------------------------- full disk, Ctrl-C
@pytest.mark.timeout(30)
def test_failed_zarr_chunk_write_leaves_no_temp_file_and_names_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunk write that fails (a full disk) left its temporary file in the capture,
    holding space, and the error named no file."""
    path = tmp_path / "c.zarr"
    w = CaptureWriter(path, [SiteInfo("a", (8,))], chunk_rows=4, commit_interval_s=1e9)
    full = FailOnNth(os.writev, 3, OSError(28, "No space left on device"))
    monkeypatch.setattr(backends_mod.os, "writev", full)
    with pytest.raises(WriterFailedError) as info:
        for i in range(100):
            w.append(token_columns(4, 4 * i), {"a": rows(4, 8, 4 * i)})
            time.sleep(0.01)
    monkeypatch.undo()
    assert "No space left on device" in str(info.value) and str(path) in str(info.value)
    with pytest.raises(WriterFailedError):
        w.close()
    assert [p for p in path.rglob("*.tmp")] == []
    # A chunk's first frame is written in place: the failed one is removed, not left empty.
    chunks = [p for p in path.rglob("*") if p.is_file() and "c" in p.relative_to(path).parts]
    assert chunks and [p for p in chunks if p.stat().st_size == 0] == []


def test_zarr_first_frames_go_in_place_and_rewritten_tails_by_atomic_replace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SPEC 7.2: only a chunk stored before (a commit's zero-padded tail) needs the
    temporary file and rename; a chunk's first frame holds no published row."""
    path = tmp_path / "c.zarr"
    renamed: list[str] = []
    real_replace = os.replace

    def replace(src: Any, dst: Any) -> None:
        renamed.append(Path(dst).relative_to(path).as_posix())
        real_replace(src, dst)

    monkeypatch.setattr(backends_mod.os, "replace", replace)
    x = rows(12, 8, 0)
    with CaptureWriter(path, [SiteInfo("a", (8,))], chunk_rows=4, commit_interval_s=1e9) as w:
        w.append(token_columns(4, 0), {"a": x[:4]})  # chunk 0, full
        w.append(token_columns(2, 4), {"a": x[4:6]})
        w.commit()  # chunk 1's first frame: a zero-padded tail
        w.append(token_columns(2, 6), {"a": x[6:8]})  # chunk 1 again, full
        w.append(token_columns(4, 8), {"a": x[8:12]})  # chunk 2, full
    chunk_renames = sorted(r for r in renamed if "/c/" in r)
    assert chunk_renames == sorted(
        [f"tokens/{c}/c/1" for c in ("token_id", "sequence", "position", "step")]
        + ["activations/a/c/1/0"]
    )
    assert np.array_equal(open_capture(path).read("a"), x)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("nth", [1, 4, 8])  # which document's rename fails (Zarr)
def test_a_capture_that_cannot_be_created_leaves_nothing(
    backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nth: int
) -> None:
    """A full disk while the Zarr store was laid out left a directory without a root
    document, which then made even overwrite=True refuse the path."""
    path = tmp_path / f"c{backend}"
    if backend == ".h5":  # the file exists, the layout inside it fails
        real = backends_mod.HDF5Backend._create

        def create_then_fail(self: Any, *args: Any) -> None:
            real(self, *args)
            raise OSError(28, "No space left")

        monkeypatch.setattr(backends_mod.HDF5Backend, "_create", create_then_fail)
    else:
        full = FailOnNth(os.replace, nth, OSError(28, "No space left"))
        monkeypatch.setattr(backends_mod.os, "replace", full)
    with pytest.raises(OSError, match="cannot create the capture") as info:
        CaptureWriter(path, [SiteInfo("a", (8,))], chunk_rows=4)
    assert str(path) in str(info.value)
    monkeypatch.undo()
    assert not path.exists()
    assert not Path(str(path) + ".lock").exists()
    with CaptureWriter(path, [SiteInfo("a", (8,))], chunk_rows=4) as w:  # no overwrite needed
        w.append(token_columns(4), {"a": rows(4, 8)})
    assert open_capture(path).num_rows == 4


@pytest.mark.timeout(30)
def test_ctrl_c_while_closing_propagates_and_aborts(
    backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C while close() waited for the last frames became a WriterFailedError saying
    that rows up to the last commit were kept, whatever then reached the disk."""
    path = tmp_path / f"c{backend}"
    w = CaptureWriter(path, [SiteInfo("a", (8,))], chunk_rows=4, commit_interval_s=1e9)
    w.append(token_columns(10), {"a": rows(10, 8)})
    assert w.commit() == 10
    w.append(token_columns(3, 10), {"a": rows(3, 8, 10)})
    original = CaptureWriter._drain
    calls = []

    def interrupted(self: CaptureWriter) -> None:
        calls.append(1)
        original(self)  # the frames are on disk; the interrupt hits right after
        if len(calls) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(CaptureWriter, "_drain", interrupted)
    with pytest.raises(KeyboardInterrupt):
        w.close()
    assert w.closed and not Path(str(path) + ".lock").exists()
    with open_capture(path) as cap:
        assert cap.status == "aborted" and "interrupted while closing" in cap.metadata["error"]
        assert cap.num_rows >= 10
        np.testing.assert_array_equal(cap.read("a"), rows(cap.num_rows, 8))


@pytest.mark.timeout(60)
def test_ctrl_c_while_closing_stops_waiting_for_queued_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The interrupt cancels the encodes not yet started and keeps those in flight: close
    waited for every queued chunk before, and published only what was durable at the
    interrupt (4 rows of 32 on disk)."""
    path = tmp_path / "c.zarr"
    real = backends_mod.ZarrBackend.write_chunk
    slow = threading.Event()

    def slow_write(self: Any, *args: Any) -> None:
        if slow.is_set():
            time.sleep(0.3)
        real(self, *args)

    monkeypatch.setattr(backends_mod.ZarrBackend, "write_chunk", slow_write)
    monkeypatch.setattr(writer_mod, "QUEUED_CHUNKS_PER_THREAD", 100)  # all of them queue
    w = CaptureWriter(
        path, [SiteInfo("a", (8,))], chunk_rows=4, commit_interval_s=1e9, encoder_threads=1
    )
    w.append(token_columns(4), {"a": rows(4, 8)})
    assert w.commit() == 4
    slow.set()
    w.append(token_columns(28, 4), {"a": rows(28, 8, 4)})  # 7 chunks x 5 arrays queued
    threading.Timer(
        0.5, lambda: signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
    ).start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        w.close()
    assert time.monotonic() - started < 3.0  # 35 chunks x 0.3 s were queued
    assert w.budget.used == 0  # cancelled tasks gave back their frames and buffers
    with open_capture(path) as cap:
        assert cap.status == "aborted" and cap.num_rows >= 4
        np.testing.assert_array_equal(cap.read("a"), rows(cap.num_rows, 8))
    check_released(path, set())


def test_a_second_interrupt_while_closing_still_releases_the_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second Ctrl-C in close()'s cleanup skipped the lock's release: the path stayed
    locked for as long as the writer object lived."""
    path = tmp_path / "c.zarr"
    w = CaptureWriter(path, [SiteInfo("a", (8,))], chunk_rows=4)
    w.append(token_columns(6), {"a": rows(6, 8)})
    real_shutdown = w._executor.shutdown

    def interrupted_shutdown(*args: Any, **kwargs: Any) -> None:
        real_shutdown(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(w._executor, "shutdown", interrupted_shutdown)
    with pytest.raises(KeyboardInterrupt):
        w.close()
    assert not Path(str(path) + ".lock").exists()
    with CaptureWriter(path, [SiteInfo("a", (8,))], chunk_rows=4, overwrite=True) as again:
        again.append(token_columns(1), {"a": rows(1, 8)})


@pytest.mark.timeout(30)
def test_appending_after_an_interrupted_commit_waits_for_its_tail_frames(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C while ``commit`` waited for its tail frames, then more rows (a notebook cell
    interrupted, the next one goes on): the chunk's full frame went out while its tail was
    still being written, into the same file. Found in review: a CRC32C mismatch on read
    (and, before first frames were written in place, rows silently zero)."""
    path = tmp_path / "c.zarr"
    x = np.arange(8 * 64, dtype=np.float32).reshape(8, 64) + 1
    w = CaptureWriter(path, [SiteInfo("a", (64,))], chunk_rows=4, commit_interval_s=1e9)
    real_writev = os.writev
    slow = {"armed": False}

    def writev(fd: int, views: Any) -> int:  # the tail of chunk 1 of "a", in two halves
        name = os.readlink(f"/proc/self/fd/{fd}")
        if slow["armed"] and "activations/a/c/1" in name:
            slow["armed"] = False
            flat = b"".join(bytes(v) for v in views)
            n = os.write(fd, flat[: len(flat) // 2])
            time.sleep(0.5)
            return n + os.write(fd, flat[len(flat) // 2 :])
        return real_writev(fd, views)

    monkeypatch.setattr(backends_mod.os, "writev", writev)
    w.append(token_columns(6, 0), {"a": x[:6]})
    real_drain = CaptureWriter._drain
    drains = {"n": 0}

    def drain(self: CaptureWriter) -> None:
        drains["n"] += 1
        if drains["n"] == 2:  # commit's second drain: the tails are on their way
            raise KeyboardInterrupt
        real_drain(self)

    monkeypatch.setattr(CaptureWriter, "_drain", drain)
    slow["armed"] = True
    with pytest.raises(KeyboardInterrupt):
        w.commit()
    monkeypatch.setattr(CaptureWriter, "_drain", real_drain)
    w.append(token_columns(2, 6), {"a": x[6:8]})  # chunk 1 fills while its tail is written
    assert w.commit() == 8
    w.close()
    cap = open_capture(path)
    assert np.array_equal(cap.read("a"), x)
    from llminstr.tools import stored_bytes

    keys = ["activations/a"] + [f"tokens/{c}" for c in cap.token_columns]
    assert w.stats().stored_bytes == sum(stored_bytes(cap, k) for k in keys)
