"""The Zarr array documents llminstr writes itself are exactly the ones zarr-python writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec

from llminstr.format import CodecConfig
from llminstr.storage.backends import ArrayDecl, zarr_array_document


@pytest.mark.parametrize("dtype", ["float32", "float16", "uint16", "int64"])
@pytest.mark.parametrize("cname", ["lz4", "zstd", None])
@pytest.mark.parametrize("checksum", [True, False])
def test_array_document_equals_zarr_python(
    tmp_path: Path, dtype: str, cname: str | None, checksum: bool
) -> None:
    codec = CodecConfig(cname, None, checksum)
    feature = () if dtype == "int64" else (3, 2)
    names = ["row"] if not feature else ["row", "feature_0", "feature_1"]
    decl = ArrayDecl("activations", "x", dtype, feature, 4, {"dimension_names": names})
    compressors: list[object] = []
    if cname is not None:
        compressors.append(
            BloscCodec(
                cname=cname,
                clevel=codec.clevel,
                shuffle="shuffle",
                typesize=np.dtype(dtype).itemsize,
                blocksize=0,
            )
        )
    if checksum:
        compressors.append(Crc32cCodec())
    zarr.create_array(
        str(tmp_path / "a"),
        shape=(0, *feature),
        chunks=(4, *feature),
        dtype=dtype,
        serializer=BytesCodec(endian="little"),
        compressors=compressors or None,
        fill_value=0,
        dimension_names=names,
        attributes={"llminstr": decl.document},
    )
    theirs = (tmp_path / "a" / "zarr.json").read_text()
    ours = json.dumps(zarr_array_document(decl, codec), indent=2)
    assert json.loads(theirs) == json.loads(ours)
    assert list(json.loads(theirs)) == list(json.loads(ours))  # same key order, too


@pytest.mark.parametrize("rows", [0, 1, 7, 10**6, 2**40])
def test_shape_template_renders_exactly_the_dumped_document(rows: int) -> None:
    """Commits re-render array documents by substituting the row count into a template:
    the bytes equal json.dumps of the document with that row count."""
    from llminstr.storage.backends import _dumps, _ShapeTemplate

    for codec in (CodecConfig("lz4", 5, True), CodecConfig(None, None, False)):
        decl = ArrayDecl(
            "activations",
            "layers.3.mlp",
            "float16",
            (2, 7),
            16,
            {"dimension_names": ["row", "a", "b"], "layer": 3},
        )
        doc = zarr_array_document(decl, codec)
        template = _ShapeTemplate(doc)
        assert template.parts is not None
        expected = dict(doc, shape=[rows, *doc["shape"][1:]])
        assert template.render(rows) == _dumps(expected)
        assert json.loads(template.render(rows))["shape"] == [rows, 2, 7]


def test_shape_template_falls_back_when_the_mark_is_ambiguous() -> None:
    from llminstr.storage import backends

    doc = {"dimension_names": ["row"], "note": backends._ROWS_MARK}
    decl = ArrayDecl("tokens", "step", "int64", (), 16, doc)
    template = backends._ShapeTemplate(zarr_array_document(decl, CodecConfig("lz4", 5, True)))
    assert template.parts is None
    assert json.loads(template.render(5))["shape"] == [5]
