"""The operations class called directly (no kernel): inode numbers that stay
the same while the kernel forgets and looks up again, folder listings with
"." and ".." read in several calls, and the inode counts `df -i` shows."""

from __future__ import annotations

from typing import Any

import pyfuse3
import pytest

from lazyfs.catalog import Catalog
from lazyfs.fetch import Fetcher
from lazyfs.fuse_ops import Operations
from lazyfs.handles import Handles
from lazyfs.inodes import ROOT_INODE
from lazyfs.modeljson import Source
from lazyfs.storespace import StoreSpace
from support.enginekit import BUCKET, fetch_config, running, trio_test
from support.fakeremote import FakeRemote

CTX: Any = None  # the handlers never look at the request context


async def ops_for(remote: FakeRemote, fetcher: Fetcher) -> Operations:
    catalog = Catalog(remote, [Source(BUCKET, "m/")])
    await catalog.refresh()
    return Operations(catalog, Handles(fetcher), StoreSpace(fetcher.store.fsinfo))


async def walk(ops: Operations, *names: str) -> int:
    """Look each name up as the kernel does (one lookup counted each); the last inode."""
    ino = ROOT_INODE
    for name in names:
        ino = (await ops.lookup(ino, name.encode(), CTX)).st_ino
    return ino


@pytest.fixture
def no_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pyfuse3, "invalidate_entry", lambda ino, name, deleted=0: None)
    monkeypatch.setattr(pyfuse3, "invalidate_inode", lambda ino, attr_only=False: None)


@trio_test
async def test_a_forgotten_inode_comes_back_with_its_number(remote: FakeRemote, stores) -> None:
    """Before: after the kernel forgot them (memory pressure, drop_caches) a
    file and its folder came back as new numbers (4 -> 7, 3 -> 6)."""
    remote.put(BUCKET, "m/sub/f.txt", b"hello\n")
    async with running(Fetcher(remote, stores(), fetch_config())) as fetcher:
        ops = await ops_for(remote, fetcher)
        m, sub, f = [await walk(ops, *names) for names in (["m"], ["m", "sub"], ["m", "sub", "f.txt"])]
        await ops.forget([(f, 1), (sub, 2), (m, 3)])  # each looked up once per walk through it
        assert len(ops.inodes) == 1, "the kernel forgot all but the root"
        assert [await walk(ops, "m"), await walk(ops, "m", "sub"), await walk(ops, "m", "sub", "f.txt")] == \
            [m, sub, f]


@trio_test
async def test_a_replaced_file_gets_a_new_number_and_its_old_one_is_let_go(remote: FakeRemote, stores,
                                                                           no_kernel: None) -> None:
    remote.put(BUCKET, "m/f.txt", b"one")
    remote.put(BUCKET, "m/g.txt", b"unchanged")
    async with running(Fetcher(remote, stores(), fetch_config())) as fetcher:
        ops = await ops_for(remote, fetcher)
        old, g = await walk(ops, "m", "f.txt"), await walk(ops, "m", "g.txt")
        await ops.forget([(old, 1), (g, 1)])
        assert ops.inodes.kept() == 2
        remote.put(BUCKET, "m/f.txt", b"two!")
        ops.kernel.forget_names(await ops.catalog.refresh())
        assert ops.inodes.kept() == 1, "the old version's number is kept after the refresh took it away"
        new = await walk(ops, "m", "f.txt")
        assert new != old
        assert await walk(ops, "m", "g.txt") == g, "an unchanged file keeps its number across a refresh"
        await ops.kernel.settle()


class Getdents:
    """The kernel's side of readdir: room for `per_call` entries per request,
    each resuming at the last offset it was sent.  pyfuse3.readdir_reply is
    patched to fill it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, per_call: int) -> None:
        self.per_call = per_call
        self.room = 0
        self.sent: list[tuple[bytes, int, int]] = []  # (name, inode, next offset)
        monkeypatch.setattr(pyfuse3, "readdir_reply", self._reply)

    def _reply(self, token: Any, name: bytes, attrs: pyfuse3.EntryAttributes, next_id: int) -> bool:
        if self.room == 0:
            return False
        self.room -= 1
        self.sent.append((name, attrs.st_ino, next_id))
        return True

    async def read(self, ops: Operations, ino: int) -> list[tuple[bytes, int, int]]:
        self.sent = []
        fh = await ops.opendir(ino, CTX)
        offset = 0
        while True:
            before, self.room = len(self.sent), self.per_call
            await ops.readdir(fh, offset, None)
            if len(self.sent) == before:
                break
            offset = self.sent[-1][2]
        await ops.releasedir(fh)
        return self.sent


@pytest.mark.parametrize("per_call", [1, 2, 3, 7, 1000])
@trio_test
async def test_a_listing_has_dot_and_dotdot_and_every_name_once_however_it_is_read(
        remote: FakeRemote, stores, monkeypatch: pytest.MonkeyPatch, per_call: int) -> None:
    """Before: no "." and ".." (ls -a, ls -fa, Perl's readdir showed none).
    The kernel counts no lookup for the dots (libfuse: readdirplus), so the
    table must not either, or the kernel's forgets would never balance."""
    names = [f"f{i:03d}" for i in range(40)] + ["sub"]
    for name in names[:-1]:
        remote.put(BUCKET, f"m/{name}", b"x")
    remote.put(BUCKET, "m/sub/deep", b"y")
    async with running(Fetcher(remote, stores(), fetch_config())) as fetcher:
        ops = await ops_for(remote, fetcher)
        m = await walk(ops, "m")
        kernel = Getdents(monkeypatch, per_call)
        sent = await kernel.read(ops, m)
        assert [n for n, _, _ in sent] == [b".", b".."] + [n.encode() for n in names]
        assert sent[0][1] == m and sent[1][1] == ROOT_INODE
        assert [o for _, _, o in sent] == list(range(1, len(names) + 3)), "offsets resume where they stopped"
        # The kernel forgets each name it was sent once, and "m" once (its
        # lookup): then it knows nothing but the root.
        await ops.forget([(ino, 1) for _, ino, _ in sent[2:]] + [(m, 1)])
        assert len(ops.inodes) == 1
        sub = await walk(ops, "m", "sub")
        assert [(n, i) for n, i, _ in (await kernel.read(ops, sub))[:2]] == [(b".", sub), (b"..", m)]
        root = await kernel.read(ops, ROOT_INODE)
        assert [(n, i) for n, i, _ in root] == [(b".", ROOT_INODE), (b"..", ROOT_INODE), (b"m", m)]


@trio_test
async def test_df_i_shows_the_store_filesystems_inodes_not_all_used(remote: FakeRemote, stores) -> None:
    """Before: f_ffree 0 (`df -i`: 100% used) on every mount, so inode
    exhaustion alerts fired.  Inodes are reported as blocks are: the store's
    filesystem, whose free inodes bound what can still be fetched."""
    remote.put(BUCKET, "m/a", b"x")
    async with running(Fetcher(remote, stores(), fetch_config())) as fetcher:
        ops = await ops_for(remote, fetcher)
        st = await ops.statfs(CTX)
        disk = fetcher.store.fsinfo()
        assert st.f_files > 0 and 0 < st.f_ffree <= st.f_files and st.f_favail <= st.f_ffree
        assert abs(st.f_ffree - disk.f_ffree) < 1000 and st.f_files == disk.f_files
        assert (st.f_blocks, st.f_bsize) == (disk.f_blocks, disk.f_bsize)
