"""`sparse-embed vacuum` on an output the real embed job wrote on the local S3 server: nights
of changes leave old files and index versions; a vacuum with no retention removes exactly
what no reader needs, every reader still sees the live rows, a server that holds the
previous index keeps answering by id and by URI, and the next night updates the index."""
from __future__ import annotations

import json
import sys

import pytest

from helpers import SPEC
from helpers.faults import fill
from helpers.readers import assert_live_rows
from sparse_embed.jobs.cli import main
from sparse_embed.pipeline.embed.run import EmbedConfig, run_embed
from sparse_embed.pipeline.index.publish import current_manifest
from sparse_embed.pipeline.index.searcher import ShardedIndex, referenced_ids
from sparse_embed.pipeline.store import live, storage, tables

pytestmark = pytest.mark.integration


def _stored_bytes(uri: str) -> int:
    """Bytes of the table's data files and deletion vectors (its log excluded)."""
    fs = storage.filesystem(uri)
    fs.invalidate_cache()
    files = fs.find(storage.strip_scheme(uri), detail=True)
    return sum(int(f["size"]) for p, f in files.items() if "/_delta_log/" not in p and f.get("type") == "file")


def _index_versions(out: str) -> set[str]:
    """The index versions that hold files (SeaweedFS may keep an emptied folder's entry)."""
    fs = storage.filesystem(out)
    fs.invalidate_cache()
    root = storage.strip_scheme(f"{out}/index")
    return {p[len(root) + 1:].split("/", 1)[0] for p in fs.find(root) if "/" in p[len(root) + 1:]}


def _live_bytes(uri: str) -> int:
    """Bytes of the live version's data files and the deletion-vector files they name."""
    from sparse_embed.pipeline.store import deletion_vectors

    files = live.table_files(uri).files
    dv_files = {deletion_vectors.relative_path(f.dv["pathOrInlineDv"]) for f in files
                if f.dv and f.dv.get("storageType") == "u"}
    fs = storage.filesystem(uri)
    return sum(f.size for f in files) + sum(fs.size(storage.strip_scheme(f"{uri}/{p}")) for p in dv_files)


@pytest.mark.parametrize("deletion_vectors", [
    pytest.param(False, id="copy-on-write", marks=pytest.mark.slow),  # ~2 min each on 2 cores; ./dev test -m slow
    pytest.param(True, id="deletion-vectors"),
])
def test_vacuum_bounds_storage_and_every_reader_and_server_keeps_working(ray_local, bucket, capsys, tmp_path,
                                                                       deletion_vectors):
    source, uris = fill(bucket, 4, seed=51)
    out = f"{bucket}/emb"
    emb = f"{out}/embeddings"
    cfg = dict(source=source, out=out, spec=SPEC, rows_per_file=4, index_shards=1, max_delete="50%",
               deletion_vectors=deletion_vectors)
    run_embed(EmbedConfig(**cfg, run_id="night-0"))
    fs = storage.filesystem(source)
    keys = sorted(u[len(source):] for u in uris)
    for night, (changed, deleted) in enumerate([(0, 2), (4, 6)], start=1):
        storage.put_many(source, {keys[changed]: fs.cat_file(storage.strip_scheme(source + keys[changed + 1]))})
        fs.rm_file(storage.strip_scheme(source + keys[deleted]))
        if night == 1:
            held = ShardedIndex.open(f"{out}/index")  # a server's index, loaded before the next night
        run_embed(EmbedConfig(**cfg, run_id=f"night-{night}"))
    assert _stored_bytes(emb) > _live_bytes(emb), "the nights left files no version needs"
    before = _index_versions(out)

    assert main(["vacuum", "--out", out, "--retain-hours", "0"]) == 0
    said = capsys.readouterr().out
    assert "embeddings:" in said and "index:" in said, said
    assert _stored_bytes(emb) == _live_bytes(emb), "exactly the live files are left"
    keep = referenced_ids(current_manifest(f"{out}/index"))
    after = _index_versions(out)
    assert after == keep and len(before) > len(after), (before, after, said)

    rows = live.read_live(emb, ["image_id", "uri", "etag"])
    expected = list(zip(*(rows.column(c).to_pylist() for c in ("image_id", "uri", "etag"))))
    assert len(expected) == len(uris) - 2
    # DuckDB's delta extension reads S3 through httpfs, which is not installable offline: every
    # reader reads a byte-for-byte copy of the vacuumed table (data files, vectors and log)
    copy = tmp_path / "embeddings"
    storage.filesystem(emb).get(storage.strip_scheme(emb) + "/", str(copy) + "/", recursive=True)
    assert_live_rows(str(copy), expected, deletion_vectors=deletion_vectors)

    unchanged = source + keys[3]
    image_id = dict(zip(rows.column("uri").to_pylist(), rows.column("image_id").to_pylist()))[unchanged]
    assert held.image_id_of_uri(unchanged) == image_id
    vectors, found = held.vectors_for_ids([image_id])
    assert found == [unchanged] and held.hits(vectors, 1)[0][0].image_id == image_id

    fs.rm_file(storage.strip_scheme(source + keys[7]))  # the next night, after the vacuum
    report = run_embed(EmbedConfig(**cfg, run_id="night-3"))
    assert report["counts"]["deleted"] == 1 and report["index_id"]
    assert ShardedIndex.open(f"{out}/index").ntotal == len(uris) - 3
    assert main(["vacuum", "--out", out]) == 0  # the default week: the newest files are kept


NIGHTS = 40
OUTSIDE_TABLES_BYTES = 64 * 1024  # encoder specs, index/CURRENT and the lock object: a few KiB in all


def _output_bytes(out: str) -> tuple[int, int]:
    """(bytes stored under `out` outside the Delta logs and run reports, bytes the live
    versions need: every table's live files and vectors and CURRENT's index versions)."""
    from sparse_embed.pipeline.store.vacuum import TABLES

    fs = storage.filesystem(out)
    fs.invalidate_cache()
    root = storage.strip_scheme(out)
    files = fs.find(root, detail=True)
    stored = sum(int(f["size"]) for p, f in files.items()
                 if f.get("type") == "file" and "/_delta_log/" not in p and not p[len(root):].startswith("/runs/"))
    needed = sum(_live_bytes(tables.table_uri(out, name)) for name in TABLES)
    for version in referenced_ids(current_manifest(f"{out}/index")):
        needed += sum(int(f["size"]) for p, f in files.items() if p.startswith(f"{root}/index/{version}/"))
    return stored, needed


@pytest.mark.slow  # about 45 s a night, 30 min in all on 2 cores: ./dev test -m slow tests/integration/test_vacuum.py
@pytest.mark.timeout(3000)
def test_forty_nights_with_compactions_and_vacuum_stay_bounded_and_keep_serving(ray_local, bucket, capsys, tmp_path):
    """40 nightlies (one object changed, one deleted, one added each night; deletion vectors,
    files of 4 rows, so compactions come every few nights), each followed by its vacuum
    with no retention: after every night the bytes stored outside the logs are the live
    bytes plus a small constant, every table opens from a checkpoint at its latest version,
    the index is at the table's version, search by id and by URI answer on the new index
    and on the server's index of the night before."""
    import numpy as np
    import yaml

    from sparse_embed.infra.synthetic_images import generate

    source, _ = fill(bucket, 6, seed=52)
    out = f"{bucket}/emb"
    emb = f"{out}/embeddings"
    config = tmp_path / "nightly.yaml"
    config.write_text(yaml.safe_dump({"source": source, "out": out, "model": SPEC["model"], "rows_per_file": 4,
                                      "index_shards": 1, "deletion_vectors": True, "retain_hours": 0, "max_delete": 1}))
    fresh = generate(2 * NIGHTS, seed=53, variants=(), min_side=32, max_side=64)
    fs = storage.filesystem(source)
    rng = np.random.default_rng(52)
    held, touched, sizes = None, set(), []
    for night in range(NIGHTS):
        if night:
            keys = sorted(p[len(storage.strip_scheme(source)):] for p in fs.find(storage.strip_scheme(source)))
            changed, gone = (keys[i] for i in rng.choice(len(keys), 2, replace=False))
            added = f"n{night}/{fresh[2 * night + 1].key}"
            storage.put_many(source, {changed: fresh[2 * night].data, added: fresh[2 * night + 1].data})
            fs.rm_file(storage.strip_scheme(source + gone))
            touched = {source + k for k in (changed, gone, added)}
        assert main(["nightly", "--config", str(config)]) == 0, night
        said = capsys.readouterr().out
        assert "vacuum (retain 0 h)" in said, said

        stored, needed = _output_bytes(out)
        sizes.append(stored)
        sys.__stderr__.write(f"night {night}: {stored:,} bytes stored, {needed:,} needed\n")
        assert needed <= stored <= needed + OUTSIDE_TABLES_BYTES, (night, stored, needed)
        for name in ("embeddings", "errors", "image_ids", "listing"):
            uri = tables.table_uri(out, name)
            last = storage.read_bytes(f"{uri}/_delta_log/_last_checkpoint")
            assert json.loads(last)["version"] == tables.version_of(uri), (night, name)
        rows = live.read_live(emb, ["image_id", "uri"])
        ids = dict(zip(rows.column("uri").to_pylist(), rows.column("image_id").to_pylist()))
        index = ShardedIndex.open(f"{out}/index")
        assert index.manifest["table_version"] == tables.version_of(emb) and index.ntotal == len(ids) == 12, night
        for searcher in [index] + ([held] if held is not None else []):
            uri = sorted(set(ids) - touched)[int(rng.integers(len(set(ids) - touched)))]
            assert searcher.image_id_of_uri(uri) == ids[uri], (night, uri)
            vectors, found = searcher.vectors_for_ids([ids[uri]])
            assert found == [uri] and searcher.hits(vectors, 1)[0][0].image_id == ids[uri], (night, uri)
        held = index
    compactions = [h for h in tables.open_table(emb).history() if h.get("operation") == "OPTIMIZE"]
    assert len(compactions) >= 3, "the nights compacted the table several times"
    print(f"stored bytes after nights 1, 10, 20, 30, 40: {[sizes[i] for i in (0, 9, 19, 29, 39)]}")
    rows = live.read_live(emb, ["image_id", "uri", "etag"])
    copy = tmp_path / "embeddings"
    storage.filesystem(emb).get(storage.strip_scheme(emb) + "/", str(copy) + "/", recursive=True)
    assert_live_rows(str(copy), list(zip(*(rows.column(c).to_pylist() for c in ("image_id", "uri", "etag")))),
                     deletion_vectors=True)
