"""Capture configuration: the four fields of the API document plus validated extras."""

from __future__ import annotations

import contextlib
import enum
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from llminstr.errors import ConfigError

COMPRESSION_ALGORITHMS: tuple[str | None, ...] = ("lz4", "zstd", None)
STORAGE_DTYPES: tuple[str | None, ...] = (None, "float32", "float16", "bfloat16")
BACKENDS: tuple[str | None, ...] = (None, "zarr", "hdf5")
PADDING_POLICIES: tuple[str, ...] = ("skip", "keep")
#: Bounds of ``max_memory_gb``: a kilobyte (smaller budgets round to nothing) to a petabyte.
MIN_MEMORY_GB, MAX_MEMORY_GB = 1e-6, 1e6


class HookGranularity(enum.Enum):
    """Which components of each block are captured.

    * ``ALL``: the attention output, the FFN (MLP / MoE) output and the residual stream
      after each block (the block's output hidden states).
    * ``ATTENTION_ONLY``: the attention module's output only.
    * ``FFN_ONLY``: the FFN module's output only.

    ``docs/architectures.md`` lists the exact module each member maps to per architecture.
    """

    ALL = "all"
    ATTENTION_ONLY = "attention_only"
    FFN_ONLY = "ffn_only"


def check_torch_device(device: Any, label: str) -> None:
    """Refuse a device string torch cannot parse or this machine cannot use (CUDA absent,
    or a CUDA index beyond the devices present), naming it as ``label``. Imports torch."""
    import torch

    if not isinstance(device, str) or not device:
        raise ConfigError(f"{label} must be a torch device string; got {device!r}")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"{label} {device!r} is not a torch device: {exc}") from None
    if dev.type == "meta":
        raise ConfigError(f"{label} {device!r}: meta tensors hold no data to compute with")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"{label} {device!r}: CUDA is not available to this torch build ({torch.__version__})"
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(
            f"{label} {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
        )


def _choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        shown = ", ".join(repr(a) for a in allowed)
        raise ConfigError(f"{name} must be one of {shown}; got {value!r}")


def _positive_number(
    name: str, value: Any, *, allow_none: bool = False, low: float = 0.0, high: float = math.inf
) -> float | None:
    """``value`` as a float, above 0 and within ``[low, high]`` (any real number type:
    Python's or numpy's)."""
    if value is None and allow_none:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name} must be a positive number; got {value!r}")
    number = float(value)
    if not number > 0:
        raise ConfigError(f"{name} must be a positive number; got {value!r}")
    if not math.isfinite(number):
        raise ConfigError(f"{name} must be a finite positive number; got {value!r}")
    if not low <= number <= high:
        raise ConfigError(f"{name} must be between {low:g} and {high:g}; got {value!r}")
    return number


def _integer(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


@dataclass(frozen=True)
class InstrumentationConfig:
    """What to capture and how to store it.

    The first four fields are those of the API document and keep their meaning:

    granularity
        Which components are captured (:class:`HookGranularity`).
    compression_algorithm
        ``"lz4"``, ``"zstd"`` (Blosc with byte shuffle) or ``None`` (raw chunks).
    target_throughput_gbps
        The capture rate, in GB/s of raw activations, the pipeline is sized for: it sets
        the number of encoder threads, and the achieved rate is reported against it in
        ``last_capture_stats`` with a warning when missed. It never changes what is stored.
    max_memory_gb
        Host memory (GB, 1e9 bytes) that CUDA staging arenas, chunk assemblers and the encode
        queue may hold together. When it is spent, hooks block until the writer catches up.
        (The encode queue itself holds at most one full chunk per array plus two per
        encoder thread; hooks also wait when it is full.)

    The remaining fields are optional:

    layers
        Layer indices to capture (``None``: every layer). Negative indices count from the end.
    module_names
        Explicit module paths to capture; overrides the granularity and the registry.
    chunk_rows
        Rows per storage chunk (``None``: chosen from the row size and the memory budget;
        the chosen value is recorded in the capture).
    compression_level
        Blosc level 1-9 (``None``: 5 for lz4, 1 for zstd).
    storage_dtype
        ``None`` keeps each tensor's dtype; ``"float32"``, ``"float16"`` or ``"bfloat16"``
        casts before storing (the cast is recorded as the site's logical dtype).
    padding
        ``"skip"`` (default) stores only tokens whose attention mask is 1; ``"keep"``
        stores every position, padding included (with ``is_padding`` recorded).
    backend
        ``"zarr"`` or ``"hdf5"``; ``None`` picks by the output path's suffix.
    checksum
        Append a CRC32C checksum to every Zarr chunk (readers verify it).
    commit_interval_s
        Publish committed rows at least this often during a long capture.
    encoder_threads
        Threads compressing chunks (``None``: from ``target_throughput_gbps`` and the cores).
    progress
        Show a progress line on a terminal (``None``: only when stderr is a TTY).
    """

    granularity: HookGranularity = HookGranularity.ALL
    compression_algorithm: Literal["lz4", "zstd"] | None = "lz4"
    target_throughput_gbps: float = 2.0
    max_memory_gb: float = 4.0
    layers: tuple[int, ...] | None = None
    module_names: tuple[str, ...] | None = None
    chunk_rows: int | None = None
    compression_level: int | None = None
    storage_dtype: Literal["float32", "float16", "bfloat16"] | None = None
    padding: Literal["skip", "keep"] = "skip"
    backend: Literal["zarr", "hdf5"] | None = None
    checksum: bool = True
    commit_interval_s: float = 10.0
    encoder_threads: int | None = None
    progress: bool | None = None

    def __post_init__(self) -> None:
        if isinstance(self.granularity, str):
            with contextlib.suppress(KeyError):  # an unknown name fails the check below
                object.__setattr__(self, "granularity", HookGranularity[self.granularity.upper()])
        if not isinstance(self.granularity, HookGranularity):
            raise ConfigError(
                "granularity must be a HookGranularity (ALL, ATTENTION_ONLY, FFN_ONLY); "
                f"got {self.granularity!r}"
            )
        _choice("compression_algorithm", self.compression_algorithm, COMPRESSION_ALGORITHMS)
        object.__setattr__(
            self,
            "target_throughput_gbps",
            _positive_number("target_throughput_gbps", self.target_throughput_gbps),
        )
        object.__setattr__(
            self,
            "max_memory_gb",
            _positive_number(
                "max_memory_gb", self.max_memory_gb, low=MIN_MEMORY_GB, high=MAX_MEMORY_GB
            ),
        )
        if self.layers is not None:
            if _integer(self.layers):
                raise ConfigError(
                    "layers must be a sequence of layer indices, not one integer; "
                    f"got {self.layers!r} (write ({self.layers!r},))"
                )
            try:
                layers = tuple(self.layers)
            except TypeError:
                layers = ()
            if not layers or not all(_integer(i) for i in layers):
                raise ConfigError(
                    f"layers must be a non-empty sequence of integers or None; got {self.layers!r}"
                )
            object.__setattr__(self, "layers", tuple(int(i) for i in layers))
        if self.module_names is not None:
            if isinstance(self.module_names, str):
                raise ConfigError(
                    "module_names must be a sequence of module paths, not one string; "
                    f"got {self.module_names!r} (write ({self.module_names!r},))"
                )
            names = tuple(self.module_names)
            if not names or not all(isinstance(n, str) and n for n in names):
                raise ConfigError(
                    "module_names must be a non-empty sequence of non-empty strings or None; "
                    f"got {self.module_names!r}"
                )
            if len(set(names)) != len(names):
                raise ConfigError(f"module_names has duplicates: {names!r}")
            object.__setattr__(self, "module_names", names)
        if self.chunk_rows is not None and (
            isinstance(self.chunk_rows, bool)
            or not isinstance(self.chunk_rows, int)
            or not 1 <= self.chunk_rows <= 2**24
        ):
            raise ConfigError(
                f"chunk_rows must be an integer in [1, 16777216] or None; got {self.chunk_rows!r}"
            )
        if self.compression_level is not None and (
            isinstance(self.compression_level, bool)
            or not isinstance(self.compression_level, int)
            or not 1 <= self.compression_level <= 9
        ):
            raise ConfigError(
                f"compression_level must be an integer in [1, 9] or None; got {self.compression_level!r}"
            )
        if self.compression_level is not None and self.compression_algorithm is None:
            raise ConfigError(
                f"compression_level={self.compression_level!r} was given with "
                "compression_algorithm=None: there is no codec to set the level of"
            )
        _choice("storage_dtype", self.storage_dtype, STORAGE_DTYPES)
        _choice("padding", self.padding, PADDING_POLICIES)
        _choice("backend", self.backend, BACKENDS)
        if not isinstance(self.checksum, bool):
            raise ConfigError(f"checksum must be True or False; got {self.checksum!r}")
        object.__setattr__(
            self, "commit_interval_s", _positive_number("commit_interval_s", self.commit_interval_s)
        )
        if self.encoder_threads is not None and (
            isinstance(self.encoder_threads, bool)
            or not isinstance(self.encoder_threads, int)
            or not 1 <= self.encoder_threads <= 256
        ):
            raise ConfigError(
                f"encoder_threads must be an integer in [1, 256] or None; got {self.encoder_threads!r}"
            )
        if self.progress is not None and not isinstance(self.progress, bool):
            raise ConfigError(f"progress must be True, False or None; got {self.progress!r}")

    @property
    def max_memory_bytes(self) -> int:
        return int(self.max_memory_gb * 1e9)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form, as recorded in a capture's ``capture_config``."""
        return {
            "granularity": self.granularity.name,
            "compression_algorithm": self.compression_algorithm,
            "target_throughput_gbps": float(self.target_throughput_gbps),
            "max_memory_gb": float(self.max_memory_gb),
            "layers": list(self.layers) if self.layers is not None else None,
            "module_names": list(self.module_names) if self.module_names is not None else None,
            "chunk_rows": self.chunk_rows,
            "compression_level": self.compression_level,
            "storage_dtype": self.storage_dtype,
            "padding": self.padding,
            "backend": self.backend,
            "checksum": self.checksum,
            "commit_interval_s": float(self.commit_interval_s),
            "encoder_threads": self.encoder_threads,
        }
