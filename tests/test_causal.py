"""Tests of the causal graph between sites (llminstr.analysis.causal)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from llminstr.analysis.causal import LOGITS_NODE, _sequences, causal_graph
from llminstr.errors import ConfigError, LlminstrError, SiteNotFoundError
from llminstr.format import SiteInfo
from llminstr.reader import Capture, open_capture
from llminstr.storage.writer import CaptureWriter

N_SITES, WIDTH, LATENT, ROWS = 6, 24, 4, 20000


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties)."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    n_pos, n_neg = labels.sum(), (~labels).sum()
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def test_auroc_helper() -> None:
    assert auroc(np.array([0.1, 0.2, 0.9, 0.8]), np.array([0, 0, 1, 1])) == 1.0
    assert auroc(np.array([0.5, 0.5]), np.array([0, 1])) == 0.5
    assert auroc(np.array([0.9, 0.1]), np.array([0, 1])) == 0.0


@pytest.fixture(scope="module")
def sem_capture(tmp_path_factory: pytest.TempPathFactory) -> tuple[Capture, set[tuple[int, int]]]:
    """A planted linear structural model over six sites, in site order: each site is a
    low-rank latent (LATENT dims) embedded in WIDTH dims plus noise; a latent depends
    linearly on its parents' latents. Some forward edges are absent."""
    rng = np.random.default_rng(7)
    true = {(0, 1), (0, 3), (1, 2), (2, 4), (3, 4), (1, 5), (4, 5), (2, 5)}
    latents: list[np.ndarray] = []
    for j in range(N_SITES):
        z = rng.standard_normal((ROWS, LATENT))
        for i in range(j):
            if (i, j) in true:
                a = rng.standard_normal((LATENT, LATENT)) / np.sqrt(LATENT)
                z = z + latents[i] @ (a * rng.uniform(0.4, 1.0))
        latents.append(z)
    sites = [
        SiteInfo(f"layers.{j}", (WIDTH,), "float32", kind="residual", layer=j)
        for j in range(N_SITES)
    ]
    data = {}
    for j, site in enumerate(sites):
        embed = rng.standard_normal((LATENT, WIDTH)) * rng.uniform(0.5, 3.0)
        noise = 0.1 * rng.standard_normal((ROWS, WIDTH))
        data[site.name] = (latents[j] @ embed + noise).astype(np.float32)
    path = tmp_path_factory.mktemp("causal") / "sem.zarr"
    rows = np.arange(ROWS)
    with CaptureWriter(path, sites, chunk_rows=1024) as writer:
        tokens = {
            "token_id": rows % 50,
            "sequence": rows // 100,
            "position": rows % 100,
            "step": rows // 100,
        }
        writer.append(tokens, data)
    return open_capture(path), true


@pytest.mark.parametrize("basis", ["pca", "random"])
def test_observational_recovers_planted_dag(
    sem_capture: tuple[Capture, set[tuple[int, int]]], basis: str
) -> None:
    from dask.delayed import Delayed

    cap, true = sem_capture
    lazy = causal_graph(cap, basis=basis, rank=8)
    assert isinstance(lazy, Delayed)
    out = lazy.compute()
    assert out["method"] == "observational"
    names = cap.sites
    order = {n: i for i, n in enumerate(names)}
    edges = out["edges"]
    assert len(edges) == N_SITES * (N_SITES - 1) // 2
    assert all(order[e["source"]] < order[e["target"]] for e in edges)
    assert all(e["method"] == "observational" for e in edges)
    scores = np.array([e["weight"] for e in edges])
    labels = np.array([(order[e["source"]], order[e["target"]]) in true for e in edges])
    assert auroc(scores, labels) >= 0.95
    graph = out["graph"]
    assert list(graph.nodes) == names
    assert graph.nodes[names[2]]["layer"] == 2 and graph.nodes[names[2]]["kind"] == "residual"
    assert graph.number_of_edges() == len(edges)
    assert graph.edges[names[0], names[1]]["weight"] == edges[0]["weight"]
    assert out["details"]["passes"] == (2 if basis == "pca" else 1)
    json.dumps({k: v for k, v in out.items() if k != "graph"})


def test_observational_options(sem_capture: tuple[Capture, set[tuple[int, int]]]) -> None:
    cap, _ = sem_capture
    names = cap.sites
    out = causal_graph(cap, names[:3][::-1], rows=(0, 5000), weight="std_coef").compute()
    assert [n["name"] for n in out["nodes"]] == names[:3]  # model order, whatever was asked
    assert out["details"]["n_rows"] == 5000
    w = {(e["source"], e["target"]): e["weight"] for e in out["edges"]}
    assert w[names[0], names[1]] > 0.1 and w[names[1], names[2]] > 0.1
    assert w[names[0], names[2]] < 0.05  # (0, 2) is absent: 0 acts on 2 only through 1


@pytest.fixture(scope="module")
def gpt2_capture(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Capture, str]:
    from transformers import GPT2Config, GPT2LMHeadModel

    from llminstr.config import HookGranularity, InstrumentationConfig
    from llminstr.framework import InstrumentationFramework

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=3,
        n_embd=32,
        n_head=2,
        n_positions=64,
        vocab_size=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = GPT2LMHeadModel(config).eval()
    inert = "transformer.h.1.attn"
    with torch.no_grad():
        model.transformer.h[1].attn.c_proj.weight.zero_()
        model.transformer.h[1].attn.c_proj.bias.zero_()
    fw = InstrumentationFramework(
        InstrumentationConfig(granularity=HookGranularity.ALL, chunk_rows=64)
    )
    fw.instrument_model(model)
    ids = torch.randint(0, 64, (6, 12), generator=torch.Generator().manual_seed(1))
    path = tmp_path_factory.mktemp("causal") / "gpt2.zarr"
    with fw.capture_activations(path), torch.no_grad():
        model(ids[:3])
        model(ids[3:, :9])  # a second pass with shorter sequences: padded batches
    return model, open_capture(path), inert


def test_interventional_inert_component(gpt2_capture: tuple[Any, Capture, str]) -> None:
    model, cap, inert = gpt2_capture
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out = causal_graph(cap, model=model, n_sequences=5, batch_size=4).compute()
    assert out["method"] == "interventional"
    assert out["details"]["n_sequences"] == 5 and out["details"]["n_tokens"] == 3 * 12 + 2 * 9
    names = cap.sites
    assert [n["name"] for n in out["nodes"]] == [*names, LOGITS_NODE]
    order = {n: i for i, n in enumerate([*names, LOGITS_NODE])}
    edges = out["edges"]
    assert len(edges) == len(names) * (len(names) - 1) // 2 + len(names)
    assert all(order[e["source"]] < order[e["target"]] for e in edges)
    for e in edges:
        if e["source"] == inert:
            assert abs(e["weight"]) < 1e-6, e
        elif e["target"] == LOGITS_NODE:
            assert e["weight"] > 1e-6, e
        elif e["target"] != inert:
            assert e["weight"] > 1e-3, e
    assert out["graph"].nodes[LOGITS_NODE]["kind"] == "logits"
    json.dumps({k: v for k, v in out.items() if k != "graph"})
    # the model is left as it was: no hooks, same weights, same mode
    assert not any(m._forward_hooks for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])
    assert not model.training


def test_interventional_given_means(gpt2_capture: tuple[Any, Capture, str]) -> None:
    model, cap, _ = gpt2_capture
    names = cap.sites[-4:]
    means = {n: cap.read(n).astype(np.float64).mean(axis=0) for n in names}
    a = causal_graph(cap, names, model=model, means=means, n_sequences=3).compute()
    b = causal_graph(cap, names, model=model, n_sequences=3).compute()
    assert a["details"]["means_from_capture"] == []
    assert b["details"]["means_from_capture"] == names
    lazy_means = {n: cap.activations(n).mean(axis=0) for n in names}  # dask: stay lazy
    d = causal_graph(cap, names, model=model, means=lazy_means, n_sequences=3).compute()
    for ea, eb, ed in zip(a["edges"], b["edges"], d["edges"], strict=True):
        assert np.isclose(ea["weight"], eb["weight"], rtol=1e-4, atol=1e-7)
        assert np.isclose(ed["weight"], eb["weight"], rtol=1e-4, atol=1e-7)
    # zero means ablate differently
    zeros = {names[0]: np.zeros(32)}
    c = causal_graph(cap, names, model=model, means=zeros, n_sequences=3, logits=False).compute()
    assert all(e["target"] != LOGITS_NODE for e in c["edges"])
    assert c["edges"][0]["weight"] != a["edges"][0]["weight"]


def _token_capture(path: Path, rows: list[tuple[int, int, int, int]], chunk_rows: int) -> Capture:
    """A one-site capture whose token columns are ``rows`` of (sequence, position,
    token id, step)."""
    seq, pos, tok, step = (np.array(c) for c in zip(*rows, strict=True))
    with CaptureWriter(path, [SiteInfo("s", (2,), "float32")], chunk_rows=chunk_rows) as writer:
        writer.append(
            {"token_id": tok, "sequence": seq, "position": pos, "step": step},
            {"s": np.zeros((len(rows), 2), np.float32)},
        )
    return open_capture(path)


def test_sequences_reassembled_across_steps(tmp_path: Path) -> None:
    # sequence 0 and 1: prompt (positions 0-3) at step 0, then one token per step;
    # sequence 2 lacks position 0 in the rows given and is skipped.
    rows = [(0, p, 10 + p, 0) for p in range(4)] + [(1, p, 20 + p, 0) for p in range(4)]
    rows += [(2, p, 30 + p, 0) for p in range(1, 4)]
    rows += [(0, 4, 14, 1), (1, 4, 24, 1), (0, 5, 15, 2), (1, 5, 25, 2), (3, 0, 40, 3)]
    cap = _token_capture(tmp_path / "gen.zarr", rows, chunk_rows=4)
    seqs, ids, skipped = _sequences(cap, (0, cap.num_rows), 3)
    assert ids == [0, 1, 3] and skipped == 1
    np.testing.assert_array_equal(seqs[0], 10 + np.arange(6))
    np.testing.assert_array_equal(seqs[1], 20 + np.arange(6))
    np.testing.assert_array_equal(seqs[2], [40])


def test_sequences_first_seen_past_position_zero_take_no_candidate_place(tmp_path: Path) -> None:
    """Thirty sequences whose position 0 lies before the rows given, then ten complete
    ones: the partial ones filled the candidate list, and n_sequences=1 found none."""
    rows = [(s, p, 100 + s, 0) for s in range(30) for p in (5, 6)]
    rows += [(30 + s, p, 200 + s, 1) for s in range(10) for p in range(3)]
    cap = _token_capture(tmp_path / "partial.zarr", rows, chunk_rows=16)
    for n in (1, 3):
        seqs, ids, skipped = _sequences(cap, (0, cap.num_rows), n)
        assert ids == list(range(30, 30 + n)) and skipped == 30
        np.testing.assert_array_equal(seqs[0], [200, 200, 200])


def test_interventional_refuses_nonfinite_means(gpt2_capture: tuple[Any, Capture, str]) -> None:
    model, cap, _ = gpt2_capture
    names = cap.sites[:2]
    means = {names[0]: np.full(32, np.nan), names[1]: np.zeros(32)}
    with pytest.raises(LlminstrError, match=rf"site '{names[0]}' holds NaN or inf"):
        causal_graph(cap, names, model=model, means=means, n_sequences=1).compute()


def test_interventional_refused_inside_a_capture(
    gpt2_capture: tuple[Any, Capture, str], tmp_path: Path
) -> None:
    """Computed inside a capture_activations block, the graph's re-runs of the model were
    recorded into that capture (252 rows where the block ran 12)."""
    from llminstr.config import InstrumentationConfig
    from llminstr.errors import CaptureStateError
    from llminstr.framework import InstrumentationFramework

    model, cap, _ = gpt2_capture
    fw = InstrumentationFramework(InstrumentationConfig(chunk_rows=64))
    fw.instrument_model(model)
    with fw.capture_activations(tmp_path / "new.zarr"), torch.no_grad():
        model(torch.zeros((1, 4), dtype=torch.long))
        graph = causal_graph(cap, cap.sites[:2], model=model, n_sequences=1)
        with pytest.raises(CaptureStateError, match="after the block"):
            graph.compute()
    assert open_capture(tmp_path / "new.zarr").num_rows == 4
    causal_graph(cap, cap.sites[:2], model=model, n_sequences=1).compute()  # after: fine


@pytest.mark.parametrize("key", ["means", "rows", "sites", "model"])
def test_analyze_refuses_causal_options_it_sets_itself(
    sem_capture: tuple[Capture, set[tuple[int, int]]], key: str
) -> None:
    from llminstr.analysis import analyze_activations

    with pytest.raises(ConfigError, match="causal_options cannot set"):
        analyze_activations(sem_capture[0], causal_options={key: None})


def test_errors(
    sem_capture: tuple[Capture, set[tuple[int, int]]], gpt2_capture: tuple[Any, Capture, str]
) -> None:
    cap, _ = sem_capture
    with pytest.raises(ConfigError, match="method"):
        causal_graph(cap, method="granger")
    with pytest.raises(ConfigError, match="needs a model"):
        causal_graph(cap, method="interventional")
    with pytest.raises(ConfigError, match="unknown option"):
        causal_graph(cap, n_sequences=3)
    with pytest.raises(SiteNotFoundError):
        causal_graph(cap, ["nope"])
    with pytest.raises(ConfigError, match="at least two"):
        causal_graph(cap, [cap.sites[0]])
    with pytest.raises(ConfigError, match="rank"):
        causal_graph(cap, rank=0)
    with pytest.raises(ConfigError, match="basis"):
        causal_graph(cap, basis="ica")
    with pytest.raises(ConfigError, match="means"):
        causal_graph(cap, means={})
    model, gcap, _ = gpt2_capture
    with pytest.raises(ConfigError, match="unknown option"):
        causal_graph(gcap, model=model, rank=3)
    with pytest.raises(ConfigError, match="feature shape"):
        causal_graph(gcap, model=model, means={gcap.sites[0]: np.zeros(5)})
    with pytest.raises(SiteNotFoundError):
        causal_graph(gcap, model=model, means={"nope": np.zeros(32)})
    # a model without the captured modules
    with pytest.raises(SiteNotFoundError, match="no module"):
        causal_graph(gcap, model=torch.nn.Linear(2, 2))
    # a model with the same module paths but another size: refused before anything runs
    from transformers import GPT2Config, GPT2LMHeadModel

    wider = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=48, n_head=2, vocab_size=64))
    with pytest.raises(
        ConfigError, match=r"is not the one this capture recorded \(GPT2LMHeadModel"
    ):
        causal_graph(gcap, model=wider)
    # observational on the model's capture when asked explicitly
    out = causal_graph(gcap, model=model, method="observational", rank=4).compute()
    assert out["method"] == "observational"


def test_interventional_output_shape_mismatch_names_the_site(
    gpt2_capture: tuple[Any, Capture, str], tmp_path: Path
) -> None:
    """A capture without a model entry, whose rows do not fit the model's outputs: the
    ablation hook says which site and which shapes, instead of a torch broadcast error."""
    from conftest import token_columns

    from llminstr.format import SiteInfo
    from llminstr.storage.writer import CaptureWriter

    model, _, _ = gpt2_capture
    path = tmp_path / "narrow.zarr"
    sites = [
        SiteInfo(p, (5,), kind="attention", layer=i, module_path=p, tuple_index=0)
        for i, p in enumerate(["transformer.h.0.attn", "transformer.h.1.attn"])
    ]
    with CaptureWriter(path, sites, chunk_rows=8) as w:
        tokens = token_columns(8)
        tokens["sequence"] = np.zeros(8, np.int64)
        tokens["position"] = np.arange(8, dtype=np.int64)
        tokens["token_id"] = np.arange(8, dtype=np.int64) + 3
        w.append(tokens, {s.name: np.ones((8, 5), np.float32) for s in sites})
    graph = causal_graph(open_capture(path), model=model, n_sequences=1)
    with pytest.raises(LlminstrError, match=r"site 'transformer.h.0.attn': the model's output"):
        graph.compute()


def _three_sites(
    path: Path, offset: float, spread: float, nan: bool = False, minus: float = 0.0
) -> Capture:
    """A -> B strongly, C independent; every value offset by ``offset`` (stored float32),
    then ``minus`` subtracted from the stored values (exactly: see the offset test)."""
    from conftest import token_columns

    from llminstr.format import SiteInfo
    from llminstr.storage.writer import CaptureWriter

    rng = np.random.default_rng(3)
    n, d = 600, 4
    a = rng.standard_normal((n, d))
    b = a @ rng.standard_normal((d, d)) + 0.2 * rng.standard_normal((n, d))
    c = rng.standard_normal((n, d))
    data = {
        k: ((offset + spread * v).astype(np.float32).astype(np.float64) - minus).astype(np.float32)
        for k, v in zip("ABC", (a, b, c), strict=True)
    }
    if nan:
        data["A"][17, 2] = np.nan
    with CaptureWriter(path, [SiteInfo(k, (d,)) for k in "ABC"], chunk_rows=64) as w:
        w.append(token_columns(n), data)
    return open_capture(path)


@pytest.mark.parametrize("basis", ["random", "pca"])
def test_observational_reads_each_chunk_once_per_pass(
    basis: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from collections import Counter

    from llminstr import reader as reader_mod

    cap = _three_sites(tmp_path / "c.zarr", 0.0, 1.0)
    reads: Counter[tuple[str, int]] = Counter()
    real = reader_mod._Source.read_chunk

    def counting(self: Any, index: int, out: Any = None) -> Any:
        reads[(self.key, index)] += 1
        return real(self, index, out)

    monkeypatch.setattr(reader_mod._Source, "read_chunk", counting)
    out = causal_graph(cap, basis=basis, rank=2).compute()
    passes = 2 if basis == "pca" else 1
    assert out["details"]["passes"] == passes
    assert set(reads.values()) == {passes} and len(reads) == 3 * 10


@pytest.mark.parametrize("basis", ["random", "pca"])
def test_observational_is_exact_under_a_large_common_offset(basis: str, tmp_path: Path) -> None:
    """Moments are merged centred (Chan et al.). The same float32 values with and without
    an offset of 3e4 (over a spread of 1e-2; the shift is exact in float32) give the same
    edges; computing outer/n - mean*mean in float64 was off by about 0.01."""
    far = _three_sites(tmp_path / "a.zarr", 3e4, 1e-2)
    near = _three_sites(tmp_path / "b.zarr", 3e4, 1e-2, minus=3e4)
    np.testing.assert_array_equal(far.read("A").astype(np.float64) - 3e4, near.read("A"))
    e_far = causal_graph(far, basis=basis, rank=4).compute()["edges"]
    e_near = causal_graph(near, basis=basis, rank=4).compute()["edges"]
    for e0, e1 in zip(e_near, e_far, strict=True):
        assert e1["delta_r2"] == pytest.approx(e0["delta_r2"], abs=1e-6)
    assert e_near[0]["delta_r2"] > 0.9  # A -> B


@pytest.mark.parametrize("basis", ["random", "pca"])
def test_observational_refuses_nonfinite_data(basis: str, tmp_path: Path) -> None:
    cap = _three_sites(tmp_path / "c.zarr", 0.0, 1.0, nan=True)
    with pytest.raises(LlminstrError, match="needs finite data"):
        causal_graph(cap, basis=basis, rank=2).compute()
