"""Option checking shared by the analysis modules (rows, sites, captures).

These helpers only look at metadata: none of them reads activations.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from llminstr.errors import ConfigError, LlminstrError, SiteNotFoundError

if TYPE_CHECKING:
    from llminstr.reader import Capture

#: What ``rows=`` accepts: ``None`` (all committed rows), a ``slice`` with step 1, or a
#: ``(start, stop)`` pair of integers / ``None`` (Python slice semantics, negatives allowed).
RowsSpec = slice | tuple[int | None, int | None] | list[int | None] | None


def nonfinite_error(site: str | None, part: str, detail: str | None = None) -> LlminstrError:
    """NaN or inf where ``part`` (the SAE, the causal graph) needs finite data, naming the
    site and, when known, ``detail`` (a row, what gave the value)."""
    where = f"site {site!r}" if site else "the data"
    at = f" ({detail})" if detail else ""
    return LlminstrError(
        f"{where} holds NaN or inf{at}: {part} needs finite data (the statistics' "
        "nonfinite_count shows where); choose sites or rows without them"
    )


def as_capture(data: str | os.PathLike[str] | Capture) -> Capture:
    """Open ``data`` (a path) with :func:`llminstr.reader.open_capture`, or return it as is
    when it already is a :class:`~llminstr.reader.Capture`."""
    from llminstr.reader import Capture, open_capture

    if isinstance(data, Capture):
        return data
    if not isinstance(data, (str, os.PathLike)):
        raise ConfigError(
            f"data_path must be a path (str or os.PathLike) or a Capture; got {type(data).__name__}"
        )
    return open_capture(data)


def resolve_rows(rows: Any, num_rows: int) -> tuple[int, int]:
    """Turn a ``rows=`` option into a non-empty ``[start, stop)`` range of committed rows.

    Raises :class:`ConfigError` for anything but ``None``, a step-1 slice or range, or a
    ``(start, stop)`` pair of integers, and when the range selects no row.
    """
    if rows is None:
        sl = slice(None)
    elif isinstance(rows, range):
        if rows.step != 1:
            raise ConfigError(f"rows must be a contiguous range (step 1); got {rows!r}")
        sl = slice(rows.start, rows.stop)
    elif isinstance(rows, slice):
        if rows.step not in (None, 1):
            raise ConfigError(f"rows must be a contiguous range (slice step 1); got {rows!r}")
        sl = rows
    elif isinstance(rows, (tuple, list)) and len(rows) == 2:
        sl = slice(rows[0], rows[1])
    else:
        raise ConfigError(
            "rows must be None, a slice(start, stop) or a (start, stop) pair of integers; "
            f"got {rows!r}"
        )
    for bound in (sl.start, sl.stop):
        if bound is not None and (
            isinstance(bound, bool) or not isinstance(bound, (int, np.integer))
        ):
            raise ConfigError(f"rows bounds must be integers or None; got {bound!r} in {rows!r}")
    start, stop, _ = slice(
        None if sl.start is None else int(sl.start), None if sl.stop is None else int(sl.stop)
    ).indices(num_rows)
    if stop <= start:
        raise ConfigError(
            f"rows={rows!r} selects no rows: the capture has {num_rows} committed rows"
        )
    return start, stop


def check_sites(capture: Capture, sites: str | Iterable[str] | None) -> list[str]:
    """The requested sites, in the given order (all of the capture's sites for ``None``).

    Unknown names raise :class:`SiteNotFoundError` listing the capture's sites.
    """
    available = capture.sites
    if sites is None:
        return list(available)
    if not isinstance(sites, (str, Iterable)):
        raise ConfigError(f"sites must be a site name or a list of names; got {sites!r}")
    names: Sequence[Any] = [sites] if isinstance(sites, str) else list(sites)
    if not names:
        raise ConfigError(f"sites must name at least one site; the capture has {available}")
    seen: set[str] = set()
    out: list[str] = []
    for name in names:
        if not isinstance(name, str):
            raise ConfigError(f"site names must be strings; got {name!r}")
        if name not in available:
            raise SiteNotFoundError(
                f"capture {str(capture.path)!r} has no site {name!r}; sites: {available}"
            )
        if name in seen:
            raise ConfigError(f"site {name!r} is listed twice in sites")
        seen.add(name)
        out.append(name)
    return out


def lazy_item(parent: Any, item: str) -> Any:
    """``parent[item]`` for a ``dask.delayed`` ``parent``, as a :class:`LazyItem`."""
    return _lazy_item_class()(parent, item)


_LAZY_ITEM: Any = None


def _lazy_item_class() -> Any:
    """:class:`LazyItem`, defined on first use so that importing this module does not
    import Dask."""
    global _LAZY_ITEM
    if _LAZY_ITEM is None:
        import operator

        from dask._task_spec import Task, TaskRef
        from dask.delayed import Delayed
        from dask.highlevelgraph import HighLevelGraph

        class LazyItem(Delayed):
            """``parent[item]`` as a Delayed (so ``dask.compute`` takes it as usual) that
            :func:`llminstr.analysis.compute` evaluates by computing ``parent`` once and
            indexing it: a dict of fourteen lazy statistics per site is then one
            collection to Dask, not fourteen (each costs graph merging, tokenizing and
            optimisation in every compute: it was most of a small pass's time). The key
            is derived from the parent's, so building it tokenizes nothing."""

            __slots__ = ("item", "parent")

            def __init__(self, parent: Any, item: str) -> None:
                key = f"{parent.key}-{item}"
                task = Task(key, operator.getitem, TaskRef(parent.key), item)
                # The graph is assembled by hand: HighLevelGraph.from_collections asks
                # is_dask_collection of the parent, which on a Delayed creates (and
                # tokenizes) a DelayedAttr for ``.expr``.
                base = parent.dask
                layers = {**base.layers, key: {key: task}}
                deps = {**base.dependencies, key: set(parent.__dask_layers__())}
                super().__init__(key, HighLevelGraph(layers, deps))  # type: ignore[no-untyped-call]
                self.parent = parent
                self.item = item

        _LAZY_ITEM = LazyItem
    return _LAZY_ITEM


def is_lazy_item(obj: Any) -> bool:
    return _LAZY_ITEM is not None and isinstance(obj, _LAZY_ITEM)


class TaskGraph:
    """A one-layer Dask graph assembled task by task, for the chunk-reading passes.

    ``dask.delayed`` calls walk every argument looking for collections and merge graphs
    at each call: for the statistics pass that was most of the graph building time
    (4-6 ms for a 12-task graph on the 2-core VM), spent on the
    scheduler's thread while the block tasks compete for the same cores. Here each task is
    a ``dask._task_spec.Task`` whose arguments are taken as they are (only
    ``TaskRef`` arguments, and lists or dicts of them, are dependencies). Keys are the
    caller's, so equal requests in one compute still share their tasks."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.layer: dict[Any, Any] = {}

    def task(self, key: Any, fn: Any, *args: Any) -> Any:
        """Add ``fn(*args)`` under ``key``; return a reference to its result."""
        from dask._task_spec import Dict, List, Task, TaskRef

        def node(arg: Any) -> Any:
            if isinstance(arg, list) and any(isinstance(a, TaskRef) for a in arg):
                return List(*arg)
            if isinstance(arg, dict) and any(isinstance(a, TaskRef) for a in arg.values()):
                return Dict(arg)
            return arg

        self.layer[key] = Task(key, fn, *(node(a) for a in args))
        return TaskRef(key)

    def reduce(
        self, refs: Sequence[Any], merge: Any, split_every: int, *, until: int = 1, tag: str = ""
    ) -> list[Any]:
        """Merge ``refs`` ``split_every`` at a time, level by level, until at most
        ``until`` remain; keys are ``(name + "-merge" + tag, level, index)``."""
        if not refs:
            raise ConfigError("nothing to reduce: the row range selects no blocks")
        level, depth = list(refs), 0
        while len(level) > until:
            level = [
                self.task((f"{self.name}-merge{tag}", depth, j), merge, *level[i : i + split_every])
                for j, i in enumerate(range(0, len(level), split_every))
            ]
            depth += 1
        return level

    def delayed(self, ref: Any) -> Any:
        """The ``dask.delayed`` object of the task ``ref`` names, over the whole layer."""
        from dask.delayed import Delayed
        from dask.highlevelgraph import HighLevelGraph

        graph = HighLevelGraph({self.name: self.layer}, {self.name: set()})
        return Delayed(ref.key, graph, layer=self.name)  # type: ignore[no-untyped-call]
