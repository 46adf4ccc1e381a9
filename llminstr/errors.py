"""Exceptions raised by llminstr.

Every exception derives from :class:`LlminstrError`. Each leaf also derives from the
builtin that matches its meaning (``ValueError``, ``FileNotFoundError``, ...), so a
caller may catch either the llminstr class or the builtin one.

Messages say what was expected, what was found and, where there is one, what to do.
"""

from __future__ import annotations


class LlminstrError(Exception):
    """Root of every error raised by llminstr."""


class ConfigError(LlminstrError, ValueError):
    """An :class:`~llminstr.InstrumentationConfig` field (or another option) is invalid."""


class NotACaptureError(LlminstrError, ValueError):
    """The path exists but does not hold an llminstr capture."""


class CaptureNotFoundError(LlminstrError, FileNotFoundError):
    """The path does not exist."""


class UnsupportedVersionError(LlminstrError, ValueError):
    """The capture's format major version is not one this reader knows."""


class FormatError(LlminstrError, ValueError):
    """Metadata or shapes in a capture are inconsistent with the format specification."""


class CorruptChunkError(LlminstrError, OSError):
    """A stored chunk could not be decoded (bad frame, checksum mismatch, wrong size)."""

    def __init__(self, site: str, chunk: int, detail: str) -> None:
        self.site = site
        self.chunk = chunk
        super().__init__(f"chunk {chunk} of site {site!r} is corrupt: {detail}")


class SiteNotFoundError(LlminstrError, KeyError):
    """A site name that the capture (or the model) does not have."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class CaptureExistsError(LlminstrError, FileExistsError):
    """A capture already exists at the path and overwriting was not asked for."""


class CaptureLockedError(LlminstrError, BlockingIOError):
    """Another writer holds the capture open."""


class WriterClosedError(LlminstrError, RuntimeError):
    """The writer was closed (or failed) and accepts no more rows."""


class WriterFailedError(LlminstrError, RuntimeError):
    """A worker thread of the writer failed; the original exception is the cause."""


class NoSitesFoundError(LlminstrError, LookupError):
    """No module of the model matched the requested granularity."""


class CaptureStateError(LlminstrError, RuntimeError):
    """A call that does not fit the framework's state (not instrumented, capture already active)."""
