"""Analysis benchmark: the statistics pass against the same-run read ceiling.

For each stored dtype, one synthetic capture (``--sites`` sites of ``--dims`` features,
lz4, warm page cache) is measured, interleaved ``--repeat`` times (best of each kept):

* ceiling: every activation chunk read and decoded with the reader's
  ``_Source.read_chunk`` (file read + CRC32C + Blosc decode) on ``--threads`` threads,
  each thread decoding into a buffer it reuses;
* stats: ``compute(analyze_activations(capture, include=("statistics",)))`` on the
  threaded scheduler with ``num_workers=--threads`` (token columns left out, so both
  sides touch the same chunks; graph building included; the capture is opened before
  either clock starts);
* kernel: the block statistics kernel alone on one decoded chunk, one thread.

``--baseline FILE`` (another version of ``llminstr/analysis/statistics.py``, e.g.
``git show HEAD:llminstr/analysis/statistics.py > /tmp/old_statistics.py``) also runs
the stats pass and the kernel with that file's block kernel, merge and finish
functions, interleaved with the others, so old and new are compared in the same
machine state (``base_*`` columns).

Throughputs are GB/s of raw (stored, uncompressed) activation bytes. ``ratio`` =
stats / ceiling (target >= 0.8). Peak RSS: the stats pass runs again in a fresh
subprocess; ``extra RSS`` is its peak (``VmHWM`` restarted after the graph is built)
above its RSS at that point, compared with ``--budget-mb`` (default: 4 chunk-sized
buffers per thread + 32 MiB; the capture itself is 8-16x larger).

Run: ``python benchmarks/bench_analysis.py [--quick] [--json out.json]``
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

import llminstr.analysis.statistics as stats_module
from llminstr.analysis import analyze_activations, compute
from llminstr.analysis.statistics import DEFAULT_RELATIVE_ACCURACY
from llminstr.format import SiteInfo
from llminstr.reader import open_capture
from llminstr.storage.writer import CaptureWriter

CHILD = """
import json, sys, psutil
from llminstr.analysis import analyze_activations, compute

def hwm():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0

result = analyze_activations(sys.argv[1], include=("statistics",))
base = psutil.Process().memory_info().rss
try:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
except OSError:
    pass
compute(result, scheduler="threads", num_workers=int(sys.argv[2]))
print(json.dumps({"baseline": base, "peak": max(hwm(), base)}))
"""


def write_capture(path: Path, sites: int, dims: int, rows: int, chunk_rows: int, dtype: str) -> int:
    """A capture of random rows (a pool of 4 random chunks, shifted per chunk so that
    no two chunks are equal); returns the raw activation bytes."""
    import ml_dtypes

    rng = np.random.default_rng(0)
    pool = rng.standard_normal((4, chunk_rows, dims)).astype(np.float32)
    infos = [
        SiteInfo(f"layers.{i}", (dims,), dtype, kind="residual", layer=i) for i in range(sites)
    ]
    cast: Any = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    with CaptureWriter(path, infos, chunk_rows=chunk_rows, memory_budget_bytes=1 << 30) as w:
        for c in range(rows // chunk_rows):
            r = np.arange(c * chunk_rows, (c + 1) * chunk_rows, dtype=np.int64)
            tokens = {
                "token_id": r % 50000,
                "sequence": r // 512,
                "position": r % 512,
                "step": r % 512,
            }
            block = pool[c % 4] + np.float32(c % 7)
            w.append(
                tokens, {info.name: (block * (i + 1)).astype(cast) for i, info in enumerate(infos)}
            )
    itemsize = 4 if dtype == "float32" else 2
    return sites * dims * (rows // chunk_rows) * chunk_rows * itemsize


def warm(path: Path) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as fh:
                while fh.read(1 << 24):
                    pass


def ceiling_seconds(path: Path, threads: int) -> float:
    """Read and decode every activation chunk on ``threads`` threads, each decoding into a
    buffer of its own reused from chunk to chunk (as the statistics tasks do: a fresh
    buffer per chunk is slower on this VM, so the ceiling uses the faster way)."""
    cap = open_capture(path)
    sources = [cap._source(f"activations/{s}", s) for s in cap.sites]
    nchunks = math.ceil(cap.num_rows / cap.chunk_rows)
    jobs = [(src, i) for src in sources for i in range(nchunks)]
    local = threading.local()

    def read(job: tuple[Any, int]) -> None:
        src, index = job
        out = getattr(local, "out", None)
        if out is None or out.dtype != src.dtype:
            out = local.out = np.empty((src.chunk_rows, *src.feature_shape), src.dtype)
        src.read_chunk(index, out=out)

    with ThreadPoolExecutor(threads) as pool:
        t = time.perf_counter()
        for _ in pool.map(read, jobs):
            pass
        return time.perf_counter() - t


def stats_seconds(path: Path, threads: int) -> float:
    """The statistics pass, graph building included. The capture is opened before the
    clock starts, as for the ceiling (opening parses and validates the metadata)."""
    cap = open_capture(path)
    t = time.perf_counter()
    result = analyze_activations(cap, include=("statistics",), statistics_options={"tokens": False})
    compute(result, scheduler="threads", num_workers=threads)
    return time.perf_counter() - t


_SWAPPED = ("site_block_partial", "merge_site_partials", "finish_site")


def load_baseline(path: str) -> ModuleType:
    """Import another version of ``llminstr/analysis/statistics.py`` as its own module."""
    spec = importlib.util.spec_from_file_location("_baseline_statistics", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def kernels(module: ModuleType | None) -> Iterator[None]:
    """Within the block, graphs built by the statistics module use ``module``'s block
    kernel, merge and finish functions (``None``: the installed ones)."""
    if module is None:
        yield
        return
    saved = {name: getattr(stats_module, name) for name in _SWAPPED}
    try:
        for name in _SWAPPED:
            setattr(stats_module, name, getattr(module, name))
        yield
    finally:
        for name, fn in saved.items():
            setattr(stats_module, name, fn)


def kernel_gbps(path: Path, module: ModuleType | None = None) -> float:
    kernel = (module or stats_module).site_block_partial
    cap = open_capture(path)
    src = cap._source(f"activations/{cap.sites[0]}", cap.sites[0])
    chunk = src.read_chunk(0)
    lg = math.log((1 + DEFAULT_RELATIVE_ACCURACY) / (1 - DEFAULT_RELATIVE_ACCURACY))
    kernel(chunk, 1e-6, lg)
    best = math.inf
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(3):
            kernel(chunk, 1e-6, lg)
        best = min(best, (time.perf_counter() - t) / 3)
    return chunk.nbytes / best / 1e9


def peak_rss(path: Path, threads: int) -> dict[str, int]:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), str(threads)],
        capture_output=True,
        text=True,
        check=True,
    )
    out: dict[str, int] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows_out = []
    base = load_baseline(args.baseline) if args.baseline else None
    tmp = Path(tempfile.mkdtemp(prefix="bench_analysis_"))
    try:
        for dtype in args.dtypes.split(","):
            path = tmp / f"{dtype}.zarr"
            raw = write_capture(path, args.sites, args.dims, args.rows, args.chunk_rows, dtype)
            warm(path)
            ceil_t, stat_t, base_t = math.inf, math.inf, math.inf
            stats_seconds(path, args.threads)  # warm-up (imports)
            for _ in range(args.repeat):  # interleaved: drift hits all alike
                ceil_t = min(ceil_t, ceiling_seconds(path, args.threads))
                stat_t = min(stat_t, stats_seconds(path, args.threads))
                if base is not None:
                    with kernels(base):
                        base_t = min(base_t, stats_seconds(path, args.threads))
            rss = peak_rss(path, args.threads)
            extra = rss["peak"] - rss["baseline"]
            chunk_bytes = args.chunk_rows * args.dims * (4 if dtype == "float32" else 2)
            budget_mb = (
                args.budget_mb
                if args.budget_mb is not None
                else (4 * args.threads * chunk_bytes + (32 << 20)) / 2**20
            )
            rows_out.append(
                {
                    "dtype": dtype,
                    "raw_mb": raw / 2**20,
                    "chunk_kb": args.chunk_rows
                    * args.dims
                    * (4 if dtype == "float32" else 2)
                    / 1024,
                    "threads": args.threads,
                    "ceiling_gbps": raw / ceil_t / 1e9,
                    "stats_gbps": raw / stat_t / 1e9,
                    "ratio": ceil_t / stat_t,
                    "kernel_gbps_1thread": kernel_gbps(path),
                    "base_stats_gbps": raw / base_t / 1e9 if base else math.nan,
                    "base_ratio": ceil_t / base_t if base else math.nan,
                    "base_kernel_gbps": kernel_gbps(path, base) if base else math.nan,
                    "extra_rss_mb": extra / 2**20,
                    "budget_mb": budget_mb,
                    "rss_within_budget": extra <= budget_mb * 2**20,
                }
            )
            shutil.rmtree(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows_out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sites", type=int, default=4)
    ap.add_argument("--dims", type=int, default=1024)
    ap.add_argument("--rows", type=int, default=16384)
    ap.add_argument("--chunk-rows", type=int, default=1024)
    ap.add_argument("--dtypes", default="float32,bfloat16,float16")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument(
        "--budget-mb",
        type=float,
        default=None,
        help="default: 4 chunk-sized buffers per thread (frame, decoded chunk, the "
        "reader's row copy, slack) + 32 MiB",
    )
    ap.add_argument("--quick", action="store_true", help="a quarter of the rows, 2 repeats")
    ap.add_argument(
        "--baseline",
        metavar="FILE",
        help="another statistics.py whose kernel is timed alongside (base_* columns)",
    )
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON ('-': stdout)")
    args = ap.parse_args(argv)
    if args.quick:
        args.rows //= 4
        args.repeat = 2
    results = run(args)
    cols = [
        ("dtype", "{:>8}"),
        ("raw_mb", "{:>7.0f}"),
        ("chunk_kb", "{:>8.0f}"),
        ("threads", "{:>7}"),
        ("ceiling_gbps", "{:>12.2f}"),
        ("stats_gbps", "{:>10.2f}"),
        ("ratio", "{:>5.2f}"),
        ("kernel_gbps_1thread", "{:>19.2f}"),
        ("extra_rss_mb", "{:>12.1f}"),
        ("budget_mb", "{:>9.0f}"),
    ]
    if args.baseline:
        cols[7:7] = [
            ("base_stats_gbps", "{:>15.2f}"),
            ("base_ratio", "{:>10.2f}"),
        ]
        cols.insert(10, ("base_kernel_gbps", "{:>16.2f}"))
    print("  ".join(f"{name:>{len(fmt.format(results[0][name]))}}" for name, fmt in cols))
    for row in results:
        print("  ".join(fmt.format(row[name]) for name, fmt in cols))
    print("target: ratio >= 0.8; extra RSS <= budget")
    if args.json:
        text = json.dumps({"config": vars(args), "results": results}, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
