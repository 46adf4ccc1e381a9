"""The ``llminstr`` command line: demo, capture, info, validate, repair, analyze, report,
convert.

Exit codes: 0 success, 1 the capture failed validation, 2 bad input or a library error.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llminstr.errors import LlminstrError

EXIT_OK, EXIT_INVALID, EXIT_ERROR = 0, 1, 2

DEMO_PROMPTS = [
    "The with statement",
    "Assignment statements",
    "The import system",
    "Boolean operations",
    "class definitions",
    "The for statement is used to",
    "Exceptions",
    "Lambdas",
]


def demo_prompts(n: int) -> list[str]:
    """Openings of Python's own documentation topics (the demo model's training text)."""
    from pydoc_data.topics import topics

    texts = [topics[k].strip() for k in sorted(topics)]
    prompts = []
    for text in texts[:: max(1, len(texts) // n)][:n]:
        words = [w for w in text.split() if w.strip("*=-")]
        prompts.append(" ".join(words[:6]))
    return prompts


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1; got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number; got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0; got {text}")
    return value


def _row_range(text: str) -> slice:
    """``START:STOP`` (either may be empty, negatives count from the end) -> a slice."""
    start, sep, stop = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return slice(int(start) if start.strip() else None, int(stop) if stop.strip() else None)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected START:STOP (e.g. 0:1000, :-100, 500: or --rows=-100:); got {text!r}"
        ) from None


def _gb(n: float) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


# --------------------------------------------------------------------------- models
def load_model(spec: str, device: str, dtype: str) -> tuple[Any, Any]:
    """``demo`` (the shipped model), a local Hugging Face directory, or a hub name."""
    import torch

    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[
        dtype
    ]
    from llminstr.config import check_torch_device

    check_torch_device(device, "--device")
    if spec == "demo":
        from llminstr.demo import load_demo_model

        return load_demo_model(device=device, dtype=torch_dtype)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(spec).is_dir()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            spec, dtype=torch_dtype, local_files_only=local
        )
        tokenizer = AutoTokenizer.from_pretrained(spec, local_files_only=local)
    except (OSError, ValueError) as exc:
        raise LlminstrError(
            f"could not load model {spec!r}: {exc}. Pass 'demo', a local model directory, or a "
            "hub name while online."
        ) from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    loaded: Any = model
    return loaded.to(device).eval(), tokenizer


def _encode(tokenizer: Any, prompts: list[str]) -> dict[str, Any]:
    from llminstr.demo import ByteTokenizer

    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer(prompts, padding_side="left", add_bos=True)
    return dict(tokenizer(prompts, return_tensors="pt", padding=True))


def _read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.exists():
            raise LlminstrError(f"--prompts-file {str(path)!r} does not exist")
        if not path.is_file():
            raise LlminstrError(f"--prompts-file {str(path)!r} is not a file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise LlminstrError(f"--prompts-file {str(path)!r} is not UTF-8 text ({exc})") from None
        lines = [line.rstrip("\n") for line in text.splitlines() if line.strip()]
        if not lines:
            raise LlminstrError(f"--prompts-file {str(path)!r} holds no prompt (one per line)")
        prompts += lines
    return prompts or list(DEMO_PROMPTS)


# --------------------------------------------------------------------------- capture
def run_capture(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from llminstr import HookGranularity, InstrumentationConfig, InstrumentationFramework

    output = Path(args.output)
    if (output.exists() or output.is_symlink()) and not args.overwrite:
        raise LlminstrError(f"{str(output)!r} already exists; pass --overwrite to replace it")
    prompts = _read_prompts(args)
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model, args.device, args.dtype)
    cfg = InstrumentationConfig(
        granularity=HookGranularity[args.granularity.upper()],
        compression_algorithm=None if args.compression == "none" else args.compression,
        target_throughput_gbps=args.target_gbps,
        max_memory_gb=args.max_memory_gb,
        layers=tuple(args.layers) if args.layers else None,
        module_names=tuple(args.module) if args.module else None,
        chunk_rows=args.chunk_rows,
        storage_dtype=args.storage_dtype,
        backend=args.backend,
        progress=False if args.quiet else None,
    )
    fw = InstrumentationFramework(cfg)
    sites = fw.instrument_model(model)
    texts: list[str] = []
    starts = range(0, len(prompts), args.batch_size)
    bar = _bar(args, "prompts", "prompts")  # the batch bar knows its total: it gives the ETA
    if bar is not None:
        bar.total = len(prompts)
        bar.position = 1
    with fw.capture_activations(args.output, overwrite=args.overwrite), torch.no_grad():
        for start in starts:
            batch = prompts[start : start + args.batch_size]
            enc = {k: v.to(args.device) for k, v in _encode(tokenizer, batch).items()}
            pad = getattr(tokenizer, "pad_token_id", None)
            out = model.generate(
                **enc,
                max_new_tokens=args.max_new_tokens,
                do_sample=args.sample,
                temperature=args.temperature if args.sample else None,
                pad_token_id=pad,
            )
            new = out[:, enc["input_ids"].shape[1] :].cpu()
            texts += [tokenizer.decode(row) for row in new]
            if bar is not None:
                bar.update(len(batch))
    if bar is not None:
        bar.close()
    stats = dict(fw.last_capture_stats or {})
    stats["sites"] = [s.name for s in sites]
    stats["generations"] = [
        {"prompt": p, "continuation": t} for p, t in zip(prompts, texts, strict=True)
    ]
    return stats


def cmd_capture(args: argparse.Namespace) -> int:
    stats = run_capture(args)
    if args.json:
        print(json.dumps(stats, indent=2, default=str))
        return EXIT_OK
    print(
        f"captured {stats['rows']} rows x {len(stats['sites'])} sites to {stats['path']} "
        f"({stats['status']})"
    )
    print(
        f"  raw {_gb(stats['raw_bytes'])}, stored {_gb(stats['stored_bytes'])}, "
        f"ratio {stats['compression_ratio']:.2f}, {stats['gbps']:.3f} GB/s, "
        f"stalled {stats['stall_seconds']:.2f} s, peak buffer {_gb(stats['peak_buffered_bytes'])}"
    )
    for g in stats["generations"][:4]:
        print(f"  {g['prompt']!r} -> {g['continuation'][:60]!r}")
    return EXIT_OK


# --------------------------------------------------------------------------- info / validate / convert
def cmd_info(args: argparse.Namespace) -> int:
    from llminstr.tools import summary

    info = summary(args.path)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return EXIT_OK
    ratio = info["compression_ratio"]
    print(f"{info['path']}  ({info['backend']}, format {info['format_version']})")
    state = ""
    if info["writer_live"] is True:
        state = f"  (a writer is live; last commit {info['updated'] or 'none yet'})"
    elif info["writer_live"] is False:
        state = (
            f"  (no live writer: it stopped without closing; last commit "
            f"{info['updated'] or 'none'}; the committed rows are readable)"
        )
    print(
        f"  status   {info['status']}"
        + state
        + (f"  error: {info['error']}" if info["error"] else "")
    )
    print(f"  rows     {info['rows']}  (chunk_rows {info['chunk_rows']})")
    comp = info["compression"]
    print(
        f"  codec    {comp['cname'] or 'none'}"
        + (f" level {comp['clevel']}" if comp["cname"] else "")
        + (f", {comp['checksum']}" if comp["checksum"] else "")
    )
    print(
        f"  size     raw {_gb(info['raw_bytes'])}, stored {_gb(info['stored_bytes'])}"
        + (f", ratio {ratio:.2f}" if ratio else "")
    )
    model = info["model"]
    if model:
        params = model.get("num_parameters")
        print(
            f"  model    {model.get('class')} ({model.get('model_type')})"
            + (f", {params} parameters" if params is not None else "")
        )
    print(
        f"  {'site':<36} {'kind':<9} {'layer':>5} {'dtype':<8} {'shape':<10} {'stored':>10} {'ratio':>6}"
    )
    for s in info["sites"]:
        r = s["compression_ratio"]
        print(
            f"  {s['name']:<36} {s['kind']:<9} {s['layer'] if s['layer'] is not None else '-':>5} "
            f"{s['dtype']:<8} {'x'.join(map(str, s['feature_shape'])):<10} {_gb(s['stored_bytes']):>10} "
            f"{(f'{r:.2f}' if r else '-'):>6}"
        )
    return EXIT_OK


def cmd_validate(args: argparse.Namespace) -> int:
    from llminstr.tools import validate

    if not Path(args.path).exists():
        raise LlminstrError(f"{args.path!r} does not exist")  # bad input (2), not invalid (1)
    problems = validate(args.path)
    if problems:
        for p in problems:
            print(f"INVALID: {p}", file=sys.stderr)
        return EXIT_INVALID
    print(f"{args.path}: conforms to the llminstr capture format")
    return EXIT_OK


def cmd_convert(args: argparse.Namespace) -> int:
    from llminstr.tools import convert

    dst = Path(args.dst)
    if (dst.exists() or dst.is_symlink()) and not args.overwrite:
        raise LlminstrError(f"{args.dst!r} already exists; pass --overwrite to replace it")
    compression = (
        "keep"
        if args.compression == "keep"
        else (None if args.compression == "none" else args.compression)
    )
    bar = _bar(args, "convert", "rows")
    last = [0]

    def progress(done: int, total: int) -> None:
        if bar is not None:
            bar.total = total
            bar.update(done - last[0])
            last[0] = done

    try:
        convert(
            args.src,
            args.dst,
            backend=args.backend,
            compression=compression,
            overwrite=args.overwrite,
            on_progress=progress,
        )
    finally:
        if bar is not None:
            bar.close()
    print(f"converted {args.src} -> {args.dst}")
    return EXIT_OK


def cmd_repair(args: argparse.Namespace) -> int:
    from llminstr.tools import repair

    result = repair(args.path)
    if result["repaired"]:
        print(
            f"{args.path}: cleared the open-for-writing mark; {result['status']}, "
            f"{result['rows']} rows"
        )
    else:
        print(f"{args.path}: nothing to repair; {result['status']}, {result['rows']} rows")
    return EXIT_OK


def _bar(args: argparse.Namespace, desc: str, unit: str) -> Any:
    if getattr(args, "quiet", False) or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(desc=desc, unit=f" {unit}", dynamic_ncols=True)


# --------------------------------------------------------------------------- analyze / report / demo
def _sae_options(args: argparse.Namespace) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    for key in ("n_features", "k", "steps", "seed"):
        value = getattr(args, f"sae_{key}", None)
        if value is not None:
            opts[key] = value
    return opts


def run_analysis(
    path: str, out_dir: Path, args: argparse.Namespace, model: Any = None
) -> dict[str, Any]:
    from llminstr.analysis import PARTS, analyze_activations
    from llminstr.report import compute_with_progress, write_analysis

    # No --include is the library's default (PARTS itself): a capture with one site or one
    # row then gets no causal graph, with a note, instead of an error.
    include = tuple(args.include) if args.include else PARTS
    result = analyze_activations(
        path,
        sites=args.sites or None,
        rows=getattr(args, "rows", None),
        include=include,
        model=model,
        sae_options=_sae_options(args),
    )
    if not args.quiet:
        for note in result["capture"].get("notes", []):
            print(note, file=sys.stderr)
    computed = compute_with_progress(result, quiet=args.quiet)
    write_analysis(computed, out_dir)
    return computed


def cmd_analyze(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else Path(str(args.path).rstrip("/") + ".analysis")
    t = time.perf_counter()
    computed = run_analysis(args.path, out, args)
    written = "analysis.json" + (
        ", sae/ weights as safetensors" if computed.get("sae_features") is not None else ""
    )
    print(
        f"analysis of {args.path} written to {out}/ in {time.perf_counter() - t:.1f} s ({written})"
    )
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from llminstr.report import build_report

    analysis = (
        Path(args.analysis) if args.analysis else Path(str(args.path).rstrip("/") + ".analysis")
    )
    if not (analysis / "analysis.json").is_file():
        raise LlminstrError(
            f"no analysis at {str(analysis)!r}: run `llminstr analyze {args.path}` first or pass --analysis"
        )
    out = Path(args.out) if args.out else analysis / "report.html"
    build_report(args.path, analysis, out)
    print(f"report written to {out}")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from llminstr import InstrumentationConfig
    from llminstr.report import build_report

    InstrumentationConfig(max_memory_gb=args.max_memory_gb)  # refused before anything is made
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    capture_path = out / "capture.zarr"
    print(
        f"[1/3] capturing ALL-granularity activations of the embedded demo model during generate() -> {capture_path}"
    )
    ns = argparse.Namespace(
        model="demo",
        prompt=demo_prompts(args.prompts),
        device="cpu",
        dtype="float32",
        seed=0,
        granularity="all",
        compression="lz4",
        target_gbps=2.0,
        max_memory_gb=args.max_memory_gb,
        layers=None,
        module=None,
        chunk_rows=256,
        storage_dtype=None,
        backend=None,
        quiet=args.quiet,
        prompts_file=None,
        output=str(capture_path),
        overwrite=True,
        batch_size=16,
        max_new_tokens=args.max_new_tokens,
        sample=False,
        temperature=1.0,
    )
    stats = run_capture(ns)
    print(
        f"      {stats['rows']} rows x {len(stats['sites'])} sites, raw {_gb(stats['raw_bytes'])}, "
        f"stored {_gb(stats['stored_bytes'])} (ratio {stats['compression_ratio']:.2f})"
    )
    for g in stats["generations"][:3]:
        print(f"      {g['prompt']!r} -> {g['continuation'][:50]!r}")
    print("[2/3] analysing: statistics, sparse-autoencoder features, causal graph")
    from llminstr.demo import load_demo_model

    model, _tok = load_demo_model()
    analysis_dir = out / "analysis"
    an_args = argparse.Namespace(
        include=None,
        sites=None,
        quiet=args.quiet,
        sae_n_features=256,
        sae_k=8,
        sae_steps=args.sae_steps,
        sae_seed=0,
    )
    computed = run_analysis(str(capture_path), analysis_dir, an_args, model=model)
    print("[3/3] writing the HTML report")
    report = build_report(capture_path, analysis_dir, out / "report.html")
    print()
    print("Done. Outputs:")
    print(f"  capture   {capture_path}   (open with llminstr.open_capture, zarr or xarray)")
    print(f"  analysis  {analysis_dir}/analysis.json  (+ sae/ weights as safetensors)")
    print(f"  report    {report}")
    for line in _headlines(computed):
        print(f"  - {line}")
    return EXIT_OK


def _headlines(computed: dict[str, Any]) -> list[str]:
    from llminstr.report import headlines

    return headlines(computed)


# --------------------------------------------------------------------------- parser
def _add_capture_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="demo",
        help="'demo' (embedded model), a local HF model directory, or a hub name when online (default: demo)",
    )
    p.add_argument(
        "--prompt", action="append", help="a prompt (repeatable); default: a few built-in prompts"
    )
    p.add_argument("--prompts-file", help="a UTF-8 file with one prompt per line")
    p.add_argument(
        "--max-new-tokens",
        type=_positive_int,
        default=32,
        help="tokens generated per prompt (default 32)",
    )
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        default=8,
        help="prompts per generate() call (default 8)",
    )
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument(
        "--temperature",
        type=_positive_float,
        default=1.0,
        help="sampling temperature (with --sample)",
    )
    p.add_argument("--seed", type=int, default=0, help="torch seed (default 0)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="model dtype"
    )
    p.add_argument(
        "--granularity",
        default="all",
        choices=["all", "attention_only", "ffn_only"],
        help="which components to capture (default all)",
    )
    p.add_argument(
        "--layers",
        type=int,
        nargs="+",
        help="layer indices to capture (negative counts from the end)",
    )
    p.add_argument(
        "--module",
        action="append",
        help="explicit module path to capture (repeatable; overrides --granularity)",
    )
    p.add_argument(
        "--compression",
        default="lz4",
        choices=["lz4", "zstd", "none"],
        help="chunk codec (default lz4)",
    )
    p.add_argument(
        "--max-memory-gb", type=float, default=2.0, help="host memory for buffering, GB (default 2)"
    )
    p.add_argument(
        "--target-gbps",
        type=float,
        default=2.0,
        help="capture rate the pipeline is sized for, GB/s",
    )
    p.add_argument(
        "--chunk-rows",
        type=_positive_int,
        help="rows per storage chunk (default: automatic, recorded)",
    )
    p.add_argument(
        "--storage-dtype",
        choices=["float32", "float16", "bfloat16"],
        help="cast activations before storing",
    )
    p.add_argument(
        "--backend", choices=["zarr", "hdf5"], help="default: from the output suffix (.zarr / .h5)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llminstr",
        description="Record activations of PyTorch language models to Zarr/HDF5 and analyse them.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="capture + analyse + report on the embedded demo model")
    p.add_argument("--out", default="out/demo", help="output folder (default out/demo)")
    p.add_argument(
        "--max-new-tokens",
        type=_positive_int,
        default=64,
        help="tokens generated per prompt (default 64)",
    )
    p.add_argument(
        "--prompts",
        type=_positive_int,
        default=64,
        help="prompts taken from Python's docs (default 64)",
    )
    p.add_argument(
        "--sae-steps", type=_positive_int, default=300, help="SAE training steps (default 300)"
    )
    p.add_argument(
        "--max-memory-gb", type=float, default=1.0, help="capture memory budget, GB (default 1)"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("capture", help="run generate() on prompts and capture activations")
    p.add_argument("output", help="capture path: NAME.zarr (Zarr v3) or NAME.h5 (HDF5)")
    _add_capture_options(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing capture")
    p.add_argument("--json", action="store_true", help="print the capture statistics as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_capture)

    p = sub.add_parser("info", help="summary of a capture: status, rows, sites, sizes")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "validate", help="full conformance check; exit 1 when the capture is invalid"
    )
    p.add_argument("path")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser(
        "repair",
        help="clear the open-for-writing mark an HDF5 capture keeps when its writer was "
        "killed at close (like h5clear -s)",
    )
    p.add_argument("path")
    p.set_defaults(func=cmd_repair)

    p = sub.add_parser(
        "analyze", help="statistics, SAE features and causal graph -> JSON + safetensors"
    )
    p.add_argument("path")
    p.add_argument("--out", help="output folder (default PATH.analysis)")
    p.add_argument("--sites", nargs="+", help="sites to analyse (default all)")
    p.add_argument(
        "--rows",
        type=_row_range,
        metavar="START:STOP",
        help="rows to analyse, Python slice rules (default all committed rows); write "
        "a negative start as --rows=-100:",
    )
    p.add_argument(
        "--include",
        nargs="+",
        choices=["statistics", "sae_features", "causal_graph"],
        help="parts to run (default all)",
    )
    p.add_argument("--sae-n-features", type=_positive_int, help="SAE dictionary size")
    p.add_argument("--sae-k", type=_positive_int, help="active SAE features per row")
    p.add_argument("--sae-steps", type=_positive_int, help="SAE training steps")
    p.add_argument("--sae-seed", type=int, help="SAE seed")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("report", help="HTML report with plots from a capture and its analysis")
    p.add_argument("path")
    p.add_argument("--analysis", help="analysis folder (default PATH.analysis)")
    p.add_argument("--out", help="HTML file (default ANALYSIS/report.html)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("convert", help="convert Zarr <-> HDF5 with identical logical content")
    p.add_argument("src")
    p.add_argument("dst", help="destination; the backend follows its suffix unless --backend")
    p.add_argument("--backend", choices=["zarr", "hdf5"])
    p.add_argument(
        "--compression",
        default="keep",
        choices=["keep", "lz4", "zstd", "none"],
        help="codec of the copy (default: keep the source's)",
    )
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_convert)
    return parser


def _quiet_transformers() -> None:
    """llminstr shows its own progress; transformers' weight-loading bars are noise here."""
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging_module
    except ImportError:
        return
    hf_logging: Any = hf_logging_module
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    _quiet_transformers()
    try:
        code: int = args.func(args)
        return code
    except LlminstrError as exc:
        print(f"llminstr {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:  # the reader of our output went away (`llminstr info X | head`)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes at exit
        return EXIT_OK
    except OSError as exc:  # a path that cannot be written or read, a full disk
        if args.verbose:
            logging.getLogger(__name__).exception("llminstr %s failed", args.command)
        print(f"llminstr {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"llminstr {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
