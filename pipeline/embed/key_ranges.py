"""Key ranges of an S3 listing, and how a range that turned out big is split (pure).

A part of a listing is the keys under `prefix` with after < key <= upto (either bound may
be None). S3 lists a range with Prefix and StartAfter (exclusive) and stops at `upto`;
ranges that share a prefix and whose bounds chain (one's `upto` is the next one's
`after`) partition its keys, whatever strings the bounds are.

A listing task that pages through its range for a while without reaching the end splits
the rest (`split_rest`) using the keys it saw: the keys after the last one it listed,
L, fall into regions by the first position at which they differ from L. Region p holds
the keys that start with L[:p] and have a character above L[p] there; the shallower the
position, the more keys the region may hold. Each region becomes a range, the regions
at and just above the positions where the task's own keys varied are cut once more at
each character of L[p]'s class (digits, lower case, upper case, other ASCII), and the
regions deeper than that, which lie within what one task lists, are merged into the first
range. A region with no keys costs its task one LIST call.
"""
from __future__ import annotations

import string
from dataclasses import dataclass

CLASSES = (string.digits, string.ascii_lowercase, string.ascii_uppercase,
           "".join(c for c in map(chr, range(0x21, 0x7F)) if not c.isalnum()))
CUT_POSITIONS = 4  # regions cut by character, counted upwards from where the task's keys varied


@dataclass(frozen=True)
class KeyRange:
    prefix: str  # every key starts with it ("" for a whole bucket)
    after: str | None = None  # exclusive lower bound (S3's StartAfter)
    upto: str | None = None  # inclusive upper bound
    direct: bool = False  # only the keys directly under prefix (a listing with Delimiter="/")

    def holds(self, key: str) -> bool:
        return (key.startswith(self.prefix) and (self.after is None or key > self.after)
                and (self.upto is None or key <= self.upto))


def successor(c: str) -> str | None:
    """The next code point after `c` (surrogates skipped); None after U+10FFFF. UTF-8 byte
    order, S3's key order, is code point order."""
    n = ord(c) + 1
    if 0xD800 <= n <= 0xDFFF:
        n = 0xE000
    return chr(n) if n <= 0x10FFFF else None


def _class_above(c: str) -> str:
    for chars in CLASSES:
        if c in chars:
            return chars[chars.index(c) + 1:]
    return ""


def common_prefix_len(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def split_rest(part: KeyRange, first: str, last: str) -> list[KeyRange]:
    """The keys of `part` after `last` as ranges (in key order) that partition them; `first`
    and `last` are the first and last key the task listed in `part`."""
    start = len(part.prefix)
    varied = max(start, common_prefix_len(first, last))  # the task's keys all share last[:varied]
    bounds = set()
    for p in range(start, min(len(last), varied + 2)):  # deeper regions stay in the first range
        nxt = successor(last[p])
        if nxt is not None:
            bounds.add(last[:p] + nxt)
    for p in range(max(start, varied - CUT_POSITIONS + 1), min(len(last), varied + 1)):
        for c in _class_above(last[p])[1:]:  # the class's next character is the region's own start
            bounds.add(last[:p] + c)
    ordered = sorted(b for b in bounds if b > last and (part.upto is None or b < part.upto)
                     and b.startswith(part.prefix))
    edges = [last] + ordered + [part.upto]
    return [KeyRange(part.prefix, lo, hi) for lo, hi in zip(edges, edges[1:])]
