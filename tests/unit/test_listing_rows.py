"""listing.listing_rows (vectorised filters, used by the listing tasks and the inventory
reader) keeps exactly the paths `matches` keeps, sorted by uri."""
from __future__ import annotations

import random

import pyarrow as pa
import pytest

from sparse_embed.pipeline.embed.listing import DEFAULT_EXTENSIONS, listing_rows, matches


@pytest.mark.parametrize("extensions,glob", [(DEFAULT_EXTENSIONS, None), ((".png",), "*_large*"), ((), "bkt/a/*"), ((), None)])
def test_filters_equal_matches(extensions, glob):
    rng = random.Random(7)
    names = ["x.JPG", "y.jpeg", "z.png", "w_large.png", "notes.txt", "v.Tiff", "noext", "ü ñ.webp"]
    paths = [f"bkt/{rng.choice(['a', 'b', 'a/c'])}/{i}-{rng.choice(names)}" for i in range(400)]
    found = pa.table({"path": paths, "etag": ["e"] * len(paths), "size": pa.array(range(len(paths)), pa.int64()),
                      "mtime": pa.array([0] * len(paths), pa.timestamp("us", tz="UTC"))})
    got = listing_rows(found, "s3://bkt/", extensions, glob)
    expected = sorted(f"s3://{p}" for p in paths if matches(p, extensions, glob))
    assert got.column("uri").to_pylist() == expected and len(expected) > 0
    local = listing_rows(found, "/data/", extensions, glob)
    assert local.column("uri").to_pylist() == sorted(p for p in paths if matches(p, extensions, glob))
