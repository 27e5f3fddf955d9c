"""`--decode device` end to end on the real object store and Ray: the fetch tasks ship bytes,
the actors decode (torchvision's CPU decoder here), every object is one row, the bad ones
decode error rows as with `--decode cpu`, and the embeddings match the CPU-decode run's."""
from __future__ import annotations

import numpy as np
import pytest

from helpers import SPEC
from sparse_embed.infra.synthetic_images import generate
from sparse_embed.jobs.demo import corrupt_objects
from sparse_embed.pipeline.embed.run import EmbedConfig, run_embed
from sparse_embed.pipeline.store import live, storage, tables

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _rows(out: str, name: str, cols: list[str]) -> dict:
    return live.read_live(tables.table_uri(out, name), cols).to_pydict()


def test_device_decode_run_matches_the_cpu_decode_run(object_store, ray_local):
    bucket = object_store.create_bucket("decode-device")
    source = f"{bucket}/images/"
    objects = {im.key: im.data for im in generate(4, seed=3)} | corrupt_objects(3)
    storage.put_many(source, objects)
    runs = {}
    for mode in ("device", "cpu"):
        out = f"{bucket}/emb-{mode}"
        runs[mode] = run_embed(EmbedConfig(source=source, out=out, spec=SPEC, build_index=False, decode=mode))
        assert runs[mode]["actor_pool"]["decode"] == mode
    emb = {m: _rows(f"{bucket}/emb-{m}", tables.EMBEDDINGS, ["uri", "embedding", "width", "height"]) for m in runs}
    err = {m: _rows(f"{bucket}/emb-{m}", tables.ERRORS, ["uri", "stage", "error_type"]) for m in runs}
    assert len(emb["device"]["uri"]) + len(err["device"]["uri"]) == len(objects)
    assert sorted(zip(err["device"]["uri"], err["device"]["stage"], err["device"]["error_type"])) == \
        sorted(zip(err["cpu"]["uri"], err["cpu"]["stage"], err["cpu"]["error_type"]))
    assert set(err["device"]["stage"]) == {"decode"} and len(err["device"]["uri"]) == 3
    by_uri = {m: {u: (np.asarray(e, np.float32), w, h) for u, e, w, h in zip(*(emb[m][c] for c in ("uri", "embedding", "width", "height")))}
              for m in runs}
    assert by_uri["device"].keys() == by_uri["cpu"].keys() and len(by_uri["cpu"]) == len(objects) - 3
    for uri, (vec, w, h) in by_uri["device"].items():
        ref, rw, rh = by_uri["cpu"][uri]
        assert (w, h) == (rw, rh)
        assert float(vec @ ref) > 0.999, f"{uri}: cosine {float(vec @ ref)} between device- and CPU-decoded embeddings"
