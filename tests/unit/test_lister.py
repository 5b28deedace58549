"""The listing's key ranges as pure logic: where a listing splits, how a range
keeps only its own keys, and that split ranges leave no gap."""

from __future__ import annotations

import itertools

from lazyfs.lister import MAX_RANGES, KeyRange, plan_splits, ranges_for, ranges_from, split
from lazyfs.namespace import RemoteObject
from lazyfs.objectstore import ListPage


def objs(*keys: str) -> list[RemoteObject]:
    return [RemoteObject("b", k, 1, "e", 0) for k in keys]


def numbered(n: int) -> list[RemoteObject]:
    return objs(*(f"p/{i:07d}" for i in range(n)))


def sizes(objects: list[RemoteObject], splits: list[str]) -> list[int]:
    """How many of `objects` each range of `splits` holds."""
    out = []
    for r in ranges_from(splits):
        out.append(sum(1 for o in objects if o.key > r.after and (r.upto is None or o.key <= r.upto)))
    return out


def test_small_listings_are_one_range() -> None:
    assert plan_splits([]) == []
    assert plan_splits(numbered(5000)) == []


def test_splits_are_whole_pages_and_at_most_eight_ranges() -> None:
    for n, expected in [(20_000, [5000] * 4), (10_007, [4000, 4000, 2007]), (11_000, [4000, 4000, 3000]),
                        (200_000, [25_000] * 8)]:
        objects = numbered(n)
        assert sizes(objects, plan_splits(objects)) == expected, n
    assert len(ranges_from(plan_splits(numbered(1_000_000)))) == 8


def test_a_range_keeps_its_keys_and_stops_at_its_end() -> None:
    r = KeyRange(after="p/b", upto="p/d")
    r.take(ListPage(objs("p/c", "p/d", "p/e"), [], next_token="t"))
    assert [o.key for o in r.objects] == ["p/c", "p/d"] and r.done and r.after == "p/d"


def test_a_range_walks_on_with_the_token_until_the_last_page() -> None:
    r = KeyRange()
    r.take(ListPage(objs("p/a"), [], next_token="t1"))
    assert not r.done and r.token == "t1"
    r.take(ListPage(objs("p/b"), []))
    assert r.done and [o.key for o in r.objects] == ["p/a", "p/b"]


def test_a_store_that_ignores_start_after_costs_pages_not_correctness() -> None:
    r = KeyRange(after="p/b")
    r.take(ListPage(objs("p/a", "p/b", "p/c"), []))
    assert [o.key for o in r.objects] == ["p/c"] and r.ignored_start_after


def test_split_cuts_only_what_is_not_listed_yet_and_leaves_no_gap() -> None:
    r = KeyRange(after="p/m/d009/f", upto=None)
    folders = [f"p/m/d{i:03d}/" for i in range(100)] + ["p/n/"]
    new = split(r, folders)
    assert len(new) == 7
    pieces = [r, *new]
    assert all(p.after > "p/m/d009/f" for p in pieces[1:])
    for a, b in itertools.pairwise(pieces):
        assert a.upto == b.after, "consecutive ranges share their bound"
    assert pieces[-1].upto is None


def test_split_with_few_candidates_uses_them_all_and_none_changes_nothing() -> None:
    r = KeyRange(after="p/a", upto="p/z")
    assert split(r, ["p/0/", "p/a", "p/z/"]) == [] and r.upto == "p/z"
    new = split(r, ["p/c/", "p/q/"])
    assert [(x.after, x.upto) for x in [r, *new]] == [("p/a", "p/c/"), ("p/c/", "p/q/"), ("p/q/", "p/z")]


def test_a_first_listing_splits_by_how_long_the_rest_looks() -> None:
    assert ranges_for(pages=1, reached=334, ahead=66) == 1, "400 folders of 3 keys: a page is left"
    assert ranges_for(pages=1, reached=10, ahead=91) == 5, "peer-bench: about 9 pages are left"
    assert ranges_for(pages=1, reached=2, ahead=1000) == MAX_RANGES
    assert ranges_for(pages=1, reached=0, ahead=3) == MAX_RANGES, "no telling"
