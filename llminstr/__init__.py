"""llminstr: record the internal activations of PyTorch language models, and analyse them.

``import llminstr`` is cheap: torch, zarr, h5py and dask load when first used.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from llminstr.config import HookGranularity, InstrumentationConfig
from llminstr.errors import (
    CaptureExistsError,
    CaptureLockedError,
    CaptureNotFoundError,
    CaptureStateError,
    ConfigError,
    CorruptChunkError,
    FormatError,
    LlminstrError,
    NoSitesFoundError,
    NotACaptureError,
    SiteNotFoundError,
    UnsupportedVersionError,
    WriterClosedError,
    WriterFailedError,
)

__version__ = "0.1.0"

_LAZY = {
    "InstrumentationFramework": "llminstr.framework",
    "open_capture": "llminstr.reader",
    "Capture": "llminstr.reader",
    "CaptureWriter": "llminstr.storage.writer",
    "SiteInfo": "llminstr.format",
    "analyze_activations": "llminstr.analysis",
    "compute": "llminstr.analysis",
}

if TYPE_CHECKING:
    from llminstr.analysis import analyze_activations, compute
    from llminstr.format import SiteInfo
    from llminstr.framework import InstrumentationFramework
    from llminstr.reader import Capture, open_capture
    from llminstr.storage.writer import CaptureWriter


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'llminstr' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "Capture",
    "CaptureExistsError",
    "CaptureLockedError",
    "CaptureNotFoundError",
    "CaptureStateError",
    "CaptureWriter",
    "ConfigError",
    "CorruptChunkError",
    "FormatError",
    "HookGranularity",
    "InstrumentationConfig",
    "InstrumentationFramework",
    "LlminstrError",
    "NoSitesFoundError",
    "NotACaptureError",
    "SiteInfo",
    "SiteNotFoundError",
    "UnsupportedVersionError",
    "WriterClosedError",
    "WriterFailedError",
    "__version__",
    "analyze_activations",
    "compute",
    "open_capture",
]
