"""How long the trio thread is held: a trio Instrument that times every task
step (the run of one task between two of its awaits, during which nothing
else on the loop runs), for tests and scripts that bound or report the worst.
Test support only: the product never installs it.

Two clocks: wall time (what a waiting FUSE request feels, including waits for
the GIL held by a worker thread and the OS running something else), and the
trio thread's own CPU time (the work done on it, whatever the machine's load:
what a test can bound robustly).  `Lateness` adds what steps do not show:
how late a timer fires, waits for the GIL between steps included."""

from __future__ import annotations

import contextlib
import gc
import time
from typing import AsyncIterator, Iterator

import trio


class StepTimer(trio.abc.Instrument):
    def __init__(self) -> None:
        self.worst = 0.0  # wall seconds
        self.worst_task = ""
        self.worst_cpu = 0.0  # the trio thread's CPU seconds
        self.worst_cpu_task = ""
        self.steps = 0
        self._started: tuple[float, float] | None = None  # None: the step began before we watched

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._started = (time.perf_counter(), time.thread_time())

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        self._count(task)

    def _count(self, task: trio.lowlevel.Task) -> None:
        if self._started is None:
            return
        wall, cpu = time.perf_counter() - self._started[0], time.thread_time() - self._started[1]
        self._started = None
        self.steps += 1
        if wall > self.worst:
            self.worst, self.worst_task = wall, task.name
        if cpu > self.worst_cpu:
            self.worst_cpu, self.worst_cpu_task = cpu, task.name

    def __str__(self) -> str:
        return (f"worst step {self.worst * 1000:.1f} ms wall ({self.worst_task}), "
                f"{self.worst_cpu * 1000:.1f} ms CPU ({self.worst_cpu_task}), of {self.steps} steps")


@contextlib.contextmanager
def watching() -> Iterator[StepTimer]:
    """Time the current trio run's task steps for the block."""
    timer = StepTimer()
    trio.lowlevel.add_instrument(timer)
    try:
        yield timer
    finally:
        trio.lowlevel.remove_instrument(timer)
        timer._count(trio.lowlevel.current_task())  # the step that ends the watch counts too


class Lateness:
    """The worst lateness of a 1 ms timer, while `run` runs in a nursery."""

    def __init__(self, period: float = 0.001) -> None:
        self.period = period
        self.worst = 0.0

    async def run(self) -> None:
        while True:
            started = time.perf_counter()
            await trio.sleep(self.period)
            self.worst = max(self.worst, time.perf_counter() - started - self.period)


@contextlib.asynccontextmanager
async def watched() -> AsyncIterator[tuple[StepTimer, Lateness]]:
    """The trio thread's steps for the block, and how late a 1 ms timer fires.
    The collector's pauses stop every thread wherever they start: they are
    not the work measured, so it is off meanwhile."""
    gc.collect()
    gc.disable()
    late = Lateness()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(late.run)
            with watching() as steps:
                yield steps, late
            nursery.cancel_scope.cancel()
    finally:
        gc.enable()
