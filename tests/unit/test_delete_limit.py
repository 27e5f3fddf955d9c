"""The deletion guard's limit and decision (pipeline/embed/deletion_guard.py)."""
from __future__ import annotations

import pytest

from sparse_embed.pipeline.embed.deletion_guard import DeleteLimit, MassDelete, check


@pytest.mark.parametrize("text, rows_of_1000", [("10%", 100), ("0.1", 100), ("0", 0), ("100%", 1000), ("500", 500),
                                                (7, 7), ("2.5%", 25)])
def test_a_limit_is_a_share_or_a_count(text, rows_of_1000):
    assert DeleteLimit.parse(text).rows(1000) == rows_of_1000


@pytest.mark.parametrize("text", ["lots", "-1", "150%", "1.5", ""])
def test_a_bad_limit_names_the_accepted_forms(text):
    with pytest.raises(ValueError, match=r"share of the live rows \(10%, 0.1\) or a count of rows \(500\)"):
        DeleteLimit.parse(text)


def test_over_the_limit_is_refused_unless_allowed():
    args = dict(live_rows=40, limit=DeleteLimit.parse("10%"), listing_from="inventory s3://b/m.json", source="s3://b/i/")
    assert check(deleted=4, allow=False, **args)["limit_rows"] == 4, "at the limit passes"
    with pytest.raises(MassDelete, match=r"Refusing to remove 39 of 40 rows \(97.5%, over --max-delete 10%\).*"
                                         r"inventory s3://b/m.json.*--allow-mass-delete"):
        check(deleted=39, allow=False, **args)
    figures = check(deleted=39, allow=True, **args)
    assert figures == {"deleted_rows": 39, "live_rows": 40, "share": 0.975, "limit": "10%", "limit_rows": 4,
                       "listing": "inventory s3://b/m.json", "allowed": True}
    assert check(deleted=0, allow=False, **(args | {"live_rows": 0}))["share"] == 0.0
