"""Chunk frames: Blosc encoding/decoding and the CRC32C trailer, shared by both backends.

A stored chunk is always a full chunk (``chunk_rows`` rows, the tail padded with zeros),
encoded as the Zarr v3 codec chain ``bytes(little) -> [blosc] -> [crc32c]`` would encode it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numcodecs
import numcodecs.blosc
import numpy as np
from crc32c import crc32c

from llminstr.format import CodecConfig

# Blosc's own threads make numcodecs hold the GIL and give run-to-run varying bytes; we
# parallelise across chunks instead, with the GIL released inside each call.
numcodecs.blosc.use_threads = False

CRC_BYTES = 4
BLOSC_OVERHEAD = 16  # Blosc1 header; an incompressible frame is at most raw + 16 bytes


class ChunkCodec:
    """Encodes one full chunk (a C-contiguous numpy array) into the parts of a frame."""

    def __init__(self, config: CodecConfig) -> None:
        self.config = config
        self._blosc = (
            numcodecs.Blosc(
                cname=config.cname,
                clevel=int(config.clevel or 1),
                shuffle=numcodecs.Blosc.SHUFFLE,
                blocksize=0,
            )
            if config.cname is not None
            else None
        )

    def frame_bound(self, raw_bytes: int) -> int:
        """Largest frame (in bytes) encoding ``raw_bytes`` may produce, beyond the raw buffer."""
        extra = CRC_BYTES if self.config.checksum else 0
        if self._blosc is not None:
            return raw_bytes + BLOSC_OVERHEAD + extra
        return extra

    def encode(self, chunk: np.ndarray) -> list[bytes | memoryview]:
        """Return the frame as parts to be written back to back (no concatenation copy)."""
        body: bytes | memoryview
        if self._blosc is not None:
            body = self._blosc.encode(chunk)
        else:
            raw: Any = np.ascontiguousarray(chunk).view(np.uint8).reshape(-1)
            body = memoryview(raw)
        if self.config.checksum:
            return [body, crc32c(body).to_bytes(CRC_BYTES, "little")]
        return [body]


def decode_frame(
    frame: bytes | memoryview,
    *,
    cname: str | None,
    checksum: bool,
    dtype: np.dtype,
    chunk_shape: Sequence[int],
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Decode one stored chunk, verifying checksum and size, into a new array or into
    ``out`` (C-contiguous, ``chunk_shape``, ``dtype``; the caller checks). Raises
    ``ValueError`` on damage."""
    view = memoryview(frame)
    if checksum:
        if len(view) < CRC_BYTES:
            raise ValueError(f"frame of {len(view)} bytes is too short to hold a CRC32C")
        body, trailer = view[:-CRC_BYTES], view[-CRC_BYTES:]
        expected = int.from_bytes(trailer, "little")
        actual = crc32c(body)
        if actual != expected:
            raise ValueError(f"CRC32C mismatch (stored {expected:#010x}, computed {actual:#010x})")
        view = body
    expected_bytes = math.prod(int(d) for d in chunk_shape) * dtype.itemsize
    if cname is not None:
        if len(view) < BLOSC_OVERHEAD:
            raise ValueError(f"Blosc frame of {len(view)} bytes is shorter than its header")
        # Blosc1 header: version, versionlz, flags, typesize (1 byte each), then
        # nbytes, blocksize, cbytes (uint32 little endian).
        nbytes = int.from_bytes(view[4:8], "little")
        cbytes = int.from_bytes(view[12:16], "little")
        if cbytes != len(view):
            raise ValueError(
                f"Blosc header says {cbytes} compressed bytes; the frame has {len(view)}"
            )
        if nbytes != expected_bytes:
            raise ValueError(
                f"Blosc frame decodes to {nbytes} bytes; a chunk of shape {tuple(chunk_shape)} "
                f"and dtype {dtype} needs {expected_bytes}"
            )
        if out is None:
            out = np.empty(tuple(chunk_shape), dtype=dtype)
        numcodecs.blosc.decompress(view, out)
        return out
    if len(view) != expected_bytes:
        raise ValueError(
            f"raw chunk holds {len(view)} bytes; a chunk of shape {tuple(chunk_shape)} "
            f"and dtype {dtype} needs {expected_bytes}"
        )
    raw = np.frombuffer(view, dtype=dtype).reshape(tuple(chunk_shape))
    if out is None:
        return raw.copy()
    np.copyto(out, raw)
    return out
