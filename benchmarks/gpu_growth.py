"""Does a captured ``generate``'s cost per step grow with the step, on CUDA?

The GPU overhead runs (docs/performance.md, run 4) cost 3.1 ms per extra token at 96 new
tokens and 4.9 at 384, after a fixed cost of about 0.2 s: more than linear. This script
times every forward pass of one long ``generate`` (GPT-2-small shape, random weights),
plain and captured, and prints the median wall time per step in bins of steps; then it
profiles one captured run (cProfile, all threads' Python frames that run in the model's
thread) and prints the functions with the most own time.

Run: ``python benchmarks/gpu_growth.py [--new-tokens 384] [--batch 4]``
"""

from __future__ import annotations

import argparse
import cProfile
import io
import itertools
import pstats
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers

from llminstr import HookGranularity, InstrumentationConfig, InstrumentationFramework


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--new-tokens", type=int, default=384)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--bins", type=int, default=6)
    ap.add_argument(
        "--captured-only",
        action="store_true",
        help="only warm up and run one captured generate (for an outside profiler: "
        "py-spy record --native -- python benchmarks/gpu_growth.py --captured-only)",
    )
    args = ap.parse_args()
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257)
    model = transformers.GPT2LMHeadModel(cfg).eval().to(args.device)
    ids = torch.randint(0, 50000, (args.batch, 32), device=args.device)
    stamps: list[float] = []
    model.register_forward_pre_hook(lambda m, a: stamps.append(time.perf_counter()))
    fw = InstrumentationFramework(
        InstrumentationConfig(granularity=HookGranularity.ALL, max_memory_gb=1.0, progress=False)
    )
    fw.instrument_model(model)

    def run() -> list[float]:
        stamps.clear()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
        if args.device != "cpu":
            torch.cuda.synchronize()
        return [b - a for a, b in itertools.pairwise(stamps)]

    tmp = Path(tempfile.mkdtemp(prefix="llminstr-growth-"))
    run()
    with fw.capture_activations(tmp / "warm.zarr", overwrite=True):
        run()
    if args.captured_only:
        t = time.perf_counter()
        with fw.capture_activations(tmp / "only.zarr", overwrite=True):
            steps = run()
        print(f"captured generate: {time.perf_counter() - t:.3f} s, {len(steps) + 1} steps")
        return
    plain = run()
    with fw.capture_activations(tmp / "c.zarr", overwrite=True):
        captured = run()
    n = min(len(plain), len(captured))
    width = max(1, n // args.bins)
    print(f"ms per step, medians over bins of {width} steps")
    print(f"{'steps':>12s} {'plain':>8s} {'captured':>9s} {'extra':>7s}")
    for lo in range(0, n - width + 1, width):
        p = statistics.median(plain[lo : lo + width]) * 1e3
        c = statistics.median(captured[lo : lo + width]) * 1e3
        print(f"{lo:5d}-{lo + width - 1:<6d} {p:8.2f} {c:9.2f} {c - p:7.2f}")
    prof = cProfile.Profile()
    with fw.capture_activations(tmp / "p.zarr", overwrite=True):
        prof.enable()
        run()
        prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(22)
    print("\n".join(line[:150] for line in out.getvalue().splitlines()[6:]))


if __name__ == "__main__":
    main()
