"""The deletion guard: a run that would remove a large share of the table stops first.

A listing that shrinks (a missing mount, a half-synced directory, an inventory filtered on
another prefix) looks to the diff exactly like objects that were deleted. After the diff
and before any commit, the run counts the embedding rows of objects no longer listed; over
the limit it raises MassDelete (exit 2) and changes no table, the index or the errors.
Rows of changed objects are not counted: the same run embeds them again.

A limit is a share of the live rows ("10%", "0.1") or a count ("500"); a deliberate purge
passes with allow (`--allow-mass-delete`, or `--allow-empty-source` for an empty SOURCE).
"""
from __future__ import annotations

from dataclasses import dataclass

DEFAULT_LIMIT = "10%"


class MassDelete(ValueError):
    """The run would remove more rows than its limit allows (a ValueError: exit 2)."""


@dataclass(frozen=True)
class DeleteLimit:
    share: float | None = None  # of the live rows, in [0, 1]
    count: int | None = None

    @classmethod
    def parse(cls, text) -> "DeleteLimit":
        """"10%" or "0.1" -> a share; "500" -> a count. Raises ValueError naming the forms."""
        s = str(text).strip()
        try:
            if s.endswith("%"):
                share = float(s[:-1]) / 100
            elif s.isdigit():
                return cls(count=int(s))
            else:
                share = float(s)
        except ValueError:
            share = -1.0
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"Expected --max-delete as a share of the live rows (10%, 0.1) or a count of rows (500), "
                             f"got {text!r}")
        return cls(share=share)

    def rows(self, live_rows: int) -> int:
        """The most rows a run may remove from a table of `live_rows`."""
        return self.count if self.count is not None else int(self.share * live_rows)

    def __str__(self) -> str:
        return str(self.count) if self.count is not None else f"{self.share:.0%}"


def check(*, deleted: int, live_rows: int, limit: DeleteLimit, allow: bool, listing_from: str, source: str) -> dict:
    """The guard's figures for the run report; raises MassDelete when `deleted` rows exceed
    the limit and the run was not told the purge is deliberate."""
    figures = {"deleted_rows": deleted, "live_rows": live_rows, "share": round(deleted / live_rows, 4) if live_rows else 0.0,
               "limit": str(limit), "limit_rows": limit.rows(live_rows), "listing": listing_from, "allowed": allow}
    if deleted > figures["limit_rows"] and not allow:
        raise MassDelete(
            f"Refusing to remove {deleted} of {live_rows} rows ({figures['share']:.1%}, over --max-delete {limit}): "
            f"{deleted} embedded objects are missing from the listing of {source!r} ({listing_from}); nothing was "
            f"changed. Check that the listing is complete (mount, prefix, inventory), or rerun with --allow-mass-delete "
            f"if the objects were deleted on purpose")
    return figures
