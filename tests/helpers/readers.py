"""Readers this project did not write, each reading a Delta table as its users would:
deltalake's kernel QueryBuilder (DataFusion), deltalake's pyarrow scanner, polars'
read_delta and DuckDB's delta extension (delta_scan, offline from PyPI). Local tables only
(DuckDB's S3 access needs its httpfs extension, which is downloaded at run time)."""
from __future__ import annotations

import glob
import os

COLUMNS = ("image_id", "uri", "etag")


def _rows(table):
    """Sorted (image_id, uri, etag) tuples and the number of null embeddings of an Arrow table."""
    import pyarrow as pa
    import pyarrow.compute as pc

    t = pa.table(table)
    keys = sorted(zip(*(t.column(c).to_pylist() for c in COLUMNS)))
    nulls = int(pc.sum(pc.is_null(t.column("embedding"))).as_py() or 0) if "embedding" in t.column_names else 0
    return keys, nulls


def query_builder(path):
    from deltalake import DeltaTable, QueryBuilder

    return _rows(QueryBuilder().register("t", DeltaTable(path)).execute("select * from t").read_all())


def pyarrow_scanner(path):
    from deltalake import DeltaTable

    return _rows(DeltaTable(path).to_pyarrow_table())


def polars(path):
    import polars as pl

    return _rows(pl.read_delta(str(path)).to_arrow())


def duckdb_extension_path() -> str:
    import duckdb

    site = os.path.dirname(os.path.dirname(duckdb.__file__))
    found = glob.glob(os.path.join(site, "duckdb_ext", "extensions", "v*", "*", "delta.duckdb_extension"))
    if not found:
        raise FileNotFoundError("duckdb-ext-delta is not installed (pip install duckdb-ext-delta==1.4.4.20260205)")
    return found[0]


def duckdb(path):
    import duckdb as ddb

    con = ddb.connect(config={"allow_unsigned_extensions": "true"})
    con.execute(f"LOAD '{duckdb_extension_path()}'")
    return _rows(con.execute(f"SELECT * FROM delta_scan('{path}')").arrow())


READERS = {"deltalake QueryBuilder": query_builder, "deltalake to_pyarrow_table": pyarrow_scanner,
           "polars read_delta": polars, "duckdb delta_scan": duckdb}


def read_all(path) -> dict:
    """reader name -> (rows, null embeddings), or the exception it raised."""
    out = {}
    for name, read in READERS.items():
        try:
            out[name] = read(path)
        except Exception as e:  # noqa: BLE001 - a refusal is an outcome the tests check
            out[name] = e
    return out


def assert_live_rows(path, expected_rows, *, deletion_vectors: bool) -> None:
    """Every reader returns exactly `expected_rows` ((image_id, uri, etag), one per object,
    no null embedding), or, on a deletion-vector table, the pyarrow scanner refuses it."""
    expected = sorted(expected_rows)
    for name, got in read_all(path).items():
        if deletion_vectors and name == "deltalake to_pyarrow_table":
            assert isinstance(got, Exception) and "deletionVectors" in str(got), (name, got)
            continue
        assert not isinstance(got, Exception), f"{name} failed: {got!r}"
        rows, nulls = got
        assert nulls == 0, f"{name}: {nulls} null embeddings"
        assert rows == expected, f"{name}: {len(rows)} rows, expected {len(expected)}"
