"""Merging IVF slice files into one plain faiss file, on disk, in a task.

Slices trained from one empty index share its quantizer, so merging concatenates their
inverted lists. `merge_ivf_files` writes the merged file as a stream: the trained index's
header (with the merged ntotal), then faiss's "ilar" inverted-lists section, list by list,
copied from the slices opened with IO_FLAG_MMAP. Resident memory stays at about one list
plus the page cache; it needs the slices' bytes again in disk, not in RAM. The output is a
plain faiss file: `faiss.read_index` loads it and IO_FLAG_MMAP maps it.

faiss serialises an ArrayInvertedLists as: b"ilar", nlist (u64), code_size (u64), then
b"full" and a u64 vector of the list sizes (or b"sprs" and (list, size) pairs), then for
each non-empty list its codes and then its ids (int64). An IVF index's inverted lists are
the last section of its serialisation, and an empty index's section is the 32 bytes
b"ilar", nlist, code_size, b"sprs", 0 (checked before writing).
"""
from __future__ import annotations

import os
import struct
import tempfile

from sparse_embed.pipeline.store import storage

COPY_CHUNK = 64 * 1024**2  # bytes per read while downloading or uploading a slice


def empty_lists_tail(nlist: int, code_size: int) -> bytes:
    """The serialisation of `nlist` empty inverted lists of `code_size` bytes (pure)."""
    return b"ilar" + struct.pack("<QQ", nlist, code_size) + b"sprs" + struct.pack("<Q", 0)


def lists_header(nlist: int, code_size: int, sizes) -> bytes:
    """The "full" inverted-lists header for lists of `sizes` entries (pure)."""
    import numpy as np

    sizes = np.asarray(sizes, dtype="<u8")
    return b"ilar" + struct.pack("<QQ", nlist, code_size) + b"full" + struct.pack("<Q", nlist) + sizes.tobytes()


def index_head(trained: bytes, ntotal: int) -> tuple[bytes, int, int]:
    """(the trained index's serialisation without its empty inverted lists but with
    `ntotal` in its headers, nlist, code_size)."""
    import faiss
    import numpy as np

    index = faiss.deserialize_index(np.frombuffer(trained, dtype="uint8"))
    ivf = faiss.extract_index_ivf(index)
    if ivf.ntotal:
        raise ValueError(f"Expected an empty trained index to merge into, got one with {ivf.ntotal} vectors")
    nlist, code_size = int(ivf.nlist), int(ivf.code_size)
    ivf.ntotal = ntotal
    index.ntotal = ntotal  # a wrapper (IndexPreTransform) keeps its own count
    data = faiss.serialize_index(index).tobytes()
    tail = empty_lists_tail(nlist, code_size)
    if not data.endswith(tail):
        raise RuntimeError("this faiss version does not serialise an empty IVF index's lists as expected "
                           f"(last bytes {data[-32:]!r}); the on-disk merge cannot write this format")
    return data[:-len(tail)], nlist, code_size


def merge_ivf_files(trained: bytes, inputs: list[str], out_path: str) -> int:
    """Merge the local slice files `inputs` (IVF indexes from `trained`) into `out_path`;
    returns ntotal. Reads the slices memory-mapped and writes list by list."""
    import faiss
    import numpy as np

    flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY
    slices = [faiss.read_index(p, flags) for p in inputs]
    lists = [faiss.extract_index_ivf(s).invlists for s in slices]
    ntotal = int(sum(faiss.extract_index_ivf(s).ntotal for s in slices))
    head, nlist, code_size = index_head(trained, ntotal)
    for p, il in zip(inputs, lists):
        if il.nlist != nlist or il.code_size != code_size:
            raise ValueError(f"Expected slices of {nlist} lists of {code_size}-byte codes, got {il.nlist} x "
                             f"{il.code_size} in {p}")
    sizes = np.zeros(nlist, dtype="int64")
    for il in lists:
        sizes += np.array([il.list_size(i) for i in range(nlist)], dtype="int64")
    tmp = f"{out_path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(head)
        f.write(lists_header(nlist, code_size, sizes))
        for i in range(nlist):
            if not sizes[i]:
                continue
            for il in lists:  # codes of list i, slice after slice
                n = il.list_size(i)
                if n:
                    f.write(memoryview(faiss.rev_swig_ptr(il.get_codes(i), n * code_size)))
            for il in lists:  # then their ids, in the same order
                n = il.list_size(i)
                if n:
                    f.write(memoryview(faiss.rev_swig_ptr(il.get_ids(i), n)).cast("B"))
        f.flush()
        os.fsync(f.fileno())
    del lists, slices
    check = faiss.read_index(tmp, flags)
    if check.ntotal != ntotal or faiss.extract_index_ivf(check).invlists.compute_ntotal() != ntotal:
        raise RuntimeError(f"merged file {tmp} does not hold the {ntotal} vectors of its slices")
    del check
    os.replace(tmp, out_path)
    return ntotal


def merge_in_memory(inputs: list[str]):
    """The reference merge: faiss's merge_from on loaded slices (holds everything in RAM)."""
    import faiss

    merged = faiss.read_index(inputs[0])
    for p in inputs[1:]:
        other = faiss.read_index(p)  # keep a reference: extract_index_ivf's proxy does not own the index
        faiss.extract_index_ivf(merged).merge_from(faiss.extract_index_ivf(other), 0)
        del other
    merged.ntotal = faiss.extract_index_ivf(merged).ntotal
    return merged


def download(uri: str, local: str) -> None:
    """Stream `uri` to the local path (chunks of COPY_CHUNK; the file is never held whole)."""
    fs = storage.filesystem(uri)
    with fs.open(storage.strip_scheme(uri), "rb") as src, open(local, "wb") as dst:
        while chunk := src.read(COPY_CHUNK):
            dst.write(chunk)


def upload(local: str, uri: str) -> None:
    """Stream a local file to `uri`; locally, copy aside and rename (atomic)."""
    fs = storage.filesystem(uri)
    path = storage.strip_scheme(uri)
    if storage.is_s3(uri):
        fs.put_file(local, path)  # one object appears when the (multipart) upload completes
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(local, "rb") as src, open(tmp, "wb") as dst:
        while chunk := src.read(COPY_CHUNK):
            dst.write(chunk)
        dst.flush()
        os.fsync(dst.fileno())
    os.replace(tmp, path)


def merge_task(index_dir: str, trained: bytes, files: list[str], out_file: str, *, remove_inputs: bool = True) -> dict:
    """Ray task body: merge slice files under `index_dir` into `out_file` there, on this
    worker's disk; the inputs are removed afterwards unless one of them is `out_file`'s
    name (then it is replaced). Returns {"file", "ntotal", "bytes"}."""
    with tempfile.TemporaryDirectory(prefix="sparse-embed-merge-") as tmp:
        local = []
        for f in files:
            uri = storage.join(index_dir, f)
            if storage.is_s3(uri):
                path = os.path.join(tmp, f)
                download(uri, path)
            else:
                path = storage.strip_scheme(uri)
            local.append(path)
        out_local = os.path.join(tmp, "merged-" + out_file)
        ntotal = merge_ivf_files(trained, local, out_local)
        size = os.path.getsize(out_local)
        upload(out_local, storage.join(index_dir, out_file))
    if remove_inputs:
        fs = storage.filesystem(index_dir)
        for f in files:
            if f != out_file:
                fs.rm_file(storage.strip_scheme(storage.join(index_dir, f)))
    return {"file": out_file, "ntotal": ntotal, "bytes": size}
