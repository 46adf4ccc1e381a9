"""The command line, used as a new user would: exit codes, outputs, messages."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llminstr.cli import EXIT_ERROR, EXIT_INVALID, EXIT_OK, main
from llminstr.errors import CorruptChunkError
from llminstr.format import SiteInfo
from llminstr.reader import open_capture
from llminstr.storage.writer import CaptureWriter
from llminstr.tools import convert


@pytest.fixture(scope="module")
def capture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "run.zarr"
    code = main(
        [
            "capture",
            str(path),
            "--prompt",
            "The with statement",
            "--prompt",
            "Lambdas",
            "--max-new-tokens",
            "6",
            "--chunk-rows",
            "16",
            "-q",
        ]
    )
    assert code == EXIT_OK
    return path


def test_capture_writes_a_complete_capture(capture: Path) -> None:
    cap = open_capture(capture)
    assert cap.status == "complete"
    # two prompts with a leading end-of-text id: 19 + 8 tokens, then 5 decode steps x 2
    assert cap.num_rows == 19 + 8 + 5 * 2
    assert len(cap.sites) == 12


def test_info_json_and_text(capture: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(capture), "--json"]) == EXIT_OK
    info = json.loads(capsys.readouterr().out)
    assert info["status"] == "complete" and info["rows"] == 37
    assert info["sites"][0]["name"] == "transformer.h.0.attn"
    assert info["stored_bytes"] > 0
    assert main(["info", str(capture)]) == EXIT_OK
    text = capsys.readouterr().out
    assert "status   complete" in text and "transformer.h.3" in text


def test_validate_ok_then_corrupt(
    capture: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["validate", str(capture)]) == EXIT_OK
    broken = tmp_path / "broken.zarr"
    shutil.copytree(capture, broken)
    chunk = broken / "activations" / "transformer.h.2" / "c" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[40] ^= 0xFF
    chunk.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["validate", str(broken)]) == EXIT_INVALID
    err = capsys.readouterr().err
    assert "chunk 0 of site 'transformer.h.2'" in err and "CRC32C" in err


def test_convert_keeps_the_rows_before_a_corrupt_chunk(tmp_path: Path) -> None:
    src = tmp_path / "src.zarr"
    cols = ("token_id", "sequence", "position", "step")
    x = np.arange(40 * 3, dtype=np.float32).reshape(40, 3)
    with CaptureWriter(src, [SiteInfo("s", (3,))], chunk_rows=8) as w:
        w.append({c: np.arange(40) for c in cols}, {"s": x})
    chunk = src / "activations" / "s" / "c" / "2" / "0"  # rows 16..23
    data = bytearray(chunk.read_bytes())
    data[-1] ^= 0xFF  # the CRC32C no longer matches
    chunk.write_bytes(bytes(data))
    dst = tmp_path / "dst.h5"
    with pytest.raises(CorruptChunkError, match="chunk 2 of site 's'"):
        convert(src, dst)
    out = open_capture(dst)
    assert (out.status, out.num_rows) == ("aborted", 16)  # every row before the damage
    assert np.array_equal(out.read("s"), x[:16])
    assert "conversion failed" in out.metadata["error"]


def test_convert_goes_on_when_a_failed_chunk_reads_the_second_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunk that fails once (a live writer replaced it while it was read) and reads
    on the chunk-by-chunk retry is copied, and so is everything after it."""
    from llminstr import reader

    src = tmp_path / "src.zarr"
    x = np.arange(40 * 4, dtype=np.float32).reshape(40, 4)
    with CaptureWriter(src, [SiteInfo("s", (4,))], chunk_rows=4) as w:
        w.append({c: np.arange(40) for c in ("token_id", "sequence", "position", "step")}, {"s": x})
    real, failed = reader._read_zarr_frame, []

    def once(path: str, key: str, index: int, *args: object, **kwargs: object) -> object:
        if key.startswith("activations") and not failed:
            failed.append(index)
            raise reader._FrameTooLarge(100, grew=True)
        return real(path, key, index, *args, **kwargs)

    monkeypatch.setattr(reader, "_read_zarr_frame", once)
    convert(src, tmp_path / "dst.zarr", rows_per_block=8)
    out = open_capture(tmp_path / "dst.zarr")
    assert failed and (out.status, out.num_rows) == ("complete", 40)
    assert np.array_equal(out.read("s"), x)


def test_bad_input_exit_code_and_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["info", str(tmp_path / "missing.zarr")]) == EXIT_ERROR
    assert "does not exist" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "x.zarr")]) == EXIT_ERROR
    assert "run `llminstr analyze" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["capture"])
    assert exc.value.code == 2


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-new-tokens", "0"], "--max-new-tokens: must be at least 1; got 0"),
        (["--batch-size", "-1"], "--batch-size: must be at least 1; got -1"),
        (["--sample", "--temperature", "0"], "--temperature: must be a finite number above 0"),
        (["--chunk-rows", "x"], "--chunk-rows: expected a whole number; got 'x'"),
    ],
)
def test_capture_refuses_bad_numbers_as_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["capture", str(tmp_path / "c.zarr"), "-q", *flags])
    assert exc.value.code == EXIT_ERROR
    assert message in capsys.readouterr().err
    assert not (tmp_path / "c.zarr").exists()


def test_capture_user_errors_are_messages_not_tracebacks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each fails before the model runs, with exit code 2 and one line naming the problem."""
    import torch

    out = str(tmp_path / "c.zarr")
    cases: list[tuple[list[str], str]] = [
        (["--model", str(tmp_path)], f"could not load model {str(tmp_path)!r}"),
        (["--device", "nonsense"], "--device 'nonsense' is not a torch device"),
        (["--prompts-file", str(tmp_path)], "is not a file"),
        (["--prompts-file", str(tmp_path / "none.txt")], "does not exist"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "CUDA is not available"))
    for flags, message in cases:
        assert main(["capture", out, "-q", "--max-new-tokens", "1", *flags]) == EXIT_ERROR
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (flags, err)
        assert not Path(out).exists()
    (tmp_path / "taken.zarr").mkdir()
    assert main(["capture", str(tmp_path / "taken.zarr"), "-q"]) == EXIT_ERROR
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["capture", str(blocker / "c.zarr"), "-q", "--max-new-tokens", "1"]) == EXIT_ERROR
    assert "llminstr capture: error:" in capsys.readouterr().err


def test_python_dash_m_runs_the_cli() -> None:
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "llminstr", "--help"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0 and "usage: llminstr" in proc.stdout


def test_convert_round_trip(capture: Path, tmp_path: Path) -> None:
    h5 = tmp_path / "run.h5"
    assert main(["convert", str(capture), str(h5), "-q"]) == EXIT_OK
    back = tmp_path / "back.zarr"
    assert main(["convert", str(h5), str(back), "--compression", "zstd", "-q"]) == EXIT_OK
    a, b, c = open_capture(capture), open_capture(h5), open_capture(back)
    assert a.sites == b.sites == c.sites and a.num_rows == b.num_rows == c.num_rows
    assert b.status == c.status == "complete"
    for site in a.sites:
        assert np.array_equal(a.read(site), b.read(site)) and np.array_equal(
            a.read(site), c.read(site)
        )
        info_a, info_c = a.site_info(site), c.site_info(site)
        for key in (
            "module_path",
            "layer",
            "kind",
            "module_class",
            "logical_dtype",
            "feature_shape",
        ):
            assert info_a[key] == info_c[key]
    for col in a.token_columns:
        assert np.array_equal(a.token_table()[col], c.token_table()[col])
    assert c.metadata["compression"]["cname"] == "zstd"


def test_convert_keeps_extra_token_columns_and_their_descriptions(tmp_path: Path) -> None:
    src = tmp_path / "extra.zarr"
    cols = ("token_id", "sequence", "position", "step", "batch")
    with CaptureWriter(
        src, [SiteInfo("s", (3,))], chunk_rows=4, extra_token_columns={"batch": "loader batch"}
    ) as w:
        w.append(
            {c: np.arange(5) * (i + 1) for i, c in enumerate(cols)},
            {"s": np.ones((5, 3), np.float32)},
        )
    dst = tmp_path / "extra.h5"
    assert main(["convert", str(src), str(dst), "-q"]) == EXIT_OK
    out = open_capture(dst)
    assert out.token_columns == list(cols)
    assert out.token_info("batch")["description"] == "loader batch"
    assert np.array_equal(out.token_table()["batch"], np.arange(5) * 5)


def test_analyze_and_report(capture: Path, tmp_path: Path) -> None:
    out = tmp_path / "an"
    assert (
        main(
            [
                "analyze",
                str(capture),
                "--out",
                str(out),
                "--sae-steps",
                "20",
                "--sae-n-features",
                "32",
                "--sae-k",
                "4",
                "-q",
            ]
        )
        == EXIT_OK
    )
    doc = json.loads((out / "analysis.json").read_text())
    assert set(doc) >= {"capture", "statistics", "sae_features", "causal_graph"}
    assert doc["causal_graph"]["method"] == "observational"  # no model at hand from the CLI
    assert (out / "sae" / "sae.safetensors").is_file()
    html_path = tmp_path / "report.html"
    assert (
        main(["report", str(capture), "--analysis", str(out), "--out", str(html_path)]) == EXIT_OK
    )
    page = html_path.read_text()
    for png in ("norms.png", "outliers.png", "compression.png", "sae_frequency.png", "causal.png"):
        assert f"src='{png}'" in page
        assert (tmp_path / png).stat().st_size > 1000
    assert "Top-activating tokens per feature" in page


def test_analyze_one_site_leaves_out_the_causal_graph(
    capture: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "one"
    args = ["analyze", str(capture), "--out", str(out), "--sites", "transformer.h.1.mlp"]
    sae = ["--sae-steps", "5", "--sae-n-features", "16", "--sae-k", "2"]
    assert main([*args, *sae]) == EXIT_OK
    assert "no causal graph: it needs at least two sites" in capsys.readouterr().err
    doc = json.loads((out / "analysis.json").read_text())
    assert doc["causal_graph"] is None and "transformer.h.1.mlp" in doc["statistics"]["sites"]
    # asked for explicitly, the graph's own error stands
    assert main([*args, "--include", "causal_graph", "-q"]) == EXIT_ERROR
    assert "at least two sites" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("chromium") is None, reason="headless Chromium is not installed")
def test_report_renders_in_chromium(capture: Path, tmp_path: Path) -> None:
    out = tmp_path / "an"
    assert (
        main(["analyze", str(capture), "--out", str(out), "--include", "statistics", "-q"])
        == EXIT_OK
    )
    page = tmp_path / "report.html"
    assert main(["report", str(capture), "--analysis", str(out), "--out", str(page)]) == EXIT_OK
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}",
            "--window-size=1000,1400",
            page.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=90,
    )
    from PIL import Image

    img = np.asarray(Image.open(shot).convert("L"))
    assert img.shape == (1400, 1000)
    assert (img < 128).mean() > 0.005  # text and plots, not a blank page


def test_demo_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    assert (
        main(
            [
                "demo",
                "--out",
                str(out),
                "--prompts",
                "6",
                "--max-new-tokens",
                "8",
                "--sae-steps",
                "20",
                "-q",
            ]
        )
        == EXIT_OK
    )
    text = capsys.readouterr().out
    assert "Done. Outputs:" in text and str(out / "report.html") in text
    assert open_capture(out / "capture.zarr").status == "complete"
    assert (out / "report.html").is_file() and (out / "analysis" / "analysis.json").is_file()


def test_convert_refuses_its_own_source_and_names_the_flag(
    capture: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Converting onto the source with --overwrite deleted the source before reading it."""
    src = tmp_path / "src.zarr"
    shutil.copytree(capture, src)
    before = open_capture(src).num_rows
    for dst in (src, tmp_path / "." / "src.zarr", src / "inside.h5"):
        assert main(["convert", str(src), str(dst), "--overwrite", "-q"]) == EXIT_ERROR
        assert "is the source" in capsys.readouterr().err
    assert open_capture(src).num_rows == before and open_capture(src).status == "complete"
    taken = tmp_path / "taken.h5"
    taken.write_bytes(b"")
    assert main(["convert", str(src), str(taken), "-q"]) == EXIT_ERROR
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert main(["validate", str(tmp_path / "missing.zarr")]) == EXIT_ERROR


def _small_capture(path: Path, rows: int, *, sites: int = 2, nonfinite: bool = False) -> Path:
    x = np.random.default_rng(0).standard_normal((rows, 8)).astype(np.float32)
    if nonfinite:
        x[0, 0] = np.inf
    cols = ("token_id", "sequence", "position", "step")
    infos = [SiteInfo(f"s{i}", (8,), layer=i, kind="residual") for i in range(sites)]
    with CaptureWriter(path, infos, chunk_rows=8) as w:
        w.append({c: np.arange(rows) for c in cols}, {f"s{i}": x for i in range(sites)})
    return path


def test_analyze_and_report_on_a_one_row_capture(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The default analysis of one row gets no causal graph (a note, not an error), and its
    SAE has no held-out rows (FVU null): the report says n/a instead of failing."""
    cap = _small_capture(tmp_path / "one.zarr", 1)
    out = tmp_path / "one.analysis"
    sae = ["--sae-steps", "2", "--sae-n-features", "8", "--sae-k", "2"]
    assert main(["analyze", str(cap), "--out", str(out), *sae]) == EXIT_OK
    captured = capsys.readouterr()
    assert "no causal graph: it needs at least two sites and two rows" in captured.err
    assert "sae/ weights as safetensors" in captured.out
    doc = json.loads((out / "analysis.json").read_text())
    assert doc["causal_graph"] is None and doc["sae_features"]["metrics"]["fvu"] is None
    html_path = tmp_path / "elsewhere" / "r.html"
    assert main(["report", str(cap), "--analysis", str(out), "--out", str(html_path)]) == EXIT_OK
    page = html_path.read_text()
    assert "FVU (held out) n/a" in page
    assert "Data: <code>../one.analysis/analysis.json</code> and its sae/ folder." in page
    # a statistics-only run over the same folder removes the SAE files it no longer describes
    assert main(["analyze", str(cap), "--out", str(out), "--include", "statistics"]) == EXIT_OK
    assert "sae/" not in capsys.readouterr().out
    assert not (out / "sae").exists()
    assert main(["report", str(cap), "--analysis", str(out), "--out", str(html_path)]) == EXIT_OK
    assert not (html_path.parent / "sae_frequency.png").exists()  # the earlier report's plot
    assert "and its sae/ folder" not in html_path.read_text()


def test_report_on_sites_holding_inf(tmp_path: Path) -> None:
    cap = _small_capture(tmp_path / "inf.zarr", 64, nonfinite=True)
    out = tmp_path / "inf.analysis"
    assert (
        main(["analyze", str(cap), "--out", str(out), "--include", "statistics", "-q"]) == EXIT_OK
    )
    assert main(["report", str(cap), "--analysis", str(out)]) == EXIT_OK
    assert (out / "outliers.png").stat().st_size > 1000


def test_info_into_a_closed_pipe(
    capture: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`llminstr info X | head -1`: the reader of the output goes away; that is not an
    error (it printed "error: [Errno 32] Broken pipe" and exited 2)."""
    sink = open(tmp_path / "sink", "w")  # noqa: SIM115 (its descriptor is borrowed below)

    class ClosedPipe:
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self) -> None:
            pass

        def fileno(self) -> int:
            return sink.fileno()

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    try:
        assert main(["info", str(capture)]) == EXIT_OK
    finally:
        sink.close()
    assert capsys.readouterr().err == ""


def test_analyze_a_row_range(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cap = _small_capture(tmp_path / "r.zarr", 64)
    out = tmp_path / "r.analysis"
    args = ["analyze", str(cap), "--out", str(out), "--include", "statistics", "-q"]
    assert main([*args, "--rows", "8:-8"]) == EXIT_OK
    doc = json.loads((out / "analysis.json").read_text())
    assert doc["statistics"]["rows"] == [8, 56]
    assert main([*args, "--rows=-16:"]) == EXIT_OK  # a negative start needs the = form
    assert json.loads((out / "analysis.json").read_text())["statistics"]["rows"] == [48, 64]
    assert doc["statistics"]["sites"]["s0"]["num_rows"] == 48
    with pytest.raises(SystemExit) as exc:
        main([*args, "--rows", "8"])
    assert exc.value.code == 2 and "expected START:STOP" in capsys.readouterr().err


def test_report_refuses_an_analysis_of_another_capture(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Captured again over the same path, a capture kept the old PATH.analysis folder, and
    report crashed on its rows (IndexError) or a malformed analysis.json (TypeError)."""
    cap = _small_capture(tmp_path / "c.zarr", 64)
    out = tmp_path / "c.analysis"
    assert main(["analyze", str(cap), "--out", str(out), "--include", "statistics"]) == EXIT_OK
    shutil.rmtree(cap)
    _small_capture(cap, 16)  # the same path, captured again
    capsys.readouterr()
    assert main(["report", str(cap), "--analysis", str(out)]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "was made from another capture" in err and "Traceback" not in err
    doc = json.loads((out / "analysis.json").read_text())
    doc["capture"]["created"] = open_capture(cap).metadata["created"]
    (out / "analysis.json").write_text(json.dumps(doc))  # same created, rows beyond it
    assert main(["report", str(cap), "--analysis", str(out)]) == EXIT_ERROR
    assert "which this capture of 16 rows does not hold" in capsys.readouterr().err
    doc["capture"]["rows"] = [0, 16]
    doc["sae_features"] = 5  # valid JSON, wrong shape
    (out / "analysis.json").write_text(json.dumps(doc))
    assert main(["report", str(cap), "--analysis", str(out)]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "does not hold an analysis this report can read" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"\xff\xfe\x00bad\n", "is not UTF-8 text"), (b"\n  \n", "holds no prompt")],
)
def test_prompts_file_that_cannot_be_used(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, message: str
) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_bytes(content)
    out = tmp_path / "c.zarr"
    assert main(["capture", str(out), "-q", "--prompts-file", str(prompts)]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_analyzing_again_removes_the_earlier_report(tmp_path: Path) -> None:
    """A report left in the analysis folder described the earlier analysis (its SAE and
    causal sections, a link to the removed sae/ folder) until report ran again."""
    cap = _small_capture(tmp_path / "c.zarr", 64)
    out = tmp_path / "c.analysis"
    sae = ["--sae-steps", "2", "--sae-n-features", "8", "--sae-k", "2"]
    assert main(["analyze", str(cap), "--out", str(out), *sae]) == EXIT_OK
    assert main(["report", str(cap), "--analysis", str(out)]) == EXIT_OK
    assert (out / "report.html").exists() and (out / "sae_frequency.png").exists()
    assert main(["analyze", str(cap), "--out", str(out), "--include", "statistics"]) == EXIT_OK
    assert not (out / "report.html").exists() and not (out / "sae_frequency.png").exists()
    assert main(["report", str(cap), "--analysis", str(out)]) == EXIT_OK
    assert "Sparse-autoencoder" not in (out / "report.html").read_text()


def test_demo_refuses_a_bad_budget_before_making_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "d"
    assert main(["demo", "--out", str(out), "--max-memory-gb", "0"]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "max_memory_gb" in err and "Traceback" not in err
    assert not out.exists()


def test_report_of_a_live_capture_says_which_rows_it_shows(tmp_path: Path) -> None:
    """An audit: the report's table showed the capture's rows and status at report time
    (3260, in progress) while its plots were of the 870 rows analysed, and 870 appeared
    nowhere. Sites without a layer drew an empty norm profile and a matplotlib warning."""
    import warnings

    path = tmp_path / "live.zarr"
    cols = ("token_id", "sequence", "position", "step")
    x = np.random.default_rng(0).standard_normal((100, 8)).astype(np.float32)
    w = CaptureWriter(path, [SiteInfo("a", (8,)), SiteInfo("b", (8,))], chunk_rows=8)
    w.append({c: np.arange(40) for c in cols}, {"a": x[:40], "b": x[:40]})
    w.commit()
    out = tmp_path / "an"
    args = ["analyze", str(path), "--out", str(out), "--include", "statistics", "-q"]
    assert main(args) == EXIT_OK
    w.append({c: np.arange(40, 100) for c in cols}, {"a": x[40:], "b": x[40:]})
    w.close()
    page_path = tmp_path / "report.html"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's "No artists with labels" included
        assert main(["report", str(path), "--analysis", str(out), "--out", str(page_path)]) == 0
    page = page_path.read_text()
    assert "Analysed rows 0 to 40 of the 40 committed when the analysis ran" in page
    assert "status then: in_progress" in page
    assert "<td>100</td>" in page  # the capture now
    assert "norms.png" not in page and not (tmp_path / "norms.png").exists()


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_info_tells_a_live_writer_from_a_dead_one(
    tmp_path: Path, suffix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """An audit: a capture whose writer was killed stays ``in_progress`` for good, and
    `info` gave no hint that nothing was writing it. It now asks the lock file (SPEC 7.5)
    and shows the last commit's time (for HDF5, the commit record's)."""
    path = tmp_path / f"c{suffix}"
    cols = ("token_id", "sequence", "position", "step")
    w = CaptureWriter(path, [SiteInfo("a", (4,))], chunk_rows=4)
    w.append({c: np.arange(6) for c in cols}, {"a": np.ones((6, 4), np.float32)})
    w.commit()
    assert main(["info", str(path)]) == EXIT_OK
    out = capsys.readouterr().out
    assert "in_progress  (a writer is live; last commit 20" in out
    w.close()
    code = (
        "import sys, os, numpy as np\n"
        "from llminstr.format import SiteInfo\n"
        "from llminstr.storage.writer import CaptureWriter\n"
        "w = CaptureWriter(sys.argv[1], [SiteInfo('a', (4,))], chunk_rows=4, overwrite=True)\n"
        "cols = ('token_id', 'sequence', 'position', 'step')\n"
        "w.append({c: np.arange(6) for c in cols}, {'a': np.ones((6, 4), np.float32)})\n"
        "w.commit()\n"
        "os._exit(0)  # killed: no close\n"
    )
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, timeout=60)
    assert main(["info", str(path)]) == EXIT_OK
    out = capsys.readouterr().out
    assert "in_progress  (no live writer: it stopped without closing; last commit 20" in out
    info = json.loads((main(["info", str(path), "--json"]), capsys.readouterr().out)[1])
    assert info["writer_live"] is False and info["rows"] == 6 and info["updated"] is not None


def test_writer_live_through_other_spellings_and_a_probe_does_not_stop_a_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A review: through a symbolic link `writer_live` said False for a live writer, and
    for "." it raised; and a writer starting while a probe held its shared lock for an
    instant was refused as a second writer."""
    import fcntl
    import threading

    from llminstr.tools import writer_live

    path = tmp_path / "c.zarr"
    link = tmp_path / "link.zarr"
    cols = ("token_id", "sequence", "position", "step")
    with CaptureWriter(path, [SiteInfo("a", (4,))], chunk_rows=4) as w:
        link.symlink_to(path)
        w.append({c: np.arange(4) for c in cols}, {"a": np.ones((4, 4), np.float32)})
        assert writer_live(link) and writer_live(path)
        monkeypatch.chdir(path)
        assert writer_live(".") and writer_live(str(path) + "/")
    assert not writer_live(link) and not writer_live(".")
    # a probe holding the shared lock while a writer starts
    lock = tmp_path / "d.zarr.lock"
    lock.touch()
    fd = os.open(lock, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH)
    threading.Timer(0.1, lambda: os.close(fd)).start()
    with CaptureWriter(tmp_path / "d.zarr", [SiteInfo("a", (4,))], chunk_rows=4) as w:
        w.append({c: np.arange(4) for c in cols}, {"a": np.ones((4, 4), np.float32)})
