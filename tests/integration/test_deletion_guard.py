"""The deletion guard: a listing that shrinks (a missing directory, a parallel S3 listing
of a half-deleted prefix, an inventory of another prefix) is refused with exit 2 and
nothing changed; the objects coming back costs nothing; --allow-mass-delete then removes
exactly the missing objects' rows."""
from __future__ import annotations

import shutil

import pytest

from helpers.faults import assert_exactly_once, fill
from helpers.inventory import bucket_objects, write_report
from helpers.readers import polars
from sparse_embed.infra.synthetic_images import generate
from sparse_embed.jobs.cli import main
from sparse_embed.pipeline.embed.run import load_run_reports
from sparse_embed.pipeline.index.publish import current_manifest
from sparse_embed.pipeline.store import live, storage, tables

pytestmark = pytest.mark.integration


def _embed(source: str, out: str, *extra: str) -> list[str]:
    return ["embed", source, "--out", out, "--model", "resnet10t", "--rows-per-file", "8", "--index-shards", "1", *extra]


def _state(out: str) -> tuple:
    """What a refused run must leave as it was: every table's version and the CURRENT index."""
    versions = tuple(tables.version_of(tables.table_uri(out, t)) for t in (tables.EMBEDDINGS, tables.ERRORS, tables.IMAGE_IDS))
    return versions, current_manifest(f"{out}/index")["index_id"]


def _uris(out: str) -> list[str]:
    return sorted(live.read_live(f"{out}/embeddings", ["uri"]).column("uri").to_pylist())


def _report(out: str, capsys) -> dict:
    """The run report of the last run whose summary went to stdout (run ids of one second
    do not sort by time)."""
    run_id = [ln.split()[1] for ln in capsys.readouterr().out.splitlines() if ln.startswith("run ")][-1]
    return next(r for r in load_run_reports(out) if r["run_id"] == run_id)


def _polars_uris(out: str) -> list[str]:
    rows, nulls = polars(f"{out}/embeddings")
    assert nulls == 0
    return sorted(uri for _, uri, _ in rows)


def test_a_missing_directory_is_refused_comes_back_free_and_purges_only_when_told(ray_local, tmp_path, capsys):
    src, out = tmp_path / "src", str(tmp_path / "out")
    for sub, n, seed in (("mount", 4, 41), ("kept", 1, 42)):  # 8 images under mount/, 2 under kept/
        for im in generate(n, seed=seed, variants=("jpeg",), min_side=32, max_side=64):
            (src / sub / im.key).parent.mkdir(parents=True, exist_ok=True)
            (src / sub / im.key).write_bytes(im.data)
    assert main(_embed(str(src), out)) == 0
    before, all_uris = _state(out), _uris(out)
    assert len(all_uris) == 10

    shutil.move(src / "mount", tmp_path / "unmounted")  # the mount went away
    capsys.readouterr()
    assert main(_embed(str(src), out)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (earlier lines: Ray workers' logs of the first run)
    assert err.startswith("sparse-embed embed: error: Refusing to remove 8 of 10 rows (80.0%, over --max-delete 10%)")
    assert "(parallel listing)" in err and "--allow-mass-delete" in err
    assert _state(out) == before and _uris(out) == all_uris, "a refused run changed the table or the index"
    assert _polars_uris(out) == all_uris, "another reader sees every row still"

    shutil.move(tmp_path / "unmounted", src / "mount")  # back, byte for byte
    capsys.readouterr()
    assert main(_embed(str(src), out)) == 0
    assert _report(out, capsys)["counts"]["processed"] == 0, "nothing is embedded again"

    shutil.rmtree(src / "mount")  # deleted on purpose this time
    assert main(_embed(str(src), out, "--allow-mass-delete")) == 0
    report = _report(out, capsys)
    assert report["counts"]["removed_rows"] == 8 and report["deletion_guard"]["deleted_rows"] == 8
    assert report["deletion_guard"]["allowed"] and report["deletion_guard"]["limit"] == "10%"
    kept = [u for u in all_uris if "/kept/" in u]
    assert _uris(out) == kept and _polars_uris(out) == kept
    assert current_manifest(f"{out}/index")["ntotal"] == 2


def test_shrunken_s3_and_inventory_listings_are_refused_until_allowed(ray_local, bucket, capsys):
    source, keys = fill(bucket, 6, seed=43)  # 12 objects under images/
    out = f"{bucket}/emb"
    assert main(_embed(source, out)) == 0
    before, all_uris = _state(out), _uris(out)

    other = write_report(bucket, "CSV", [o for o in bucket_objects(bucket) if o["Key"].startswith("emb/runs/")])
    capsys.readouterr()
    assert main(_embed(source, out, "--inventory", other)) == 2, "an inventory of another prefix lists nothing here"
    err = capsys.readouterr().err
    assert "No images to embed: the inventory " in err and "check SOURCE and --inventory" in err
    assert _state(out) == before

    half = write_report(bucket, "Parquet", [o for o in bucket_objects(bucket) if o["Key"].startswith("images/")][:6])
    assert main(_embed(source, out, "--inventory", half)) == 2
    assert "Refusing to remove 6 of 12 rows" in capsys.readouterr().err and _state(out) == before

    fs = storage.filesystem(source)
    for k in keys[:9]:
        fs.rm_file(storage.strip_scheme(k))
    assert main(_embed(source, out, "--max-delete", "8")) == 2, "a count limit"
    assert "over --max-delete 8" in capsys.readouterr().err and _state(out) == before and _uris(out) == all_uris
    assert main(_embed(source, out, "--max-delete", "9")) == 0, "9 rows are within a limit of 9"
    assert _uris(out) == sorted(keys[9:])
    assert_exactly_once(source, out)
    capsys.readouterr()
    assert main(_embed(source, out)) == 0 and _report(out, capsys)["counts"]["processed"] == 0
