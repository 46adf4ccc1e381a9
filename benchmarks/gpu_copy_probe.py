"""What one small device-to-host copy costs the thread that issues it, on CUDA.

The hook profile (``gpu_profile.py``, docs/performance.md, run 4) put about 40 µs of the
model thread's CPU per site per step in the stager's ``copy_(non_blocking=True)`` of a
12 KB output into a pinned arena. This probe issues the same kind of copy in a loop and
reports host CPU µs and wall µs per call (medians over rounds) for:

- ``as_strided``: building the destination view alone (no copy);
- ``d2h-registered``: into ``mmap`` pages registered with ``cudaHostRegister`` (the
  stager's arenas), through the same ``torch.as_strided`` view the stager builds;
- ``d2h-torch-pinned``: into a tensor from torch's pinned allocator;
- ``d2h-pageable``: into ordinary memory (torch then waits for the copy: the reference
  for what a synchronous copy costs);
- ``d2d``: into a device buffer (design (1) in docs/performance.md);
- ``launch``: one tiny elementwise kernel (``add_``), the floor of a torch call that
  launches work.

Each is measured with the GPU idle and with the stream kept busy by ``torch.cuda._sleep``
ahead of the copies (as in a generate, where the CPU runs ahead of the GPU): a copy whose
CPU cost grows with a busy stream waits for the GPU. ``stream`` is the GPU time per call
on the stream (events around the calls queued behind the sleep, less the sleep: the
events start after it): what each copy adds to the model's stream when issued there.

Run: ``python benchmarks/gpu_copy_probe.py [--kb 12] [--calls 400] [--rounds 5]``
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from llminstr.staging import DeviceOps


def _time(fn: Callable[[], None], calls: int, busy: bool) -> tuple[float, float, float]:
    """Host CPU, host wall and stream (GPU) µs per call. With ``busy``, the calls queue
    behind ~0.1 s of GPU sleep, so the events time the calls' own work on the stream."""
    if busy:
        torch.cuda._sleep(200_000_000)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    t0, c0 = time.perf_counter(), time.thread_time()
    for _ in range(calls):
        fn()
    t1, c1 = time.perf_counter(), time.thread_time()
    end.record()
    torch.cuda.synchronize()
    gpu = start.elapsed_time(end) * 1e3 / calls
    return (c1 - c0) / calls * 1e6, (t1 - t0) / calls * 1e6, gpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--kb", type=int, default=12, help="bytes per copy, in KB")
    ap.add_argument("--calls", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_copy_probe needs CUDA")
    n = args.kb * 1024 // 4
    src = torch.randn(n, device="cuda")
    ops = DeviceOps()
    _, arena, release = ops.pinned(n * 4 * args.calls)
    arena_f = arena.view(torch.float32)
    torch_pinned = torch.empty(n * args.calls, dtype=torch.float32, pin_memory=True)
    pageable = torch.empty(n, dtype=torch.float32)
    device_buf = torch.empty(n * args.calls, dtype=torch.float32, device="cuda")
    state = {"i": 0}

    def slot() -> int:
        state["i"] = (state["i"] + 1) % args.calls
        return state["i"] * n

    def view_only() -> None:
        torch.as_strided(arena_f, src.shape, src.stride(), slot())

    def d2h_registered() -> None:
        torch.as_strided(arena_f, src.shape, src.stride(), slot()).copy_(src, non_blocking=True)

    def d2h_torch_pinned() -> None:
        torch.as_strided(torch_pinned, src.shape, src.stride(), slot()).copy_(
            src, non_blocking=True
        )

    def d2h_pageable() -> None:
        pageable.copy_(src, non_blocking=True)

    def d2d() -> None:
        torch.as_strided(device_buf, src.shape, src.stride(), slot()).copy_(src, non_blocking=True)

    def launch() -> None:
        src.add_(0.0)

    variants = {
        "as_strided": view_only,
        "d2h-registered": d2h_registered,
        "d2h-torch-pinned": d2h_torch_pinned,
        "d2h-pageable": d2h_pageable,
        "d2d": d2d,
        "launch": launch,
    }
    for fn in variants.values():  # warm-up
        _time(fn, 20, busy=False)
    rows: dict[str, dict[str, list[tuple[float, float, float]]]] = {
        name: {"idle": [], "busy": []} for name in variants
    }
    for _ in range(args.rounds):  # interleaved rounds
        for name, fn in variants.items():
            for mode in ("idle", "busy"):
                rows[name][mode].append(_time(fn, args.calls, busy=mode == "busy"))
    release()
    print(f"{args.kb} KB per copy, {args.calls} calls x {args.rounds} rounds; medians, µs per call")
    print(
        f"{'variant':18s} {'cpu idle':>9s} {'wall idle':>10s} {'cpu busy':>9s} "
        f"{'wall busy':>10s} {'stream':>7s}"
    )
    for name, by_mode in rows.items():
        cells = [
            statistics.median(r[k] for r in by_mode[m]) for m in ("idle", "busy") for k in (0, 1)
        ]
        stream = statistics.median(r[2] for r in by_mode["busy"])
        print(
            f"{name:18s} {cells[0]:9.1f} {cells[1]:10.1f} {cells[2]:9.1f} {cells[3]:10.1f} "
            f"{stream:7.1f}"
        )


if __name__ == "__main__":
    main()
