"""Lazy analysis of llminstr captures with Dask.

>>> result = analyze_activations("run.zarr")        # doctest: +SKIP
>>> values = compute(result)                       # doctest: +SKIP   (one dask.compute)

:func:`analyze_activations` reads metadata only and returns a dict of Dask collections
and ``dask.delayed`` objects; :func:`compute` materialises all of them in a single
``dask.compute`` call, so tasks that several requests share run once (each analysis reads
its chunks itself: see "Memory" below and ``docs/guide.md``). Both run the
same on the local schedulers and on a ``dask.distributed`` cluster (the graph holds only
picklable chunk sources and module-level functions).

Parts (``include=``):

``"statistics"``
    :func:`llminstr.analysis.statistics.compute_statistics`: per-site statistics in one
    pass over the data, plus a token-column summary.
``"sae_features"``
    :func:`llminstr.analysis.sae.sae_features` on one site: ``sae_options["site"]`` if
    given, else the middle ``residual`` site (by layer, then capture order), else the
    capture's last site.
``"causal_graph"``
    :func:`llminstr.analysis.causal.causal_graph` over the selected sites, given the model
    (interventional when one is at hand) and the lazy per-site means of the statistics
    (for mean ablation).

Memory. A statistics block task reads a few storage chunks (about
``statistics.TASK_BYTES`` of them) one at a time: each chunk's compressed frame goes
into a per-thread frame buffer and is decoded into a per-thread chunk buffer, both reused
from chunk to chunk, and the task returns a partial of a few feature-sized float64
vectors that the tree reduction merges soon after. The peak is therefore about
``workers x 2 x chunk bytes`` (the buffers stay with the worker threads) plus the
scheduler's per-task state, independent of the capture's size. The threaded
scheduler's default worker count is the CPU count; ``compute(..., num_workers=n)``
lowers it. Measured in ``tests/test_out_of_core.py`` and ``benchmarks/bench_analysis.py``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from llminstr.analysis._common import as_capture, check_sites, is_lazy_item, resolve_rows
from llminstr.errors import ConfigError

if TYPE_CHECKING:
    from llminstr.reader import Capture

PARTS: tuple[str, ...] = ("statistics", "sae_features", "causal_graph")
STATISTICS_OPTIONS: tuple[str, ...] = (
    "eps",
    "outlier_factor",
    "relative_accuracy",
    "quantiles",
    "split_every",
    "tokens",
)

__all__ = ["PARTS", "analyze_activations", "compute", "default_sae_site"]


def default_sae_site(capture: Capture, sites: list[str] | None = None) -> str:
    """The site an SAE is trained on by default: the middle ``residual`` site (sorted by
    layer, sites without a layer last, ties in capture order), else the last site."""
    names = list(capture.sites) if sites is None else list(sites)
    if not names:
        raise ConfigError("no site to train an SAE on")
    residual = [
        (i, capture.site_info(s))
        for i, s in enumerate(names)
        if capture.site_info(s).get("kind") == "residual"
    ]
    if not residual:
        return names[-1]
    residual.sort(
        key=lambda item: (
            item[1].get("layer") is None,
            item[1].get("layer") if item[1].get("layer") is not None else 0,
            item[0],
        )
    )
    return names[residual[(len(residual) - 1) // 2][0]]


def _check_include(include: Any) -> tuple[str, ...]:
    names = (include,) if isinstance(include, str) else include
    try:
        names = tuple(names)
    except TypeError:
        raise ConfigError(
            f"include must be a name or a sequence of names from {list(PARTS)}; got {include!r}"
        ) from None
    bad = [n for n in names if n not in PARTS]
    if bad:
        raise ConfigError(f"include names must be among {list(PARTS)}; got unknown {bad}")
    return tuple(n for n in PARTS if n in names)


def _check_options(name: str, options: Any) -> dict[str, Any]:
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise ConfigError(f"{name} must be a mapping of keyword options or None; got {options!r}")
    bad = [k for k in options if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"{name} keys must be strings; got {bad}")
    return dict(options)


def _summary(capture: Capture, sites: list[str], start: int, stop: int) -> dict[str, Any]:
    return {
        "path": str(capture.path),
        "backend": capture.backend,
        "format_version": capture.format_version,
        "status": capture.status,
        "num_rows": capture.num_rows,
        "chunk_rows": capture.chunk_rows,
        "created": capture.metadata.get("created"),
        "rows": [start, stop],
        "sites": list(sites),
        "site_info": {
            s: {
                "kind": capture.site_info(s).get("kind"),
                "layer": capture.site_info(s).get("layer"),
                "feature_shape": list(capture.site_info(s)["feature_shape"]),
                "dtype": capture.site_info(s)["logical_dtype"],
            }
            for s in sites
        },
        "token_columns": capture.token_columns,
    }


def analyze_activations(
    data_path: str | os.PathLike[str] | Capture,
    *,
    sites: str | Iterable[str] | None = None,
    rows: Any = None,
    include: str | Iterable[str] = PARTS,
    model: Any = None,
    sae_options: Mapping[str, Any] | None = None,
    causal_options: Mapping[str, Any] | None = None,
    statistics_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Build the lazy analyses of a capture; nothing is read until computed.

    ``sites``: a name or names (default: all). ``rows``: ``None``, ``slice(start, stop)``
    or ``(start, stop)`` over committed rows. ``include``: any of :data:`PARTS`.
    ``model``: the instrumented ``torch.nn.Module`` (enables the interventional causal
    graph). ``sae_options`` / ``causal_options``: keyword options of those analyses
    (``sae_options["site"]`` picks the SAE site). ``statistics_options``: keywords of
    :func:`~llminstr.analysis.statistics.compute_statistics` (``eps``, ``outlier_factor``,
    ``relative_accuracy``, ``quantiles``, ``split_every``, ``tokens``).

    Returns ``{"capture": <JSON-able summary>, "statistics": ..., "sae_features": ...,
    "causal_graph": ...}``; a part not in ``include`` is ``None``. Compute it with
    :func:`compute`.
    """
    default_parts = include is PARTS
    parts = _check_include(include)
    sae_opts = _check_options("sae_options", sae_options)
    causal_opts = _check_options("causal_options", causal_options)
    given = sorted({"sites", "rows", "model", "means", "capture"} & set(causal_opts))
    if given:
        raise ConfigError(
            f"causal_options cannot set {given}: analyze_activations passes them itself (use its "
            "sites=, rows= and model= arguments; the means come from the statistics)"
        )
    stats_opts = _check_options("statistics_options", statistics_options)
    unknown = sorted(set(stats_opts) - set(STATISTICS_OPTIONS))
    if unknown:
        raise ConfigError(
            f"statistics_options accepts {list(STATISTICS_OPTIONS)}; got unknown {unknown}"
        )
    capture = as_capture(data_path)
    names = check_sites(capture, sites)
    if capture.num_rows == 0:
        raise ConfigError(
            f"capture {str(capture.path)!r} has no committed rows (status {capture.status!r})"
        )
    start, stop = resolve_rows(rows, capture.num_rows)
    result: dict[str, Any] = {
        "capture": _summary(capture, names, start, stop),
        "statistics": None,
        "sae_features": None,
        "causal_graph": None,
    }
    stats: dict[str, Any] | None = None
    if "statistics" in parts or ("causal_graph" in parts and model is not None):
        from llminstr.analysis.statistics import compute_statistics

        stats = compute_statistics(capture, names, (start, stop), **stats_opts)
    if "statistics" in parts:
        result["statistics"] = stats
    if "sae_features" in parts:
        from llminstr.analysis.sae import sae_features

        site = sae_opts.pop("site", None)
        site = default_sae_site(capture, names) if site is None else check_sites(capture, [site])[0]
        result["sae_features"] = sae_features(capture, site, rows=(start, stop), **sae_opts)
    if "causal_graph" in parts and default_parts and (len(names) < 2 or stop - start < 2):
        # Not asked for by name: a capture with one site (or one row) simply has no graph.
        parts = tuple(p for p in parts if p != "causal_graph")
        result["capture"]["notes"] = [
            "no causal graph: it needs at least two sites and two rows "
            f"({len(names)} site(s), {stop - start} row(s) selected)"
        ]
    if "causal_graph" in parts:
        from llminstr.analysis.causal import causal_graph

        # The causal module accepts means only for its interventional method (a model is
        # given and the method is "auto" or "interventional").
        means = None
        if model is not None and causal_opts.get("method", "auto") in ("auto", "interventional"):
            assert stats is not None
            means = {s: stats["sites"][s]["mean"] for s in names}
        result["causal_graph"] = causal_graph(
            capture, names, model=model, means=means, rows=(start, stop), **causal_opts
        )
    return result


def compute(result: Any, scheduler: Any = None, **kwargs: Any) -> Any:
    """Materialise a result of :func:`analyze_activations` (or any nest of dicts, lists
    and Dask objects) with ONE ``dask.compute`` call: shared tasks (equal requests, the
    per-statistic items of one site) run once. Returns the same structure with numpy arrays and
    plain Python values. ``scheduler`` and ``kwargs`` (e.g. ``num_workers``) go to
    ``dask.compute``; by default Dask's current scheduler is used (a
    ``distributed.Client`` when one is active, else the threaded scheduler)."""
    import dask.base

    base: Any = dask.base  # untyped module
    if scheduler is not None:
        kwargs["scheduler"] = scheduler
    # Our own walk over plain dicts, lists and tuples (Dask's unpack_collections tokenizes
    # every collection and builds a task per container: measurable on small passes).
    from dask.delayed import Delayed

    def is_collection(obj: Any) -> bool:
        return isinstance(obj, Delayed) or bool(base.is_dask_collection(obj))

    collections: list[Any] = []
    skeleton = _unpack(result, collections, is_collection)
    if not collections:
        return result
    # Lazy items (``parent[item]``, see _common.LazyItem) are answered from their parent,
    # computed once.
    wanted: list[Any] = []
    slot: dict[Any, int] = {}
    route: list[tuple[int, Any]] = []
    for coll in collections:
        if is_lazy_item(coll):
            target, item, ident = coll.parent, coll.item, ("key", coll.parent.key)
        else:
            target, item, ident = coll, _WHOLE, ("id", id(coll))
        if ident not in slot:
            slot[ident] = len(wanted)
            wanted.append(target)
        route.append((slot[ident], item))
    values = _compute_grouped(base, wanted, kwargs)
    return _repack(
        skeleton, [values[i] if item is _WHOLE else values[i][item] for i, item in route]
    )


class _Slot:
    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index


_PLAIN = (str, bytes, int, float, complex, type(None), np.ndarray, np.generic)


def _unpack(obj: Any, found: list[Any], is_collection: Any) -> Any:
    """``obj`` with each Dask collection inside plain dicts, lists and tuples replaced by
    a :class:`_Slot` numbering it in ``found``. (Plain values are not asked
    ``is_dask_collection``: on a Delayed-like object it may build a task graph node.)"""
    if isinstance(obj, _PLAIN):
        return obj
    if is_collection(obj):
        found.append(obj)
        return _Slot(len(found) - 1)
    if type(obj) is dict:
        return {k: _unpack(v, found, is_collection) for k, v in obj.items()}
    if type(obj) in (list, tuple):
        return type(obj)(_unpack(v, found, is_collection) for v in obj)
    return obj


def _repack(obj: Any, values: list[Any]) -> Any:
    if isinstance(obj, _Slot):
        return values[obj.index]
    if type(obj) is dict:
        return {k: _repack(v, values) for k, v in obj.items()}
    if type(obj) in (list, tuple):
        return type(obj)(_repack(v, values) for v in obj)
    return obj


_WHOLE = object()


def _compute_grouped(base: Any, collections: list[Any], kwargs: dict[str, Any]) -> list[Any]:
    # dask 2026.8 groups the collections of one compute by their graph optimizer and
    # returns the results in group order, so a structure that interleaves, e.g., dask
    # arrays and delayed objects gets values in the wrong places. Passing the
    # collections already grouped (stable) makes that regrouping the identity.
    groups: list[Any] = []
    rank: list[int] = []
    for coll in collections:
        opt = getattr(coll, "__dask_optimize__", None)
        for i, seen in enumerate(groups):
            if seen == opt:
                rank.append(i)
                break
        else:
            groups.append(opt)
            rank.append(len(groups) - 1)
    order = sorted(range(len(collections)), key=lambda i: rank[i])
    values = base.compute(*(collections[i] for i in order), **kwargs)
    placed: list[Any] = [None] * len(collections)
    for value, i in zip(values, order, strict=True):
        placed[i] = value
    return placed
