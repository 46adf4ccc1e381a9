"""Summarise py-spy raw stacks (``--threads --format raw``): for the thread with the most
samples (the model's), the share of samples in each llminstr frame (inclusive), and the
leaf frames under llminstr's hooks.

Run: ``python benchmarks/stack_summary.py stacks.txt[.gz]``
"""

from __future__ import annotations

import collections
import gzip
import re
import sys

FRAME = re.compile(r"^(?P<fn>.+?) \((?P<file>[^():]+)(?::\d+)?\)$")


def main() -> None:
    path = sys.argv[1]
    opener = gzip.open if path.endswith(".gz") else open
    by_thread: dict[str, list[tuple[list[str], int]]] = collections.defaultdict(list)
    with opener(path, "rt") as fh:  # type: ignore[operator]
        for line in fh:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            frames = stack.split(";")
            by_thread[frames[0]].append((frames[1:], int(count)))
    thread, stacks = max(by_thread.items(), key=lambda kv: sum(c for _, c in kv[1]))
    total = sum(c for _, c in stacks)
    inclusive: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    hooked = 0
    for frames, count in stacks:
        names = {f for f in frames if "llminstr/" in f}
        for name in names:
            inclusive[re.sub(r":\d+\)$", ")", name)] += count
        if any("_on_site" in f or "_post_hook" in f or "_pre_hook" in f for f in frames):
            hooked += count
            leaves[re.sub(r":\d+\)$", ")", frames[-1])] += count
    print(
        f"thread {thread}: {total} samples; under llminstr hooks: {hooked} ({hooked / total:.1%})"
    )
    print("llminstr frames, inclusive share of the thread's samples:")
    for name, count in inclusive.most_common(15):
        print(f"  {count / total:6.1%}  {name}")
    print("leaf frames under the hooks:")
    for name, count in leaves.most_common(15):
        print(f"  {count / total:6.1%}  {name}")


if __name__ == "__main__":
    main()
