"""Shared by every tier: the import path (tests/support is a package), and a
faulthandler/timeout configuration in pyproject.toml.  Tier fixtures live in
tests/engine/conftest.py and tests/e2e/conftest.py."""

from __future__ import annotations

import os

import pytest

_UNGROUPED = pytest.StashKey[str]()


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The longest tests (marked `long`) first, the rest in their order: on
    several workers (scripts/test) a 100 s soak begun last would run on alone
    at the end.  A stable sort, the same in every worker."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)
    _check_groups_hold(config, items)


def _check_groups_hold(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test marked `xdist_group` that a parallel run would put beside the
    tests it must not run with fails instead.  pytest-xdist's --dist
    loadgroup groups by a suffix it writes into each test's id; pytest 9.2
    no longer lets it (pytest-xdist#1386), and it then spreads the tests as
    if they were not marked.  (Runs after xdist's hook: trylast.)"""
    if not (os.environ.get("PYTEST_XDIST_WORKER") and getattr(config.option, "loadgroup", False)):
        return
    for item in items:
        if item.get_closest_marker("xdist_group") and item.nodeid.rfind("@") <= item.nodeid.rfind("]"):
            item.stash[_UNGROUPED] = (
                f"--dist loadgroup does not group tests with pytest {pytest.__version__} (pytest-xdist#1386): "
                "this test would run beside the tests it must not; install the test extra's pytest "
                "(scripts/setup), or run on one worker (-n 0)")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if _UNGROUPED in item.stash:
        pytest.fail(item.stash[_UNGROUPED], pytrace=False)
