"""key_ranges.split_rest: the ranges it returns partition the keys after the last one listed."""
from __future__ import annotations

import random

import pytest

from sparse_embed.pipeline.embed.key_ranges import KeyRange, split_rest, successor


def _keys(seed: int, alphabet: str, n: int) -> list[str]:
    rng = random.Random(seed)
    return sorted({"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 9))) for _ in range(n)})


@pytest.mark.parametrize("seed,alphabet", [(0, "ab0_/Z~é"), (1, "0123456789"), (2, "xyz/.-é\U0001F600")])
@pytest.mark.parametrize("bounded", [False, True])
def test_rest_is_partitioned_exactly(seed, alphabet, bounded):
    keys = _keys(seed, alphabet, 4000)
    part = KeyRange("", None, keys[-300] if bounded else None)
    listed = [k for k in keys if part.holds(k)][:500]
    rest = split_rest(part, listed[0], listed[-1])
    for k in keys:
        owners = sum(r.holds(k) for r in rest)
        expected = 1 if part.holds(k) and k > listed[-1] else 0
        assert owners == expected, (k, owners)
    assert len(rest) > 1


def test_numbered_flat_keys_split_into_ranges_of_similar_size():
    keys = [f"img_{i:07d}.jpg" for i in range(0, 10**7, 7)]  # every 7th: 1.43 M keys
    first, last = keys[0], keys[14285]  # a task listed the first 100k names' worth
    rest = split_rest(KeyRange(""), first, last)
    import bisect

    sizes = [bisect.bisect_right(keys, r.upto) - bisect.bisect_right(keys, r.after) if r.upto else
             len(keys) - bisect.bisect_right(keys, r.after) for r in rest]
    assert sum(sizes) == len(keys) - 14286
    assert max(sizes) <= len(keys) // 9, f"the biggest range keeps {max(sizes)} of {len(keys)} keys"


def test_a_prefix_bounds_the_rest():
    rest = split_rest(KeyRange("photos/2024/"), "photos/2024/a.jpg", "photos/2024/b.jpg")
    assert all(r.prefix == "photos/2024/" for r in rest)
    assert all(r.upto is None or r.upto.startswith("photos/2024/") for r in rest)
    assert rest[-1].upto is None


def test_successor_skips_surrogates_and_stops_at_the_last_code_point():
    assert successor("a") == "b" and successor("\ud7ff") == "\ue000" and successor("\U0010ffff") is None
