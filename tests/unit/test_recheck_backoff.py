"""When a name a 404 took is asked about again (recheck.Schedule), and the
tree it comes back into (Tree.replaced adding a file): pure, no clock."""

from __future__ import annotations

import math

from lazyfs.namespace import DirNode, RemoteObject, build_tree
from lazyfs.recheck import Schedule


def obj(key: str, size: int = 1, etag: str = "e") -> RemoteObject:
    return RemoteObject(bucket="b", key=key, size=size, etag=etag, mtime_ns=10)


def asked(schedule: Schedule, key: str, dropped_at: float, found_at: float = math.inf) -> list[float]:
    """The times `key` is asked about again, answered 404 until `found_at`."""
    times: list[float] = []
    schedule.dropped(obj(key), dropped_at, listings=1)
    while (due := schedule.next_due()) < math.inf:
        assert [m.old.key for m in schedule.due(due)] == [key]
        times.append(due)
        if due >= found_at:
            schedule.done(key)
        else:
            schedule.again(key, due)
    return times


def test_asked_again_after_2_s_then_twice_as_long_each_time_within_the_refresh_interval() -> None:
    assert asked(Schedule(60.0, 2.0), "m/a.bin", 100.0) == [102.0, 106.0, 114.0, 130.0]
    assert asked(Schedule(3600.0, 2.0), "m/a.bin", 0.0) == [2.0 * (2 ** n - 1) for n in range(1, 11)]


def test_found_again_ends_the_rechecks() -> None:
    assert asked(Schedule(60.0, 2.0), "m/a.bin", 0.0, found_at=5.0) == [2.0, 6.0]


def test_a_refresh_sooner_than_the_first_recheck_leaves_it_to_the_listing() -> None:
    schedule = Schedule(1.0, 2.0)
    assert not schedule.dropped(obj("m/a.bin"), 0.0, listings=1)
    assert schedule.next_due() == math.inf


def test_a_late_recheck_counts_its_wait_from_when_it_ran() -> None:
    schedule = Schedule(60.0, 2.0)
    schedule.dropped(obj("m/a.bin"), 0.0, listings=1)
    assert schedule.again("m/a.bin", 10.0)  # (the loop was held up)
    assert schedule.next_due() == 14.0
    assert not schedule.again("m/a.bin", 55.0), "asked no more past the refresh interval (55 + 8 > 60)"
    assert schedule.missing == {}


def test_a_name_is_added_back_into_its_folder_in_order() -> None:
    t = build_tree([obj("p/a.bin", 3), obj("p/c.bin", 5), obj("p/d/x.bin", 7)], folders=["p/"])
    gone = t.replaced("p/c.bin", None)
    assert gone.find("p/c.bin") is None and (gone.objects, gone.total_bytes) == (2, 10)
    back = gone.replaced("p/c.bin", obj("p/c.bin", 5))
    p = back.find("p")
    assert isinstance(p, DirNode) and p.names == ("a.bin", "c.bin", "d") and p.nsubdirs == 1
    assert back.find("p/c.bin") == obj("p/c.bin", 5) and (back.objects, back.total_bytes) == (3, 15)
    assert back.find("p/d") is t.find("p/d"), "folders off its path are shared"
    assert gone.find("p/c.bin") is None, "snapshots are immutable"


def test_nothing_is_added_where_its_folder_went_or_a_folder_stands() -> None:
    t = build_tree([obj("p/a.bin"), obj("p/d/x.bin")], folders=["p/"])
    assert t.replaced("p/gone/b.bin", obj("p/gone/b.bin")) is t
    assert t.replaced("p/d", obj("p/d")) is t
    assert t.replaced("p/nothing.bin", None) is t
