"""The CUDA staging path (pinned arenas, copy stream, events) on a real device: no
synchronisation of the compute stream, exact rows under budget pressure and on a
non-default stream, worker failures reaching the caller; with small outputs copied at once
and with their copies deferred to the end of the pass. Skipped without a CUDA device."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_staging import (
    _expected,
    _stack,
    check_rows_under_budget_pressure,
    check_writer_failure_reaches_the_model_thread,
)
from test_staging import _inputs as _cpu_inputs

from llminstr import InstrumentationFramework, staging
from llminstr.reader import open_capture

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(autouse=True, params=[False, True], ids=["copy-at-once", "copy-deferred"])
def defer(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    monkeypatch.setattr(staging, "DEFER_COPIES", bool(request.param))
    return bool(request.param)


def _framework(layers: int, **cfg: Any) -> tuple[InstrumentationFramework, torch.nn.Module]:
    return _stack(layers, device="cuda", **cfg)


def _inputs(
    passes: int, batch: int, seq: int, width: int, dtype: torch.dtype
) -> list[torch.Tensor]:
    return _cpu_inputs(passes, batch, seq, width, dtype, device="cuda")


@pytest.mark.timeout(120)
def test_hooks_never_synchronise_the_compute_stream(tmp_path: Path) -> None:
    """With torch's sync debug mode set to "error", any synchronising call made on the
    model's thread (a blocking copy, .item(), a stream synchronize) raises."""
    fw, model = _framework(4, max_memory_gb=0.2, chunk_rows=64)
    inputs = _inputs(12, 2, 16, 128, torch.float32)
    with fw.capture_activations(tmp_path / "c.zarr"), torch.no_grad():
        model(inputs_embeds=inputs[0])  # the first pass opens the writer (it waits, once)
        torch.cuda.set_sync_debug_mode("error")
        try:
            for x in inputs[1:]:
                model(inputs_embeds=x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    cap = open_capture(tmp_path / "c.zarr")
    assert cap.num_rows == 12 * 2 * 16
    for i in range(4):
        assert np.array_equal(cap.activations(f"layers.{i}").compute(), _expected(inputs, i))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seq", [64, 160], ids=["inline", "copy-stream"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rows_exact_when_the_budget_forces_arena_reuse(
    dtype: torch.dtype, seq: int, tmp_path: Path
) -> None:
    """8 sites per pass against a 24 MB budget shared with the writer's chunk buffers, on
    both paths (64-row passes copied on the producing stream; 160-row passes, over 1 MiB
    in every dtype, cloned and copied on the copy stream): the arena pool must wait for
    the drain thread and reuse its arenas."""
    check_rows_under_budget_pressure(_inputs(40, 4, seq, 1024, dtype), "cuda", tmp_path / "c.zarr")


@pytest.mark.timeout(120)
def test_model_on_a_side_stream(tmp_path: Path) -> None:
    """The copy waits on the stream that produced the tensor, not on the default stream."""
    fw, model = _framework(3, max_memory_gb=0.1, chunk_rows=128)
    cuda: Any = torch.cuda  # its stream helpers carry no annotations
    side = cuda.Stream()
    with torch.cuda.stream(side):
        inputs = _inputs(10, 4, 32, 512, torch.float32)
        with fw.capture_activations(tmp_path / "c.zarr"), torch.no_grad():
            for x in inputs:
                cuda._sleep(1_000_000)  # keep the side stream busy: a missing wait shows
                model(inputs_embeds=x)
        expected = [_expected(inputs, i) for i in range(3)]
    cap = open_capture(tmp_path / "c.zarr")
    for i in range(3):
        assert np.array_equal(cap.activations(f"layers.{i}").compute(), expected[i])


@pytest.mark.timeout(120)
def test_writer_failure_during_cuda_capture_reaches_the_caller(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fw, model = _framework(4, max_memory_gb=0.05, chunk_rows=128, commit_interval_s=0.001)
    inputs = _inputs(4, 4, 64, 512, torch.float32)
    check_writer_failure_reaches_the_model_thread(
        fw, model, inputs, tmp_path / "c.zarr", monkeypatch, fail_after=40
    )
