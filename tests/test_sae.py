"""Tests of the out-of-core TopK SAE (llminstr.analysis.sae)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from llminstr.analysis.sae import (
    SAEConfig,
    SAEResult,
    held_out_mask,
    load_sae,
    sae_features,
    save_sae,
    train_sae,
)
from llminstr.errors import ConfigError, FormatError, LlminstrError, SiteNotFoundError
from llminstr.format import SiteInfo
from llminstr.reader import Capture, open_capture
from llminstr.storage.writer import CaptureWriter

D, ATOMS, ACTIVE, ROWS, CHUNK = 48, 96, 3, 30000, 1024
SITE = "blocks.2.mlp"


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def token_columns(rows: np.ndarray) -> dict[str, np.ndarray]:
    return {
        "token_id": (rows * 7 + 3) % 1000,
        "sequence": rows // 64,
        "position": rows % 64,
        "step": rows // 64,
    }


def planted(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rows that are sums of ACTIVE unit atoms (positive magnitudes) plus small noise."""
    rng = np.random.default_rng(seed)
    atoms = rng.standard_normal((ATOMS, D))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    idx = np.argsort(rng.random((ROWS, ATOMS)), axis=1)[:, :ACTIVE]
    mags = rng.uniform(0.5, 2.0, (ROWS, ACTIVE))
    x = np.einsum("nk,nkd->nd", mags, atoms[idx]) + 0.02 * rng.standard_normal((ROWS, D))
    return x.astype(np.float32), atoms


@pytest.fixture(scope="module")
def capture(tmp_path_factory: pytest.TempPathFactory) -> tuple[Capture, np.ndarray, np.ndarray]:
    x, atoms = planted()
    path = tmp_path_factory.mktemp("sae") / "planted.zarr"
    sites = [
        SiteInfo(SITE, (D,), "float32", kind="ffn", layer=2, module_path=SITE),
        SiteInfo("other", (4,), "float32"),
    ]
    with CaptureWriter(path, sites, chunk_rows=CHUNK) as writer:
        for start in range(0, ROWS, 5000):
            rows = np.arange(start, min(start + 5000, ROWS))
            writer.append(
                token_columns(rows), {SITE: x[rows], "other": np.zeros((len(rows), 4), np.float32)}
            )
    return open_capture(path), x, atoms


CONFIG = SAEConfig(n_features=2 * ATOMS, k=4, epochs=3, batch_size=256, seed=3)


@pytest.fixture(scope="module")
def trained(capture: tuple[Capture, np.ndarray, np.ndarray]) -> SAEResult:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_sae(capture[0], CONFIG, site=SITE)
    finally:
        torch.set_num_threads(before)


def test_recovers_planted_dictionary(
    capture: tuple[Capture, np.ndarray, np.ndarray], trained: SAEResult
) -> None:
    _, _, atoms = capture
    assert trained.W_dec.shape == (D, 2 * ATOMS)
    np.testing.assert_allclose(np.linalg.norm(trained.W_dec, axis=0), 1.0, atol=1e-5)
    best = (atoms @ trained.W_dec).max(axis=1)
    assert best.mean() >= 0.9, best.mean()
    m = trained.metrics
    assert m["fvu"] is not None and m["fvu"] < 0.2
    assert 0 < m["mean_l0"] <= CONFIG.k
    assert 0 <= m["dead_fraction"] < 0.5
    assert m["steps"] > 0 and m["eval_rows"] == ROWS
    assert trained.feature_frequency.shape == (2 * ATOMS,)
    assert np.isclose(trained.feature_frequency.sum(), m["mean_l0"])
    assert trained.config.lr is not None and trained.config.n_features == 2 * ATOMS
    assert trained.site == SITE
    # normalisation recorded: scaled inputs have unit mean norm
    x = capture[1]
    assert abs(np.linalg.norm(x * trained.input_scale, axis=1).mean() - 1) < 0.05
    # encode/decode on raw inputs reconstruct well
    rec = trained.decode(trained.encode(x[:2000]))
    fvu = ((rec - x[:2000]) ** 2).sum() / ((x[:2000] - x[:2000].mean(0)) ** 2).sum()
    assert fvu < 0.2


def test_top_examples_carry_token_columns(
    capture: tuple[Capture, np.ndarray, np.ndarray], trained: SAEResult
) -> None:
    cap, x, _ = capture
    T = CONFIG.top_examples
    assert trained.top_row.shape == (2 * ATOMS, T)
    latents = trained.encode(x)
    live = np.flatnonzero(trained.feature_frequency > 0)
    assert len(live) > 0
    for f in live[:20]:
        tops = trained.top_activations(int(f))
        assert len(tops) == min(T, int((latents[:, f] > 0).sum()))
        values = [t["value"] for t in tops]
        assert values == sorted(values, reverse=True)
        table = cap.token_table()
        for t in tops:
            r = t["row"]
            assert t["token_id"] == table["token_id"][r]
            assert t["sequence"] == table["sequence"][r]
            assert t["position"] == table["position"][r]
            assert np.isclose(t["value"], latents[r, f], rtol=1e-3, atol=1e-4)
        # they really are the strongest rows of the feature
        best = np.sort(latents[:, f])[::-1][: len(tops)]
        np.testing.assert_allclose(values, best, rtol=1e-3, atol=1e-4)


def test_held_out_rows_never_trained(capture: tuple[Capture, np.ndarray, np.ndarray]) -> None:
    cap = capture[0]
    seen: list[np.ndarray] = []
    cfg = SAEConfig(
        n_features=32,
        k=2,
        epochs=2,
        batch_size=512,
        shuffle_buffer_rows=3000,
        held_out_fraction=0.1,
        seed=5,
        top_examples=0,
    )
    res = train_sae(cap, cfg, site=SITE, rows=(1000, 20000), on_batch=seen.append)
    rows = np.concatenate(seen)
    held = held_out_mask(np.arange(1000, 20000), 0.1, 5)
    assert 0.08 < held.mean() < 0.12
    assert not held_out_mask(rows, 0.1, 5).any()
    assert rows.min() >= 1000 and rows.max() < 20000
    # every training row is seen exactly once per epoch
    counts = np.bincount(rows - 1000, minlength=19000)
    np.testing.assert_array_equal(counts, np.where(held, 0, 2))
    assert all(len(b) <= 512 for b in seen)
    # the batches are shuffled across chunks, not in storage order
    assert len(np.unique(seen[0] // CHUNK)) > 1
    assert res.metrics["held_out_rows"] == int(held.sum())
    assert res.metrics["eval_rows"] == 19000
    assert res.metrics["rows_trained"] == 2 * int((~held).sum())
    # membership depends only on the row index and the seed
    np.testing.assert_array_equal(held_out_mask(np.arange(5000, 6000), 0.1, 5), held[4000:5000])


def test_deterministic_with_seed() -> None:
    x, _ = planted(seed=1)
    x = x[:6000]
    cfg = SAEConfig(n_features=64, k=3, steps=40, batch_size=128, seed=11, shuffle_buffer_rows=2048)
    a, b = train_sae(x, cfg), train_sae(x, cfg)
    for name, arr in a.arrays().items():
        np.testing.assert_array_equal(arr, b.arrays()[name], err_msg=name)
    assert a.loss_history == b.loss_history
    c = train_sae(x, cfg, seed=12)
    assert not np.array_equal(a.W_dec, c.W_dec)
    assert a.metrics["steps"] == 40


def test_save_load_round_trip(trained: SAEResult, tmp_path: Path) -> None:
    out = save_sae(trained, tmp_path / "sae")
    assert sorted(p.name for p in out.iterdir()) == ["sae.json", "sae.safetensors"]
    json.loads((out / "sae.json").read_text())
    back = load_sae(out)
    for name, arr in trained.arrays().items():
        got = back.arrays()[name]
        assert got.dtype == arr.dtype, name
        np.testing.assert_array_equal(got, arr, err_msg=name)
    assert back.config == trained.config
    assert back.metrics == trained.metrics
    assert back.loss_history == trained.loss_history
    assert back.input_scale == trained.input_scale and back.site == trained.site
    # the plain dict form saves identically
    again = load_sae(save_sae(trained.to_dict(), tmp_path / "sae2"))
    np.testing.assert_array_equal(again.W_enc, trained.W_enc)
    with pytest.raises(FormatError):
        load_sae(tmp_path / "missing")


def test_sae_features_is_lazy_and_restricted(
    capture: tuple[Capture, np.ndarray, np.ndarray],
) -> None:
    import dask
    from dask.delayed import Delayed

    cap = capture[0]
    lazy = sae_features(
        cap,
        SITE,
        rows=(0, 4096),
        n_features=32,
        k=2,
        steps=10,
        batch_size=256,
        shuffle_buffer_rows=1024,
    )
    assert isinstance(lazy, Delayed)
    (out,) = dask.compute(lazy)
    assert out["site"] == SITE and out["n_features"] == 32
    assert out["W_dec"].shape == (D, 32)
    assert out["metrics"]["eval_rows"] == 4096 and out["metrics"]["steps"] == 10
    rows = out["top_examples"]["row"]
    assert rows.max() < 4096 and rows.shape == (32, 8)
    assert set(out["top_examples"]) == {"row", "value", "token_id", "sequence", "position"}
    # a path works as well as a Capture
    assert isinstance(sae_features(str(cap.path), SITE, steps=1), Delayed)


def test_bfloat16_site_and_dask_input(tmp_path: Path) -> None:
    import dask.array as da
    import ml_dtypes

    x, _ = planted(seed=2)
    x = x[:3000]
    path = tmp_path / "bf16.h5"
    with CaptureWriter(path, [SiteInfo("s", (D,), "bfloat16")], chunk_rows=512) as writer:
        writer.append(token_columns(np.arange(3000)), {"s": x.astype(ml_dtypes.bfloat16)})
    cfg = SAEConfig(n_features=32, k=3, steps=5, batch_size=128, shuffle_buffer_rows=512)
    res = train_sae(path, cfg)
    assert res.site == "s" and res.metrics["eval_rows"] == 3000
    arr = da.from_array(x, chunks=(700, D))
    res2 = train_sae(arr, cfg, tokens={"token_id": np.arange(3000)})
    assert res2.site is None
    valid = res2.top_row[res2.top_row >= 0]
    np.testing.assert_array_equal(res2.top_token_id[res2.top_row >= 0], valid)
    assert (res2.top_sequence[res2.top_row >= 0] == -1).all()


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"k": 0}, "k must be"),
        ({"n_features": 8, "k": 9}, "must not exceed"),
        ({"lr": -1.0}, "lr must be"),
        ({"held_out_fraction": 1.0}, "held_out_fraction"),
        ({"batch_size": 4096, "shuffle_buffer_rows": 1024}, "shuffle_buffer_rows"),
        ({"device": "nonsense"}, "device"),
        ({"epochs": 1.5}, "epochs"),
        ({"normalize": "yes"}, "normalize"),
        ({"b_dec_init": "median"}, "b_dec_init"),
        ({"steps": 0}, "steps"),
        ({"device": "meta"}, "meta tensors"),
        ({"seed": 2**63}, "seed must be"),
    ],
)
def test_config_errors(options: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        SAEConfig(**options)


@pytest.mark.parametrize(
    ("options", "match"),
    [({"n_features": 10**12}, "n_features must be"), ({"top_examples": 10**12}, "top_examples")],
)
def test_sizes_no_memory_holds_are_refused_before_training(
    capture: tuple[Capture, np.ndarray, np.ndarray], options: dict[str, Any], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        sae_features(capture[0], SITE, **options)
    with pytest.raises(ConfigError, match=match):
        train_sae(capture[0], SAEConfig(**options), site=SITE)


def test_a_save_with_sizes_above_the_new_bounds_still_loads(
    trained: SAEResult, tmp_path: Path
) -> None:
    """Bounds added later must not lock out SAEs saved before them."""
    from llminstr.analysis.sae import MAX_TOP_EXAMPLES

    data = trained.to_dict()
    top = MAX_TOP_EXAMPLES + 1  # as an older version could save it
    data["config"]["top_examples"] = top
    for column, table in data["top_examples"].items():
        wide = np.full((table.shape[0], top), 0 if column == "value" else -1, table.dtype)
        wide[:, : table.shape[1]] = table
        data["top_examples"][column] = wide
    back = load_sae(save_sae(data, tmp_path / "sae"))
    assert back.config.top_examples == top and back.top_row.shape[1] == top


def test_call_errors(capture: tuple[Capture, np.ndarray, np.ndarray]) -> None:
    cap = capture[0]
    with pytest.raises(SiteNotFoundError):
        sae_features(cap, "nope")
    with pytest.raises(ConfigError, match="unknown SAE option"):
        sae_features(cap, SITE, bogus=1)
    with pytest.raises(ConfigError, match="must not exceed"):
        sae_features(cap, SITE, n_features=2, k=4)
    with pytest.raises(ConfigError, match="name one with site"):
        train_sae(cap, CONFIG)
    with pytest.raises(ConfigError, match="rows must be"):
        train_sae(cap, CONFIG, site=SITE, rows=slice(0, 100, 2))
    assert SAEConfig().resolved(100).n_features == 400


def test_sparse_gradients_match_autograd() -> None:
    from llminstr.analysis.sae import _TopK

    rng = np.random.default_rng(4)
    d, n, k, batch = 12, 40, 5, 64
    cfg = SAEConfig(n_features=n, k=k, lr=1e-3, seed=2)
    sae = _TopK(d, cfg, rng.standard_normal(d).astype(np.float32))
    with torch.no_grad():  # move away from the tied initialisation
        sae.W_enc += 0.3 * torch.randn(n, d, generator=torch.Generator().manual_seed(0))
        sae.b_enc += 0.1 * torch.randn(n, generator=torch.Generator().manual_seed(1))
    x = torch.from_numpy(rng.standard_normal((batch, d)).astype(np.float32))
    loss, grads = sae.gradients(x)

    params = {
        name: getattr(sae, name).detach().clone().requires_grad_(True)
        for name in ("W_enc", "b_enc", "W_dec", "b_dec")
    }
    xc = x - params["b_dec"]
    pre = xc @ params["W_enc"].T + params["b_enc"]
    idx = pre.detach().topk(k, dim=1).indices
    z = torch.zeros(batch, n).scatter(1, idx, torch.relu(pre.gather(1, idx)))
    recon = z @ params["W_dec"] + params["b_dec"]
    ref = (recon - x).pow(2).sum(dim=1).mean()
    ref.backward()
    assert np.isclose(loss, float(ref.detach()), rtol=1e-5)
    for name, p in params.items():
        assert p.grad is not None
        np.testing.assert_allclose(grads[name].numpy(), p.grad.numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("rows", [1, 5, 300])
def test_steps_on_data_smaller_than_the_buffer_read_it_once_per_epoch(
    rows: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A capture smaller than the shuffle buffer is emitted epoch by epoch, each epoch a
    permutation of every training row, instead of being read until the buffer fills."""
    from llminstr.analysis import sae as sae_mod

    path = tmp_path / "small.zarr"
    x = np.random.default_rng(0).standard_normal((rows, 8)).astype(np.float32)
    with CaptureWriter(path, [SiteInfo("s", (8,))], chunk_rows=64) as w:
        w.append(token_columns(np.arange(rows)), {"s": x})
    reads = [0]
    real_read = sae_mod._Blocks.read

    def counting_read(self: Any, i: int) -> Any:
        reads[0] += 1
        return real_read(self, i)

    monkeypatch.setattr(sae_mod._Blocks, "read", counting_read)
    seen: list[np.ndarray] = []
    steps = 6
    cfg = SAEConfig(n_features=8, k=2, steps=steps, batch_size=128, held_out_fraction=0.0)
    res = train_sae(open_capture(path), cfg, site="s", on_batch=seen.append)
    blocks = -(-rows // 64)
    batches_per_epoch = -(-rows // 128)
    epochs = -(-steps // batches_per_epoch)
    # init sample + one read per block per epoch (the last epoch may be cut short)
    assert reads[0] <= blocks * (epochs + 1) + blocks
    assert res.metrics["steps"] == steps and len(seen) == steps
    epoch_rows = np.concatenate(seen[:batches_per_epoch])
    np.testing.assert_array_equal(np.sort(epoch_rows), np.arange(rows))


def test_numpy_numbers_in_options_become_python_numbers(tmp_path: Path) -> None:
    """numpy integers passed the checks but then failed in torch's manual_seed and in
    save_sae's JSON."""
    cfg = SAEConfig(seed=np.int64(3), batch_size=np.int64(64), lr=np.float32(1e-3))
    assert type(cfg.seed) is int and type(cfg.batch_size) is int and type(cfg.lr) is float
    json.dumps(cfg.to_dict())


def _save_pair(trained: SAEResult, out: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    save_sae(trained, out)
    from safetensors.numpy import load_file

    return load_file(str(out / "sae.safetensors")), json.loads((out / "sae.json").read_text())


def _rewrite(out: Path, arrays: dict[str, np.ndarray], meta: Any, save_id: str) -> None:
    """Replace a saved SAE's files, keeping their save_id pairing (a forger can copy it)."""
    from safetensors.numpy import save_file

    save_file(arrays, str(out / "sae.safetensors"), metadata={"save_id": save_id})
    (out / "sae.json").write_text(meta if isinstance(meta, str) else json.dumps(meta))


@pytest.mark.parametrize(
    ("tamper", "match"),
    [
        (lambda a, m: a.update(W_enc=a["W_enc"][:-1]), "W_enc has shape"),
        (lambda a, m: a.update(extra=np.zeros(2, np.float32)), "has others"),
        (lambda a, m: a.pop("b_dec"), "lacks arrays"),
        (lambda a, m: a["W_dec"].__setitem__((0, 0), np.nan), "W_dec holds NaN"),
        (lambda a, m: a.update(W_enc=a["W_enc"].astype(np.float16)), "W_enc has dtype"),
        (lambda a, m: a.update(top_row=a["top_row"][:, :1]), "top_row has shape"),
        (lambda a, m: a.update(top_row=a["top_row"].astype(np.float32)), "top_row has dtype"),
        (lambda a, m: m.update(d_in=8.7), "d_in must be"),
        (lambda a, m: m.update(d_in="abc"), "d_in must be"),
        (lambda a, m: m.pop("n_features"), "n_features must be"),
        (lambda a, m: m.update(input_scale=0), "input_scale must be"),
        (lambda a, m: m.update(input_scale="x"), "input_scale must be"),
        (lambda a, m: m.update(config=["k"]), "config must be"),
        (lambda a, m: m["config"].update(k="4"), "config: k must be"),
        (lambda a, m: m["config"].update(n_features=4), "config says n_features 4"),
        (lambda a, m: m["config"].update(n_features=None, k=m["n_features"] + 1), "exceed"),
        (lambda a, m: m.update(metrics=[1, 2]), "metrics must be"),
        (lambda a, m: m.update(loss_history="abc"), "loss_history must be"),
        (lambda a, m: m.update(site=3), "site must be"),
    ],
)
def test_load_refuses_tampered_files(
    trained: SAEResult, tmp_path: Path, tamper: Any, match: str
) -> None:
    arrays, meta = _save_pair(trained, tmp_path / "sae")
    tamper(arrays, meta)
    _rewrite(tmp_path / "sae", arrays, meta, meta["save_id"])
    with pytest.raises(FormatError, match=match):
        load_sae(tmp_path / "sae")


@pytest.mark.parametrize(
    ("weights", "meta", "match"),
    [
        (b"\x80\x04\x95" + b"\0" * 64, None, "sae.safetensors cannot be read"),  # a pickle
        (b"", None, "sae.safetensors cannot be read"),
        (b"\xff" * 8 + b"{}", None, "sae.safetensors cannot be read"),  # a huge header length
        (None, "{not json", "not valid JSON"),
        (None, "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ],
)
def test_load_refuses_damaged_files(
    trained: SAEResult, tmp_path: Path, weights: bytes | None, meta: str | None, match: str
) -> None:
    out = save_sae(trained, tmp_path / "sae")
    if weights is not None:
        (out / "sae.safetensors").write_bytes(weights)
    if meta is not None:
        (out / "sae.json").write_text(meta)
    with pytest.raises(FormatError, match=match):
        load_sae(out)


def test_files_of_two_saves_are_refused_and_a_failed_save_keeps_the_old_one(
    trained: SAEResult, tmp_path: Path
) -> None:
    """save_sae wrote the weights, then failed on the JSON: the directory held new
    weights beside the previous save's config and metrics, and loaded without a word."""
    first = save_sae(trained, tmp_path / "a")
    second = save_sae(trained, tmp_path / "b")
    (first / "sae.json").write_bytes((second / "sae.json").read_bytes())
    with pytest.raises(FormatError, match="different saves"):
        load_sae(first)

    save_sae(trained, tmp_path / "c")
    before = {p.name: p.read_bytes() for p in (tmp_path / "c").iterdir()}
    broken = trained.to_dict()
    broken["metrics"] = {"fvu": object()}  # not JSON
    with pytest.raises(TypeError):
        save_sae(broken, tmp_path / "c")
    assert {p.name: p.read_bytes() for p in (tmp_path / "c").iterdir()} == before
    load_sae(tmp_path / "c")


def test_nonfinite_held_out_rows_are_refused(tmp_path: Path) -> None:
    """Held-out rows are never trained on, so only the evaluation sees them: a NaN there
    gave fvu=None and a lowered mean_l0 without a word."""
    path = tmp_path / "nan.zarr"
    x = np.random.default_rng(0).standard_normal((300, 8)).astype(np.float32)
    cfg = SAEConfig(n_features=8, k=2, steps=5, batch_size=64, init_rows=16, held_out_fraction=0.3)
    held = np.flatnonzero(held_out_mask(np.arange(300), 0.3, 0))
    x[held[3], 5] = np.nan
    with CaptureWriter(path, [SiteInfo("s", (8,))], chunk_rows=64) as w:
        w.append(token_columns(np.arange(300)), {"s": x})
    with pytest.raises(LlminstrError, match=rf"site 's' holds NaN or inf \(row {held[3]}\)"):
        train_sae(open_capture(path), cfg, site="s")


def test_nonfinite_rows_are_refused_not_trained_into_nan_weights(tmp_path: Path) -> None:
    path = tmp_path / "nan.zarr"
    x = np.random.default_rng(0).standard_normal((300, 8)).astype(np.float32)
    x[211, 3] = np.inf
    with CaptureWriter(path, [SiteInfo("s", (8,))], chunk_rows=64) as w:
        w.append(token_columns(np.arange(300)), {"s": x})
    cfg = SAEConfig(n_features=8, k=2, steps=20, batch_size=64, init_rows=16, held_out_fraction=0.0)
    with pytest.raises(LlminstrError, match=r"site 's' holds NaN or inf \(row 211\)"):
        train_sae(open_capture(path), cfg, site="s")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_cuda_device_is_refused_up_front_without_cuda() -> None:
    with pytest.raises(ConfigError, match="CUDA is not available"):
        SAEConfig(device="cuda")


def test_training_batches_hold_one_block_not_copies_of_it(tmp_path: Path) -> None:
    """With storage chunks much larger than the shuffle buffer, the batches are cut from
    the block being read: numpy memory stays at what reading one block takes plus the
    buffers (whole blocks were filtered, concatenated and permuted: 4.9 chunks)."""
    import tracemalloc

    from llminstr.analysis import sae as sae_mod

    rows, width, chunk = 4 * 8192, 256, 8192
    path = tmp_path / "wide.zarr"
    x = np.random.default_rng(0).standard_normal((rows, width)).astype(np.float32)
    with CaptureWriter(path, [SiteInfo("s", (width,))], chunk_rows=chunk) as w:
        w.append(token_columns(np.arange(rows)), {"s": x})
    del x
    blocks, _ = sae_mod._blocks_for(open_capture(path), "s", None, None)
    cfg = SAEConfig(n_features=8, k=2, batch_size=128, shuffle_buffer_rows=512, epochs=1).resolved(
        width
    )
    chunk_bytes = chunk * width * 4
    blocks.read(0)  # warm the reader
    tracemalloc.start()
    try:
        seen = 0
        for xb, rb in sae_mod._training_batches(blocks, cfg, np.random.default_rng(0), cycle=False):
            assert xb.shape[1] == width and len(xb) == len(rb)
            seen += len(rb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert seen == int((~held_out_mask(np.arange(rows), cfg.held_out_fraction, cfg.seed)).sum())
    # reading a block holds its frame and the decoded chunk (2 chunks); before: 4.9
    assert peak < 2.6 * chunk_bytes, peak / chunk_bytes


def test_default_k_fits_narrow_sites(tmp_path: Path) -> None:
    """The documented default call on a 6-feature site: k defaulted to 32 and exceeded the
    24 default features (a ConfigError before any statistics could run)."""
    from llminstr.analysis import analyze_activations, compute

    path = tmp_path / "narrow.zarr"
    x = np.random.default_rng(0).standard_normal((300, 6)).astype(np.float32)
    with CaptureWriter(path, [SiteInfo("s", (6,))], chunk_rows=64) as w:
        w.append(token_columns(np.arange(300)), {"s": x})
    out = compute(analyze_activations(path, sae_options={"steps": 5}))
    cfg = out["sae_features"]["config"]
    assert (cfg["n_features"], cfg["k"]) == (24, 6)
    assert SAEConfig().resolved(768).k == 32  # wide sites keep the usual k
    with pytest.raises(ConfigError, match=r"k \(40\) must not exceed n_features \(24\)"):
        SAEConfig(k=40).resolved(6)  # an explicit k is kept, and checked


def test_sae_rows_are_fixed_when_set_up_on_a_live_capture(tmp_path: Path) -> None:
    """Without ``rows=``, the SAE trained on every row committed when it was *computed*,
    while the statistics and the causal graph fix theirs when set up (an audit: set up at
    90 rows, it trained on about 1000). A capture replaced at the path is refused."""
    import dask

    path = tmp_path / "live.zarr"
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1000, 8)).astype(np.float32)
    w = CaptureWriter(path, [SiteInfo("s", (8,))], chunk_rows=32, commit_interval_s=1e9)
    w.append(token_columns(np.arange(90)), {"s": x[:90]})
    w.commit()
    options = dict(n_features=8, k=2, steps=5, batch_size=32, held_out_fraction=0.2)
    lazy = sae_features(open_capture(path), "s", **options)
    w.append(token_columns(np.arange(90, 1000)), {"s": x[90:]})
    w.close()
    (out,) = dask.compute(lazy)
    assert out["metrics"]["eval_rows"] == 90
    assert out["top_examples"]["row"].max() < 90
    # the same path now holding another capture
    stale = sae_features(open_capture(path), "s", **options)
    with CaptureWriter(path, [SiteInfo("s", (8,))], chunk_rows=32, overwrite=True) as again:
        again.append(token_columns(np.arange(100)), {"s": x[:100]})
    with pytest.raises(FormatError, match="another capture"):
        dask.compute(stale)
