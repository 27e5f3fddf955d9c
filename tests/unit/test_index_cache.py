"""The searcher's local cache: one folder per index root, pruned of index ids no longer used."""
import os

from sparse_embed.pipeline.index import searcher


def _cached_id(root, index_id: str, mtime: float):
    d = searcher.cache_root(root) / index_id
    d.mkdir(parents=True)
    f = d / "shard_00000.faiss"
    f.write_bytes(b"x")
    os.utime(f, (mtime, mtime))
    os.utime(d, (mtime, mtime))


def test_prune_removes_old_unused_ids_of_this_root_only(tmp_path, monkeypatch):
    monkeypatch.setattr(searcher, "CACHE_DIR", tmp_path)
    now = 1_000_000.0
    _cached_id("s3://b/out/index", "old-unused", now - 7200)
    _cached_id("s3://b/out/index", "old-kept", now - 7200)
    _cached_id("s3://b/out/index", "fresh-unused", now - 60)  # perhaps another process fetching it
    _cached_id("s3://b/other/index", "old-other-root", now - 7200)
    removed = searcher.prune_cache("s3://b/out/index", {"old-kept"}, min_age_s=3600, now=now)
    assert removed == ["old-unused"]
    assert {d.name for d in searcher.cache_root("s3://b/out/index").iterdir()} == {"old-kept", "fresh-unused"}
    assert (searcher.cache_root("s3://b/other/index") / "old-other-root").is_dir()
    assert searcher.cache_root("s3://b/out/index/") == searcher.cache_root("s3://b/out/index")
    assert searcher.prune_cache("s3://b/never/index", set(), now=now) == []  # no cache folder yet


def test_referenced_ids_include_the_folders_of_base_shards_id_maps_and_deletions():
    m = {"index_id": "u2", "shards": [{"file": "shard_00000.faiss", "index_id": "b1"}, {"file": "delta.faiss"}],
         "id_maps": [{"file": "idmap_00000.arrow", "index_id": "b1"}, {"file": "idmap_d.arrow", "index_id": "u1"}],
         "deleted": {"file": "deleted.npy", "count": 3}}
    assert searcher.referenced_ids(m) == {"u2", "b1", "u1"}
