"""Materialise analysis results to files and draw the HTML report (PNG plots).

``write_analysis`` writes ``analysis.json`` (statistics, SAE metrics and top examples,
causal edges) and ``sae/`` (weights as safetensors + JSON). ``build_report`` reads those
and the capture's own summary, and writes ``report.html`` beside the PNG plots it draws.
"""

from __future__ import annotations

import html
import json
import math
import os
import sys
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from llminstr.errors import FormatError


# --------------------------------------------------------------------------- compute & write
def compute_with_progress(result: Mapping[str, Any], *, quiet: bool = False) -> dict[str, Any]:
    """``llminstr.analysis.compute`` with a progress bar on a terminal."""
    from llminstr.analysis import compute

    if quiet or not sys.stderr.isatty():
        done: dict[str, Any] = compute(result)
        return done
    import dask.diagnostics

    progress: Any = getattr(dask.diagnostics, "ProgressBar")  # noqa: B009 (untyped export)
    with progress(out=sys.stderr):
        shown: dict[str, Any] = compute(result)
    return shown


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        return value if math.isfinite(value) else None  # strict JSON has no NaN/inf
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    return str(obj)


def write_analysis(computed: Mapping[str, Any], out_dir: str | os.PathLike[str]) -> Path:
    """Write computed analysis results: ``analysis.json`` and ``sae/`` (safetensors)."""
    from llminstr.analysis.sae import save_sae

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {
        "capture": computed.get("capture"),
        "statistics": computed.get("statistics"),
    }
    sae = computed.get("sae_features")
    if sae is not None:
        save_sae(sae, out / "sae")
        doc["sae_features"] = {
            "site": sae["site"],
            "config": sae["config"],
            "d_in": sae["d_in"],
            "n_features": sae["n_features"],
            "metrics": sae["metrics"],
            "loss_history": sae["loss_history"],
            "feature_frequency": sae["feature_frequency"],
            "top_examples": sae["top_examples"],
            "weights": "sae/sae.safetensors",
        }
    else:
        doc["sae_features"] = None
        _remove_stale_sae(out / "sae")
    graph = computed.get("causal_graph")
    doc["causal_graph"] = (
        {k: v for k, v in graph.items() if k != "graph"} if graph is not None else None
    )
    (out / "analysis.json").write_text(json.dumps(_jsonable(doc), indent=1, allow_nan=False))
    if (out / "report.html").exists():  # a report of the earlier analysis: stale now
        for name in ("report.html", *PLOT_FILES):
            (out / name).unlink(missing_ok=True)
    return out


def _remove_stale_sae(folder: Path) -> None:
    """An earlier run's SAE files, which this run's analysis.json no longer describes."""
    from llminstr.analysis.sae import META_FILE, WEIGHTS_FILE

    for name in (WEIGHTS_FILE, META_FILE):
        (folder / name).unlink(missing_ok=True)
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


#: The plots a report writes beside its HTML file.
PLOT_FILES = ("norms.png", "outliers.png", "compression.png", "sae_frequency.png", "causal.png")


def load_analysis(out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(out_dir) / "analysis.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FormatError(f"no analysis.json in {str(out_dir)!r}") from None
    except ValueError as exc:
        raise FormatError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise FormatError(f"{path} does not hold a JSON object")
    return doc


def _num(value: Any, spec: str) -> str:
    """``value`` formatted with ``spec``, or "n/a" for a missing value (JSON null: an FVU
    without held-out rows, a NaN statistic)."""
    return "n/a" if value is None else format(value, spec)


def headlines(computed: Mapping[str, Any]) -> list[str]:
    """A few sentences that say what the analysis found."""
    lines: list[str] = []
    stats = (computed.get("statistics") or {}).get("sites") or {}
    if stats:
        norms = {
            s: v["row_norm"]["mean"]
            for s, v in stats.items()
            if v.get("row_norm") and v["row_norm"].get("mean") is not None
        }
        if norms:
            top = max(norms, key=lambda s: norms[s])
            lines.append(f"largest mean row norm: {top} ({norms[top]:.2f})")
        outliers = {s: len(np.atleast_1d(v.get("outlier_dims", []))) for s, v in stats.items()}
        worst = max(outliers, key=lambda s: outliers[s])
        if outliers[worst]:
            lines.append(f"most outlier dimensions: {worst} ({outliers[worst]})")
    sae = computed.get("sae_features")
    if sae:
        m = sae["metrics"]
        lines.append(
            f"SAE on {sae['site']}: {sae['n_features']} features, L0 {_num(m['mean_l0'], '.1f')}, "
            f"FVU {_num(m['fvu'], '.3f')}, dead {100 * m['dead_fraction']:.1f}%"
        )
    graph = computed.get("causal_graph")
    if graph:
        edges = sorted(graph["edges"], key=lambda e: -abs(e["weight"] or 0))
        if edges:
            e = edges[0]
            lines.append(
                f"strongest {graph['method']} edge: {e['source']} -> {e['target']} "
                f"({_num(e['weight'], '.3g')})"
            )
    return lines


# --------------------------------------------------------------------------- token text
def token_decoder(model_desc: Mapping[str, Any]) -> Callable[[list[int]], str]:
    """Turn token ids into text: the demo model's byte tokenizer, a local HF tokenizer
    named by the capture's model descriptor, or the ids themselves."""
    config = model_desc.get("config") or {}
    if config.get("vocab_size") == 257 and model_desc.get("model_type") == "gpt2":
        from llminstr.demo import ByteTokenizer

        tok = ByteTokenizer()
        return lambda ids: tok.decode([i for i in ids if i >= 0])
    name = model_desc.get("name_or_path")
    if name and Path(str(name)).is_dir():
        try:
            from transformers import AutoTokenizer

            hf = AutoTokenizer.from_pretrained(str(name), local_files_only=True)
            return lambda ids: str(hf.decode([i for i in ids if i >= 0]))
        except (OSError, ValueError):
            pass
    return lambda ids: " ".join(f"[{i}]" for i in ids)


def _contexts(
    capture: Any,
    examples: Mapping[str, Any],
    features: list[int],
    width: int,
    decode: Callable[[list[int]], str],
) -> dict[int, list[tuple[str, str, float]]]:
    """For each feature, its top rows as (context before, the token, activation)."""
    table = capture.token_table()
    seq, pos, ids = table["sequence"], table["position"], table["token_id"]
    order = np.lexsort((pos, seq))
    sorted_seq, sorted_pos = seq[order], pos[order]
    out: dict[int, list[tuple[str, str, float]]] = {}
    for f in features:
        items = []
        for row, value in zip(examples["row"][f], examples["value"][f], strict=True):
            if row < 0 or value <= 0:
                continue
            s, p = int(seq[row]), int(pos[row])
            lo = np.searchsorted(sorted_seq, s, "left")
            hi = np.searchsorted(sorted_seq, s, "right")
            window = order[lo:hi][(sorted_pos[lo:hi] >= p - width) & (sorted_pos[lo:hi] < p)]
            items.append((decode(ids[window].tolist()), decode([int(ids[row])]), float(value)))
        out[f] = items[:5]
    return out


# --------------------------------------------------------------------------- plots
def _plots(
    capture_summary: Mapping[str, Any], analysis: Mapping[str, Any], out: Path
) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files: dict[str, str] = {}
    for name in PLOT_FILES:  # an earlier report's plots of parts this analysis lacks
        (out / name).unlink(missing_ok=True)
    stats = (analysis.get("statistics") or {}).get("sites") or {}
    sites = capture_summary["sites"]

    if stats:
        fig, ax = plt.subplots(figsize=(7, 3.6))
        for kind, marker in (("residual", "o"), ("attention", "s"), ("ffn", "^"), ("other", "x")):
            pts = [
                (s["layer"], stats[s["name"]]["row_norm"]["mean"])
                for s in sites
                if s["kind"] == kind
                and s["name"] in stats
                and s["layer"] is not None
                and stats[s["name"]]["row_norm"].get("mean") is not None
            ]
            if pts:
                xs, ys = zip(*sorted(pts), strict=True)
                ax.plot(xs, ys, marker=marker, label=kind)
        ax.set_xlabel("layer")
        _integer_ticks(ax)
        ax.set_ylabel("mean L2 norm of a row")
        ax.set_title("Per-layer norm profile")
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
            ax.grid(alpha=0.3)
            files["norms"] = _save(fig, out / "norms.png")
        else:  # no site has a layer: no profile (an empty plot, and a matplotlib warning)
            plt.close(fig)

        fig, ax = plt.subplots(figsize=(7, 3.6))
        names = [s["name"] for s in sites if s["name"] in stats]
        drawn = 0
        for i, name in enumerate(names):
            st = stats[name]
            # JSON null (a dimension holding NaN/inf) -> NaN; medians ignore them, as the
            # statistics' own outlier rule does, and only finite scores are drawn.
            max_abs = np.array(st["max_abs"], dtype=float).ravel()
            rms = np.array(st["rms"], dtype=float).ravel()
            with np.errstate(invalid="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN medians
                scores = np.maximum(
                    max_abs / max(np.nanmedian(max_abs), 1e-30),
                    rms / max(np.nanmedian(rms), 1e-30),
                )
            scores = scores[np.isfinite(scores) & (scores > 0)]
            drawn += scores.size
            high = scores > float(st.get("outlier_factor", 6.0))
            ax.scatter(np.full(int((~high).sum()), i), scores[~high], s=4, color="0.6")
            ax.scatter(np.full(int(high.sum()), i), scores[high], s=14, color="crimson")
        ax.set_xticks(range(len(names)), names, rotation=70, fontsize=7)
        if drawn:  # (a log axis with no positive value fails)
            ax.set_yscale("log")
        ax.set_ylabel("max(|x|max, rms) / median over dims")
        ax.set_title("Per-dimension scale; red: outlier dimensions (above the outlier factor)")
        files["outliers"] = _save(fig, out / "outliers.png")

    fig, ax = plt.subplots(figsize=(7, 3.2))
    ratios = [s["compression_ratio"] or 0 for s in sites]
    ax.bar(range(len(sites)), ratios, color="steelblue")
    ax.axhline(1.0, color="0.3", lw=0.8)
    ax.set_xticks(range(len(sites)), [s["name"] for s in sites], rotation=70, fontsize=7)
    ax.set_ylabel("raw / stored")
    ax.set_title(f"Compression per site ({capture_summary['compression']['cname'] or 'none'})")
    files["compression"] = _save(fig, out / "compression.png")

    sae = analysis.get("sae_features")
    if sae:
        freq = np.asarray(sae["feature_frequency"], dtype=float)
        fig, ax = plt.subplots(figsize=(7, 3.2))
        live = freq[freq > 0]
        if live.size:
            ax.hist(np.log10(live), bins=40, color="darkorange")
        ax.set_xlabel("log10 activation frequency")
        ax.set_ylabel("features")
        dead = int((freq == 0).sum())
        ax.set_title(f"SAE feature frequency on {sae['site']} ({dead} dead of {freq.size})")
        files["sae_frequency"] = _save(fig, out / "sae_frequency.png")

    graph = analysis.get("causal_graph")
    if graph and graph.get("nodes"):
        files["causal"] = _draw_graph(graph, out / "causal.png")
    return files


def _draw_graph(graph: Mapping[str, Any], path: Path) -> str:
    import matplotlib.pyplot as plt

    rows = {"attention": 0, "ffn": 1, "residual": 2, "other": 3}
    nodes = graph["nodes"]
    pos: dict[str, tuple[float, float]] = {}
    for n in nodes:
        if n["name"] == "logits":
            pos[n["name"]] = (max(p[0] for p in pos.values()) + 1 if pos else 0, 1.0)
        else:
            layer = n.get("layer") if n.get("layer") is not None else n["order"]
            pos[n["name"]] = (float(layer), float(rows.get(n.get("kind") or "other", 3)))
    edges = [
        e
        for e in graph["edges"]
        if e["weight"] is not None and e["source"] in pos and e["target"] in pos
    ]
    fig, ax = plt.subplots(figsize=(9, 4.2))
    if edges:
        top = max(abs(e["weight"]) for e in edges) or 1.0
        shown = sorted(edges, key=lambda e: -abs(e["weight"]))[: max(12, len(nodes) * 2)]
        for e in shown:
            (x0, y0), (x1, y1) = pos[e["source"]], pos[e["target"]]
            w = abs(e["weight"]) / top
            ax.annotate(
                "",
                xy=(x1, y1),
                xytext=(x0, y0),
                arrowprops={
                    "arrowstyle": "->",
                    "lw": 0.5 + 3 * w,
                    "alpha": 0.25 + 0.7 * w,
                    "color": "navy",
                    "connectionstyle": "arc3,rad=0.15",
                },
            )
    for name, (x, y) in pos.items():
        ax.scatter([x], [y], s=160, color="gold", edgecolor="k", zorder=3)
        ax.text(
            x,
            y + 0.18,
            name.split(".")[-1] if name != "logits" else "logits",
            ha="center",
            fontsize=7,
        )
    used = sorted({int(y) for _x, y in pos.values()})
    ax.set_yticks(used, [k for k, v in rows.items() if v in used])
    _integer_ticks(ax)
    ax.set_xlabel("layer (logits at the right)")
    ax.set_title(f"Causal graph ({graph['method']}; strongest edges, width = weight)")
    return _save(fig, path)


def _integer_ticks(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _save(fig: Any, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


# --------------------------------------------------------------------------- html
def build_report(
    capture_path: str | os.PathLike[str],
    analysis_dir: str | os.PathLike[str],
    out_html: str | os.PathLike[str],
) -> Path:
    """Write an HTML report (with PNG plots beside it) for a capture and its analysis."""
    from llminstr.reader import open_capture
    from llminstr.tools import summary

    out = Path(out_html)
    out.parent.mkdir(parents=True, exist_ok=True)
    info = summary(capture_path)
    analysis = load_analysis(analysis_dir)
    cap = open_capture(capture_path)
    _check_matches(analysis, cap, Path(analysis_dir))
    try:
        return _write_report(info, analysis, cap, out, Path(analysis_dir))
    except (KeyError, TypeError, IndexError, ValueError, AttributeError) as exc:
        raise FormatError(
            f"{str(Path(analysis_dir) / 'analysis.json')!r} does not hold an analysis this "
            f"report can read ({type(exc).__name__}: {exc}); run `llminstr analyze` again"
        ) from exc


def _check_matches(analysis: Mapping[str, Any], cap: Any, analysis_dir: Path) -> None:
    """The analysis must be of this capture: an analysis left beside a capture that was
    captured again (``--overwrite``) pointed at rows and sites that are not there."""
    where = str(analysis_dir / "analysis.json")
    summary_doc = analysis.get("capture")
    if not isinstance(summary_doc, dict):
        raise FormatError(f"{where!r} has no capture summary; run `llminstr analyze` again")
    rows, sites = summary_doc.get("rows"), summary_doc.get("sites")
    created = summary_doc.get("created")
    redo = "run `llminstr analyze` again"
    if created is not None and created != cap.metadata.get("created"):
        raise FormatError(
            f"{where!r} was made from another capture (created {created}; this one was "
            f"created {cap.metadata.get('created')}): {redo}"
        )
    if (
        not isinstance(rows, list)
        or len(rows) != 2
        or not all(isinstance(r, int) for r in rows)
        or not 0 <= rows[0] <= rows[1] <= cap.num_rows
    ):
        raise FormatError(
            f"{where!r} covers rows {rows!r}, which this capture of {cap.num_rows} rows does "
            f"not hold: {redo}"
        )
    if not isinstance(sites, list) or not set(map(str, sites)) <= set(cap.sites):
        raise FormatError(f"{where!r} names sites this capture does not have: {redo}")


def _analysed(summary: Mapping[str, Any], info: Mapping[str, Any]) -> str:
    """The rows the analysis covered, and the capture as it was then: the table above
    shows the capture now, which for a live capture has more rows than were analysed."""
    rows = summary.get("rows")
    if not (isinstance(rows, list) and len(rows) == 2):
        return ""
    then = summary.get("num_rows")
    text = f"Analysed rows {rows[0]:,} to {rows[1]:,}"
    if isinstance(then, int):
        text += f" of the {then:,} committed when the analysis ran"
        status = summary.get("status")
        if then != info["rows"] or (status is not None and status != info["status"]):
            text += f" (status then: {html.escape(str(status))}; the plots and tables below are of those rows)"
    return f"<p>{text}.</p>"


def _write_report(
    info: Mapping[str, Any], analysis: Mapping[str, Any], cap: Any, out: Path, analysis_dir: Path
) -> Path:
    files = _plots(info, analysis, out.parent)
    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>llminstr report</title>",
        "<style>body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px}"
        "code{background:#f3f3f3}img{max-width:100%}.tok{background:#ffe08a}</style></head><body>",
        f"<h1>llminstr report</h1><p><code>{e(info['path'])}</code> &middot; {e(info['backend'])} &middot; "
        f"format {e(info['format_version'])} &middot; status <b>{e(info['status'])}</b></p>",
        "<table><tr><th>rows</th><th>sites</th><th>raw</th><th>stored</th><th>ratio</th><th>model</th></tr>",
        f"<tr><td>{info['rows']}</td><td>{len(info['sites'])}</td><td>{info['raw_bytes'] / 1e6:.2f} MB</td>"
        f"<td>{info['stored_bytes'] / 1e6:.2f} MB</td><td>{(info['compression_ratio'] or 0):.2f}</td>"
        f"<td>{e(str(info['model'].get('class')))} ({e(str(info['model'].get('model_type')))})</td></tr></table>",
        _analysed(analysis.get("capture") or {}, info),
    ]
    for key, title in (
        ("norms", "Norm profile"),
        ("outliers", "Outlier dimensions"),
        ("compression", "Compression per site"),
    ):
        if key in files:
            parts.append(f"<h2>{title}</h2><img src='{files[key]}' alt='{title}'>")
    sae = analysis.get("sae_features")
    if sae:
        m = sae["metrics"]
        parts.append(
            f"<h2>Sparse-autoencoder features: <code>{e(sae['site'])}</code></h2>"
            f"<p>{sae['n_features']} features, k={sae['config']['k']}, mean L0 "
            f"{_num(m['mean_l0'], '.2f')}, FVU (held out) {_num(m['fvu'], '.4f')}, dead "
            f"{100 * m['dead_fraction']:.1f}%</p>"
        )
        if "sae_frequency" in files:
            parts.append(f"<img src='{files['sae_frequency']}' alt='SAE frequency'>")
        freq = np.asarray(sae["feature_frequency"], dtype=float)
        features = [
            int(i) for i in np.argsort(-freq)[:: max(1, len(freq) // 12)][:12] if freq[i] > 0
        ]
        decode = token_decoder(cap.metadata.get("model", {}))
        contexts = _contexts(cap, sae["top_examples"], features, 12, decode)
        parts.append(
            "<h3>Top-activating tokens per feature</h3><table><tr><th>feature</th><th>freq</th><th>top contexts (token highlighted, activation)</th></tr>"
        )
        for f in features:
            cells = " &nbsp;|&nbsp; ".join(
                f"{e(before[-24:])}<span class='tok'>{e(tok)}</span> ({v:.2f})"
                for before, tok, v in contexts[f]
            )
            parts.append(
                f"<tr><td>{f}</td><td>{freq[f]:.3f}</td><td><code>{cells}</code></td></tr>"
            )
        parts.append("</table>")
    graph = analysis.get("causal_graph")
    if graph:
        parts.append(f"<h2>Causal graph ({e(graph['method'])})</h2>")
        if "causal" in files:
            parts.append(f"<img src='{files['causal']}' alt='causal graph'>")
        edges = sorted(graph["edges"], key=lambda x: -abs(x["weight"] or 0))[:10]
        parts.append("<table><tr><th>source</th><th>target</th><th>weight</th></tr>")
        parts += [
            f"<tr><td>{e(x['source'])}</td><td>{e(x['target'])}</td>"
            f"<td>{_num(x['weight'], '.4g')}</td></tr>"
            for x in edges
        ]
        parts.append("</table>")
    data = os.path.relpath(Path(analysis_dir) / "analysis.json", out.parent)
    weights = " and its sae/ folder" if sae else ""
    parts.append(
        f"<p style='color:#777'>Written by llminstr. Data: <code>{e(data)}</code>{weights}.</p>"
        "</body></html>"
    )
    out.write_text("\n".join(parts), encoding="utf-8")
    cap.close()
    return out
