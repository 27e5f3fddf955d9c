"""Delta deletion vectors: the bytes, the files and the descriptors, as the Delta protocol
(PROTOCOL.md of delta-io/delta) specifies them. Each function names the section it follows.

- "Deletion Vector Format": a RoaringBitmapArray is the magic number 1681511377 (4 bytes,
  little-endian) followed by a 64-bit roaring bitmap in the portable format: the number of
  32-bit buckets (8 bytes LE), then per bucket in ascending key order its key (4 bytes LE,
  the high 32 bits of its values) and a 32-bit roaring bitmap in the portable
  serialization (pyroaring's `BitMap.serialize`, the RoaringFormatSpec layout).
- "Deletion Vector File Storage Format": a `.bin` file is a version byte (1), then per
  vector its data size (4 bytes big-endian), the data, and the CRC-32 of the data (4 bytes
  big-endian). A descriptor's `offset` points at the size field and `sizeInBytes` is the
  data size.
- "Deletion Vector Descriptor Schema": storageType "u" (a file in the table's folder named
  deletion_vector_<uuid>.bin, `pathOrInlineDv` an optional prefix folder and the UUID in
  Z85, 20 characters), "i" (the data itself in Z85, inline in the log) or "p" (an
  absolute path); `cardinality` is the number of rows the vector marks.

The positions are physical row indexes in the data file, counted from 0.
"""
from __future__ import annotations

import struct
import uuid
import zlib

MAGIC = 1681511377
FILE_FORMAT_VERSION = 1
_Z85 = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#"
_Z85_INDEX = {c: i for i, c in enumerate(_Z85)}


def z85_encode(data: bytes) -> str:
    """ZeroMQ's Z85 (RFC 32/Z85), which the protocol uses for UUIDs and inline vectors;
    `data` is padded with zeros to a multiple of 4 bytes (the protocol's inline vectors are)."""
    data = data + b"\0" * (-len(data) % 4)
    out = []
    for i in range(0, len(data), 4):
        value = struct.unpack(">I", data[i: i + 4])[0]
        chunk = []
        for _ in range(5):
            value, r = divmod(value, 85)
            chunk.append(_Z85[r])
        out.append("".join(reversed(chunk)))
    return "".join(out)


def z85_decode(text: str) -> bytes:
    if len(text) % 5:
        raise ValueError(f"Expected Z85 text of a multiple of 5 characters, got {len(text)}")
    out = bytearray()
    for i in range(0, len(text), 5):
        value = 0
        for c in text[i: i + 5]:
            value = value * 85 + _Z85_INDEX[c]
        out += struct.pack(">I", value)
    return bytes(out)


def serialize(positions) -> bytes:
    """"Deletion Vector Format": the RoaringBitmapArray of `positions` (int64 row indexes >= 0)."""
    import numpy as np
    from pyroaring import BitMap

    positions = np.unique(np.asarray(positions, dtype=np.int64))
    if len(positions) and positions[0] < 0:
        raise ValueError("Expected row positions >= 0")
    highs = (positions >> 32).astype(np.int64)
    parts = [struct.pack("<i", MAGIC)]
    keys = np.unique(highs)
    parts.append(struct.pack("<q", len(keys)))
    for key in keys:
        lows = (positions[highs == key] & 0xFFFFFFFF).astype(np.uint32)
        parts.append(struct.pack("<I", int(key)))
        parts.append(BitMap(lows.tolist()).serialize())
    return b"".join(parts)


def deserialize(data: bytes):
    """The row positions (sorted int64) of a RoaringBitmapArray ("Deletion Vector Format")."""
    import numpy as np
    from pyroaring import BitMap

    if len(data) < 12 or struct.unpack_from("<i", data, 0)[0] != MAGIC:
        raise ValueError("Not a Delta deletion vector: its magic number is not 1681511377")
    (n_buckets,) = struct.unpack_from("<q", data, 4)
    at, parts = 12, []
    for _ in range(n_buckets):
        (key,) = struct.unpack_from("<I", data, at)
        bitmap = BitMap.deserialize(data[at + 4:])
        at += 4 + len(bitmap.serialize())  # a bucket's length is that of its own portable serialization
        parts.append((np.asarray(bitmap.to_array(), dtype=np.int64) if len(bitmap) else np.zeros(0, np.int64)) | (key << 32))
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def file_bytes(data: bytes) -> bytes:
    """"Deletion Vector File Storage Format" for one vector: version, size, data, CRC-32.
    The vector's descriptor offset is 1 (its size field follows the version byte)."""
    return bytes([FILE_FORMAT_VERSION]) + struct.pack(">i", len(data)) + data + struct.pack(">I", zlib.crc32(data))


def read_framed(blob: bytes, offset: int, size: int) -> bytes:
    """The data of the vector at `offset` of a deletion-vector file's bytes, its size and
    CRC-32 checked ("Deletion Vector File Storage Format")."""
    (stored,) = struct.unpack_from(">i", blob, offset)
    if stored != size:
        raise ValueError(f"Deletion vector size mismatch: the descriptor says {size} bytes, the file {stored}")
    data = blob[offset + 4: offset + 4 + size]
    (crc,) = struct.unpack_from(">I", blob, offset + 4 + size)
    if zlib.crc32(data) != crc:
        raise ValueError("Deletion vector checksum mismatch: the file is damaged")
    return data


def new_file_name() -> tuple[str, str]:
    """(file name in the table's folder, the descriptor's pathOrInlineDv) of a new "u" vector."""
    u = uuid.uuid4()
    return f"deletion_vector_{u}.bin", z85_encode(u.bytes)


def relative_path(path_or_inline_dv: str) -> str:
    """The file of a "u" descriptor, relative to the table root: a prefix folder (the
    characters before the last 20) and deletion_vector_<uuid>.bin."""
    prefix, encoded = path_or_inline_dv[:-20], path_or_inline_dv[-20:]
    name = f"deletion_vector_{uuid.UUID(bytes=z85_decode(encoded))}.bin"
    return f"{prefix}/{name}" if prefix else name


def descriptor(path_or_inline_dv: str, size: int, cardinality: int, *, offset: int = 1, storage_type: str = "u") -> dict:
    """A deletionVector descriptor as the add and remove actions carry it."""
    d = {"storageType": storage_type, "pathOrInlineDv": path_or_inline_dv, "sizeInBytes": int(size),
         "cardinality": int(cardinality)}
    if storage_type != "i":
        d["offset"] = int(offset)
    return d
