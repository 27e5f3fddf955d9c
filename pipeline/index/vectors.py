"""Embedding columns as (n, D) float32 arrays, read without 32-bit list offsets."""
from __future__ import annotations


def vectors_of(column):
    """An embedding column -> (n, D) float32, chunk by chunk from each chunk's flat values
    (no concatenation of Arrow lists, so no 32-bit list offsets past 2^31 floats). Files
    this job writes hold list (Delta has no fixed-size array type, and polars refuses a
    file whose type differs from the table's); files of older runs hold fixed_size_list.
    Both read the same."""
    import numpy as np

    chunks = column.chunks if hasattr(column, "chunks") else [column]
    parts = [_chunk_vectors(c) for c in chunks if len(c)]
    if not parts:
        return np.zeros((0, 0), dtype="float32")
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _chunk_vectors(chunk):
    """One Arrow list array -> (n, D) float32; `flatten` honours the chunk's slice offset,
    and for a fixed_size_list it is a zero-copy view of the child values."""
    import numpy as np

    flat = chunk.flatten().to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(flat.reshape(len(chunk), -1), dtype="float32")
