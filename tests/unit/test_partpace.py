"""The CRT's request sizes (partpace.py): sized for the rate each request
gets once the sweep's requests share the link, learnt from every request
that lands or stalls."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from lazyfs.partpace import Attempt, Limits, PartPace, Wire

MiB = 1024 * 1024
PART_BLOCKS = 8
CONNECTIONS = 16
UNSEEN_S = 20.0  # the shorter of --read-deadline and --read-timeout


class Req:
    def __init__(self, start: int, end: int, attempt: Attempt) -> None:
        self.start, self.end, self.attempt = start, end, attempt


class Link:
    """A pace, its wire and a clock of our own."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, size: int = 1024 * MiB) -> None:
        self.now = 100.0
        monkeypatch.setattr("lazyfs.partpace.time", SimpleNamespace(monotonic=lambda: self.now))
        self.wire = Wire()
        self.left = size
        limits = Limits(part_blocks=PART_BLOCKS, max_requests=CONNECTIONS, read_deadline=60, whole_parts=True,
                        unseen_s=UNSEEN_S)
        self.pace = PartPace(limits, MiB, self.wire, lambda: self.left)

    def start(self, nbytes: int) -> Req:
        self.wire.started()
        return Req(0, nbytes, self.pace.stamp(0))

    def land(self, *reqs: Req, after: float) -> None:
        """The requests, all on the wire, land together `after` seconds later."""
        self.now += after
        for req in reqs:
            self.pace.landed(req)
            self.wire.ended()
            self.left -= req.end - req.start


def test_the_link_is_unknown_until_a_request_lands(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Link(monkeypatch).pace.blocks == 1


def test_a_lone_blocks_rate_is_shared_by_the_requests_to_come(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tester's link: 2 MB/s.  Alone, the first block says 2 MB/s; the
    sweep's 16 requests each get an eighth of a MB/s: a part of 8 MiB takes a
    minute there, a block 8 s.  Before, the sweep asked for whole parts."""
    link = Link(monkeypatch)
    link.land(link.start(MiB), after=MiB / 2e6)
    assert link.pace.blocks == 1


def test_a_fast_link_keeps_whole_parts_from_the_start(monkeypatch: pytest.MonkeyPatch) -> None:
    link = Link(monkeypatch)
    link.land(link.start(MiB), after=0.05)  # ~30 ms to the first byte, then 1 MiB: 21 MB/s alone
    assert link.pace.blocks == PART_BLOCKS


def test_all_the_rest_of_a_file_that_lands_in_time_comes_in_whole_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    link = Link(monkeypatch, size=16 * MiB)
    link.land(link.start(MiB), after=MiB / 2e6)
    assert link.pace.blocks == PART_BLOCKS  # 15 MiB in 10 s at 2 MB/s, however they are split


def test_requests_that_shared_the_link_measure_it_together(monkeypatch: pytest.MonkeyPatch) -> None:
    """16 requests of a block, each at 125 KB/s: the link is 2 MB/s, and the
    next requests are one block each (not the 8 one request at 125 KB/s
    alone would suggest were it the link's; nor fewer)."""
    link = Link(monkeypatch)
    link.land(link.start(MiB), after=MiB / 2e6)
    wave = [link.start(MiB) for _ in range(CONNECTIONS)]
    link.land(*wave, after=MiB / 125e3)
    assert link.pace.blocks == 1
    # The link grows faster: 16 connections of 10 MB/s each, parts land in a second.  One wave
    # of landings says so (each raises it to what one request got, or at most twofold).
    wave = [link.start(MiB) for _ in range(CONNECTIONS)]
    link.land(*wave, after=MiB / 10e6)
    assert link.pace.blocks == PART_BLOCKS


def test_the_first_requests_of_a_sweep_to_land_do_not_speak_for_the_link(monkeypatch: pytest.MonkeyPatch) -> None:
    """Counted on the wire, most of the sweep's requests had not begun to
    send when the first one landed, at four times its share: the link's rate
    it suggests is taken at most twice what was known."""
    link = Link(monkeypatch)
    link.land(link.start(MiB), after=MiB / 2e6)  # alone: 2 MB/s
    wave = [link.start(MiB) for _ in range(CONNECTIONS)]
    link.land(wave[0], after=MiB / 500e3)  # "16 x 500 KB/s": 8 MB/s
    assert link.pace.blocks == 1  # (8 MB/s would make it 2)


def test_a_stall_shrinks_the_requests_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whole parts on a link that then slows down: a part cancelled as
    stalled (no byte for 20 s, 16 requests on the wire) says each connection
    is slower than 8 MiB / 20 s: the next requests are a quarter of that."""
    link = Link(monkeypatch)
    link.land(link.start(MiB), after=0.05)
    assert link.pace.blocks == PART_BLOCKS
    wave = [link.start(8 * MiB) for _ in range(CONNECTIONS)]
    link.now += 20.0
    link.pace.stalled(wave[0], 8 * MiB, 20.0)
    assert link.pace.blocks == 2
    link.pace.stalled(wave[1], MiB, 20.0)  # (a block of its rest, asked for block by block, stalled too)
    assert link.pace.blocks == 1


def test_with_one_connection_a_lone_request_is_not_spread_over_others(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its rate is the one the next request gets: a quarter of the time, as
    with any measured rate (not the half a worst case earns)."""
    limits = Limits(part_blocks=PART_BLOCKS, max_requests=1, read_deadline=60, whole_parts=True, unseen_s=UNSEEN_S)
    now = [100.0]
    monkeypatch.setattr("lazyfs.partpace.time", SimpleNamespace(monotonic=lambda: now[0]))
    pace = PartPace(limits, MiB, Wire(), lambda: 1024 * MiB)
    req = Req(0, MiB, pace.stamp(0))
    now[0] += MiB / 1e6  # 1 MB/s: 5 MB in a quarter of 20 s, 10 in half
    pace.landed(req)
    assert pace.blocks == 4


def test_boto3_requests_are_always_whole_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    """boto3 hands bytes over as they come: nothing to pace."""
    limits = Limits(part_blocks=PART_BLOCKS, max_requests=CONNECTIONS, read_deadline=60)
    pace = PartPace(limits, MiB, Wire(), lambda: 1024 * MiB)
    req = Req(0, MiB, pace.stamp(0))
    pace.landed(req)
    pace.stalled(req, MiB, 20.0)
    assert pace.blocks == PART_BLOCKS
