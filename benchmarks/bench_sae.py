"""Benchmark: TopK SAE training throughput (rows/s) on a capture, on CPU (or --device).

Writes a synthetic capture (sparse combinations of random directions plus noise, width
``--d``) through :class:`~llminstr.storage.writer.CaptureWriter`, then trains one SAE per
expansion factor with :func:`llminstr.analysis.sae.train_sae` for a fixed number of steps,
reading the capture chunk by chunk as in real use. "train rows/s" is end to end (the
initial sample for b_dec and the scale, chunk reads, the shuffle buffer, the optimiser);
"step rows/s" counts optimiser steps only (forward, sparse gradients, Adam); the
evaluation pass (one pass over every row, with top-example tracking) is timed separately.

    python benchmarks/bench_sae.py                  # d=768, 4x and 8x, k=32
    python benchmarks/bench_sae.py --json           # machine-readable
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llminstr.analysis.sae import SAEConfig, train_sae
from llminstr.format import SiteInfo
from llminstr.reader import open_capture
from llminstr.storage.writer import CaptureWriter


def make_capture(path: Path, rows: int, d: int, chunk_rows: int, seed: int = 0) -> float:
    """Write ``rows`` synthetic activations of width ``d``; return the seconds taken."""
    rng = np.random.default_rng(seed)
    atoms = rng.standard_normal((4 * d, d)).astype(np.float32)
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    started = time.perf_counter()
    with CaptureWriter(path, [SiteInfo("resid", (d,), "float32")], chunk_rows=chunk_rows) as w:
        for start in range(0, rows, chunk_rows):
            n = min(chunk_rows, rows - start)
            idx = rng.integers(0, len(atoms), (n, 16))
            mags = rng.exponential(1.0, (n, 16)).astype(np.float32)
            x = np.einsum("nk,nkd->nd", mags, atoms[idx])
            x += 0.05 * rng.standard_normal((n, d)).astype(np.float32)
            r = np.arange(start, start + n)
            w.append(
                {
                    "token_id": r % 50257,
                    "sequence": r // 128,
                    "position": r % 128,
                    "step": r // 128,
                },
                {"resid": x.astype(np.float32)},
            )
    return time.perf_counter() - started


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "bench.zarr"
        write_s = make_capture(path, args.rows, args.d, args.chunk_rows)
        cap = open_capture(path)
        # warm-up: first-call costs (lazy imports in torch.optim, kernel setup) are not timed
        warm = SAEConfig(n_features=64, k=4, steps=2, batch_size=64, shuffle_buffer_rows=64)
        train_sae(cap, warm, site="resid", rows=(0, 2048), device=args.device)
        for expansion in args.expansions:
            cfg = SAEConfig(
                n_features=expansion * args.d,
                k=args.k,
                steps=args.steps,
                batch_size=args.batch_size,
                shuffle_buffer_rows=max(args.batch_size, args.shuffle_buffer_rows),
                device=args.device,
                top_examples=8,
            )
            res = train_sae(cap, cfg, site="resid")
            m = res.metrics
            eval_s = m["seconds"] - m["train_seconds"]
            results.append(
                {
                    "d": args.d,
                    "n_features": cfg.n_features,
                    "expansion": expansion,
                    "k": args.k,
                    "batch_size": args.batch_size,
                    "steps": m["steps"],
                    "train_rows": m["rows_trained"],
                    "train_seconds": m["train_seconds"],
                    "train_rows_per_s": m["rows_trained"] / m["train_seconds"],
                    "step_seconds": m["step_seconds"],
                    "step_rows_per_s": m["rows_trained"] / m["step_seconds"],
                    "eval_rows": m["eval_rows"],
                    "eval_seconds": eval_s,
                    "eval_rows_per_s": m["eval_rows"] / eval_s if eval_s > 0 else None,
                    "fvu": m["fvu"],
                    "mean_l0": m["mean_l0"],
                    "dead_fraction": m["dead_fraction"],
                }
            )
        cap.close()
    return {
        "benchmark": "sae_training",
        "device": args.device,
        "torch_threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "capture_rows": args.rows,
        "capture_write_seconds": write_s,
        "results": results,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--expansions", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--rows", type=int, default=16384)
    parser.add_argument("--chunk-rows", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--shuffle-buffer-rows", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=max(1, torch.get_num_threads()))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dir", default=None, help="where the temporary capture goes")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    report = run(args)
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
        return 0
    print(
        f"TopK SAE training on {report['device']} ({report['torch_threads']} torch threads), "
        f"capture of {args.rows} rows x {args.d} float32"
    )
    header = f"{'n_features':>10} {'k':>4} {'batch':>6} {'steps':>6} {'train rows/s':>13} {'step rows/s':>12} {'eval rows/s':>12} {'FVU':>7}"
    print(header)
    print("-" * len(header))
    for r in report["results"]:
        fvu = f"{r['fvu']:.3f}" if r["fvu"] is not None else "-"
        ev = f"{r['eval_rows_per_s']:.0f}" if r["eval_rows_per_s"] else "-"
        print(
            f"{r['n_features']:>10} {r['k']:>4} {r['batch_size']:>6} {r['steps']:>6} "
            f"{r['train_rows_per_s']:>13.0f} {r['step_rows_per_s']:>12.0f} {ev:>12} {fvu:>7}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
