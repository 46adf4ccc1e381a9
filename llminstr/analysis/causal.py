"""A causal graph between the sites of a capture.

Nodes are the sites in model order (the order of the capture's ``sites``), with their
``layer``, ``kind``, ``module_path`` and ``order`` as attributes. Edges only go forward
(from a site to a later one); each carries a ``weight`` and the ``method`` that gave it.
Every forward pair gets an edge, so weights can be ranked or thresholded by the caller.

Two methods:

* **interventional** (a model is at hand): the captured token sequences are re-run
  through the model, once clean and once per site with that site *mean-ablated* (a
  forward hook on the site's module replaces its output, or the output's element
  ``tuple_index``, by the site's mean activation). The weight of ``s -> t`` is the
  relative L2 change of ``t``'s output, ``mean_tokens ||t_ablated - t_clean|| /
  mean_tokens ||t_clean||``. A pseudo-node ``"logits"`` receives from every site the mean
  KL divergence ``KL(p_clean || p_ablated)`` of the next-token distribution, in nats.

* **observational** (data only): an ordered linear model. Every site is reduced to ``r``
  coordinates (``rank``), then each site is regressed (least squares, a small ridge) on
  all earlier sites together; the weight of ``s -> t`` is the drop in ``R^2`` of ``t``
  when ``s``'s block is left out of the regression (its *unique* contribution; ``R^2`` is
  the fraction of the variance of ``t``'s reduced coordinates explained). The norm of the
  standardised coefficient block is reported too (``std_coef``). Everything comes from
  second moments computed lazily with Dask.

  With ``basis="pca"`` (default) each site is reduced to its top-``r`` principal
  directions, which takes **two passes** over the data: per-site second moments first,
  then the joint second moments of the reduced coordinates (the second pass's reads are
  bound to the basis, so they run only once it is known: memory stays bounded). With
  ``basis="random"`` the reduction is a random orthonormal projection fixed by ``seed``,
  and one pass suffices.

:func:`causal_graph` returns a ``dask.delayed`` object; computing it gives
``{"graph": networkx.DiGraph, "edges": [...], "nodes": [...], "method": ..., "details": {...}}``
where everything but ``graph`` is JSON-serialisable.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llminstr.analysis._common import nonfinite_error, resolve_rows
from llminstr.errors import CaptureStateError, ConfigError, LlminstrError, SiteNotFoundError

__all__ = ["LOGITS_NODE", "causal_graph", "interventional_graph", "observational_graph"]

LOGITS_NODE = "logits"
METHODS = ("auto", "interventional", "observational")
OBSERVATIONAL_OPTIONS = {"rank": 8, "basis": "pca", "ridge": 1e-6, "seed": 0, "weight": "delta_r2"}
INTERVENTIONAL_OPTIONS = {"n_sequences": 8, "batch_size": 8, "pad_token_id": 0, "logits": True}

RowsArg = slice | range | tuple[int, int] | None


# ---------------------------------------------------------------------------- common


def _select_sites(capture: Any, sites: Sequence[str] | None) -> list[str]:
    """The requested sites (default: all), in model order; unknown names raise."""
    order = capture.sites
    if sites is None:
        return list(order)
    if isinstance(sites, str):
        raise ConfigError(f"sites must be a sequence of site names, not one string; got {sites!r}")
    wanted = list(sites)
    unknown = [s for s in wanted if s not in order]
    if unknown:
        raise SiteNotFoundError(
            f"capture {str(capture.path)!r} has no site(s) {unknown}; sites: {order}"
        )
    if len(set(wanted)) != len(wanted):
        raise ConfigError(f"sites has duplicates: {wanted}")
    return [s for s in order if s in set(wanted)]


def _node_attrs(capture: Any, names: list[str]) -> list[dict[str, Any]]:
    nodes = []
    for i, name in enumerate(names):
        info = capture.site_info(name)
        nodes.append(
            {
                "name": name,
                "order": i,
                "layer": info.get("layer"),
                "kind": info.get("kind"),
                "module_path": info.get("module_path") or name,
                "tuple_index": info.get("tuple_index") or 0,
                "feature_shape": list(info["feature_shape"]),
            }
        )
    return nodes


def _assemble(
    nodes: list[dict[str, Any]],
    edges: list[dict[str, Any]],
    method: str,
    details: dict[str, Any],
) -> dict[str, Any]:
    import networkx as nx

    graph = nx.DiGraph(method=method)
    for node in nodes:
        graph.add_node(node["name"], **{k: v for k, v in node.items() if k != "name"})
    for edge in edges:
        attrs = {k: v for k, v in edge.items() if k not in ("source", "target")}
        graph.add_edge(edge["source"], edge["target"], **attrs)
    return {"graph": graph, "edges": edges, "nodes": nodes, "method": method, "details": details}


def _options(given: Mapping[str, Any], defaults: Mapping[str, Any], method: str) -> dict[str, Any]:
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ConfigError(
            f"unknown option(s) {unknown} for the {method} causal graph; known: {sorted(defaults)}"
        )
    return {**defaults, **given}


def _size(shape: Any) -> int:
    return int(np.prod([int(v) for v in shape]))


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{name} must be a positive integer; got {value!r}")
    return int(value)


# ---------------------------------------------------------------------------- entry point
def causal_graph(
    capture: Any,
    sites: Sequence[str] | None = None,
    *,
    model: Any = None,
    means: Mapping[str, Any] | None = None,
    rows: RowsArg = None,
    method: str = "auto",
    **options: Any,
) -> Any:
    """A ``dask.delayed`` object computing the causal graph between ``sites`` of ``capture``.

    ``method="auto"`` is interventional when ``model`` is given and observational
    otherwise. ``rows`` restricts the rows used (a contiguous range).

    Observational options: ``rank`` (coordinates per site, default 8), ``basis``
    (``"pca"``, two passes; or ``"random"``, one pass), ``ridge`` (relative ridge, default
    1e-6), ``seed`` (for the random basis), ``weight`` (``"delta_r2"``, default, or
    ``"std_coef"``).

    Interventional options: ``n_sequences`` (first sequences of the capture re-run,
    default 8), ``batch_size`` (sequences per forward pass, default 8), ``pad_token_id``
    (default 0), ``logits`` (add the ``"logits"`` node, default True). ``means`` maps
    site names to mean activations (shape ``feature_shape``); missing ones are computed
    from the capture's rows.
    """
    from llminstr.reader import Capture, open_capture

    if method not in METHODS:
        raise ConfigError(f"method must be one of {', '.join(map(repr, METHODS))}; got {method!r}")
    cap = capture if isinstance(capture, Capture) else open_capture(capture)
    if method == "interventional" and model is None:
        raise ConfigError("method='interventional' needs a model (model=...)")
    if model is not None and method in ("auto", "interventional"):
        return interventional_graph(cap, sites, model=model, means=means, rows=rows, **options)
    if means is not None:
        raise ConfigError("means= only applies to the interventional causal graph")
    return observational_graph(cap, sites, rows=rows, **options)


# ---------------------------------------------------------------------------- observational
def _site_matrix(capture: Any, name: str, span: tuple[int, int], after: Any = None) -> Any:
    """Rows ``span`` of a site as a 2-D float64 dask array. With ``after``, a fresh copy of
    the graph whose reads wait for ``after`` (bound before slicing: dask cannot bind a
    sliced ``from_array``)."""
    # One block per storage chunk: each moment task holds its block in float64.
    x = capture.activations(name, block_rows=capture.chunk_rows)
    if after is not None:
        from dask.graph_manipulation import bind

        x = bind(x, after)
    x = x[span[0] : span[1]]
    x = x.reshape(x.shape[0], -1) if x.ndim != 2 else x
    return x.astype(np.float64)


#: Block moments merged per task of the moment tree (each holds a d x d matrix).
_MOMENT_FAN_IN = 4


def _block_moments(block: Any) -> tuple[int, np.ndarray, np.ndarray]:
    """``(n, mean, centred scatter matrix)`` of one block of rows, in float64."""
    b = np.asarray(block, dtype=np.float64)
    mean = b.mean(axis=0) if len(b) else np.zeros(b.shape[1])
    c = b - mean
    return len(b), mean, c.T @ c


def _merge_moments(*parts: tuple[int, np.ndarray, np.ndarray]) -> tuple[int, Any, Any]:
    """Chan et al.'s pairwise update: exact merging of centred moments, so a large common
    offset never meets a small spread in one subtraction."""
    n, mean, scatter = parts[0]
    scatter = scatter.copy()
    for nb, mean_b, scatter_b in parts[1:]:
        if nb == 0:
            continue
        total = n + nb
        delta = mean_b - mean
        scatter += scatter_b + np.outer(delta, delta) * (n * nb / total)
        mean = mean + delta * (nb / total)
        n = total
    return n, mean, scatter


def _moments(x: Any) -> Any:
    """Lazy ``(n, mean, scatter)`` of a 2-D dask array, reading each block once: one task
    per block, merged in a tree. (Passing ``x.sum(0)`` and ``x.T @ x`` to one delayed call
    read every block twice, since dask optimises each collection argument on its own.)"""
    from llminstr.analysis.statistics import tree_reduce

    blocks = list(x.to_delayed(optimize_graph=True).reshape(-1))
    from dask.delayed import delayed

    parts = [delayed(_block_moments, pure=True)(b) for b in blocks]
    return tree_reduce(parts, _merge_moments, _MOMENT_FAN_IN)


def _covariance(moments: tuple[int, np.ndarray, np.ndarray]) -> np.ndarray:
    n, _, scatter = moments
    cov = scatter / max(int(n), 1)
    return np.asarray((cov + cov.T) / 2)


def _check_finite(cov: np.ndarray, names: Sequence[str], what: str) -> None:
    if not np.isfinite(cov).all():
        raise LlminstrError(
            f"the observational causal graph needs finite data: {what} of sites {list(names)} "
            "hold NaN or inf (see the statistics' nonfinite_count); choose rows or sites "
            "without them"
        )


def _pca_basis(moments: tuple[int, np.ndarray, np.ndarray], r: int, name: str) -> np.ndarray:
    """Top-``r`` eigenvectors of the covariance from the site's moments."""
    cov = _covariance(moments)
    _check_finite(cov, [name], "the rows")
    vals, vecs = np.linalg.eigh(cov)
    order = np.argsort(vals)[::-1][:r]
    basis = vecs[:, order]
    # deterministic sign: largest-magnitude entry of each direction positive
    signs = np.sign(basis[np.abs(basis).argmax(axis=0), np.arange(basis.shape[1])])
    signs[signs == 0] = 1
    return np.ascontiguousarray(basis * signs)


def _random_basis(d: int, r: int, seed: int, index: int) -> np.ndarray:
    if r >= d:
        return np.eye(d)
    g = np.random.default_rng([seed, index])
    q, _ = np.linalg.qr(g.standard_normal((d, r)))
    return np.ascontiguousarray(q)


def observational_graph(
    capture: Any,
    sites: Sequence[str] | None = None,
    *,
    rows: RowsArg = None,
    **options: Any,
) -> Any:
    """The observational causal graph (see the module docstring), as ``dask.delayed``."""
    import dask.array
    from dask.delayed import delayed

    da: Any = dask.array
    from llminstr.reader import Capture, open_capture

    cap = capture if isinstance(capture, Capture) else open_capture(capture)
    opts = _options(options, OBSERVATIONAL_OPTIONS, "observational")
    rank = _positive_int("rank", opts["rank"])
    if opts["basis"] not in ("pca", "random"):
        raise ConfigError(f"basis must be 'pca' or 'random'; got {opts['basis']!r}")
    if opts["weight"] not in ("delta_r2", "std_coef"):
        raise ConfigError(f"weight must be 'delta_r2' or 'std_coef'; got {opts['weight']!r}")
    ridge = opts["ridge"]
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not 0 <= ridge < 1:
        raise ConfigError(f"ridge must be a number in [0, 1); got {ridge!r}")
    seed = opts["seed"]
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer; got {seed!r}")
    names = _select_sites(cap, sites)
    if len(names) < 2:
        raise ConfigError(
            f"a causal graph needs at least two sites; got {names} (leave 'causal_graph' out "
            "of include to analyse one site)"
        )
    span = resolve_rows(rows, cap.num_rows)
    n = span[1] - span[0]
    if n < 2:
        raise LlminstrError(f"the observational causal graph needs at least 2 rows; got {n}")
    nodes = _node_attrs(cap, names)
    dims = [int(np.prod(node["feature_shape"])) for node in nodes]
    ranks = [min(rank, d) for d in dims]

    xs = [_site_matrix(cap, name, span) for name in names]
    bases: list[Any] = []
    if opts["basis"] == "pca":
        for x, r, name in zip(xs, ranks, names, strict=True):
            bases.append(delayed(_pca_basis, pure=True)(_moments(x), r, name))
        # Pass 2 re-reads the data, and only once every basis is known (bounded memory).
        xs = [_site_matrix(cap, name, span, after=bases) for name in names]
    else:
        bases = [
            _random_basis(d, r, int(seed), i)
            for i, (d, r) in enumerate(zip(dims, ranks, strict=True))
        ]
    ys = []
    for x, basis, d, r in zip(xs, bases, dims, ranks, strict=True):
        q = basis if isinstance(basis, np.ndarray) else da.from_delayed(basis, (d, r), np.float64)
        ys.append(x @ q)
    z = da.concatenate(ys, axis=1)
    z = z.rechunk({1: -1})
    details = {
        "basis": opts["basis"],
        "rank": rank,
        "ranks": ranks,
        "ridge": float(ridge),
        "seed": int(seed),
        "rows": list(span),
        "passes": 2 if opts["basis"] == "pca" else 1,
        "weight": opts["weight"],
        "weight_definition": (
            "drop in R^2 of the target's reduced coordinates when the source block is left "
            "out of its regression on all earlier sites"
            if opts["weight"] == "delta_r2"
            else "Frobenius norm of the source block of standardised regression coefficients, "
            "divided by sqrt(target rank)"
        ),
    }
    return delayed(_observational_finish, pure=True)(
        _moments(z), ranks, nodes, details, float(ridge), opts["weight"]
    )


def _r2(
    cov: np.ndarray, pred: np.ndarray, tgt: np.ndarray, ridge: float
) -> tuple[float, np.ndarray]:
    """R^2 of ``tgt`` columns regressed on ``pred`` columns, and the coefficients."""
    syy = float(np.trace(cov[np.ix_(tgt, tgt)]))
    if len(pred) == 0 or syy <= 0:
        return 0.0, np.zeros((len(pred), len(tgt)))
    sxx = cov[np.ix_(pred, pred)]
    sxy = cov[np.ix_(pred, tgt)]
    lam = ridge * float(np.trace(sxx)) / len(pred) + 1e-12 * (1.0 + float(np.abs(sxx).max()))
    coef = np.linalg.solve(sxx + lam * np.eye(len(pred)), sxy)
    explained = float(np.trace(sxy.T @ coef))
    r2 = explained / syy
    return (min(1.0, max(0.0, r2)) if math.isfinite(r2) else math.nan), coef


def _observational_finish(
    moments: tuple[int, np.ndarray, np.ndarray],
    ranks: list[int],
    nodes: list[dict[str, Any]],
    details: dict[str, Any],
    ridge: float,
    weight: str,
) -> dict[str, Any]:
    n = moments[0]
    cov = _covariance(moments)
    _check_finite(cov, [node["name"] for node in nodes], "the reduced coordinates")
    offsets = np.concatenate([[0], np.cumsum(ranks)]).astype(int)
    cols = [np.arange(offsets[i], offsets[i + 1]) for i in range(len(ranks))]
    sd = np.sqrt(np.maximum(np.diag(cov), 0.0))
    edges: list[dict[str, Any]] = []
    nodes = [dict(node) for node in nodes]
    nodes[0]["r2"] = 0.0
    for j in range(1, len(nodes)):
        tgt = cols[j]
        pred = np.concatenate(cols[:j])
        r2_full, coef = _r2(cov, pred, tgt, ridge)
        nodes[j]["r2"] = r2_full
        sd_t = np.where(sd[tgt] > 0, sd[tgt], np.inf)
        std = coef * sd[pred][:, None] / sd_t[None, :]
        start = 0
        for i in range(j):
            size = len(cols[i])
            rest = (
                np.concatenate([cols[m] for m in range(j) if m != i])
                if j > 1
                else np.array([], int)
            )
            r2_rest, _ = _r2(cov, rest, tgt, ridge)
            delta = max(0.0, r2_full - r2_rest)
            std_coef = float(np.linalg.norm(std[start : start + size])) / math.sqrt(len(tgt))
            start += size
            edges.append(
                {
                    "source": nodes[i]["name"],
                    "target": nodes[j]["name"],
                    "weight": delta if weight == "delta_r2" else std_coef,
                    "method": "observational",
                    "delta_r2": delta,
                    "std_coef": std_coef,
                }
            )
    details = {**details, "n_rows": int(n)}
    return _assemble(nodes, edges, "observational", details)


# ---------------------------------------------------------------------------- interventional
def interventional_graph(
    capture: Any,
    sites: Sequence[str] | None = None,
    *,
    model: Any,
    means: Mapping[str, Any] | None = None,
    rows: RowsArg = None,
    **options: Any,
) -> Any:
    """The interventional causal graph (see the module docstring), as ``dask.delayed``."""
    import dask.array as da
    from dask.base import is_dask_collection
    from dask.delayed import delayed

    from llminstr.reader import Capture, open_capture

    cap = capture if isinstance(capture, Capture) else open_capture(capture)
    opts = _options(options, INTERVENTIONAL_OPTIONS, "interventional")
    n_seq = _positive_int("n_sequences", opts["n_sequences"])
    batch = _positive_int("batch_size", opts["batch_size"])
    pad = opts["pad_token_id"]
    if isinstance(pad, bool) or not isinstance(pad, (int, np.integer)) or pad < 0:
        raise ConfigError(f"pad_token_id must be a non-negative integer; got {pad!r}")
    if not isinstance(opts["logits"], bool):
        raise ConfigError(f"logits must be True or False; got {opts['logits']!r}")
    import torch

    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    names = _select_sites(cap, sites)
    nodes = _node_attrs(cap, names)
    for node in nodes:
        try:
            model.get_submodule(node["module_path"])
        except AttributeError:
            raise SiteNotFoundError(
                f"site {node['name']!r}: the model has no module {node['module_path']!r}"
            ) from None
    _check_same_model(cap, model)
    for col in ("token_id", "sequence", "position"):
        if col not in cap.token_columns:
            raise LlminstrError(f"the capture lacks the token column {col!r}; cannot re-run it")
    span = resolve_rows(rows, cap.num_rows)
    given = dict(means or {})
    unknown = [s for s in given if s not in names]
    if unknown:
        raise SiteNotFoundError(f"means given for site(s) {unknown} not in the graph: {names}")
    mean_inputs: dict[str, Any] = {}
    for node in nodes:
        name = node["name"]
        if name in given:
            m = given[name]
            if not is_dask_collection(m):  # dask objects stay lazy: computed with the graph
                m = np.asarray(m, dtype=np.float32)
            # a Delayed's shape is unknown until it runs: checked then
            shape = m.shape if isinstance(m, (np.ndarray, da.Array)) else None
            if shape is not None and _size(shape) != int(np.prod(node["feature_shape"])):
                size = _size(shape)
                raise ConfigError(
                    f"means[{name!r}] has {size} values; the site's feature shape is "
                    f"{node['feature_shape']}"
                )
            mean_inputs[name] = m
        else:
            x = cap.activations(name, block_rows=cap.chunk_rows)[span[0] : span[1]]
            mean_inputs[name] = x.astype(np.float64).mean(axis=0)
    details = {
        "n_sequences_requested": n_seq,
        "batch_size": batch,
        "pad_token_id": int(pad),
        "rows": list(span),
        "ablation": "mean",
        "means_from_capture": [n["name"] for n in nodes if n["name"] not in given],
        "site_metric": "mean over tokens of ||ablated - clean|| / mean over tokens of ||clean||",
        "logits_metric": "mean over tokens of KL(clean || ablated), nats"
        if opts["logits"]
        else None,
    }
    return delayed(_interventional_run, pure=False)(
        str(Path(cap.path).resolve()),
        nodes,
        model,
        mean_inputs,
        span,
        n_seq,
        batch,
        int(pad),
        opts["logits"],
        details,
    )


def _check_same_model(capture: Any, model: Any) -> None:
    """Refuse a model that cannot be the one the capture recorded: another class or
    another number of parameters (the capture's ``model`` entry; skipped when absent)."""
    recorded = capture.metadata.get("model") or {}
    if not isinstance(recorded, Mapping):
        return
    cls, params = recorded.get("class"), recorded.get("num_parameters")
    have_cls = type(model).__name__
    have_params = int(sum(p.numel() for p in model.parameters()))
    if (isinstance(cls, str) and cls != have_cls) or (
        isinstance(params, int) and not isinstance(params, bool) and params != have_params
    ):
        raise ConfigError(
            f"the model given ({have_cls}, {have_params:,} parameters) is not the one this "
            f"capture recorded ({cls}, {params:,} parameters): re-running its tokens through "
            "another model measures nothing about the capture"
            if isinstance(params, int)
            else f"the model given ({have_cls}) is not the one this capture recorded ({cls})"
        )


def _sequences(
    capture: Any, span: tuple[int, int], n_seq: int
) -> tuple[list[np.ndarray], list[int], int]:
    """Token ids of the first ``n_seq`` complete sequences of the rows in ``span``
    (ordered by position), their ids, and how many candidate sequences were skipped."""
    cr = capture.chunk_rows
    picked: list[int] = []
    parts: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
    # A sequence's rows come in increasing positions (each pass appends later ones): one
    # first seen past position 0 cannot be complete here and takes no candidate's place.
    partial: set[int] = set()
    start = span[0]
    while start < span[1]:
        stop = min(span[1], (start // cr + 1) * cr)
        table = capture.token_table(start, stop)
        seq, pos, tok = table["sequence"], table["position"], table["token_id"]
        keep = pos >= 0
        if "is_padding" in table:
            keep &= table["is_padding"] == 0
        seq, pos, tok = seq[keep], pos[keep], tok[keep]
        for s in dict.fromkeys(seq.tolist()):
            if s in parts or s in partial:
                continue
            if pos[np.argmax(seq == s)] != 0:
                partial.add(s)
            elif len(picked) < 4 * n_seq + 16:
                picked.append(s)
                parts[s] = []
        mask = np.isin(seq, picked)
        for s in np.unique(seq[mask]):
            sel = seq == s
            parts[int(s)].append((pos[sel], tok[sel]))
        start = stop
    out: list[np.ndarray] = []
    ids: list[int] = []
    skipped = len(partial)
    for s in picked:
        if len(out) == n_seq:
            break
        pos = np.concatenate([p for p, _ in parts[s]])
        tok = np.concatenate([t for _, t in parts[s]])
        order = np.argsort(pos, kind="stable")
        pos, tok = pos[order], tok[order]
        first = np.concatenate([[True], pos[1:] != pos[:-1]])
        pos, tok = pos[first], tok[first]
        if len(pos) == 0 or not np.array_equal(pos, np.arange(len(pos))) or (tok < 0).any():
            skipped += 1
            continue
        out.append(tok.astype(np.int64))
        ids.append(int(s))
    return out, ids, skipped


class _Recorder:
    """Forward hooks that record site outputs and optionally replace one by its mean."""

    def __init__(self, model: Any, nodes: list[dict[str, Any]]) -> None:
        self.model = model
        self.nodes = nodes
        self.modules = [model.get_submodule(n["module_path"]) for n in nodes]
        self.outputs: dict[int, Any] = {}
        self.ablate: int | None = None
        self.mean: Any = None

    def _hook(self, index: int) -> Any:
        import torch

        tuple_index = int(self.nodes[index]["tuple_index"])

        def hook(module: Any, args: Any, output: Any) -> Any:
            tensor, wrap = _pick(output, tuple_index, self.nodes[index]["name"])
            if self.ablate == index:
                shape = tuple(int(d) for d in self.nodes[index]["feature_shape"])
                if tuple(tensor.shape[-len(shape) :]) != shape:
                    raise LlminstrError(
                        f"site {self.nodes[index]['name']!r}: the model's output has shape "
                        f"{tuple(tensor.shape)}; the capture's rows are {shape}: is this the "
                        "model the capture was recorded from?"
                    )
                mean = self.mean.to(device=tensor.device, dtype=tensor.dtype)
                tensor = torch.broadcast_to(mean, tensor.shape).contiguous()
                self.outputs[index] = tensor.detach()
                return wrap(tensor)
            self.outputs[index] = tensor.detach()
            return None

        return hook

    def __enter__(self) -> _Recorder:
        self.handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.modules)]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()


def _pick(output: Any, index: int, name: str) -> tuple[Any, Any]:
    """The site tensor of a module output, and a function rebuilding the output with a
    replacement tensor."""
    import torch

    if torch.is_tensor(output):
        return output, lambda t: t
    if isinstance(output, (tuple, list)) and index < len(output) and torch.is_tensor(output[index]):

        def wrap(t: Any) -> Any:
            items = list(output)
            items[index] = t
            return type(output)(items) if isinstance(output, list) else tuple(items)

        return output[index], wrap
    raise LlminstrError(
        f"site {name!r}: the module returned {type(output).__name__}; expected a tensor or a "
        f"tuple whose element {index} is a tensor"
    )


def _logits_of(output: Any) -> Any:
    import torch

    if hasattr(output, "logits") and torch.is_tensor(output.logits):
        return output.logits
    if torch.is_tensor(output):
        return output
    if isinstance(output, (tuple, list)) and output and torch.is_tensor(output[0]):
        return output[0]
    return None


def _forward(
    model: Any,
    recorder: _Recorder,
    ablate: int | None,
    means: Mapping[int, Any],
    ids: Any,
    kwargs: Mapping[str, Any],
    real: Any,
    rows: int,
    want_logits: bool,
) -> tuple[list[Any], Any]:
    """One forward pass (site ``ablate`` mean-ablated, or none): every site's output at
    the real tokens, ``(tokens, features)`` float32, and the log-probabilities (or None)."""
    import torch

    recorder.ablate = ablate
    recorder.mean = means[ablate] if ablate is not None else None
    recorder.outputs = {}
    out = model(ids, **kwargs)
    acts = []
    for j, node in enumerate(recorder.nodes):
        t = recorder.outputs.get(j)
        if t is None:
            raise LlminstrError(f"site {node['name']!r} did not run in the re-run forward pass")
        acts.append(t.reshape(rows, -1)[real.to(t.device)].float())
    logits = _logits_of(out) if want_logits else None
    if logits is not None:
        logits = logits.reshape(rows, -1)[real.to(logits.device)]
        logits = torch.log_softmax(logits.float(), dim=-1)
    return acts, logits


def _interventional_run(
    path: str,
    nodes: list[dict[str, Any]],
    model: Any,
    means: Mapping[str, Any],
    span: tuple[int, int],
    n_seq: int,
    batch: int,
    pad: int,
    want_logits: bool,
    details: dict[str, Any],
) -> dict[str, Any]:
    import torch

    from llminstr.reader import open_capture

    # not closed here: an HDF5 handle is shared by every Capture of the path in the process
    seqs, seq_ids, skipped = _sequences(open_capture(path), span, n_seq)
    if not seqs:
        raise LlminstrError(
            "no complete token sequence (positions 0..L-1 with known token ids) in the capture "
            "rows; the interventional graph cannot re-run the model"
        )
    from llminstr.capture import capture_active

    if capture_active(model):
        raise CaptureStateError(
            "the interventional causal graph re-runs the model, and a capture_activations "
            "block is recording it: the re-runs would be stored in that capture. Compute the "
            "graph after the block"
        )
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    params = inspect.signature(model.forward).parameters
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    takes_mask = "attention_mask" in params or takes_kwargs
    extra = {"use_cache": False} if "use_cache" in params else {}

    # batches: padded with an attention mask when the model takes one, else equal lengths
    if takes_mask:
        batches = [list(range(i, min(i + batch, len(seqs)))) for i in range(0, len(seqs), batch)]
    else:
        by_len: dict[int, list[int]] = {}
        for i, sq in enumerate(seqs):
            by_len.setdefault(len(sq), []).append(i)
        batches = [g[i : i + batch] for g in by_len.values() for i in range(0, len(g), batch)]

    count = len(nodes)
    mean_t = {}
    for i, node in enumerate(nodes):
        m = np.asarray(means[node["name"]], dtype=np.float32)
        if m.size != int(np.prod(node["feature_shape"])):
            raise ConfigError(
                f"means[{node['name']!r}] has {m.size} values; the site's feature shape is "
                f"{node['feature_shape']}"
            )
        if not np.isfinite(m).all():
            raise nonfinite_error(
                node["name"], "the causal graph", "its mean over the capture is not finite"
            )
        mean_t[i] = torch.as_tensor(m).reshape(tuple(node["feature_shape"]))
    diff = np.zeros((count, count))  # [source, target] sum of ||delta||
    norm = np.zeros(count)  # sum of ||clean||
    kl = np.zeros(count)
    tokens = 0
    has_logits = want_logits
    recorder = _Recorder(model, nodes)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), recorder:
            for group in batches:
                lengths = [len(seqs[i]) for i in group]
                width = max(lengths)
                ids = torch.full((len(group), width), pad, dtype=torch.long)
                mask = torch.zeros((len(group), width), dtype=torch.long)
                for b, i in enumerate(group):
                    ids[b, : lengths[b]] = torch.from_numpy(seqs[i])
                    mask[b, : lengths[b]] = 1
                real = mask.reshape(-1).bool()
                kwargs: dict[str, Any] = dict(extra)
                if takes_mask:
                    kwargs["attention_mask"] = mask.to(device)

                rows = len(group) * width
                clean, clean_logp = _forward(
                    model, recorder, None, mean_t, ids.to(device), kwargs, real, rows, has_logits
                )
                if clean_logp is None:
                    has_logits = False
                for j in range(count):
                    norm[j] += float(clean[j].norm(dim=1).sum())
                for s in range(count):
                    acts, logp = _forward(
                        model, recorder, s, mean_t, ids.to(device), kwargs, real, rows, has_logits
                    )
                    for t in range(s + 1, count):
                        diff[s, t] += float((acts[t] - clean[t]).norm(dim=1).sum())
                    if has_logits and logp is not None and clean_logp is not None:
                        kl[s] += float(
                            (clean_logp.exp() * (clean_logp - logp)).sum(dim=1).clamp_min(0).sum()
                        )
                tokens += int(real.sum())
    finally:
        recorder.ablate = None
        model.train(was_training)
    for t in range(count):  # an overflow in the re-run (a float16 model, say)
        if not (math.isfinite(norm[t]) and np.isfinite(diff[:, t]).all()):
            raise nonfinite_error(
                nodes[t]["name"],
                "the causal graph",
                "the re-run forward passes gave NaN or inf there",
            )
    if has_logits and not np.isfinite(kl).all():
        raise nonfinite_error(
            LOGITS_NODE, "the causal graph", "the re-run forward passes gave NaN or inf logits"
        )
    edges: list[dict[str, Any]] = []
    for s in range(count):
        for t in range(s + 1, count):
            mean_norm = norm[t] / tokens
            weight = (diff[s, t] / tokens) / mean_norm if mean_norm > 0 else 0.0
            edges.append(
                {
                    "source": nodes[s]["name"],
                    "target": nodes[t]["name"],
                    "weight": float(weight),
                    "method": "interventional",
                }
            )
        if has_logits:
            edges.append(
                {
                    "source": nodes[s]["name"],
                    "target": LOGITS_NODE,
                    "weight": float(kl[s] / tokens),
                    "method": "interventional",
                }
            )
    nodes = [dict(n) for n in nodes]
    if has_logits:
        nodes.append(
            {
                "name": LOGITS_NODE,
                "order": count,
                "layer": None,
                "kind": "logits",
                "module_path": None,
                "tuple_index": 0,
                "feature_shape": [],
            }
        )
    details = {
        **details,
        "n_sequences": len(seqs),
        "sequence_ids": seq_ids,
        "skipped_sequences": skipped,
        "n_tokens": tokens,
        "logits": has_logits,
    }
    return _assemble(nodes, edges, "interventional", details)
