"""Statistics of a capture several times larger than a memory budget run in bounded memory.

What bounds the memory: the threaded scheduler runs ``num_workers`` tasks at a time; a
block task holds one decoded storage chunk plus cache-sized scratch and returns a
partial of a few feature-sized float64 vectors; Dask's ordering runs each tree
reduction depth first, so a chunk is released as soon as its partial exists and only
O(split_every x tree depth) partials per site wait to be merged. So the peak is about
``workers x chunk bytes`` plus the partials, whatever the capture's length.

The analysis runs in a fresh subprocess whose own peak RSS (``VmHWM``, restarted at the
baseline; ``ru_maxrss`` would include the parent's peak, which Linux carries over
fork + exec) is compared with its RSS after imports and after the graph is built.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import token_columns

from llminstr.format import SiteInfo
from llminstr.storage.writer import CaptureWriter

SITES = 8
DIMS = 512
CHUNK_ROWS = 256
ROWS = 20 * 1024  # 80 chunks per site
BUDGET = 64 << 20  # bytes above the post-import baseline the analysis may use
RAW_BYTES = SITES * DIMS * ROWS * 4  # 320 MiB of float32 activations

CHILD = textwrap.dedent(
    """
    import json, resource, sys
    import psutil
    from llminstr.analysis import analyze_activations, compute

    def high_water():
        # VmHWM is this process's own peak RSS. ru_maxrss is not usable here: Linux
        # carries the parent's high-water mark into a forked-and-exec'd child.
        try:
            with open("/proc/self/status") as fh:
                for line in fh:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    path = sys.argv[1]
    result = analyze_activations(path, include=("statistics",))
    baseline = psutil.Process().memory_info().rss
    try:  # restart the high-water mark at the baseline (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass
    out = compute(result, scheduler="threads", num_workers=2)
    peak = max(high_water(), baseline)
    s = out["statistics"]["sites"]["s0"]
    print(json.dumps({
        "baseline": baseline,
        "peak": peak,
        "rows": s["num_rows"],
        "mean0": float(s["mean"][0]),
        "maxabs": [float(out["statistics"]["sites"][f"s{i}"]["max_abs"].max()) for i in range(8)],
    }))
    """
)


@pytest.mark.timeout(120)
def test_statistics_peak_rss_is_bounded(tmp_path: Path) -> None:
    assert RAW_BYTES >= 4 * BUDGET
    path = tmp_path / "big.zarr"
    rng = np.random.default_rng(0)
    pool = rng.standard_normal((4, CHUNK_ROWS, DIMS)).astype(np.float32)
    infos = [SiteInfo(f"s{i}", (DIMS,)) for i in range(SITES)]
    with CaptureWriter(path, infos, chunk_rows=CHUNK_ROWS, memory_budget_bytes=256 << 20) as w:
        for c in range(ROWS // CHUNK_ROWS):
            block = pool[c % 4]
            w.append(
                token_columns(CHUNK_ROWS, c * CHUNK_ROWS),
                {f"s{i}": block * (i + 1) + c for i in range(SITES)},
            )

    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(path)],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["rows"] == ROWS
    # mean of dim 0 over all chunks: pool means plus the per-chunk offsets c
    chunks = ROWS // CHUNK_ROWS
    expected = float(
        np.mean([pool[c % 4, :, 0].astype(np.float64).mean() + c for c in range(chunks)])
    )
    assert report["mean0"] == pytest.approx(expected, rel=1e-6)
    assert report["maxabs"][7] > report["maxabs"][0]
    extra = report["peak"] - report["baseline"]
    print(f"raw {RAW_BYTES / 2**20:.0f} MiB; extra peak RSS {extra / 2**20:.1f} MiB")
    assert extra <= BUDGET, f"peak RSS grew by {extra / 2**20:.1f} MiB (budget {BUDGET >> 20} MiB)"
