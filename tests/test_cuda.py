"""The CUDA staging path (copy stream, pinned slabs, events) on a real device: no
synchronisation of the compute stream, exact rows under budget pressure and on a
non-default stream, worker failures reaching the caller. Skipped without a CUDA device."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import llminstr_threads

from llminstr import InstrumentationConfig, InstrumentationFramework
from llminstr.errors import LlminstrError
from llminstr.reader import open_capture
from llminstr.storage import backends

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


class _Stack(torch.nn.Module):
    """Layers whose outputs are cheap to recompute exactly: layer i returns x * (i + 1) + i."""

    def __init__(self, layers: int) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Identity() for _ in range(layers))

    def forward(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        out = inputs_embeds
        for i, layer in enumerate(self.layers):
            out = layer(inputs_embeds * (i + 1) + i)
        return out


def _inputs(
    passes: int, batch: int, seq: int, width: int, dtype: torch.dtype
) -> list[torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(0)
    return [
        torch.randn(batch, seq, width, device="cuda", generator=g).to(dtype) for _ in range(passes)
    ]


def _expected(inputs: list[torch.Tensor], layer: int) -> np.ndarray:
    rows = [(x * (layer + 1) + layer).reshape(-1, x.shape[-1]) for x in inputs]
    out = torch.cat(rows).cpu()
    return out.view(torch.uint16).numpy() if out.dtype == torch.bfloat16 else out.numpy()


def _framework(layers: int, **cfg: object) -> tuple[InstrumentationFramework, _Stack]:
    model = _Stack(layers).cuda()
    names = tuple(f"layers.{i}" for i in range(layers))
    fw = InstrumentationFramework(
        InstrumentationConfig(module_names=names, progress=False, **cfg)  # type: ignore[arg-type]
    )
    fw.instrument_model(model)
    return fw, model


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
    fw, model = _framework(8, max_memory_gb=0.024, chunk_rows=256, encoder_threads=2)
    inputs = _inputs(40, 4, seq, 1024, dtype)
    with fw.capture_activations(tmp_path / "c.zarr"), torch.no_grad():
        for x in inputs:
            model(inputs_embeds=x)
    stats = fw.last_capture_stats
    assert stats is not None
    assert stats["peak_buffered_bytes"] <= 0.024e9
    cap = open_capture(tmp_path / "c.zarr")
    assert cap.status == "complete" and cap.num_rows == 40 * 4 * seq
    for i in range(8):
        got = cap.activations(f"layers.{i}", logical=False).compute()
        assert np.array_equal(got, _expected(inputs, i)), f"layers.{i}"


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
    before = llminstr_threads()
    disk_full = OSError(28, "disk full")
    calls = {"n": 0}
    original = backends.ZarrBackend.write_chunk

    def failing(self: backends.ZarrBackend, *args: object) -> None:
        calls["n"] += 1
        if calls["n"] > 40:
            raise disk_full
        original(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(backends.ZarrBackend, "write_chunk", failing)
    fw, model = _framework(4, max_memory_gb=0.05, chunk_rows=128, commit_interval_s=0.001)
    inputs = _inputs(4, 4, 64, 512, torch.float32)
    start = time.monotonic()
    with (
        pytest.raises(LlminstrError) as info,
        fw.capture_activations(tmp_path / "c.zarr"),
        torch.no_grad(),
    ):
        for _ in range(500):
            for x in inputs:
                model(inputs_embeds=x)
    assert time.monotonic() - start < 60
    chain, err = [], info.value
    while err is not None:
        chain.append(err)
        err = err.__cause__  # type: ignore[assignment]
    assert disk_full in chain, chain
    cap = open_capture(tmp_path / "c.zarr")
    assert cap.status == "aborted"
    assert cap.num_rows > 0 and cap.verify() == []
    x_rows = cap.activations("layers.0").compute()
    per_pass = 4 * 64
    for p in range(cap.num_rows // per_pass):
        want = _expected([inputs[p % 4]], 0)
        assert np.array_equal(x_rows[p * per_pass : (p + 1) * per_pass], want)
    deadline = time.monotonic() + 10
    while llminstr_threads() - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert llminstr_threads() - before == set()
