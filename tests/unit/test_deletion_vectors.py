"""Delta deletion vectors (pipeline/store/deletion_vectors.py) in both directions: this
project's reader on vectors Databricks wrote (delta-rs's table-with-dv-small fixture,
tests/data/table-with-dv-small/PROVENANCE.md), and delta-rs's and DuckDB's readers on
vectors this project wrote."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from helpers.readers import duckdb_extension_path
from sparse_embed.pipeline.store import deletion_vectors as dvf
from sparse_embed.pipeline.store import live

FIXTURE = Path(__file__).resolve().parents[1] / "data" / "table-with-dv-small"


def test_z85_names_match_the_protocol_example():
    # the protocol's example descriptor: "ab" prefix folder + the UUID in Z85
    assert dvf.relative_path("ab^-aqEH.-t@S}K{vb[*k^") == "ab/deletion_vector_d2c639aa-8816-431a-aaf6-d3fe2512ff61.bin"
    assert dvf.relative_path("vBn[lx{q8@P<9BNH/isA") == "deletion_vector_61d16c75-6994-46b7-a15b-8b538852e50e.bin"
    raw = bytes(range(16))
    assert dvf.z85_decode(dvf.z85_encode(raw)) == raw


def test_bitmaps_round_trip_across_32_bit_buckets():
    rng = np.random.default_rng(7)
    positions = np.unique(np.r_[rng.integers(0, 2**20, 5000), [2**32 + 3, 2**33]]).astype(np.int64)
    assert np.array_equal(dvf.deserialize(dvf.serialize(positions)), positions)
    assert np.array_equal(dvf.deserialize(dvf.serialize([])), np.zeros(0, np.int64))


def test_a_damaged_vector_file_is_refused():
    body = bytearray(dvf.file_bytes(dvf.serialize([1, 2])))
    body[-6] ^= 0xFF
    with pytest.raises(ValueError, match="checksum"):
        dvf.read_framed(bytes(body), 1, len(body) - 9)


def test_our_reader_applies_the_vector_databricks_wrote():
    tf = live.table_files(str(FIXTURE))
    assert tf.deletion_vectors and len(tf.files) == 1 and tf.files[0].deleted == 2
    assert sorted(live.read_live(str(FIXTURE), ["value"]).column("value").to_pylist()) == list(range(1, 9))
    # and our serialization of those rows is byte for byte the file Databricks wrote
    blob = (FIXTURE / "deletion_vector_61d16c75-6994-46b7-a15b-8b538852e50e.bin").read_bytes()
    assert dvf.file_bytes(dvf.serialize([0, 9])) == blob


def test_kernel_readers_apply_vectors_we_wrote(tmp_path):
    """The fixture's file with our own vector (rows 2, 3 and 5) in place of Databricks'."""
    import duckdb
    from deltalake import DeltaTable, QueryBuilder

    from sparse_embed.pipeline.store import removal

    table = tmp_path / "t"
    shutil.copytree(FIXTURE, table)
    f = live.table_files(str(table)).files[0]
    rem = removal.remove_positions(str(table), [(f, np.array([2, 3, 5]))], tag="ours")
    assert rem.mechanism == removal.DELETION_VECTORS and rem.rows == 3 and rem.files_rewritten == 0
    expected = [1, 4, 6, 7, 8]
    qb = QueryBuilder().register("t", DeltaTable(str(table))).execute("select value from t").read_all()
    assert sorted(qb.column("value").to_pylist()) == expected
    con = duckdb.connect(config={"allow_unsigned_extensions": "true"})
    con.execute(f"LOAD '{duckdb_extension_path()}'")
    assert sorted(r[0] for r in con.execute(f"select value from delta_scan('{table}')").fetchall()) == expected
    assert sorted(live.read_live(str(table), ["value"]).column("value").to_pylist()) == expected
