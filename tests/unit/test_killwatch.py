"""killwatch: which interrupted FUSE requests end early (only those of tasks
being killed), read off /proc/<tid>/status."""

from __future__ import annotations

import os
import signal
import threading

import trio

from lazyfs.killwatch import KillWatch, killed_thread_name, killed_threads


def status(sigpnd: int = 0, shdpnd: int = 0, name: str = "python3") -> str:
    return (f"Name:\t{name}\nUmask:\t0022\nState:\tD (disk sleep)\nTgid:\t4242\nPid:\t4243\n"
            f"SigQ:\t1/63304\nSigPnd:\t{sigpnd:016x}\nShdPnd:\t{shdpnd:016x}\nSigBlk:\t0000000000000000\n"
            "SigIgn:\t0000000001001000\nSigCgt:\t0000000100000002\n")


def bit(sig: int) -> int:
    return 1 << (sig - 1)


def test_sigkill_pending_on_the_thread_or_its_process_means_it_is_being_killed():
    assert killed_thread_name(status(sigpnd=bit(signal.SIGKILL), name="loader")) == "loader"
    assert killed_thread_name(status(shdpnd=bit(signal.SIGKILL))) == "python3"
    # bit 9 among others: SIGKILL added to a thread that had a SIGTERM pending
    assert killed_thread_name(status(sigpnd=bit(signal.SIGKILL) | bit(signal.SIGTERM))) == "python3"


def test_other_pending_signals_are_not_a_kill():
    assert killed_thread_name(status()) is None
    for sig in (signal.SIGCHLD, signal.SIGALRM, signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGWINCH):
        assert killed_thread_name(status(sigpnd=bit(sig), shdpnd=bit(sig))) is None, sig.name
    assert killed_thread_name(status(sigpnd=bit(signal.SIGKILL) >> 1 | bit(signal.SIGKILL) << 1)) is None


def test_a_status_without_signal_lines_or_with_garbage_is_not_a_kill():
    assert killed_thread_name("") is None
    assert killed_thread_name("Name:\tx\nSigPnd:\tzz\n") is None


def test_a_live_thread_or_one_not_found_is_not_being_killed():
    # This process lives; 0 is a requester in a PID namespace this one cannot see; the last is no thread.
    assert killed_threads([os.getpid(), threading.get_native_id(), 0, -1, 2 ** 22 + 12345]) == {}


class FakeRequest:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.answered = False
        self.cancelled = 0

    def cancel(self) -> None:
        self.cancelled += 1
        self.answered = True  # pyfuse3 answers EINTR once the handler has unwound


def test_only_requests_of_tasks_being_killed_end_and_the_others_are_looked_at_again():
    killed: set[int] = set()
    looks: list[list[int]] = []

    def being_killed(tids: list[int]) -> dict[int, str]:
        looks.append(tids)
        return {t: "reader" for t in tids if t in killed}

    async def main() -> None:
        watch = KillWatch(being_killed, recheck_s=0.05)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch.run)
            handled, doomed, done = FakeRequest(10), FakeRequest(11), FakeRequest(12)
            killed.add(11)
            for r in (handled, doomed, done):
                watch.interrupted(r)
            await trio.sleep(0.2)
            assert doomed.cancelled == 1 and handled.cancelled == 0
            done.answered = True  # answered meanwhile: no longer looked at
            answered_at = len(looks)
            with trio.fail_after(10):  # counted in looks, not in time: a loaded machine looks less often
                while len(looks) < answered_at + 3:
                    await trio.sleep(0.01)
            assert handled.cancelled == 0, "a handled signal ended a request"
            # The look under way when it was answered may still name it; none after.
            assert all(12 not in tids for tids in looks[answered_at + 1:]), "an answered request was looked at again"
            # A SIGKILL after a signal the reader handled sends no second interrupt: the re-check sees it.
            killed.add(10)
            with trio.fail_after(2):
                while not handled.cancelled:
                    await trio.sleep(0.01)
            await trio.sleep(0.2)
            assert (handled.cancelled, doomed.cancelled, done.cancelled) == (1, 1, 0)
            assert watch.ended == 2
            count = len(looks)
            await trio.sleep(0.2)
            assert len(looks) == count, "looked at /proc with nothing to watch"
            nursery.cancel_scope.cancel()

    trio.run(main)
