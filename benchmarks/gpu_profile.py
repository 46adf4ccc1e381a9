"""Where the time goes during a captured ``generate`` on CUDA.

Runs a GPT-2-small-shaped model (random weights) plain and in several capture variants,
interleaved, and prints for each: wall time, CPU time of the model's thread, CPU time of
the whole process (drain and encoder threads included), per generated token. Variants:

- ``captured``: the library as it is;
- ``deferred``: small outputs copied at the end of their pass on the copy stream
  (``staging.DEFER_COPIES``) instead of at once on the producing stream;
- ``no-drain``: the same copies, but batches are held until the capture closes, so the
  drain and encoder threads stay idle while the model runs;
- ``spin-events``: batch events that spin instead of block while the drain waits;
- ``torch-pinned``: arenas from torch's pinned allocator instead of registered ``mmap``
  pages (if registered pages were not treated as pinned, every copy would wait);
- ``stage-noop``: hooks and session bookkeeping only, the stager drops every output;
- ``bare-hooks``: plain forward hooks that do nothing, on the same modules (the cost of
  torch's hook dispatch alone).

The extra wall time per site per step is what each costs the model; wall minus
model-thread CPU is time the model's thread waited (the GPU, or the GIL).

Run: ``python benchmarks/gpu_profile.py [--new-tokens 48] [--repeats 3] [--batch 4]``
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers

from llminstr import (
    HookGranularity,
    InstrumentationConfig,
    InstrumentationFramework,
    capture,
    staging,
)
from llminstr.staging import CudaStager, DeviceOps


class _SpinOps(DeviceOps):
    def record_event(self, stream: object) -> object:
        event = torch.cuda.Event()
        event.record(stream)  # type: ignore[arg-type]
        return event


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--device", default="cuda", help="cuda (cpu only as a smoke test)")
    args = ap.parse_args()
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257)
    model = transformers.GPT2LMHeadModel(cfg).eval().to(args.device)
    ids = torch.randint(0, 50000, (args.batch, 32), device=args.device)
    fw = InstrumentationFramework(
        InstrumentationConfig(granularity=HookGranularity.ALL, max_memory_gb=1.0, progress=False)
    )
    sites = fw.instrument_model(model)

    def generate() -> None:
        with torch.no_grad():
            model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
        if args.device != "cpu":
            torch.cuda.synchronize()

    variants = (
        "plain",
        "captured",
        "deferred",
        "no-drain",
        "spin-events",
        "torch-pinned",
        "stage-noop",
        "bare-hooks",
    )
    samples: dict[str, list[tuple[float, float, float]]] = {v: [] for v in variants}
    modules = dict(model.named_modules())
    real_ops, real_stage, real_end = capture.DEVICE_OPS, CudaStager.stage, CudaStager.end_pass

    def run(name: str, path: Path) -> None:
        if name == "plain":
            generate()
        elif name == "bare-hooks":
            handles = [modules[s.module_path].register_forward_hook(lambda *a: None) for s in sites]
            try:
                generate()
            finally:
                for h in handles:
                    h.remove()
        else:
            capture.DEVICE_OPS = {
                "spin-events": _SpinOps(),
                "torch-pinned": DeviceOps(register=False),
            }.get(name, real_ops)
            held = (staging.BATCH_BYTES, staging.BATCH_PASSES, staging.BATCH_SECONDS)
            staging.DEFER_COPIES = name == "deferred"
            if name == "no-drain":
                staging.BATCH_BYTES, staging.BATCH_PASSES, staging.BATCH_SECONDS = (
                    1 << 62,
                    1 << 62,
                    float("inf"),
                )
            if name == "stage-noop":  # nothing staged and no token rows: an empty capture
                CudaStager.stage = lambda *a, **k: None  # type: ignore[method-assign]
                CudaStager.end_pass = lambda *a, **k: None  # type: ignore[method-assign]
            try:
                with fw.capture_activations(path):
                    generate()
            finally:
                staging.BATCH_BYTES, staging.BATCH_PASSES, staging.BATCH_SECONDS = held
                staging.DEFER_COPIES = False
                capture.DEVICE_OPS = real_ops
                CudaStager.stage, CudaStager.end_pass = real_stage, real_end  # type: ignore[method-assign]

    with tempfile.TemporaryDirectory() as d:
        for name in variants:  # warm-up
            run(name, Path(d) / f"warm-{name}.zarr")
        for r in range(args.repeats):
            for name in variants:
                w, t, p = time.perf_counter(), time.thread_time(), time.process_time()
                run(name, Path(d) / f"{name}-{r}.zarr")
                samples[name].append(
                    (time.perf_counter() - w, time.thread_time() - t, time.process_time() - p)
                )
    steps = args.new_tokens
    print(f"sites={len(sites)} new_tokens={steps} batch={args.batch} (medians of {args.repeats})")
    print(
        f"{'run':<12} {'wall ms/tok':>12} {'model-thread cpu':>17} {'process cpu':>12} {'us/site/step':>13}"
    )
    med = {}
    for name, rows in samples.items():
        med[name] = [statistics.median(col) / steps * 1e3 for col in zip(*rows, strict=True)]
    for name in variants:
        wall, thread, proc = med[name]
        extra = (wall - med["plain"][0]) / len(sites) * 1e3
        print(f"{name:<12} {wall:>12.3f} {thread:>17.3f} {proc:>12.3f} {extra:>13.1f}")
    print(f"ratio captured/plain {med['captured'][0] / med['plain'][0]:.3f}")
    stats = fw.last_capture_stats or {}
    print(
        "last capture:",
        {k: stats.get(k) for k in ("rows", "stall_seconds", "peak_buffered_bytes", "seconds")},
    )


if __name__ == "__main__":
    main()
