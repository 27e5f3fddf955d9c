"""The id -> URI map: sorted Arrow IPC runs read memory-mapped, binary-searched; later runs
override earlier ones; deleted ids vanish from base runs; no 2 GiB column limit."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pytest

from sparse_embed.pipeline.index.idmap import IdMap, IdMapSet, write_id_map, write_sorted_id_map


def test_lookup_matches_a_dict_across_batches(tmp_path):
    rng = np.random.default_rng(0)
    ids = rng.choice(10**9, size=5000, replace=False).astype("int64")  # unsorted, sparse
    uris = [f"s3://b/k {i} #%?é.jpg" for i in ids]
    path = str(tmp_path / "run.arrow")
    assert write_id_map(path, pa.array(ids), pa.array(uris), None, batch_rows=97) == 5000
    m = IdMap(path)
    assert m.num_rows == 5000 and len(list(m.batches())) == -(-5000 // 97)
    absent = np.array([-5, 10**9 + 1, *[i for i in rng.integers(0, 10**9, 200) if i not in set(ids.tolist())]])
    probe = np.concatenate([rng.permutation(ids)[:1000], absent])
    want = dict(zip(ids.tolist(), uris))
    assert m.lookup(probe) == [want.get(i) for i in probe.tolist()]
    assert m.lookup(probe[:3], "etag") == [None, None, None]
    assert m.contains(absent).tolist() == [False] * len(absent)


def test_unsorted_or_duplicate_batches_are_refused(tmp_path):
    path = tmp_path / "bad.arrow"

    def batch(ids):
        return pa.table({"image_id": pa.array(ids, pa.int64()), "uri": pa.array([str(i) for i in ids], pa.large_string()),
                         "etag": pa.nulls(len(ids), pa.large_string())})

    with pytest.raises(ValueError, match="ascending and unique"):
        write_sorted_id_map(str(path), [batch([1, 2, 3]), batch([3, 4])])
    with pytest.raises(ValueError, match="ascending and unique"):
        write_id_map(str(path), pa.array([5, 1, 5]), pa.array(["a", "b", "c"]))
    assert not path.exists() and not list(tmp_path.iterdir())  # nothing half-written is left


def test_later_runs_override_and_deleted_ids_leave_base_runs(tmp_path):
    base, delta = str(tmp_path / "base.arrow"), str(tmp_path / "delta.arrow")
    write_id_map(base, pa.array([1, 2, 3, 4]), pa.array(["a1", "a2", "a3", "a4"]), pa.array(["e"] * 4))
    write_id_map(delta, pa.array([7, 3]), pa.array(["b7", "b3"]), pa.array(["f", "f"]))
    maps = IdMapSet([IdMap(base), IdMap(delta)], deleted=np.array([2, 3]), first_live_run=1)
    assert maps.lookup([1, 2, 3, 4, 7, 8]) == ["a1", None, "b3", "a4", "b7", None]
    live = maps.live_table()
    assert live.column("image_id").to_pylist() == [1, 3, 4, 7]
    assert live.column("uri").to_pylist() == ["a1", "b3", "a4", "b7"]
    assert live.column("etag").to_pylist() == ["e", "f", "e", "f"]


LARGE = textwrap.dedent("""
    import sys
    import numpy as np, pyarrow as pa, pyarrow.compute as pc
    from sparse_embed.pipeline.index.idmap import IdMap, write_sorted_id_map

    path, rows, pad = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    prefix = "s3://bucket/" + "p" * pad + "/"

    def batches(step=1 << 16):  # one 64 MiB batch in memory at a time
        for a in range(0, rows, step):
            ids = pa.array(np.arange(a, min(rows, a + step), dtype="int64") * 2)
            uris = pc.binary_join_element_wise(prefix, pc.cast(ids, pa.string()), "").cast(pa.large_string())
            yield pa.record_batch([ids, uris, pa.nulls(len(ids), pa.large_string())], names=["image_id", "uri", "etag"])

    n = write_sorted_id_map(path, batches())
    rss = lambda key: int([l for l in open("/proc/self/status") if l.startswith(key)][0].split()[1]) * 1024
    written_peak = rss("VmHWM:")
    before = rss("VmRSS:")
    m = IdMap(path)
    opened = rss("VmRSS:") - before
    probe = np.random.default_rng(0).integers(0, rows, 2000) * 2
    got = m.lookup(np.concatenate([probe, probe[:100] + 1]))
    assert got[:2000] == [prefix + str(i) for i in probe.tolist()], "wrong uri"
    assert got[2000:] == [None] * 100, "odd ids are absent"
    print(n, opened, written_peak, rss("RssAnon:"))
""")


@pytest.mark.slow
def test_a_run_holding_more_than_2_gib_of_uris_is_written_streaming_and_read_mapped(tmp_path):
    rows, pad = 2_300_000, 1000  # ~1 KiB per URI: ~2.2 GiB of URIs in one run, past string's 2^31 offsets
    path = tmp_path / "big.arrow"
    out = subprocess.run([sys.executable, "-c", LARGE, str(path), str(rows), str(pad)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    n, opened, written_peak, anon = map(int, out.stdout.split())
    assert n == rows and path.stat().st_size > 2**31
    assert written_peak < 1024**3, f"peak RSS {written_peak} bytes while writing"  # a few batches, not the file
    assert opened < 64 * 1024**2, f"opening the run grew RSS by {opened} bytes"  # boundaries only, not the URIs
    # Each lookup maps a few file pages (the kernel may map a 2 MiB folio per fault: page cache,
    # counted as RssFile and reclaimable); the process's own memory stays small.
    assert anon < 512 * 1024**2, f"anonymous RSS {anon} bytes after the lookups"
