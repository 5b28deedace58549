"""The package's shape, checked: dependencies point one way (no import cycle,
not even behind TYPE_CHECKING), modules stay small, and pyfuse3 and boto3
stay behind their one or two modules."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "lazyfs"
MAX_LINES = 420


def imports() -> dict[str, set[str]]:
    """module -> the modules it imports (lazyfs modules by short name, others by top-level name)."""
    graph: dict[str, set[str]] = {}
    for path in PKG.glob("*.py"):
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module == "lazyfs":
                    deps.update(a.name for a in node.names)
                elif node.module.startswith("lazyfs."):
                    deps.add(node.module.split(".")[1])
                else:
                    deps.add(node.module.split(".")[0])
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    parts = alias.name.split(".")
                    deps.add(parts[1] if parts[0] == "lazyfs" and len(parts) > 1 else parts[0])
        graph[path.stem] = deps
    return graph


def test_no_import_cycle() -> None:
    graph = imports()
    ours = {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for d in sorted(ours[m]):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(d):] + [d]))
            if d not in state:
                visit(d)
        path.pop()
        state[m] = 2

    for m in sorted(ours):
        if m not in state:
            visit(m)


def test_the_engine_points_one_way() -> None:
    graph = imports()
    for low, high in [("download", "fetch"), ("download", "coop"), ("coop", "fetch"), ("store", "fetch"),
                      ("dispatch", "fetch"), ("ranged_get", "download"), ("completion", "download")]:
        assert high not in graph[low], f"{low} imports {high}"


def test_pure_modules_import_no_io_framework() -> None:
    graph = imports()
    for pure in ("config", "errors", "namespace", "inodes", "filestate"):
        assert not graph[pure] & {"trio", "pyfuse3", "boto3", "botocore"}, pure


def test_pyfuse3_and_boto3_stay_in_their_modules() -> None:
    graph = imports()
    # The FUSE layer: the handlers, the mount, and the notifications to the kernel.
    assert {m for m, d in graph.items() if "pyfuse3" in d} == {"fuse_ops", "kernelcache", "mount"}
    assert {m for m, d in graph.items() if d & {"boto3", "botocore", "urllib3"}} == {"remote", "awssession",
                                                                                      "botoretries"}


def test_modules_stay_small() -> None:
    sizes = {p.name: len(p.read_text().splitlines()) for p in PKG.glob("*.py")}
    assert {n: s for n, s in sizes.items() if s > MAX_LINES} == {}


def test_the_first_listing_starts_before_the_fuse_machinery_is_imported() -> None:
    """startup.py (and what it imports) must not pull in trio or pyfuse3:
    the first LIST's round trip is meant to overlap their import."""
    graph = imports()
    seen, todo = set(), ["startup"]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += [d for d in graph[m] if d in graph]
    assert not {d for m in seen for d in graph[m]} & {"trio", "pyfuse3"}, sorted(seen)


def test_every_hop_to_a_thread_goes_through_threads_py() -> None:
    """A thread that cannot be started (the process at its limit of threads)
    is met in one place, threads.py: a module calling trio's thread functions
    itself would get RuntimeError, unprepared (a traceback, a lock kept)."""
    called = re.compile(r"to_thread\.run_sync|start_thread_soon")
    assert [p.name for p in PKG.glob("*.py") if p.name != "threads.py" and called.search(p.read_text())] == []
