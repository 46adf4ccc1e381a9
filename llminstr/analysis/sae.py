"""Out-of-core TopK sparse autoencoders on captured activations.

A TopK SAE (Gao et al., 2024, "Scaling and evaluating sparse autoencoders") maps an
activation ``x`` (width ``d``) to ``n_features`` latents, of which only the ``k`` largest
are kept::

    z     = TopK(ReLU(W_enc (x - b_dec) + b_enc))          # (n_features,), k non-zeros
    x_hat = W_dec z + b_dec                                 # W_dec: (d, n_features)

The decoder's columns (one per feature) have unit norm: they are renormalised after every
optimiser step, and the gradient component parallel to each column is removed before it.
``b_dec`` starts at the data mean (or geometric median), ``W_enc`` at ``W_dec.T``; the
optimiser is Adam and the loss the squared reconstruction error per row.

Training is fed chunk by chunk from the capture (never the whole site in memory): each
epoch visits the storage chunks in a seeded random order, and rows are mixed in a bounded
shuffle buffer of ``shuffle_buffer_rows`` rows. A deterministic subset of rows, chosen by
a hash of the row index (and the seed), is *held out*: never trained on, and used for the
fraction of variance unexplained (FVU). After training, one evaluation pass over every
row measures each feature's activation frequency, the dead fraction, the mean L0, the
FVU, and keeps each feature's ``top_examples`` most activating rows (with their token
columns) in bounded memory.

Gradients are written by hand and sparse: a step computes one dense ``B x d x n_features``
product (the encoder, to pick the top ``k``) and one sampled product on the ``B x k`` kept
positions (the gradient of the kept activations); the decoder product and the weight
gradients are ``O(B k d)`` bag sums, so no ``(B, n_features)`` or ``(B, k, d)`` tensor is
ever differentiated or materialised. A test checks them against autograd.

Results are saved with :func:`save_sae` (safetensors for arrays, JSON for the rest; no
pickle) and read back with :func:`load_sae`.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from llminstr.analysis._common import nonfinite_error, resolve_rows
from llminstr.config import check_torch_device
from llminstr.errors import ConfigError, FormatError, LlminstrError, SiteNotFoundError

__all__ = [
    "SAEConfig",
    "SAEResult",
    "held_out_mask",
    "load_sae",
    "sae_features",
    "save_sae",
    "train_sae",
]

SAE_FORMAT = "llminstr-sae"
SAE_FORMAT_VERSION = 1
WEIGHTS_FILE = "sae.safetensors"
META_FILE = "sae.json"
TOP_COLUMNS = ("row", "value", "token_id", "sequence", "position")
_TOKEN_COLUMNS = ("token_id", "sequence", "position")
_NUMPY_BLOCK_ROWS = 8192
#: Upper bounds of the SAE's sizes, checked with the options: beyond them the weights or
#: the top-example tables would not fit any machine's memory.
MAX_SAE_FEATURES = 1 << 24
MAX_TOP_EXAMPLES = 1 << 12

RowsArg = slice | range | tuple[int, int] | None


# ---------------------------------------------------------------------------- config
def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_int(
    name: str, value: Any, low: int, *, allow_none: bool = False, high: int | None = None
) -> None:
    if value is None and allow_none:
        return
    if not _is_int(value) or int(value) < low or (high is not None and int(value) > high):
        extra = " or None" if allow_none else ""
        span = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ConfigError(f"{name} must be an integer {span}{extra}; got {value!r}")


def _check_float(
    name: str, value: Any, low: float, high: float, *, low_open: bool, high_open: bool
) -> None:
    ok = isinstance(value, (int, float, np.floating)) and not isinstance(value, bool)
    if ok:
        v = float(value)
        ok = math.isfinite(v) and (v > low if low_open else v >= low)
        ok = ok and (v < high if high_open else v <= high)
    if not ok:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ConfigError(f"{name} must be a number in {lo}{low}, {high}{hi}; got {value!r}")


@dataclass(frozen=True)
class SAEConfig:
    """Hyper-parameters of a TopK SAE run. Every field is validated on construction.

    n_features
        Number of latents (dictionary size). ``None``: 4 x the input width.
    k
        Latents kept per row (the L0 target). ``None``: ``min(32, n_features // 4)``, at
        least 1 (so that the default call also runs on narrow sites).
    epochs
        Passes over the training rows (ignored when ``steps`` is given).
    steps
        Optimiser steps to take; the data are cycled (a new chunk order per epoch) as
        often as needed. ``None``: train for ``epochs`` epochs.
    batch_size
        Rows per optimiser step.
    lr
        Adam learning rate. ``None``: ``2e-4 / sqrt(n_features / 2**14)`` (the scaling
        of Gao et al.).
    seed
        Seeds the initialisation, the chunk order, the shuffle buffer and the held-out set.
    device
        Torch device to train on (``"cpu"``, ``"cuda"``, ``"cuda:1"`` ...).
    shuffle_buffer_rows
        Rows held in the shuffle buffer. Training holds the block being read (one storage
        chunk, about twice its size while it is read and decompressed) plus about two
        shuffle buffers; evaluation holds the block plus batches of at least 1024 rows.
    held_out_fraction
        Fraction of rows (in ``[0, 1)``) never trained on; the FVU is measured on them.
    normalize
        Scale inputs by one factor so that their mean L2 norm is 1 (estimated from a
        sample of training rows). The factor is recorded as ``input_scale``; the
        weights act on scaled inputs (:meth:`SAEResult.encode` applies it).
    top_examples
        Most activating rows kept per feature in the evaluation pass (0: none).
    b_dec_init
        ``"mean"`` or ``"geometric_median"`` of the sample, for the initial ``b_dec``.
    init_rows
        Training rows sampled for ``b_dec`` and the normalisation factor.
    log_every
        Steps averaged into each entry of the loss history.
    """

    n_features: int | None = None
    k: int | None = None
    epochs: int = 1
    steps: int | None = None
    batch_size: int = 1024
    lr: float | None = None
    seed: int = 0
    device: str = "cpu"
    shuffle_buffer_rows: int = 65536
    held_out_fraction: float = 0.05
    normalize: bool = True
    top_examples: int = 8
    b_dec_init: Literal["mean", "geometric_median"] = "mean"
    init_rows: int = 16384
    log_every: int = 50

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # numpy numbers as Python ones (JSON, torch)
            value = getattr(self, f.name)
            if isinstance(value, np.integer):
                object.__setattr__(self, f.name, int(value))
            elif isinstance(value, np.floating):
                object.__setattr__(self, f.name, float(value))
        _check_int("n_features", self.n_features, 1, allow_none=True)
        _check_int("k", self.k, 1, allow_none=True)
        if self.n_features is not None and self.k is not None and self.k > self.n_features:
            raise ConfigError(f"k ({self.k}) must not exceed n_features ({self.n_features})")
        _check_int("epochs", self.epochs, 1)
        _check_int("steps", self.steps, 1, allow_none=True)
        _check_int("batch_size", self.batch_size, 1)
        if self.lr is not None:
            _check_float("lr", self.lr, 0.0, 1.0, low_open=True, high_open=False)
        _check_int("seed", self.seed, 0, high=2**63 - 1)
        check_torch_device(self.device, "device")
        _check_int("shuffle_buffer_rows", self.shuffle_buffer_rows, 1)
        if self.shuffle_buffer_rows < self.batch_size:
            raise ConfigError(
                f"shuffle_buffer_rows ({self.shuffle_buffer_rows}) must be at least batch_size "
                f"({self.batch_size})"
            )
        _check_float(
            "held_out_fraction", self.held_out_fraction, 0.0, 1.0, low_open=False, high_open=True
        )
        if not isinstance(self.normalize, bool):
            raise ConfigError(f"normalize must be True or False; got {self.normalize!r}")
        _check_int("top_examples", self.top_examples, 0)
        if self.b_dec_init not in ("mean", "geometric_median"):
            raise ConfigError(
                f"b_dec_init must be 'mean' or 'geometric_median'; got {self.b_dec_init!r}"
            )
        _check_int("init_rows", self.init_rows, 1)
        _check_int("log_every", self.log_every, 1)

    def check_sizes(self) -> None:
        """The size bounds a new training must respect (weights and top-example tables
        that no machine's memory holds are refused before anything runs). Not applied
        when a saved SAE is loaded: earlier versions had no bounds."""
        _check_int("n_features", self.n_features, 1, allow_none=True, high=MAX_SAE_FEATURES)
        _check_int("top_examples", self.top_examples, 0, high=MAX_TOP_EXAMPLES)

    def resolved(self, d_in: int) -> SAEConfig:
        """This config with ``n_features``, ``k`` and ``lr`` filled in for inputs of width
        ``d_in``."""
        n = self.n_features if self.n_features is not None else 4 * d_in
        k = self.k if self.k is not None else min(32, max(1, n // 4))
        if k > n:
            raise ConfigError(f"k ({k}) must not exceed n_features ({n})")
        lr = self.lr if self.lr is not None else 2e-4 / math.sqrt(n / 2**14)
        return dataclasses.replace(self, n_features=int(n), k=int(k), lr=float(lr))

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SAEConfig:
        """Build from :meth:`to_dict` output (unknown keys are an error)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown SAE option(s) {unknown}; known: {sorted(names)}")
        return cls(**dict(data))


# ---------------------------------------------------------------------------- result
@dataclass
class SAEResult:
    """A trained SAE with its evaluation.

    Weights follow the ``torch.nn.Linear`` layout: ``W_enc`` is ``(n_features, d_in)``,
    ``W_dec`` is ``(d_in, n_features)`` with unit-norm columns. They act on inputs
    multiplied by ``input_scale``. ``top_*`` arrays are ``(n_features, top_examples)``,
    sorted by decreasing activation; unused slots have row ``-1`` and value ``0``.
    """

    config: SAEConfig
    d_in: int
    input_scale: float
    W_enc: np.ndarray
    b_enc: np.ndarray
    W_dec: np.ndarray
    b_dec: np.ndarray
    feature_frequency: np.ndarray
    top_row: np.ndarray
    top_value: np.ndarray
    top_token_id: np.ndarray
    top_sequence: np.ndarray
    top_position: np.ndarray
    metrics: dict[str, Any] = field(default_factory=dict)
    loss_history: list[float] = field(default_factory=list)
    site: str | None = None

    @property
    def n_features(self) -> int:
        return int(self.W_enc.shape[0])

    def encode(self, x: Any) -> np.ndarray:
        """Dense latents ``(rows, n_features)`` of raw (unscaled) activations ``x``."""
        xs = np.asarray(x, dtype=np.float32).reshape(-1, self.d_in) * np.float32(self.input_scale)
        pre = (xs - self.b_dec) @ self.W_enc.T + self.b_enc
        k = self.config.resolved(self.d_in).k  # (filled in already for trained SAEs)
        assert k is not None
        idx = np.argpartition(-pre, k - 1, axis=1)[:, :k]
        out = np.zeros_like(pre)
        vals = np.take_along_axis(pre, idx, axis=1)
        np.put_along_axis(out, idx, np.maximum(vals, 0.0), axis=1)
        return np.asarray(out)

    def decode(self, z: Any) -> np.ndarray:
        """Reconstruction, in raw (unscaled) units, of latents ``z``."""
        zz = np.asarray(z, dtype=np.float32)
        return np.asarray((zz @ self.W_dec.T + self.b_dec) / np.float32(self.input_scale))

    def top_activations(self, feature: int) -> list[dict[str, Any]]:
        """The kept top-activating rows of one feature, strongest first."""
        out = []
        for j in range(self.top_row.shape[1]):
            row = int(self.top_row[feature, j])
            if row < 0:
                break
            out.append(
                {
                    "row": row,
                    "value": float(self.top_value[feature, j]),
                    "token_id": int(self.top_token_id[feature, j]),
                    "sequence": int(self.top_sequence[feature, j]),
                    "position": int(self.top_position[feature, j]),
                }
            )
        return out

    def arrays(self) -> dict[str, np.ndarray]:
        """Every array of the result, by name."""
        return {
            "W_enc": self.W_enc,
            "b_enc": self.b_enc,
            "W_dec": self.W_dec,
            "b_dec": self.b_dec,
            "feature_frequency": self.feature_frequency,
            "top_row": self.top_row,
            "top_value": self.top_value,
            "top_token_id": self.top_token_id,
            "top_sequence": self.top_sequence,
            "top_position": self.top_position,
        }

    def to_dict(self) -> dict[str, Any]:
        """A plain dict: arrays as numpy, everything else JSON-serialisable.

        Keys: ``site``, ``config``, ``d_in``, ``n_features``, ``input_scale``, ``metrics``
        (``fvu``, ``mean_l0``, ``dead_fraction``, ...), ``loss_history``, the weight and
        frequency arrays, and ``top_examples`` (``row``, ``value``, ``token_id``,
        ``sequence``, ``position``: each ``(n_features, top_examples)``).
        """
        arrays = self.arrays()
        return {
            "site": self.site,
            "config": self.config.to_dict(),
            "d_in": self.d_in,
            "n_features": self.n_features,
            "input_scale": self.input_scale,
            "metrics": dict(self.metrics),
            "loss_history": list(self.loss_history),
            **{k: arrays[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec", "feature_frequency")},
            "top_examples": {c: arrays[f"top_{c}"] for c in TOP_COLUMNS},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SAEResult:
        """Inverse of :meth:`to_dict`."""
        top = data["top_examples"]
        return cls(
            config=SAEConfig.from_dict(data["config"]),
            d_in=int(data["d_in"]),
            input_scale=float(data["input_scale"]),
            W_enc=np.asarray(data["W_enc"]),
            b_enc=np.asarray(data["b_enc"]),
            W_dec=np.asarray(data["W_dec"]),
            b_dec=np.asarray(data["b_dec"]),
            feature_frequency=np.asarray(data["feature_frequency"]),
            top_row=np.asarray(top["row"]),
            top_value=np.asarray(top["value"]),
            top_token_id=np.asarray(top["token_id"]),
            top_sequence=np.asarray(top["sequence"]),
            top_position=np.asarray(top["position"]),
            metrics=dict(data.get("metrics", {})),
            loss_history=[float(v) for v in data.get("loss_history", [])],
            site=data.get("site"),
        )


# ---------------------------------------------------------------------------- held-out rows
def held_out_mask(rows: Any, fraction: float, seed: int = 0) -> np.ndarray:
    """Which of the global row indices ``rows`` are held out: ``hash(row, seed) < fraction``.

    The hash is SplitMix64, so membership depends only on the row index, the seed and the
    fraction, never on chunking, shuffling or the row range trained on.
    """
    r = np.asarray(rows, dtype=np.int64).astype(np.uint64)
    if fraction <= 0:
        return np.zeros(r.shape, dtype=bool)
    with np.errstate(over="ignore"):
        z = r + np.uint64(0x9E3779B97F4A7C15) * np.uint64(seed + 1)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    u = (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return np.asarray(u < fraction)


# ---------------------------------------------------------------------------- data access
class _Blocks:
    """The rows to train on, as storage-aligned blocks ``[start, stop)`` of global rows."""

    def __init__(
        self,
        read: Callable[[int, int], np.ndarray],
        bounds: list[tuple[int, int]],
        d_in: int,
        tokens: Callable[[int, int], dict[str, np.ndarray]] | None,
    ) -> None:
        self._read = read
        self.bounds = bounds
        self.d_in = d_in
        self._tokens = tokens

    def __len__(self) -> int:
        return len(self.bounds)

    def read(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows ``(n, d_in)`` float32, their global row indices) of block ``i``."""
        a, b = self.bounds[i]
        x = np.asarray(self._read(a, b))
        x = x.reshape(x.shape[0], -1)
        if x.dtype != np.float32:
            x = x.astype(np.float32)
        return x, np.arange(a, b, dtype=np.int64)

    def tokens(self, i: int) -> dict[str, np.ndarray] | None:
        if self._tokens is None:
            return None
        a, b = self.bounds[i]
        return self._tokens(a, b)


def _bounds(chunk_starts: list[int], start: int, stop: int) -> list[tuple[int, int]]:
    """Split ``[start, stop)`` at the given chunk boundaries."""
    cuts = sorted({start, stop, *(c for c in chunk_starts if start < c < stop)})
    return [(a, b) for a, b in itertools.pairwise(cuts) if b > a]


def _blocks_for(
    data: Any, site: str | None, rows: RowsArg, tokens: Mapping[str, Any] | None
) -> tuple[_Blocks, str | None]:
    """Adapt a Capture (+site), a dask array or a numpy array to :class:`_Blocks`."""
    from llminstr.reader import Capture

    if isinstance(data, (str, os.PathLike)):
        from llminstr.reader import open_capture

        data = open_capture(data)
    if isinstance(data, Capture):
        cap = data
        if site is None:
            if len(cap.sites) != 1:
                raise ConfigError(
                    f"the capture has {len(cap.sites)} sites; name one with site= ({cap.sites})"
                )
            site = cap.sites[0]
        info = cap.site_info(site)
        d_in = int(np.prod(info["feature_shape"]))
        start, stop = resolve_rows(rows, cap.num_rows)
        cr = cap.chunk_rows
        bounds = _bounds(list(range(0, cap.num_rows, cr)), start, stop)
        present = [c for c in _TOKEN_COLUMNS if c in cap.token_columns]

        def read_cap(a: int, b: int) -> np.ndarray:
            return cap.read(site, a, b)

        def tok_cap(a: int, b: int) -> dict[str, np.ndarray]:
            table = cap.token_table(a, b)
            return {c: np.asarray(table[c], dtype=np.int64) for c in present}

        return _Blocks(read_cap, bounds, d_in, tok_cap), site

    arr = data
    if not hasattr(arr, "shape") or len(arr.shape) < 2:
        raise ConfigError(
            "train_sae needs a Capture, a capture path, or an array of shape (rows, features...); "
            f"got {type(data).__name__}"
        )
    n = int(arr.shape[0])
    d_in = int(np.prod(arr.shape[1:]))
    start, stop = resolve_rows(rows, n)
    is_dask = hasattr(arr, "chunks") and hasattr(arr, "blocks") and hasattr(arr, "dask")
    if is_dask:
        starts = [int(s) for s in np.cumsum((0, *arr.chunks[0]))[:-1]]
    else:
        arr = np.asarray(arr)
        starts = list(range(0, n, _NUMPY_BLOCK_ROWS))
    bounds = _bounds(starts, start, stop)

    def read_arr(a: int, b: int) -> np.ndarray:
        block = arr[a:b]
        if is_dask:
            block = block.compute(scheduler="sync")
        return np.asarray(block)

    tok_fn = None
    if tokens is not None:
        cols = {c: tokens[c] for c in _TOKEN_COLUMNS if c in tokens}

        def tok_fn(a: int, b: int) -> dict[str, np.ndarray]:
            out = {}
            for c, col in cols.items():
                v = col[a:b]
                if hasattr(v, "compute"):
                    v = v.compute(scheduler="sync")
                out[c] = np.asarray(v, dtype=np.int64)
            return out

    return _Blocks(read_arr, bounds, d_in, tok_fn), site


# ---------------------------------------------------------------------------- batches
def _nonfinite_error(site: str | None, row: int | None) -> LlminstrError:
    return nonfinite_error(site, "the SAE", None if row is None else f"row {row}")


def _training_batches(
    blocks: _Blocks,
    cfg: SAEConfig,
    rng: np.random.Generator,
    *,
    cycle: bool,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield shuffled training batches ``(x, global_rows)``; held-out rows are dropped.

    Each epoch visits the blocks in a fresh random order; rows go through a shuffle buffer
    of ``shuffle_buffer_rows``: once it is full it is permuted, all but half of it is
    emitted as batches, and the other half stays to mix with the next blocks. When a whole
    epoch fits in the buffer, each epoch is emitted on its own, permuted (the last batch
    may be short), instead of reading the data again and again to fill the buffer.
    """
    cap = cfg.shuffle_buffer_rows
    bs = cfg.batch_size
    # A block enters the buffer in pieces of at most half the buffer, its training rows
    # taken in a random order: memory stays at one block plus about two buffers, however
    # large the storage chunks (whole blocks used to be concatenated and permuted, four
    # copies of a chunk at once).
    piece = max(1, cap // 2)
    buf_x: list[np.ndarray] = []
    buf_r: list[np.ndarray] = []
    size = 0
    epoch = 0
    while True:
        emitted = False
        seen = 0
        for i in rng.permutation(len(blocks)):
            x, r = blocks.read(int(i))
            order = np.flatnonzero(~held_out_mask(r, cfg.held_out_fraction, cfg.seed))
            rng.shuffle(order)
            seen += len(order)
            for lo in range(0, len(order), piece):
                take = order[lo : lo + piece]
                buf_x.append(x[take])
                buf_r.append(r[take])
                size += len(take)
                if size >= cap:
                    X, R = np.concatenate(buf_x), np.concatenate(buf_r)
                    buf_x, buf_r = [], []
                    perm = rng.permutation(size)
                    X, R = X[perm], R[perm]
                    emit = ((size - cap // 2) // bs) * bs
                    for j in range(0, emit, bs):
                        yield X[j : j + bs], R[j : j + bs]
                    emitted = emitted or emit > 0
                    buf_x, buf_r = [X[emit:].copy()], [R[emit:].copy()]
                    del X, R
                    size -= emit
            del x, r
        epoch += 1
        if seen == 0:
            break  # every row is held out: nothing to train on, in any epoch
        if not emitted and size:
            # The whole epoch fit in the buffer: emit it now, permuted.
            X, R = np.concatenate(buf_x), np.concatenate(buf_r)
            perm = rng.permutation(size)
            X, R = X[perm], R[perm]
            for j in range(0, size, bs):
                yield X[j : j + bs], R[j : j + bs]
            buf_x, buf_r, size = [], [], 0
        if not cycle and epoch >= cfg.epochs:
            break
    if size:
        X, R = np.concatenate(buf_x), np.concatenate(buf_r)
        perm = rng.permutation(size)
        X, R = X[perm], R[perm]
        for j in range(0, size, bs):
            yield X[j : j + bs], R[j : j + bs]


def _init_sample(blocks: _Blocks, cfg: SAEConfig, rng: np.random.Generator) -> np.ndarray:
    """Up to ``init_rows`` training rows from randomly chosen blocks."""
    got: list[np.ndarray] = []
    n = 0
    for i in rng.permutation(len(blocks)):
        x, r = blocks.read(int(i))
        idx = np.flatnonzero(~held_out_mask(r, cfg.held_out_fraction, cfg.seed))
        if len(idx) > cfg.init_rows - n:
            idx = idx[rng.choice(len(idx), cfg.init_rows - n, replace=False)]
        got.append(x[idx])  # the rows taken, not a copy of the whole block first
        del x
        n += len(idx)
        if n >= cfg.init_rows:
            break
    sample = np.concatenate(got) if got else np.empty((0, blocks.d_in), np.float32)
    if len(sample) == 0:
        raise LlminstrError("no training rows: the row range is empty or every row is held out")
    return sample.astype(np.float64)


def _geometric_median(x: np.ndarray, iters: int = 50) -> np.ndarray:
    """Weiszfeld's iteration, started at the mean."""
    m = x.mean(axis=0)
    for _ in range(iters):
        w = 1.0 / np.maximum(np.linalg.norm(x - m, axis=1), 1e-12)
        new = (w[:, None] * x).sum(axis=0) / w.sum()
        if np.linalg.norm(new - m) <= 1e-9 * (1.0 + np.linalg.norm(m)):
            return np.asarray(new)
        m = new
    return np.asarray(m)


# ---------------------------------------------------------------------------- model
class _TopK:
    """Parameters and optimiser of a TopK SAE (decoder stored as rows: ``W_dec[j]`` is
    feature ``j``'s direction), with hand-written sparse gradients.

    Per step, only two dense products of size ``B x d x n_features`` are computed: the
    encoder pre-activations (to pick the top ``k``) and the sampled product giving the
    gradient of the ``k`` kept activations (a sampled dense-dense product on the CSR
    pattern of the kept latents). The decoder product and the weight gradients are
    ``O(B k d)`` bag sums (``embedding_bag``), never materialising ``(B, k, d)``.
    """

    def __init__(self, d: int, cfg: SAEConfig, b_dec: np.ndarray) -> None:
        import torch

        assert cfg.n_features is not None and cfg.lr is not None and cfg.k is not None
        self.k = cfg.k
        self.n = cfg.n_features
        dev = torch.device(cfg.device)
        gen = torch.Generator().manual_seed(cfg.seed)
        w = torch.randn(cfg.n_features, d, generator=gen, dtype=torch.float32)
        w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.W_dec = w.clone().to(dev)  # (n, d): row j = feature j (= column j of W_dec)
        self.W_enc = w.clone().to(dev)  # (n, d): encoder initialised to the decoder's transpose
        self.b_enc = torch.zeros(cfg.n_features, device=dev)
        self.b_dec = torch.as_tensor(np.asarray(b_dec), dtype=torch.float32).to(dev).clone()
        params = [self.W_enc, self.b_enc, self.W_dec, self.b_dec]
        try:  # the fused kernel is ~10x faster than the default loop on CPU
            self.opt = torch.optim.Adam(params, lr=cfg.lr, betas=(0.9, 0.999), fused=True)
        except (RuntimeError, ValueError):
            self.opt = torch.optim.Adam(params, lr=cfg.lr, betas=(0.9, 0.999))
        self.device = dev

    def select(self, x: Any) -> tuple[Any, Any, Any]:
        """(``x - b_dec``, kept pre-activations ``(B, k)``, their feature indices sorted
        within each row)."""
        import torch

        xc = x - self.b_dec
        pre = torch.addmm(self.b_enc, xc, self.W_enc.T)
        vals, idx = pre.topk(self.k, dim=1, sorted=False)
        idx, order = idx.sort(dim=1)
        return xc, vals.gather(1, order), idx

    def gradients(self, x: Any) -> tuple[float, dict[str, Any]]:
        """Loss ``mean_b ||x_hat_b - x_b||^2`` and its gradients (before the decoder
        projection), by name: ``W_enc``, ``b_enc``, ``W_dec`` (rows), ``b_dec``."""
        import torch
        import torch.nn.functional as F

        with torch.no_grad():
            batch = x.shape[0]
            xc, vals, idx = self.select(x)
            acts = torch.relu(vals)
            recon = F.embedding_bag(idx, self.W_dec, per_sample_weights=acts, mode="sum")
            err = recon + self.b_dec - x
            loss = float((err * err).sum() / batch)
            g = err * (2.0 / batch)  # dL / d x_hat
            flat = idx.reshape(-1)
            # bags per feature: which (row, slot) pairs use it
            # distinct keys (feature, then position): any sort gives one order, fast
            slots = torch.arange(flat.numel(), device=flat.device)
            perm = torch.argsort(flat * flat.numel() + slots)
            counts = torch.bincount(flat, minlength=self.n)
            offsets = torch.cumsum(counts, 0) - counts
            rows = torch.div(perm, self.k, rounding_mode="floor")
            g_dec = F.embedding_bag(
                rows, g, offsets, per_sample_weights=acts.reshape(-1)[perm], mode="sum"
            )
            # d L / d act[b, j] = g[b] . W_dec[idx[b, j]], sampled on the kept pattern
            crow = torch.arange(0, batch * self.k + 1, self.k, device=x.device)
            pattern = _csr(crow, flat, torch.zeros_like(acts.reshape(-1)), (batch, self.n))
            d_act = torch.sparse.sampled_addmm(pattern, g, self.W_dec.T, beta=0.0)
            d_pre = d_act.values().reshape(batch, self.k) * (vals > 0)
            d_flat = d_pre.reshape(-1)
            g_b_enc = torch.zeros(self.n, device=x.device).index_add_(0, flat, d_flat)
            g_enc = F.embedding_bag(rows, xc, offsets, per_sample_weights=d_flat[perm], mode="sum")
            g_b_dec = g.sum(dim=0) - g_b_enc @ self.W_enc
        return loss, {"W_enc": g_enc, "b_enc": g_b_enc, "W_dec": g_dec, "b_dec": g_b_dec}

    def step(self, x: Any) -> float:
        import torch

        loss, grads = self.gradients(x)
        with torch.no_grad():
            g = grads["W_dec"]
            g -= (g * self.W_dec).sum(dim=1, keepdim=True) * self.W_dec
            for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
                getattr(self, name).grad = grads[name]
            self.opt.step()
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return loss

    def encode_topk(self, x: Any) -> tuple[Any, Any]:
        """(values ``(B, k)`` after ReLU, indices ``(B, k)``)."""
        import torch

        with torch.no_grad():
            _, vals, idx = self.select(x)
            return torch.relu(vals), idx

    def decode_sparse(self, vals: Any, idx: Any) -> Any:
        import torch
        import torch.nn.functional as F

        with torch.no_grad():
            recon = F.embedding_bag(idx, self.W_dec, per_sample_weights=vals, mode="sum")
            return recon + self.b_dec


_CSR_WARNED = False


def _csr(crow: Any, col: Any, values: Any, size: tuple[int, int]) -> Any:
    """A CSR tensor; torch's one-time "beta" warning about CSR is silenced."""
    import torch

    global _CSR_WARNED
    if _CSR_WARNED:
        return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        out = torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)
    _CSR_WARNED = True
    return out


# ---------------------------------------------------------------------------- evaluation
class _TopTracker:
    """Running top-``T`` rows per feature, in ``O(n_features * T)`` memory."""

    def __init__(self, n: int, t: int) -> None:
        self.n, self.t = n, t
        self.value = np.full((n, t), -np.inf, dtype=np.float32)
        self.cols = {c: np.full((n, t), -1, dtype=np.int64) for c in ("row", *_TOKEN_COLUMNS)}

    def update(self, feat: np.ndarray, val: np.ndarray, cols: dict[str, np.ndarray]) -> None:
        if self.t == 0 or len(feat) == 0:
            return
        keep = (val > 0) & (val > self.value[feat, -1])
        if not keep.any():
            return
        feat, val = feat[keep], val[keep]
        have = np.isfinite(self.value)
        f_old = np.broadcast_to(np.arange(self.n)[:, None], have.shape)[have]
        f_all = np.concatenate([f_old, feat])
        v_all = np.concatenate([self.value[have], val])
        c_all = {c: np.concatenate([self.cols[c][have], cols[c][keep]]) for c in self.cols}
        order = np.lexsort((c_all["row"], -v_all, f_all))
        f_all = f_all[order]
        first = np.searchsorted(f_all, f_all, side="left")
        rank = np.arange(len(f_all)) - first
        sel = rank < self.t
        f_s, r_s = f_all[sel], rank[sel]
        self.value = np.full((self.n, self.t), -np.inf, dtype=np.float32)
        self.value[f_s, r_s] = v_all[order][sel]
        for c in self.cols:
            arr = np.full((self.n, self.t), -1, dtype=np.int64)
            arr[f_s, r_s] = c_all[c][order][sel]
            self.cols[c] = arr

    def finish(self) -> dict[str, np.ndarray]:
        value = np.where(np.isfinite(self.value), self.value, 0.0).astype(np.float32)
        return {"value": value, **self.cols}


def _evaluate(
    model: _TopK, blocks: _Blocks, cfg: SAEConfig, scale: float, site: str | None
) -> tuple[dict[str, Any], np.ndarray, dict[str, np.ndarray]]:
    import torch

    assert cfg.n_features is not None
    n_feat = cfg.n_features
    counts = np.zeros(n_feat, dtype=np.int64)
    tracker = _TopTracker(n_feat, cfg.top_examples)
    l0_sum = 0
    rows_total = 0
    # FVU accumulators (float64), held-out and training rows separately: [err, sum x, sum x^2, n]
    acc: dict[str, list[Any]] = {
        key: [0.0, np.zeros(blocks.d_in), np.zeros(blocks.d_in), 0] for key in ("held", "train")
    }
    # Rows per evaluation batch: its float64 copies (for the FVU sums) and the encoder's
    # pre-activations are a few times this many rows, on top of the block being read.
    eval_bs = max(cfg.batch_size, 1024)
    for i in range(len(blocks)):
        x_np, rows = blocks.read(i)
        finite = np.isfinite(x_np).all(axis=tuple(range(1, x_np.ndim)))
        if not finite.all():  # held-out rows were never checked in training
            raise _nonfinite_error(site, int(rows[~finite].min()))
        toks = blocks.tokens(i)
        held = held_out_mask(rows, cfg.held_out_fraction, cfg.seed)
        feats, vals_all, pos_all = [], [], []
        for j in range(0, len(rows), eval_bs):
            xb = torch.from_numpy(x_np[j : j + eval_bs]).to(model.device)
            if scale != 1.0:
                xb = xb * scale
            vals, idx = model.encode_topk(xb)
            recon = model.decode_sparse(vals, idx)
            err = (recon - xb).pow(2).sum(dim=1).double().cpu().numpy()
            v_np, i_np = vals.cpu().numpy(), idx.cpu().numpy()
            active = v_np > 0
            l0_sum += int(active.sum())
            counts += np.bincount(i_np[active], minlength=n_feat)
            xd = xb.double().cpu().numpy()
            h = held[j : j + eval_bs]
            for key, m in (("held", h), ("train", ~h)):
                if m.any():
                    a = acc[key]
                    a[0] += float(err[m].sum())
                    a[1] += xd[m].sum(axis=0)
                    a[2] += (xd[m] ** 2).sum(axis=0)
                    a[3] += int(m.sum())
            if cfg.top_examples:
                feats.append(i_np.reshape(-1))
                vals_all.append(v_np.reshape(-1))
                pos_all.append(np.repeat(np.arange(j, j + len(v_np)), v_np.shape[1]))
        rows_total += len(rows)
        if cfg.top_examples and feats:
            pos = np.concatenate(pos_all)
            cols = {"row": rows[pos]}
            for c in _TOKEN_COLUMNS:
                cols[c] = (
                    np.asarray(toks[c])[pos]
                    if toks is not None and c in toks
                    else np.full(len(pos), -1, dtype=np.int64)
                )
            tracker.update(np.concatenate(feats), np.concatenate(vals_all), cols)

    def fvu(a: list[Any]) -> float | None:
        n = a[3]
        if n < 2:
            return None
        total = float((a[2] - a[1] ** 2 / n).sum())
        return a[0] / total if total > 0 else None

    freq = counts / max(rows_total, 1)
    metrics = {
        "fvu": fvu(acc["held"]),
        "fvu_train": fvu(acc["train"]),
        "mean_l0": l0_sum / max(rows_total, 1),
        "dead_fraction": float((counts == 0).mean()),
        "eval_rows": rows_total,
        "held_out_rows": int(acc["held"][3]),
    }
    return metrics, freq.astype(np.float64), tracker.finish()


# ---------------------------------------------------------------------------- training
def train_sae(
    data: Any,
    config: SAEConfig | None = None,
    *,
    site: str | None = None,
    rows: RowsArg = None,
    tokens: Mapping[str, Any] | None = None,
    on_batch: Callable[[np.ndarray], None] | None = None,
    **options: Any,
) -> SAEResult:
    """Train a TopK SAE now and evaluate it.

    ``data`` is a :class:`~llminstr.reader.Capture` (or a capture path) with ``site``
    naming the site (optional when there is only one), or an array of shape
    ``(rows, *features)`` (dask or numpy; ``tokens`` may then give ``token_id``,
    ``sequence`` and ``position`` columns for the top examples). ``rows`` restricts
    training and evaluation to a contiguous range of global row indices. ``options``
    override fields of ``config`` (see :class:`SAEConfig`).

    ``on_batch``, if given, is called with the global row indices of every training
    batch before the step (to audit what the optimiser sees).
    """
    import torch

    base = config if config is not None else SAEConfig()
    if not isinstance(base, SAEConfig):
        raise ConfigError(f"config must be an SAEConfig; got {type(base).__name__}")
    if options:
        merged = {**base.to_dict(), **options}
        base = SAEConfig.from_dict(merged)
    base.check_sizes()
    blocks, site = _blocks_for(data, site, rows, tokens)
    if len(blocks) == 0:
        raise LlminstrError("no rows to train on: the row range is empty")
    cfg = base.resolved(blocks.d_in)
    assert cfg.n_features is not None
    started = time.perf_counter()

    rng_init = np.random.default_rng([cfg.seed, 1])
    sample = _init_sample(blocks, cfg, rng_init)
    if not np.isfinite(sample).all():
        raise _nonfinite_error(site, None)
    scale = 1.0
    if cfg.normalize:
        mean_norm = float(np.linalg.norm(sample, axis=1).mean())
        scale = 1.0 / mean_norm if mean_norm > 0 else 1.0
    sample *= scale
    center = sample.mean(axis=0) if cfg.b_dec_init == "mean" else _geometric_median(sample)
    del sample

    model = _TopK(blocks.d_in, cfg, center)
    rng = np.random.default_rng([cfg.seed, 2])
    steps = 0
    rows_seen = 0
    step_seconds = 0.0
    history: list[float] = []
    window: list[float] = []
    for xb_np, rb in _training_batches(blocks, cfg, rng, cycle=cfg.steps is not None):
        finite = np.isfinite(xb_np).all(axis=tuple(range(1, xb_np.ndim)))
        if not finite.all():
            # One NaN row would turn every weight into NaN without a word.
            raise _nonfinite_error(site, int(rb[~finite].min()))
        if on_batch is not None:
            on_batch(rb)
        xb = torch.from_numpy(np.ascontiguousarray(xb_np)).to(model.device)
        if scale != 1.0:
            xb = xb * scale
        t_step = time.perf_counter()
        window.append(model.step(xb))
        step_seconds += time.perf_counter() - t_step
        steps += 1
        rows_seen += len(rb)
        if len(window) == cfg.log_every:
            history.append(float(np.mean(window)))
            window = []
        if cfg.steps is not None and steps >= cfg.steps:
            break
    if window:
        history.append(float(np.mean(window)))
    train_seconds = time.perf_counter() - started

    metrics, freq, top = _evaluate(model, blocks, cfg, scale, site)
    metrics.update(
        {
            "steps": steps,
            "rows_trained": rows_seen,
            "train_seconds": train_seconds,
            "step_seconds": step_seconds,
            "seconds": time.perf_counter() - started,
            "final_loss": history[-1] if history else None,
        }
    )
    W_dec_rows = model.W_dec.detach().cpu().numpy()
    return SAEResult(
        config=cfg,
        d_in=blocks.d_in,
        input_scale=float(scale),
        W_enc=model.W_enc.detach().cpu().numpy().copy(),
        b_enc=model.b_enc.detach().cpu().numpy().copy(),
        W_dec=np.ascontiguousarray(W_dec_rows.T),
        b_dec=model.b_dec.detach().cpu().numpy().copy(),
        feature_frequency=freq,
        top_row=top["row"],
        top_value=top["value"],
        top_token_id=top["token_id"],
        top_sequence=top["sequence"],
        top_position=top["position"],
        metrics=metrics,
        loss_history=history,
        site=site,
    )


def _sae_task(
    path: str, site: str, rows: tuple[int, int], config: dict[str, Any], created: str
) -> dict[str, Any]:
    from llminstr.reader import open_capture

    # not closed here: an HDF5 handle is shared by every Capture of the path in the process
    cap = open_capture(path)
    if cap.metadata["created"] != created:
        raise FormatError(
            f"{path!r} now holds another capture than the one the SAE was set up on "
            f"(created {cap.metadata['created']}, not {created}); build the analysis again"
        )
    return train_sae(cap, SAEConfig.from_dict(config), site=site, rows=rows).to_dict()


def sae_features(capture: Any, site: str, *, rows: RowsArg = None, **options: Any) -> Any:
    """A ``dask.delayed`` object that trains an SAE on ``site`` and computes to
    :meth:`SAEResult.to_dict` of the result.

    ``capture`` is a :class:`~llminstr.reader.Capture` or a capture path. The options are
    :class:`SAEConfig` fields (or ``config=SAEConfig(...)``); they and the site are checked
    now, training happens when the object is computed. It runs as one task that reads the
    capture chunk by chunk, so the worker running it needs access to the capture's path.
    """
    from dask.base import tokenize
    from dask.delayed import delayed

    from llminstr.reader import Capture, open_capture

    cap = capture if isinstance(capture, Capture) else open_capture(capture)
    if site not in cap.sites:
        raise SiteNotFoundError(
            f"capture {str(cap.path)!r} has no site {site!r}; sites: {cap.sites}"
        )
    base = options.pop("config", None) or SAEConfig()
    if not isinstance(base, SAEConfig):
        raise ConfigError(f"config must be an SAEConfig; got {type(base).__name__}")
    cfg = SAEConfig.from_dict({**base.to_dict(), **options})
    cfg.check_sizes()
    d_in = int(np.prod(cap.site_info(site)["feature_shape"]))
    cfg.resolved(d_in)  # raises now if k > n_features
    # The rows are fixed now, as the statistics' are: a live capture committing more
    # rows before the compute must not change what this object computes to.
    span = resolve_rows(rows, cap.num_rows)
    path = str(Path(cap.path).resolve())
    created = str(cap.metadata["created"])
    key = f"sae-{site}-{tokenize(path, site, span, cfg.to_dict(), created)}"
    return delayed(_sae_task, pure=True)(
        path, site, span, cfg.to_dict(), created, dask_key_name=key
    )


# ---------------------------------------------------------------------------- persistence
#: The largest ``sae.json`` load_sae reads (the loss history is its bulk).
MAX_SAE_META_BYTES = 64 << 20
_FLOAT_ARRAYS = ("W_enc", "b_enc", "W_dec", "b_dec", "top_value")
_INT_ARRAYS = ("top_row", "top_token_id", "top_sequence", "top_position")


def save_sae(result: SAEResult | Mapping[str, Any], directory: str | os.PathLike[str]) -> Path:
    """Write ``result`` to ``directory``: ``sae.safetensors`` (arrays) and ``sae.json``
    (config, metrics, loss history, scale). No pickle is involved. Returns the directory.

    Both files are written under temporary names and then renamed over the old ones, and
    they carry the same random ``save_id``: a save that fails leaves the previous one
    readable, and a pair from two different saves is refused by :func:`load_sae`."""
    import uuid

    from safetensors.numpy import save_file

    res = result if isinstance(result, SAEResult) else SAEResult.from_dict(result)
    save_id = uuid.uuid4().hex
    meta = {
        "format": SAE_FORMAT,
        "format_version": SAE_FORMAT_VERSION,
        "save_id": save_id,
        "site": res.site,
        "d_in": res.d_in,
        "n_features": res.n_features,
        "input_scale": res.input_scale,
        "config": res.config.to_dict(),
        "metrics": res.metrics,
        "loss_history": res.loss_history,
    }
    text = json.dumps(meta, indent=2, allow_nan=True)  # before any file is touched
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: np.ascontiguousarray(v) for k, v in res.arrays().items()}
    tmp_weights = out / f".{WEIGHTS_FILE}.{save_id}.tmp"
    tmp_meta = out / f".{META_FILE}.{save_id}.tmp"
    try:
        save_file(tensors, str(tmp_weights), metadata={"format": SAE_FORMAT, "save_id": save_id})
        tmp_meta.write_text(text)
        os.replace(tmp_weights, out / WEIGHTS_FILE)
        os.replace(tmp_meta, out / META_FILE)
    finally:
        tmp_weights.unlink(missing_ok=True)
        tmp_meta.unlink(missing_ok=True)
    return out


def load_sae(directory: str | os.PathLike[str]) -> SAEResult:
    """Read an SAE written by :func:`save_sae`. The files are untrusted input: anything
    that is not a consistent SAE of this format (shapes, dtypes, finite weights, the
    config against the arrays, both files from one save) raises :class:`FormatError`."""
    from safetensors import safe_open

    src = Path(directory)
    meta_path, weights_path = src / META_FILE, src / WEIGHTS_FILE
    where = str(src)

    def bad(why: str) -> FormatError:
        return FormatError(f"{where!r} is not a valid saved SAE: {why}")

    try:
        with open(meta_path, "rb") as fh:
            raw = fh.read(MAX_SAE_META_BYTES + 1)
    except FileNotFoundError as exc:
        raise FormatError(f"{where!r} is not a saved SAE: {exc}") from None
    except OSError as exc:
        raise bad(f"{META_FILE} cannot be read ({exc})") from None
    if len(raw) > MAX_SAE_META_BYTES:
        raise bad(f"{META_FILE} is larger than {MAX_SAE_META_BYTES} bytes")
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad(f"{META_FILE} is not valid JSON ({exc})") from None
    except RecursionError:
        raise bad(f"{META_FILE} is nested too deeply") from None
    if not isinstance(meta, dict) or meta.get("format") != SAE_FORMAT:
        raise FormatError(f"{str(meta_path)!r} is not an llminstr SAE description")
    if meta.get("format_version") != SAE_FORMAT_VERSION:
        raise FormatError(f"unsupported SAE format version {meta.get('format_version')!r}")
    if not weights_path.is_file():
        raise FormatError(f"{where!r} is not a saved SAE: {WEIGHTS_FILE} is missing")
    try:
        with safe_open(str(weights_path), framework="np") as fh:
            header = fh.metadata() or {}
            arrays = {name: fh.get_tensor(name) for name in fh.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise bad(f"{WEIGHTS_FILE} cannot be read ({type(exc).__name__}: {exc})") from None
    if header.get("save_id") != meta.get("save_id"):
        raise bad(f"{WEIGHTS_FILE} and {META_FILE} come from different saves")

    def integer(key: str) -> int:
        value = meta.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise bad(f"{key} must be a positive integer; got {value!r}")
        return value

    d, n = integer("d_in"), integer("n_features")
    scale = meta.get("input_scale")
    if not (
        isinstance(scale, (int, float))
        and not isinstance(scale, bool)
        and math.isfinite(scale)
        and scale > 0
    ):
        raise bad(f"input_scale must be a finite positive number; got {scale!r}")
    config = meta.get("config")
    if not isinstance(config, dict):
        raise bad(f"config must be a JSON object; got {type(config).__name__}")
    try:
        cfg = SAEConfig.from_dict(config)
        resolved = cfg.resolved(d)
    except (ConfigError, TypeError) as exc:
        raise bad(f"config: {exc}") from None
    if cfg.n_features is not None and cfg.n_features != n:
        raise bad(f"config says n_features {cfg.n_features}; the arrays have {n}")
    assert resolved.k is not None
    if resolved.k > n:
        raise bad(f"config k ({resolved.k}) exceeds n_features ({n})")
    metrics = meta.get("metrics", {})
    history = meta.get("loss_history", [])
    site = meta.get("site")
    if not isinstance(metrics, dict):
        raise bad(f"metrics must be a JSON object; got {type(metrics).__name__}")
    if not isinstance(history, list) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in history
    ):
        raise bad("loss_history must be a list of numbers")
    if site is not None and not isinstance(site, str):
        raise bad(f"site must be a string or null; got {site!r}")

    top = cfg.top_examples
    expected = {
        "W_enc": (n, d),
        "b_enc": (n,),
        "W_dec": (d, n),
        "b_dec": (d,),
        "feature_frequency": (n,),
        **{f"top_{c}": (n, top) for c in TOP_COLUMNS},
    }
    if set(arrays) != set(expected):
        missing, extra = set(expected) - set(arrays), set(arrays) - set(expected)
        raise bad(f"{WEIGHTS_FILE} lacks arrays {sorted(missing)} or has others {sorted(extra)}")
    for name, shape in expected.items():
        a = arrays[name]
        if a.shape != shape:
            raise FormatError(f"SAE array {name} has shape {a.shape}; expected {shape}")
        kind = np.dtype(np.int64 if name in _INT_ARRAYS else np.float32)
        if not (a.dtype.kind == "f" if name == "feature_frequency" else a.dtype == kind):
            raise bad(f"array {name} has dtype {a.dtype}; expected {kind}")
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise bad(f"array {name} holds NaN or inf")
    return SAEResult(
        config=cfg,
        d_in=d,
        input_scale=float(scale),
        W_enc=arrays["W_enc"],
        b_enc=arrays["b_enc"],
        W_dec=arrays["W_dec"],
        b_dec=arrays["b_dec"],
        feature_frequency=arrays["feature_frequency"],
        top_row=arrays["top_row"],
        top_value=arrays["top_value"],
        top_token_id=arrays["top_token_id"],
        top_sequence=arrays["top_sequence"],
        top_position=arrays["top_position"],
        metrics=dict(metrics),
        loss_history=[float(v) for v in history],
        site=site,
    )
