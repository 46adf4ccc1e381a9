"""Whole-capture tools: size summary, conformance check, Zarr <-> HDF5 conversion."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from llminstr.errors import (
    CaptureLockedError,
    ConfigError,
    CorruptChunkError,
    FormatError,
    LlminstrError,
    NotACaptureError,
)
from llminstr.format import ACTIVATIONS_GROUP, TOKENS_GROUP, SiteInfo
from llminstr.reader import Capture, open_capture, writer_live


def stored_bytes(capture: Capture, key: str) -> int:
    """Bytes the array ``key`` (e.g. ``activations/<site>``) occupies on disk."""
    if capture.backend == "zarr":
        root = capture.path / key / "c"
        total = 0
        for dirpath, _dirs, files in os.walk(root):
            total += sum(
                os.path.getsize(os.path.join(dirpath, f)) for f in files if not f.startswith(".")
            )
        return total
    from llminstr.reader import _H5_LOCK, _h5_file

    with _H5_LOCK:  # the reader's handle: no second handle beside its refreshes
        ds = _h5_file(str(capture.path))[key]
        try:
            return int(ds.id.get_storage_size())
        finally:
            del ds


def summary(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Status, rows, and per-site dtype, shape, raw and stored bytes of a capture."""
    cap = open_capture(path)
    sites = []
    for name in cap.sites:
        info = cap.site_info(name)
        row_bytes = int(np.prod(info["feature_shape"])) * np.dtype(info["storage_dtype"]).itemsize
        raw = row_bytes * cap.num_rows
        stored = stored_bytes(cap, f"{ACTIVATIONS_GROUP}/{name}")
        sites.append(
            {
                "name": name,
                "kind": info["kind"],
                "layer": info["layer"],
                "dtype": info["logical_dtype"],
                "feature_shape": info["feature_shape"],
                "raw_bytes": raw,
                "stored_bytes": stored,
                "compression_ratio": raw / stored if stored else None,
            }
        )
    token_stored = sum(stored_bytes(cap, f"{TOKENS_GROUP}/{c}") for c in cap.token_columns)
    raw_total = sum(s["raw_bytes"] for s in sites) + 8 * cap.num_rows * len(cap.token_columns)
    stored_total = sum(s["stored_bytes"] for s in sites) + token_stored
    meta = cap.metadata
    return {
        "path": str(cap.path),
        "backend": cap.backend,
        "format_version": cap.format_version,
        "status": cap.status,
        "writer_live": writer_live(cap.path) if cap.status == "in_progress" else None,
        "updated": meta.get("updated"),
        "rows": cap.num_rows,
        "chunk_rows": cap.chunk_rows,
        "compression": meta["compression"],
        "created": meta["created"],
        "closed": meta.get("closed"),
        "error": meta.get("error"),
        "model": {k: v for k, v in meta.get("model", {}).items() if k != "config"},
        "sites": sites,
        "raw_bytes": raw_total,
        "stored_bytes": stored_total,
        "compression_ratio": raw_total / stored_total if stored_total else None,
    }


def validate(path: str | os.PathLike[str]) -> list[str]:
    """Full conformance check: schema and layout (on open), every committed chunk decoded
    with sizes and checksums verified, and the token columns' invariants. Returns the list
    of problems found; empty means the capture conforms."""
    try:
        cap = open_capture(path)
    except LlminstrError as exc:
        return [str(exc)]
    problems = cap.verify()
    if problems:
        return problems
    n = cap.num_rows
    step = 1 << 20
    last_step = -1
    for start in range(0, n, step):
        tok = cap.token_table(start, min(n, start + step))
        if len(tok["token_id"]) and tok["sequence"].min() < 0:
            problems.append(f"rows {start}+: negative sequence ids")
        if len(tok["token_id"]) and tok["position"].min() < -1:
            problems.append(f"rows {start}+: positions below -1")
        steps = tok["step"]
        if len(steps):
            if steps[0] < last_step or np.any(np.diff(steps) < 0):
                problems.append(f"rows {start}+: forward-step column decreases")
            last_step = int(steps[-1])
    return problems


def _same_location(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Whether two paths name the same file or directory (or one lies inside the other)."""
    ra, rb = Path(os.path.realpath(a)), Path(os.path.realpath(b))
    if ra == rb or ra in rb.parents or rb in ra.parents:
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    backend: str | None = None,
    compression: str | None = "keep",
    overwrite: bool = False,
    rows_per_block: int = 1 << 16,
    on_progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Copy a capture to another backend (or codec) with identical logical content:
    sites, site attributes, token columns, values bit for bit, model and capture config.
    The status is kept (an ``in_progress`` source is written as ``aborted``).
    ``compression`` is ``"keep"`` (the source's codec), ``"lz4"``, ``"zstd"`` or ``None``."""
    from llminstr.storage.writer import CaptureWriter

    if _same_location(src, dst):
        # overwrite=True would delete the source before a single row was copied
        raise ConfigError(
            f"convert: the destination {str(dst)!r} is the source {str(src)!r}, or contains "
            "it, or lies inside it"
        )
    cap = open_capture(src)
    meta = cap.metadata
    infos = []
    for name in cap.sites:
        i = cap.site_info(name)
        infos.append(
            SiteInfo(
                name=name,
                feature_shape=tuple(i["feature_shape"]),
                dtype=i["logical_dtype"],
                kind=i["kind"],
                layer=i["layer"],
                module_path=i["module_path"],
                module_class=i["module_class"],
                tuple_index=i["tuple_index"],
            )
        )
    comp = meta["compression"]
    cname = comp["cname"] if compression == "keep" else compression
    extra = {
        c: cap.token_info(c).get("description", "")
        for c in cap.token_columns
        if c not in ("token_id", "sequence", "position", "step")
    }
    writer = CaptureWriter(
        dst,
        infos,
        compression=cname,  # type: ignore[arg-type]
        compression_level=comp["clevel"] if cname == comp["cname"] else None,
        checksum=comp["checksum"] is not None or cap.backend == "hdf5",
        chunk_rows=cap.chunk_rows,
        # room for every array's chunk buffer, frames in flight and a copy block of rows
        # (a one-site capture of 64 MiB chunks needs more than 4x its site's chunk)
        memory_budget_bytes=max(
            1 << 28,
            8 * (sum(s.row_bytes for s in infos) + 8 * len(cap.token_columns)) * cap.chunk_rows,
        ),
        backend=backend,  # type: ignore[arg-type]
        overwrite=overwrite,
        model=meta.get("model"),
        capture_config=meta.get("capture_config"),
        extra_token_columns=extra,
    )

    def copy_rows(start: int, stop: int) -> None:
        tokens = cap.token_table(start, stop)
        acts = {
            name: cap._source(f"{ACTIVATIONS_GROUP}/{name}", name).read_rows(start, stop)
            for name in cap.sites
        }
        writer.append(tokens, acts)

    try:
        block = max(cap.chunk_rows, rows_per_block // cap.chunk_rows * cap.chunk_rows)
        for start in range(0, cap.num_rows, block):
            stop = min(cap.num_rows, start + block)
            try:
                copy_rows(start, stop)
            except CorruptChunkError:
                # Keep every row before the damaged chunk: redo this block chunk by chunk
                # (the failed read appended nothing); the damaged chunk fails again and
                # ends the copy. (A chunk that reads the second time, e.g. one a live
                # writer replaced meanwhile, is copied, and the copy goes on.)
                for lo in range(start, stop, cap.chunk_rows):
                    copy_rows(lo, min(stop, lo + cap.chunk_rows))
            if on_progress is not None:
                on_progress(stop, cap.num_rows)
    except BaseException as exc:
        writer.abort(f"conversion failed: {exc!r}")
        raise
    if cap.status == "complete":
        writer.close("complete")
    else:
        writer.close("aborted", meta.get("error") or f"source capture was {cap.status}")
    cap.close()
    return Path(dst)


# --------------------------------------------------------------------------- repair
def _lookup3(data: bytes) -> int:
    """Bob Jenkins' lookup3 ``hashlittle`` with initial value 0: the checksum of HDF5
    superblocks of versions 2 and 3 (``H5_checksum_lookup3``)."""
    m = 0xFFFFFFFF

    def rot(x: int, k: int) -> int:
        return ((x << k) | (x >> (32 - k))) & m

    def add_words(v: list[int], block: bytes) -> None:
        for w in range(3):
            v[w] = (v[w] + int.from_bytes(block[4 * w : 4 * w + 4], "little")) & m

    n = len(data)
    v = [(0xDEADBEEF + n) & m] * 3  # a, b, c
    i = 0
    while n - i > 12:
        add_words(v, data[i : i + 12])
        # mix(): x -= z; x ^= rot(z, r); z += y
        for x, z, y, r in ((0, 2, 1, 4), (1, 0, 2, 6), (2, 1, 0, 8), (0, 2, 1, 16),
                           (1, 0, 2, 19), (2, 1, 0, 4)):  # fmt: skip
            v[x] = ((v[x] - v[z]) & m) ^ rot(v[z], r)
            v[z] = (v[z] + v[y]) & m
        i += 12
    if n == i:
        return v[2]
    add_words(v, data[i:].ljust(12, b"\0"))
    # final(): x ^= y; x -= rot(y, r)
    for x, y, r in ((2, 1, 14), (0, 2, 11), (1, 0, 25), (2, 1, 16), (0, 2, 4), (1, 0, 14),
                    (2, 1, 24)):  # fmt: skip
        v[x] = ((v[x] ^ v[y]) - rot(v[y], r)) & m
    return v[2]


#: Superblock status flags (HDF5 file format, version 3): bit 0 "open for writing", bit 2
#: "open for SWMR writing".
_OPEN_FOR_WRITE, _OPEN_FOR_SWMR = 0x01, 0x04


def _patch_superblock(fd: int, size: int, flags: int, checksum: bytes) -> None:
    """Write a version 2/3 superblock's flags byte and its checksum (at ``size``)."""
    os.pwrite(fd, bytes([flags]), 11)
    os.pwrite(fd, checksum, size)
    os.fsync(fd)


def repair(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Clear the "open for writing" mark that an HDF5 capture keeps when the program
    writing it without SWMR was killed (llminstr's writer is such a program for a few
    milliseconds at close, SPEC section 7.3): HDF5 then refuses every read-only open. The
    same as ``h5clear -s``, limited to that case: the file must be a capture's HDF5 file
    with a version 2 or 3 superblock whose checksum holds, marked open for writing without
    SWMR, and no program may hold it (HDF5's file lock) or write it (the capture's lock
    file). Only the flags byte and the superblock checksum change. A file marked by a
    crashed SWMR writer needs no repair (SWMR readers open it) and is left alone.

    Returns ``{"path", "repaired", "flags_before", "status", "rows"}``."""
    import fcntl

    from llminstr.reader import HDF5_SIGNATURE, _open_regular, detect_backend
    from llminstr.storage.writer import _PathLock

    where = repr(str(path))
    if detect_backend(Path(path)) != "hdf5":
        raise ConfigError(f"{where} is a Zarr capture: only HDF5 captures can need a repair")
    lock = _PathLock(Path(path))  # no llminstr writer is live (CaptureLockedError if one is)
    try:
        _open_regular(path, where, ConfigError).close()  # not a FIFO or a device
        fd = os.open(path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
        try:
            try:  # HDF5 holds an exclusive flock on a file it has open for writing
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise CaptureLockedError(
                    f"{where} is open in another program (HDF5's file lock is held); close "
                    "it there first; nothing was changed"
                ) from None
            head = os.pread(fd, 64, 0)
            if head[:8] != HDF5_SIGNATURE or len(head) < 12 or head[8] not in (2, 3):
                raise FormatError(
                    f"{where} has no HDF5 superblock of version 2 or 3 at offset 0; "
                    "nothing was changed"
                )
            size = 12 + 4 * head[9]  # then the 4-byte checksum
            if head[9] not in (2, 4, 8) or len(head) < size + 4:
                raise FormatError(f"{where} has a superblock this repair does not know")
            if _lookup3(head[:size]) != int.from_bytes(head[size : size + 4], "little"):
                raise FormatError(
                    f"{where}: the superblock's checksum does not match; nothing was changed"
                )
            flags = head[11]
            repaired = bool(flags & _OPEN_FOR_WRITE) and not flags & _OPEN_FOR_SWMR
            if repaired:
                fixed = bytearray(head[:size])
                fixed[11] = flags & ~_OPEN_FOR_WRITE
                _patch_superblock(fd, size, fixed[11], _lookup3(bytes(fixed)).to_bytes(4, "little"))
        finally:
            os.close(fd)  # (drops the flock)
        try:
            cap = open_capture(path)
        except NotACaptureError as exc:
            if repaired:  # only a capture may be changed: put the two fields back
                fd = os.open(path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
                try:
                    _patch_superblock(fd, size, flags, head[size : size + 4])
                finally:
                    os.close(fd)
            raise NotACaptureError(
                f"{where} does not open as an llminstr capture once unmarked ({exc}); "
                "nothing was changed"
            ) from exc
    finally:
        lock.release()
    try:
        return {
            "path": str(path),
            "repaired": repaired,
            "flags_before": flags,
            "status": cap.status,
            "rows": cap.num_rows,
        }
    finally:
        cap.close()
