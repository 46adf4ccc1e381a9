"""The staging path of the capture engine (llminstr.staging) run on the CPU: a stand-in for
the CUDA calls sends CPU tensors through the arenas, batches and drain thread, so the
bookkeeping (rows, padding, pass batches, the memory budget, arena release, failures) is
tested without a GPU. tests/test_cuda.py checks the same path on a real device."""

from __future__ import annotations

import contextlib
import mmap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import llminstr_threads
from test_capture import MASK, PROMPTS, _check_rows_match, _tiny

from llminstr import InstrumentationConfig, InstrumentationFramework, capture, staging
from llminstr.errors import FormatError, LlminstrError
from llminstr.reader import open_capture
from llminstr.storage import backends
from llminstr.storage.writer import CaptureWriter


class _Stream:
    def wait_event(self, event: object) -> None:
        pass


class _Event:
    def synchronize(self) -> None:
        pass  # CPU copies are done when copy_ returns


class FakeOps(staging.DeviceOps):
    """Every tensor counts as a device tensor; copies are plain CPU copies."""

    def __init__(self) -> None:
        super().__init__()
        self.stream = _Stream()
        self.allocated = 0
        self.released = 0
        self.copy_streams = 0  # made for outputs over INLINE_BYTES, or deferred copies
        self.deferred = False

    def handles(self, tensor: torch.Tensor) -> bool:
        return True

    def current_stream(self, device: torch.device) -> Any:
        return self.stream

    def new_stream(self, device: torch.device) -> Any:
        self.copy_streams += 1
        return _Stream()

    def record_event(self, stream: Any) -> Any:
        return _Event()

    def use_stream(self, stream: Any) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def record_stream(self, tensor: torch.Tensor, stream: Any) -> None:
        pass

    def host_copy(self, src: torch.Tensor) -> torch.Tensor:
        return src.clone()

    def pinned(self, nbytes: int) -> tuple[np.ndarray, torch.Tensor, Callable[[], None]]:
        array = np.frombuffer(mmap.mmap(-1, nbytes), dtype=np.uint8)
        array[:] = 0xA5  # poison: a row the drain reads before it was copied shows
        self.allocated += 1

        def release() -> None:
            self.released += 1

        return array, torch.from_numpy(array), release


@pytest.fixture(params=[False, True], ids=["copy-at-once", "copy-deferred"])
def fake(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOps]:
    """The stand-in, with small outputs copied at once on the producing stream, or at the
    end of their pass on the copy stream (staging.DEFER_COPIES)."""
    ops = FakeOps()
    ops.deferred = bool(request.param)
    monkeypatch.setattr(capture, "DEVICE_OPS", ops)
    monkeypatch.setattr(staging, "DEFER_COPIES", ops.deferred)
    yield ops
    assert ops.allocated == ops.released, "every arena is released at close"


class _Stack(torch.nn.Module):
    """Layer i returns x * (i + 1) + i, so expected rows are cheap to recompute."""

    def __init__(self, layers: int) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Identity() for _ in range(layers))

    def forward(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        out = inputs_embeds
        for i, layer in enumerate(self.layers):
            out = layer(inputs_embeds * (i + 1) + i)
        return out


def _stack(layers: int, device: str = "cpu", **cfg: Any) -> tuple[InstrumentationFramework, _Stack]:
    model = _Stack(layers).to(device)
    names = tuple(f"layers.{i}" for i in range(layers))
    fw = InstrumentationFramework(InstrumentationConfig(module_names=names, progress=False, **cfg))
    fw.instrument_model(model)
    return fw, model


def _inputs(
    passes: int,
    batch: int,
    seq: int,
    width: int,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [
        torch.randn(batch, seq, width, generator=g).to(device=device, dtype=dtype)
        for _ in range(passes)
    ]


def _expected(inputs: list[torch.Tensor], layer: int) -> np.ndarray:
    """Rows of layer ``layer``, computed where the inputs live (bfloat16 as its bits)."""
    out = torch.cat([(x * (layer + 1) + layer).reshape(-1, x.shape[-1]) for x in inputs]).cpu()
    return out.view(torch.uint16).numpy() if out.dtype == torch.bfloat16 else out.numpy()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_generate_with_padding_through_the_stager(arch: str, fake: FakeOps, tmp_path: Path) -> None:
    """Left-padded prompts, then decode steps batched together: rows equal independent
    hooks bit for bit (the check of the direct path, run through the arenas)."""
    _check_rows_match(arch, torch.float32, tmp_path / "c.zarr")
    assert fake.allocated > 0, "the stand-in was used"


def test_progress_counts_stored_rows_through_the_stager(
    fake: FakeOps, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The CUDA path resolves a pass's padding in its drain thread: the bar counts the
    rows stored there, not the padded positions."""
    model = _tiny("gpt2")
    fw = InstrumentationFramework(InstrumentationConfig(max_memory_gb=0.1, progress=True))
    fw.instrument_model(model)
    with fw.capture_activations(tmp_path / "p.zarr"), torch.no_grad():
        model(PROMPTS, attention_mask=MASK)  # 18 positions, 14 real tokens
    err = capsys.readouterr().err
    assert fake.allocated > 0, "the stand-in was used"
    assert "capture: 14 rows" in err and "18 rows" not in err, err
    assert open_capture(tmp_path / "p.zarr").num_rows == 14


def test_bf16_through_the_stager(fake: FakeOps, tmp_path: Path) -> None:
    _check_rows_match("qwen2", torch.bfloat16, tmp_path / "c.zarr")


@pytest.mark.timeout(60)
def test_small_passes_are_batched(
    fake: FakeOps, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decode-sized passes share arenas and batches: far fewer writer calls than
    passes x sites, and every row in place."""
    calls = {"n": 0}
    original = CaptureWriter.write_site_lent

    def counting(self: CaptureWriter, name: str, rows: Any, release: Any) -> None:
        calls["n"] += 1
        original(self, name, rows, release)

    monkeypatch.setattr(CaptureWriter, "write_site_lent", counting)
    monkeypatch.setattr(staging, "BATCH_SECONDS", 60.0)  # batches close by size and count
    fw, model = _stack(4, max_memory_gb=0.05, chunk_rows=64)
    inputs = _inputs(200, 4, 1, 32)
    with fw.capture_activations(tmp_path / "c.zarr"), torch.no_grad():
        for x in inputs:
            model(inputs_embeds=x)
    cap = open_capture(tmp_path / "c.zarr")
    assert cap.num_rows == 800
    for i in range(4):
        assert np.array_equal(cap.activations(f"layers.{i}").compute(), _expected(inputs, i))
    staged = fw.last_capture_stats["staging"]  # type: ignore[index]
    assert staged["staged_bytes"] == 4 * 800 * 32 * 4
    assert staged["batches"] == 1 + -(-199 // staging.BATCH_PASSES)
    assert 0 < staged["peak_arena_bytes"] <= 0.05e9
    # the first pass is copied before the writer exists; then batches of BATCH_PASSES
    # passes: one call per site per batch, two where a batch crosses into a new arena
    batches = -(-199 // staging.BATCH_PASSES)
    assert 4 * batches <= calls["n"] <= 4 * batches + 4 * (200 // staging.ARENA_PASSES + 1)
    np.testing.assert_array_equal(cap.tokens["step"].compute(), np.repeat(np.arange(200), 4))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seq", [64, 160], ids=["inline-1MiB", "copy-stream-2.6MB"])
def test_budget_pressure_splits_passes_and_never_deadlocks(
    fake: FakeOps, tmp_path: Path, seq: int
) -> None:
    """8 sites of 1 MiB (copied on the producing stream) or 2.6 MB (cloned, then copied on
    the copy stream) per pass against a 24 MB budget shared with the writer: passes are
    split across arenas, batches are sent mid-pass, and the producer waits for arenas to
    come back instead of waiting on the writer forever."""
    assert (staging.INLINE_BYTES >= 4 * 64 * 1024 * 4) and (
        staging.INLINE_BYTES < 4 * 160 * 1024 * 4
    )
    check_rows_under_budget_pressure(_inputs(30, 4, seq, 1024), "cpu", tmp_path / "c.zarr")
    assert fake.copy_streams == (1 if seq == 160 or fake.deferred else 0)


def check_rows_under_budget_pressure(inputs: list[torch.Tensor], device: str, path: Path) -> None:
    """Eight sites against a 24 MB budget shared with the writer: the buffered bytes stay
    within it and every row arrives. (Also run on a GPU by tests/test_cuda.py.)"""
    fw, model = _stack(8, device, max_memory_gb=0.024, chunk_rows=256, encoder_threads=2)
    with fw.capture_activations(path), torch.no_grad():
        for x in inputs:
            model(inputs_embeds=x)
    stats = fw.last_capture_stats
    assert stats is not None
    assert stats["peak_buffered_bytes"] <= 0.024e9
    cap = open_capture(path)
    assert cap.status == "complete" and cap.num_rows == sum(x.shape[0] * x.shape[1] for x in inputs)
    for i in range(8):
        got = cap.activations(f"layers.{i}", logical=False).compute()
        assert np.array_equal(got, _expected(inputs, i)), f"layers.{i}"


def test_a_row_wider_than_an_arena(
    fake: FakeOps, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(staging, "MAX_ARENA", 64 << 10)
    fw, model = _stack(2, max_memory_gb=0.2, chunk_rows=4)
    inputs = _inputs(5, 2, 3, 40_000)  # 160 KB rows, 64 KiB arenas
    with fw.capture_activations(tmp_path / "c.zarr"), torch.no_grad():
        for x in inputs:
            model(inputs_embeds=x)
    cap = open_capture(tmp_path / "c.zarr")
    for i in range(2):
        assert np.array_equal(cap.activations(f"layers.{i}").compute(), _expected(inputs, i))


def test_budget_and_arenas_released_at_close(fake: FakeOps, tmp_path: Path) -> None:
    fw, model = _stack(3, max_memory_gb=0.05, chunk_rows=32)
    session_budget = []
    with fw.capture_activations(tmp_path / "c.zarr") as session, torch.no_grad():
        for x in _inputs(20, 2, 16, 256):
            model(inputs_embeds=x)
        session_budget.append(session.budget)
        assert fake.allocated > fake.released
    assert session_budget[0].used == 0
    assert fake.allocated == fake.released


def check_writer_failure_reaches_the_model_thread(
    fw: InstrumentationFramework,
    model: torch.nn.Module,
    inputs: list[torch.Tensor],
    path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fail_after: int,
) -> None:
    """Chunk writes fail after ``fail_after``: the model's thread gets an error whose causes
    include the disk's, promptly; the capture is aborted with whole, correct passes; no
    llminstr thread is left running. (Also run on a GPU by tests/test_cuda.py.)"""
    before = llminstr_threads()
    disk_full = OSError(28, "disk full")
    calls = {"n": 0}
    original = backends.ZarrBackend.write_chunk

    def failing(self: backends.ZarrBackend, *args: Any) -> None:
        calls["n"] += 1
        if calls["n"] > fail_after:
            raise disk_full
        original(self, *args)

    monkeypatch.setattr(backends.ZarrBackend, "write_chunk", failing)
    start = time.monotonic()
    with pytest.raises(LlminstrError) as info, fw.capture_activations(path), torch.no_grad():
        for _ in range(2000):
            for x in inputs:
                model(inputs_embeds=x)
    assert time.monotonic() - start < 30
    chain: list[BaseException] = []
    err: BaseException | None = info.value
    while err is not None:
        chain.append(err)
        err = err.__cause__
    assert disk_full in chain, chain
    cap = open_capture(path)
    assert cap.status == "aborted"
    assert cap.verify() == []
    rows = cap.activations("layers.0").compute()
    per_pass = inputs[0].shape[0] * inputs[0].shape[1]
    assert cap.num_rows >= per_pass
    for p in range(cap.num_rows // per_pass):
        want = _expected([inputs[p % len(inputs)]], 0)
        assert np.array_equal(rows[p * per_pass : (p + 1) * per_pass], want)
    deadline = time.monotonic() + 10
    while llminstr_threads() - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert llminstr_threads() - before == set()


@pytest.mark.timeout(60)
def test_writer_failure_reaches_the_model_thread(
    fake: FakeOps, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fw, model = _stack(3, max_memory_gb=0.05, chunk_rows=32, commit_interval_s=0.001)
    check_writer_failure_reaches_the_model_thread(
        fw, model, _inputs(4, 2, 16, 64), tmp_path / "c.zarr", monkeypatch, fail_after=30
    )


def test_a_site_that_changes_shape_between_passes(fake: FakeOps, tmp_path: Path) -> None:
    fw, model = _stack(2, max_memory_gb=0.05)
    with (
        pytest.raises(
            FormatError, match=r"site 'layers\.0' changed from torch\.float32 rows of shape"
        ),
        fw.capture_activations(tmp_path / "c.zarr"),
        torch.no_grad(),
    ):
        model(inputs_embeds=torch.zeros(2, 4, 16))
        model(inputs_embeds=torch.zeros(2, 4, 8))


@pytest.mark.parametrize("seq", [8, 160], ids=["inline", "copy-stream"])
def test_storage_dtype_conversion_through_the_stager(
    fake: FakeOps, tmp_path: Path, seq: int
) -> None:
    """A float32 model stored as float16: the hook converts on the device (a fresh tensor,
    which the copy-stream path then needs no snapshot of)."""
    fw, model = _stack(2, max_memory_gb=0.1, storage_dtype="float16")
    inputs = _inputs(6, 4, seq, 1024)
    with fw.capture_activations(tmp_path / "c.zarr"), torch.no_grad():
        for x in inputs:
            model(inputs_embeds=x)
    cap = open_capture(tmp_path / "c.zarr")
    for i in range(2):
        got = cap.activations(f"layers.{i}").compute()
        assert got.dtype == np.float16
        assert np.array_equal(got, _expected(inputs, i).astype(np.float16))
    assert fake.copy_streams == (1 if seq == 160 or fake.deferred else 0)


class _ChangesInPlace(torch.nn.Module):
    """Site ``site`` returns x + 1; the model then adds 100 to that output in place,
    from pass ``from_pass`` on (like Falcon adding attention into its MLP output)."""

    def __init__(self, from_pass: int) -> None:
        super().__init__()
        self.site = torch.nn.Identity()
        self.from_pass = from_pass
        self.passes = 0

    def forward(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        out = self.site(inputs_embeds + 1)
        if self.passes >= self.from_pass:
            out.add_(100)
        self.passes += 1
        return out


def _changes_in_place(from_pass: int) -> tuple[InstrumentationFramework, _ChangesInPlace]:
    model = _ChangesInPlace(from_pass)
    fw = InstrumentationFramework(
        InstrumentationConfig(module_names=("site",), max_memory_gb=0.05, progress=False)
    )
    fw.instrument_model(model)
    return fw, model


def test_output_changed_in_place_after_the_hook_is_captured_as_it_was(
    fake: FakeOps, tmp_path: Path
) -> None:
    """Changed in every pass: the first pass marks the site as changed in place, so even
    with deferred copies it is copied at once, before the change."""
    fw, model = _changes_in_place(from_pass=0)
    inputs = _inputs(6, 2, 4, 32)
    with fw.capture_activations(tmp_path / "c.zarr"), torch.no_grad():
        for x in inputs:
            model(inputs_embeds=x)
    got = open_capture(tmp_path / "c.zarr").activations("site").compute()
    want = torch.cat([(x + 1).reshape(-1, 32) for x in inputs]).numpy()
    assert np.array_equal(got, want)


def test_a_later_in_place_change_is_refused_when_copies_are_deferred(
    fake: FakeOps, tmp_path: Path
) -> None:
    """Not changed in the first pass, changed in the third: copied at once, the rows are
    right; deferred, the change would reach the capture, so the pass is refused."""
    fw, model = _changes_in_place(from_pass=2)
    inputs = _inputs(4, 2, 4, 32)
    want = torch.cat([(x + 1).reshape(-1, 32) for x in inputs]).numpy()
    if not fake.deferred:
        with fw.capture_activations(tmp_path / "c.zarr"), torch.no_grad():
            for x in inputs:
                model(inputs_embeds=x)
        assert np.array_equal(open_capture(tmp_path / "c.zarr").activations("site").compute(), want)
        return
    with (
        pytest.raises(FormatError, match=r"site\(s\) \['site'\] was changed in place"),
        fw.capture_activations(tmp_path / "c.zarr"),
        torch.no_grad(),
    ):
        for x in inputs:
            model(inputs_embeds=x)
    cap = open_capture(tmp_path / "c.zarr")
    assert cap.status == "aborted"
    assert np.array_equal(cap.activations("site").compute(), want[: cap.num_rows])
