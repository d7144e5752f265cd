"""The protobuf wire format, just enough to parse a big .onnx file a few MiB at a time."""

from __future__ import annotations

from typing import BinaryIO, Iterator

import onnx


from . import sizes


sizes.DIRECT_LIMIT = 64 * 2**20
MERGE_CHUNK = 8 * 2**20


class WireError(Exception):
    pass


def varint_bytes(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def field_key(number: int, wire_type: int) -> bytes:
    return varint_bytes(number << 3 | wire_type)


def _read_varint(f: BinaryIO) -> int:
    result = shift = 0
    for _ in range(10):
        b = f.read(1)
        if not b:
            raise WireError("unexpected end of file")
        result |= (b[0] & 0x7F) << shift
        if b[0] < 0x80:
            return result
        shift += 7
    raise WireError("malformed varint")


def _fields(f: BinaryIO, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """``(number, wire_type, field_start, payload_start, field_end)`` of the
    fields of the message stored in ``f[start:end]``."""
    pos = start
    while pos < end:
        f.seek(pos)
        key = _read_varint(f)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise WireError("field number 0")
        if wire_type == 0:
            _read_varint(f)
            payload = f.tell()
            field_end = payload
        elif wire_type == 1:
            payload = f.tell()
            field_end = payload + 8
        elif wire_type == 2:
            length = _read_varint(f)
            payload = f.tell()
            field_end = payload + length
        elif wire_type == 5:
            payload = f.tell()
            field_end = payload + 4
        else:  # groups (3, 4) do not occur in ONNX; 6, 7 do not exist
            raise WireError(f"wire type {wire_type}")
        if field_end > end:
            raise WireError("field runs past the end of its message")
        yield number, wire_type, pos, payload, field_end
        pos = field_end


GRAPH_FIELD = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number


def _merge_range(model: onnx.ModelProto, f: BinaryIO, start: int, end: int, prefix: bytes = b"") -> None:
    """Merge ``prefix + f[start:end]`` into ``model`` with one buffer, no copies."""
    buf = bytearray(len(prefix) + end - start)
    buf[: len(prefix)] = prefix
    f.seek(start)
    view = memoryview(buf)
    if f.readinto(view[len(prefix) :]) != end - start:
        raise WireError("unexpected end of file")
    model.MergeFromString(view)


def parse_in_chunks(f: BinaryIO, size: int, skip_fields_over: int | None = None) -> onnx.ModelProto:
    """Parse a ModelProto from ``f`` a few MiB (or one big field) at a time.

    Equivalent to ``ParseFromString`` (protobuf merges a message field that
    arrives in several pieces) but never holds the whole file. With
    ``skip_fields_over``, graph fields larger than that are skipped unread.
    """
    model = onnx.ModelProto()
    for number, wire_type, start, payload, end in _fields(f, 0, size):
        if number != GRAPH_FIELD or wire_type != 2:
            _merge_range(model, f, start, end)
            continue
        model.graph.SetInParent()
        run: list[int] = []  # [start, end) of consecutive graph fields not yet merged

        def flush() -> None:
            if run:
                length = run[1] - run[0]
                _merge_range(model, f, run[0], run[1], field_key(GRAPH_FIELD, 2) + varint_bytes(length))
                run.clear()

        for _n, _w, g_start, _p, g_end in list(_fields(f, payload, end)):
            if skip_fields_over is not None and g_end - g_start > skip_fields_over:
                flush()
                continue
            if run and g_end - run[0] > MERGE_CHUNK:
                flush()
            if run:
                run[1] = g_end
            else:
                run.extend((g_start, g_end))
        flush()
    return model
