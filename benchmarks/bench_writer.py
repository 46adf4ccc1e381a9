"""Writer throughput against the same-run ceiling of its own data path.

For each configuration (fp32 / bf16 x lz4 / zstd x Zarr / HDF5) the benchmark pushes the
same synthetic activations through :class:`llminstr.storage.writer.CaptureWriter` and
measures GB/s of raw rows (activations + token columns, from the first append to the end
of ``close``). In the same run, on the same chunks, it measures the *ceiling*: numcodecs
Blosc (same cname / clevel / byte shuffle, ``numcodecs.blosc.use_threads = False``)
compressing every chunk in a ``ThreadPoolExecutor`` with the writer's thread count, each
frame appended to one plain file. Writer and ceiling runs are interleaved and repeated;
the best of each is reported.

Data: several sites of width 768-2048, heavy-tailed values (Student-t, df=4) with a few
large outlier dimensions per site, as residual streams have.

Besides GB/s the table gives the CPU ratio (ceiling CPU seconds / writer CPU seconds, best
of each), which other load on a shared machine disturbs less than wall time.

Run: ``python benchmarks/bench_writer.py [--mb 256] [--repeats 4] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numcodecs
import numcodecs.blosc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llminstr.format import DEFAULT_LEVEL, SiteInfo
from llminstr.storage.writer import CaptureWriter, auto_chunk_rows

WIDTHS = (768, 1024, 1536, 2048)
POOL_ROWS = 4096  # distinct rows per site; the stream cycles through them
BATCH_ROWS = 256  # rows per producer call (one forward pass of a batch)
TOKEN_COLUMNS = ("token_id", "sequence", "position", "step")


@dataclass
class Workload:
    dtype: str  # logical
    sites: list[SiteInfo]
    pools: dict[str, np.ndarray]  # storage dtype, POOL_ROWS rows each
    rows: int
    chunk_rows: int
    tokens: dict[str, np.ndarray]

    @property
    def raw_bytes(self) -> int:
        row = sum(p.dtype.itemsize * p.shape[1] for p in self.pools.values()) + 8 * len(self.tokens)
        return row * self.rows

    def batches(self) -> Any:
        for lo in range(0, self.rows, BATCH_ROWS):
            hi = min(self.rows, lo + BATCH_ROWS)
            p = lo % POOL_ROWS
            acts = {name: pool[p : p + hi - lo] for name, pool in self.pools.items()}
            yield {c: v[lo:hi] for c, v in self.tokens.items()}, acts

    def chunks(self) -> list[np.ndarray]:
        """Every chunk the writer stores, in order (views; the rows are chunk multiples)."""
        out = []
        for k in range(self.rows // self.chunk_rows):
            lo = k * self.chunk_rows
            p = lo % POOL_ROWS
            out += [pool[p : p + self.chunk_rows] for pool in self.pools.values()]
            out += [v[lo : lo + self.chunk_rows] for v in self.tokens.values()]
        return out


def activations(rng: np.random.Generator, rows: int, width: int) -> np.ndarray:
    x = rng.standard_t(df=4, size=(rows, width)).astype(np.float32)
    x *= 0.5
    outliers = rng.choice(width, size=4, replace=False)  # a few massive dimensions
    x[:, outliers] *= rng.uniform(20, 100, size=4).astype(np.float32)
    return x


def make_workload(dtype: str, mb: float, budget: int, seed: int = 0) -> Workload:
    rng = np.random.default_rng(seed)
    sites = [
        SiteInfo(f"model.layers.{i}.out", (w,), dtype, kind="residual", layer=i)
        for i, w in enumerate(WIDTHS)
    ]
    pools = {}
    for s in sites:
        x = activations(rng, POOL_ROWS, s.feature_shape[0])
        pools[s.name] = x.astype(ml_dtypes.bfloat16).view(np.uint16) if dtype == "bfloat16" else x
    row_bytes = [s.row_bytes for s in sites] + [8] * len(TOKEN_COLUMNS)
    chunk_rows = auto_chunk_rows(row_bytes, budget)
    assert POOL_ROWS % chunk_rows == 0
    rows = max(chunk_rows, int(mb * 1e6 / sum(row_bytes)) // chunk_rows * chunk_rows)
    r = np.arange(rows, dtype=np.int64)
    tokens = {
        "token_id": rng.integers(0, 50257, size=rows, dtype=np.int64),
        "sequence": r // 1024,
        "position": r % 1024,
        "step": r // 256,
    }
    return Workload(dtype, sites, pools, rows, chunk_rows, tokens)


def settle() -> None:
    """Let the kernel finish the previous run's deletions and writeback (outside timing),
    so that no run pays for the one before it."""
    os.sync()
    time.sleep(0.2)


def run_writer(
    work: Workload, path: Path, cname: str, threads: int, budget: int
) -> dict[str, float]:
    t0 = time.perf_counter()
    w = CaptureWriter(
        path,
        work.sites,
        compression=cname,  # type: ignore[arg-type]
        chunk_rows=work.chunk_rows,
        memory_budget_bytes=budget,
        encoder_threads=threads,
        overwrite=True,
    )
    t1, c1 = time.perf_counter(), time.process_time()
    for tokens, acts in work.batches():
        w.append(tokens, acts)
    w.close()
    t2, c2 = time.perf_counter(), time.process_time()
    stats = w.stats()
    assert stats.rows == work.rows, (stats.rows, work.rows)
    return {
        "gbps": work.raw_bytes / (t2 - t1) / 1e9,
        "seconds": t2 - t1,
        "cpu_seconds": c2 - c1,
        "setup_seconds": t1 - t0,
        "parallelism": (c2 - c1) / (t2 - t1),
        "ratio": stats.compression_ratio,
        "stall_seconds": stats.stall_seconds,
    }


def run_ceiling(work: Workload, path: Path, cname: str, threads: int) -> dict[str, float]:
    numcodecs.blosc.use_threads = False
    chunks = work.chunks()
    codecs = {
        size: numcodecs.Blosc(
            cname=cname, clevel=DEFAULT_LEVEL[cname], shuffle=numcodecs.Blosc.SHUFFLE, blocksize=0
        )
        for size in (2, 4, 8)
    }
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
    stored = 0

    def task(chunk: np.ndarray) -> int:
        frame = codecs[chunk.dtype.itemsize].encode(chunk)
        os.write(fd, frame)
        return len(frame)

    t0, c0 = time.perf_counter(), time.process_time()
    try:
        with ThreadPoolExecutor(threads) as pool:
            stored = sum(pool.map(task, chunks))
    finally:
        os.close(fd)
    t1, c1 = time.perf_counter(), time.process_time()
    raw = sum(c.nbytes for c in chunks)
    return {
        "gbps": raw / (t1 - t0) / 1e9,
        "seconds": t1 - t0,
        "cpu_seconds": c1 - c0,
        "ratio": raw / stored,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--mb", type=float, default=256, help="raw MB per configuration and run")
    ap.add_argument("--repeats", type=int, default=4, help="interleaved runs; best is reported")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--budget-mb", type=float, default=1024)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--codecs", default="lz4,zstd")
    ap.add_argument("--backends", default="zarr,hdf5")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--tmp", type=Path, default=Path("/tmp"))
    args = ap.parse_args(argv)
    budget = int(args.budget_mb * 2**20)
    dtypes = args.dtypes.split(",")
    codecs = args.codecs.split(",")
    backends = args.backends.split(",")
    suffix = {"zarr": ".zarr", "hdf5": ".h5"}

    workloads = {d: make_workload(d, args.mb, budget) for d in dtypes}
    tmp = Path(tempfile.mkdtemp(prefix="bench_writer_", dir=args.tmp))
    results: dict[tuple[str, str, str], dict[str, Any]] = {}
    ceilings: dict[tuple[str, str], list[dict[str, float]]] = {}
    started = time.perf_counter()
    try:
        for rep in range(args.repeats):
            for d in dtypes:
                for c in codecs:
                    runs: list[tuple[str, Any]] = [("ceiling", None)] + [
                        ("writer", b) for b in backends
                    ]
                    if rep % 2:
                        runs.reverse()
                    for kind, b in runs:
                        settle()
                        if kind == "ceiling":
                            target = tmp / "ceiling.bin"
                            r = run_ceiling(workloads[d], target, c, args.threads)
                            ceilings.setdefault((d, c), []).append(r)
                            target.unlink()
                        else:
                            target = tmp / f"cap{suffix[b]}"
                            r = run_writer(workloads[d], target, c, args.threads, budget)
                            results.setdefault((d, c, b), {"runs": []})["runs"].append(r)
                            if target.is_dir():
                                shutil.rmtree(target)
                            else:
                                target.unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    rows = []
    for (d, c, b), res in results.items():
        best = max(res["runs"], key=lambda r: r["gbps"])
        ceil = max(ceilings[(d, c)], key=lambda r: r["gbps"])
        rows.append(
            {
                "config": f"{'fp32' if d == 'float32' else 'bf16'} {c} {b}",
                "dtype": d,
                "codec": c,
                "backend": b,
                "writer_gbps": best["gbps"],
                "ceiling_gbps": ceil["gbps"],
                "ratio": best["gbps"] / ceil["gbps"],
                "compression_ratio": best["ratio"],
                # CPU seconds of the ceiling / of the writer (best of each): less sensitive
                # than wall time to other load on the machine
                "cpu_ratio": min(r["cpu_seconds"] for r in ceilings[(d, c)])
                / min(r["cpu_seconds"] for r in res["runs"]),
                "ceiling_compression_ratio": ceil["ratio"],
                "writer_runs_gbps": [r["gbps"] for r in res["runs"]],
                "ceiling_runs_gbps": [r["gbps"] for r in ceilings[(d, c)]],
                "setup_seconds": best["setup_seconds"],
                "stall_seconds": best["stall_seconds"],
                "raw_mb": workloads[d].raw_bytes / 1e6,
                "chunk_rows": workloads[d].chunk_rows,
            }
        )
    header = (
        f"{'config':<18} {'writer GB/s':>11} {'ceiling GB/s':>12} {'ratio':>6} "
        f"{'cpu ratio':>9} {'compr.':>7}"
    )
    print(
        f"threads={args.threads} repeats={args.repeats} MB/config={args.mb:g} "
        f"sites={len(WIDTHS)} widths={list(WIDTHS)} total={time.perf_counter() - started:.0f}s"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['config']:<18} {r['writer_gbps']:>11.2f} {r['ceiling_gbps']:>12.2f} "
            f"{r['ratio']:>6.2f} {r['cpu_ratio']:>9.2f} {r['compression_ratio']:>7.2f}"
        )
    if args.json is not None:
        doc = {
            "benchmark": "bench_writer",
            "threads": args.threads,
            "repeats": args.repeats,
            "mb_per_config": args.mb,
            "widths": list(WIDTHS),
            "cpu_count": os.cpu_count(),
            "results": rows,
        }
        args.json.write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
