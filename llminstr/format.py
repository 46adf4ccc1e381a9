"""Constants and metadata documents of the llminstr capture format, version 1.

``format_spec/SPEC.md`` is the normative description; this module is one implementation
of it. Metadata documents are plain JSON objects: :func:`root_document` and
:func:`site_document` build them, :func:`validate_root` and :func:`validate_site` check
them against the JSON Schemas shipped with the package (identical copies of
``format_spec/schema/``).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from importlib import resources
from typing import Any

import numpy as np

from llminstr.errors import ConfigError, FormatError, UnsupportedVersionError

FORMAT_NAME = "llminstr-capture"
FORMAT_VERSION = "1.0"
FORMAT_MAJOR = 1
ATTR_KEY = "llminstr"  # attribute name holding the metadata document, in both backends

TOKENS_GROUP = "tokens"
ACTIVATIONS_GROUP = "activations"
COMMIT_DATASET = "llminstr_commit"  # HDF5 only: int64[4] live commit record

STATUSES = ("in_progress", "complete", "aborted")
STATUS_CODES = {"in_progress": 0, "complete": 1, "aborted": 2}
KINDS = ("attention", "ffn", "residual", "other")

# Required token columns, in order; all int64.
TOKEN_COLUMNS: tuple[tuple[str, str], ...] = (
    ("token_id", "vocabulary id of the token (-1 when unknown)"),
    ("sequence", "sequence id, unique within the capture"),
    ("position", "0-based position of the token in its sequence"),
    ("step", "0-based index of the forward pass that produced the row"),
)
TOKEN_DTYPE = "int64"

# logical dtype -> stored (Zarr/HDF5) dtype
STORAGE_DTYPE = {"float32": "float32", "float16": "float16", "bfloat16": "uint16"}
LOGICAL_DTYPES = tuple(STORAGE_DTYPE)
CODEC_NAMES = ("lz4", "zstd", None)
DEFAULT_LEVEL = {"lz4": 5, "zstd": 1}

MAX_FEATURE_ELEMENTS = 1 << 24  # 16M values per row: far above any model, bounds reads
MAX_FEATURE_NDIM = 8
MAX_CHUNK_ROWS = 1 << 24
MAX_CHUNK_BYTES = 1 << 31  # 2 GiB raw per chunk
MAX_BLOSC_CHUNK_BYTES = (1 << 31) - 1 - 16  # Blosc1's MAX_BUFFERSIZE: what one frame can hold
MAX_DOCUMENT_BYTES = 16 << 20  # metadata documents larger than this are refused
MAX_ROWS = (1 << 53) - 1  # committed rows and array lengths: JSON's exact integers

#: Names that match the pattern but would collide with a Zarr group's own document.
_RESERVED_NAMES = frozenset({".", "..", "zarr.json"})
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,254}$")


def utc_text(moment: datetime) -> str:
    """A UTC time as the documents write it: ISO 8601, milliseconds, ``Z``."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def utc_now() -> str:
    return utc_text(datetime.now(UTC))


def check_name(name: str) -> str:
    """Site names are dotted module paths: letters, digits, ``_ . -``; 1-255 chars."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or name in _RESERVED_NAMES:
        raise ConfigError(
            "a site name must be 1-255 characters of letters, digits, '_', '.', '-', not "
            f"start with '.' or '-', and not be 'zarr.json'; got {name!r}"
        )
    return name


def logical_dtype_name(dtype: Any) -> str:
    """Map a numpy / torch / ml_dtypes dtype (or name) to a logical dtype name."""
    text = str(dtype).removeprefix("torch.")
    aliases = {"float": "float32", "half": "float16", "bf16": "bfloat16"}
    text = aliases.get(text, text)
    if text not in STORAGE_DTYPE:
        raise ConfigError(
            f"activation dtype must be one of {', '.join(LOGICAL_DTYPES)}; got {dtype!r}"
        )
    return text


@dataclass(frozen=True)
class CodecConfig:
    """How chunks are compressed. ``cname=None`` stores raw little-endian bytes."""

    cname: str | None = "lz4"
    clevel: int | None = None
    checksum: bool = True

    def __post_init__(self) -> None:
        if self.cname not in CODEC_NAMES:
            raise ConfigError(f"compression must be one of 'lz4', 'zstd', None; got {self.cname!r}")
        if self.cname is not None:
            level = DEFAULT_LEVEL[self.cname] if self.clevel is None else self.clevel
            if isinstance(level, bool) or not isinstance(level, int) or not 1 <= level <= 9:
                raise ConfigError(f"compression level must be an integer in [1, 9]; got {level!r}")
            object.__setattr__(self, "clevel", level)
        else:
            object.__setattr__(self, "clevel", None)

    def describe(self, typesize: int) -> dict[str, Any] | None:
        """The codec entry of a site document (every automatic choice spelled out)."""
        if self.cname is None:
            return None
        return {
            "name": "blosc",
            "cname": self.cname,
            "clevel": self.clevel,
            "shuffle": "shuffle",
            "typesize": typesize,
            "blocksize": 0,
        }


@dataclass(frozen=True)
class SiteInfo:
    """A site as the writer declares it: the array's shape and dtype plus its provenance."""

    name: str
    feature_shape: tuple[int, ...]
    dtype: str = "float32"  # logical dtype
    kind: str = "other"
    layer: int | None = None
    module_path: str | None = None
    module_class: str | None = None
    tuple_index: int | None = None

    def __post_init__(self) -> None:
        check_name(self.name)
        for field, value in (("layer", self.layer), ("tuple_index", self.tuple_index)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0
            ):
                raise ConfigError(
                    f"site {self.name!r}: {field} must be a non-negative integer or None; "
                    f"got {value!r}"
                )
        for field, text in (("module_path", self.module_path), ("module_class", self.module_class)):
            if text is not None and not isinstance(text, str):
                raise ConfigError(f"site {self.name!r}: {field} must be a string; got {text!r}")
        shape = tuple(int(d) for d in self.feature_shape)
        if not shape or any(d < 1 for d in shape) or len(shape) > MAX_FEATURE_NDIM:
            raise ConfigError(
                f"site {self.name!r}: feature_shape must be a tuple of 1 to {MAX_FEATURE_NDIM} "
                f"positive integers; got {self.feature_shape!r}"
            )
        if math.prod(shape) > MAX_FEATURE_ELEMENTS:
            raise ConfigError(
                f"site {self.name!r}: a row of {math.prod(shape)} values exceeds the format "
                f"limit of {MAX_FEATURE_ELEMENTS}"
            )
        object.__setattr__(self, "feature_shape", shape)
        object.__setattr__(self, "dtype", logical_dtype_name(self.dtype))
        if self.kind not in KINDS:
            raise ConfigError(f"site kind must be one of {', '.join(KINDS)}; got {self.kind!r}")

    @property
    def storage_dtype(self) -> str:
        return STORAGE_DTYPE[self.dtype]

    @property
    def row_bytes(self) -> int:
        return math.prod(self.feature_shape) * np.dtype(self.storage_dtype).itemsize


def json_safe(obj: Any) -> Any:
    """A copy of ``obj`` that strict JSON can hold: non-finite floats become ``None``,
    tuples become lists, and objects JSON does not know become their ``str``."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        return value if np.isfinite(value) else None
    return str(obj)


def dimension_names(feature_ndim: int) -> list[str]:
    if feature_ndim == 1:
        return ["row", "feature"]
    return ["row", *(f"feature_{i}" for i in range(feature_ndim))]


def site_document(site: SiteInfo, codec: CodecConfig, chunk_rows: int) -> dict[str, Any]:
    storage = np.dtype(site.storage_dtype)
    return {
        "name": site.name,
        "module_path": site.module_path if site.module_path is not None else site.name,
        "layer": site.layer,
        "kind": site.kind,
        "module_class": site.module_class,
        "tuple_index": site.tuple_index,
        "logical_dtype": site.dtype,
        "storage_dtype": site.storage_dtype,
        "feature_shape": list(site.feature_shape),
        "dimension_names": dimension_names(len(site.feature_shape)),
        "chunk_rows": chunk_rows,
        "codec": codec.describe(storage.itemsize),
        "checksum": "crc32c" if codec.checksum else None,
    }


#: Descriptions of the extra token columns llminstr itself writes (section 2.3).
EXTRA_COLUMN_DESCRIPTIONS = {
    "is_padding": "1 on a padding row (stored with padding='keep'; its position is -1), else 0",
}


def token_document(
    column: str, codec: CodecConfig, chunk_rows: int, description: str | None = None
) -> dict[str, Any]:
    """A token column's document; ``description`` (extra columns only) overrides the
    default: the standard columns' meaning, llminstr's own extras', or empty."""
    if description is None:
        description = dict(TOKEN_COLUMNS).get(column) or EXTRA_COLUMN_DESCRIPTIONS.get(column, "")
    return {
        "column": column,
        "description": description,
        "storage_dtype": TOKEN_DTYPE,
        "dimension_names": ["row"],
        "chunk_rows": chunk_rows,
        "codec": codec.describe(8),
        "checksum": "crc32c" if codec.checksum else None,
    }


def root_document(
    *,
    backend: str,
    sites: list[SiteInfo],
    token_columns: list[str],
    chunk_rows: int,
    codec: CodecConfig,
    model: dict[str, Any] | None,
    capture_config: dict[str, Any] | None,
    library_version: str,
) -> dict[str, Any]:
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "status": "in_progress",
        "committed_rows": 0,
        "commit_seq": 0,
        "created": utc_now(),
        "updated": None,
        "closed": None,
        "error": None,
        "library": {"name": "llminstr", "version": library_version},
        "backend": backend,
        "model": json_safe(model) if model is not None else {},
        "capture_config": json_safe(capture_config) if capture_config is not None else {},
        "chunk_rows": chunk_rows,
        "compression": {
            "cname": codec.cname,
            "clevel": codec.clevel,
            "shuffle": "shuffle" if codec.cname else None,
            "checksum": "crc32c" if codec.checksum else None,
        },
        "sites": [s.name for s in sites],
        "token_columns": list(token_columns),
    }


@cache
def _schema(name: str) -> dict[str, Any]:
    text = resources.files("llminstr").joinpath("schema", name).read_text(encoding="utf-8")
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def _validate(doc: Any, schema_name: str, what: str) -> None:
    import jsonschema

    validator = jsonschema.Draft202012Validator(_schema(schema_name))
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    if errors:
        first = errors[0]
        where = "/".join(str(p) for p in first.absolute_path) or "(document)"
        raise FormatError(f"{what} does not match the format schema at {where}: {first.message}")


def check_version(doc: Any, where: str) -> None:
    """Reject documents that are not captures or whose major version is unknown."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        from llminstr.errors import NotACaptureError

        raise NotACaptureError(
            f"{where} is not an llminstr capture: its root metadata has no "
            f"'format': '{FORMAT_NAME}' entry"
        )
    version = doc.get("format_version")
    match = re.fullmatch(r"(\d+)\.(\d+)", version) if isinstance(version, str) else None
    if match is None:
        raise FormatError(f"{where}: format_version must look like '1.0'; got {version!r}")
    if int(match.group(1)) != FORMAT_MAJOR:
        raise UnsupportedVersionError(
            f"{where} uses format version {version}; this llminstr reads major version "
            f"{FORMAT_MAJOR} only. Upgrade llminstr to read it."
        )


def _check_names(names: list[Any], what: str) -> None:
    # The schemas' name pattern ends in '$', which Python's re (used by jsonschema) lets
    # match before a trailing newline; ECMA-262, the schemas' dialect, does not. Enforce
    # the whole-string match here.
    for name in names:
        if not (isinstance(name, str) and _NAME_RE.fullmatch(name) and name not in _RESERVED_NAMES):
            raise FormatError(f"{what}: {name!r} is not a valid name (section 2.5)")


def validate_root(doc: Any, where: str = "capture") -> None:
    check_version(doc, where)
    _validate(doc, "root.schema.json", f"{where}: root metadata")
    _check_names([*doc["sites"], *doc["token_columns"]], f"{where}: root metadata")
    if doc["committed_rows"] > MAX_ROWS:
        raise FormatError(
            f"{where}: committed_rows {doc['committed_rows']} is above the format limit "
            f"{MAX_ROWS} (section 9)"
        )


def validate_site(doc: Any, where: str = "site") -> None:
    _validate(doc, "site.schema.json", f"{where}: site metadata")
    _check_names([doc["name"]], f"{where}: site metadata")


def validate_token(doc: Any, where: str = "token column") -> None:
    _validate(doc, "token.schema.json", f"{where}: token column metadata")
    _check_names([doc["column"]], f"{where}: token column metadata")


def _no_constant(name: str) -> Any:
    # Python's json accepts NaN, Infinity and -Infinity; JSON (RFC 8259) does not.
    raise ValueError(f"{name} is not JSON")


def parse_document(raw: bytes | str, where: str) -> Any:
    if len(raw) > MAX_DOCUMENT_BYTES:
        raise FormatError(f"{where}: metadata document of {len(raw)} bytes exceeds the limit")
    try:
        return json.loads(raw, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise FormatError(f"{where}: metadata is not valid JSON ({exc})") from exc
    except RecursionError:
        raise FormatError(f"{where}: metadata is nested too deeply to parse") from None
