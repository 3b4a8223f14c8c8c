"""An ONNX file's ``metadata_props`` read without loading its graph.

``onnx.load`` parses the whole ModelProto, weights included: its size in memory again (~100 MB
of predict's peak for the demo model) to read a few hundred bytes of metadata. ``metadata_props``
is field 14 of ModelProto (onnx/onnx.proto); this walks the top-level fields of the protobuf
wire format (https://protobuf.dev/programming-guides/encoding/) and seeks past every other one.
Plain Python, no onnx import: predict on an ``.onnx`` model imports neither onnx nor torch.
`artifact.read_onnx_meta` turns the props into a `ModelMeta`.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

METADATA_PROPS = 14  # ModelProto.metadata_props (repeated StringStringEntryProto)


def metadata_props(path: Path | str) -> dict[str, str]:
    """ModelProto.metadata_props of the file at `path` as {key: value}, by walking the protobuf's
    top-level fields and seeking past the others (the graph with its weights is never read).

    Raises OSError when the file cannot be read, ValueError when it is not a protobuf (a truncated
    field or varint, an unknown wire type) and UnicodeDecodeError for a key or value that is not UTF-8."""
    props: dict[str, str] = {}
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        while (tag := _varint(f, allow_eof=True)) is not None:
            field_number, wire = tag >> 3, tag & 7
            if wire == 0:
                _varint(f)
            elif wire in (1, 5):
                f.seek(8 if wire == 1 else 4, 1)
            elif wire == 2:
                n = _varint(f)
                if f.tell() + n > size:
                    raise ValueError("truncated field")
                if field_number == METADATA_PROPS:
                    key, value = _string_pair(f.read(n))
                    props[key] = value
                else:
                    f.seek(n, 1)
            else:
                raise ValueError(f"wire type {wire}")
    return props


def _varint(f, allow_eof: bool = False) -> int | None:  # noqa: ANN001 - a binary file
    shift = result = 0
    while True:
        b = f.read(1)
        if not b:
            if allow_eof and shift == 0:
                return None
            raise ValueError("truncated varint")
        result |= (b[0] & 0x7F) << shift
        if not b[0] & 0x80:
            return result
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _string_pair(buf: bytes) -> tuple[str, str]:
    """(key, value) of a StringStringEntryProto (key: field 1, value: field 2)."""
    f, out = io.BytesIO(buf), {1: "", 2: ""}
    while (tag := _varint(f, allow_eof=True)) is not None:
        if tag & 7 != 2:
            raise ValueError("metadata entry is not a string pair")
        out[tag >> 3] = f.read(_varint(f)).decode()
    return out[1], out[2]
