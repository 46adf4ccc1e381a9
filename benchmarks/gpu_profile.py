"""Where the time goes during a captured ``generate`` on CUDA.

Runs a GPT-2-small-shaped model (random weights) plain and captured, interleaved, and
prints for each: wall time, CPU time of the model's thread, CPU time of the whole process
(the drain and encoder threads included), per generated token. The extra wall time per
site per step is what the hooks cost the model; wall minus model-thread CPU is time the
model's thread spent waiting (the GPU, or the GIL). Run it under ``py-spy record
--threads --idle`` for stacks (benchmarks/gpu_check.sh does).

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

from llminstr import HookGranularity, InstrumentationConfig, InstrumentationFramework


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args()
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257)
    model = transformers.GPT2LMHeadModel(cfg).eval().cuda()
    ids = torch.randint(0, 50000, (args.batch, 32), device="cuda")
    fw = InstrumentationFramework(
        InstrumentationConfig(granularity=HookGranularity.ALL, max_memory_gb=1.0, progress=False)
    )
    sites = fw.instrument_model(model)

    def generate() -> None:
        with torch.no_grad():
            model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()

    samples: dict[str, list[tuple[float, float, float]]] = {"plain": [], "captured": []}
    with tempfile.TemporaryDirectory() as d:
        generate()
        with fw.capture_activations(Path(d) / "warm.zarr"):
            generate()
        for r in range(args.repeats):
            for name in ("plain", "captured"):
                w, t, p = time.perf_counter(), time.thread_time(), time.process_time()
                if name == "plain":
                    generate()
                else:
                    with fw.capture_activations(Path(d) / f"c{r}.zarr"):
                        generate()
                samples[name].append(
                    (time.perf_counter() - w, time.thread_time() - t, time.process_time() - p)
                )
    steps = args.new_tokens
    print(f"sites={len(sites)} new_tokens={steps} batch={args.batch} (medians of {args.repeats})")
    print(f"{'run':<9} {'wall ms/tok':>12} {'model-thread cpu':>17} {'process cpu':>12}")
    med = {}
    for name, rows in samples.items():
        med[name] = [statistics.median(col) / steps * 1e3 for col in zip(*rows, strict=True)]
        wall, thread, proc = med[name]
        print(f"{name:<9} {wall:>12.3f} {thread:>17.3f} {proc:>12.3f}")
    extra = (med["captured"][0] - med["plain"][0]) / len(sites) * 1e3
    print(
        f"extra wall per site per step: {extra:.1f} us; ratio {med['captured'][0] / med['plain'][0]:.3f}"
    )
    stats = fw.last_capture_stats or {}
    print(
        "last capture:",
        {k: stats.get(k) for k in ("rows", "stall_seconds", "peak_buffered_bytes", "seconds")},
    )


if __name__ == "__main__":
    main()
