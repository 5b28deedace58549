"""The FUSE operations class called directly (no kernel): names, attributes,
the read path through handles, xattrs, and errno for what a read-only mount
refuses."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
import trio

from lazyfs import xattrs
from lazyfs.catalog import Catalog
from lazyfs.fetch import Fetcher
from lazyfs.fuse_ops import Operations
from lazyfs.handles import Handles
from lazyfs.inodes import ROOT_INODE
from lazyfs.modeljson import Source
from lazyfs.namespace import DirNode
from lazyfs.storespace import StoreSpace
from support.enginekit import BUCKET, fetch_config, running, trio_test, wait_for
from support.fakeremote import FakeRemote

CTX: Any = None  # the handlers never look at the request context


async def ops_for(remote: FakeRemote, fetcher: Fetcher) -> Operations:
    catalog = Catalog(remote, [Source(BUCKET, "m/")])
    await catalog.refresh()
    return Operations(catalog, Handles(fetcher), StoreSpace(fetcher.store.fsinfo))


async def walk(ops: Operations, *names: str) -> pyfuse3.EntryAttributes:
    ino = ROOT_INODE
    attrs = None
    for name in names:
        attrs = await ops.lookup(ino, name.encode(), CTX)
        ino = attrs.st_ino
    assert attrs is not None
    return attrs


@trio_test
async def test_lookup_open_read_and_state_through_the_operations(remote: FakeRemote, stores) -> None:
    data = os.urandom(700_000)
    remote.put(BUCKET, "m/sub/w.bin", data)
    fetcher = Fetcher(remote, stores(), fetch_config())
    async with running(fetcher):
        ops = await ops_for(remote, fetcher)
        attrs = await walk(ops, "m", "sub", "w.bin")
        assert attrs.st_size == len(data) and attrs.st_blocks == -(-len(data) // 512)
        assert await ops.getxattr(attrs.st_ino, b"user.lazyfs.state", CTX) == b"missing"
        assert remote.count("GET") == 0, "looking and asking downloaded something"
        info = await ops.open(attrs.st_ino, os.O_RDONLY, CTX)
        assert info.keep_cache
        assert bytes(await ops.read(info.fh, 500_000, 100_000)) == data[500_000:600_000]
        await ops.release(info.fh)
        obj = ops.catalog.tree.find("m/sub/w.bin")
        assert obj is not None and not isinstance(obj, DirNode)
        await wait_for(lambda: fetcher.active(obj) is None, "publication")
        assert await ops.getxattr(attrs.st_ino, b"user.lazyfs.state", CTX) == b"cached"
        missing = await ops.lookup(ROOT_INODE, b"nothing-here", CTX)
        assert missing.st_ino == 0  # a negative entry the kernel may cache


@trio_test
async def test_getfattr_d_across_a_publish_sees_the_state_and_the_check_of_one_moment(
        remote: FakeRemote, stores, monkeypatch: pytest.MonkeyPatch) -> None:
    """getfattr lists a file's attributes, then reads them in turn: the state
    before how it was verified.  A download published in between showed
    `state: downloading` beside `verified: MD5`, which never held at once."""
    monkeypatch.setattr(xattrs, "READING_S", 60.0)  # however slow the machine, the publish falls inside the reading
    remote.put(BUCKET, "m/w.bin", os.urandom(300_000))
    gate = remote.gate("m/w.bin")
    fetcher = Fetcher(remote, stores(), fetch_config())
    async with running(fetcher):
        ops = await ops_for(remote, fetcher)
        ino = (await walk(ops, "m", "w.bin")).st_ino
        info = await ops.open(ino, os.O_RDONLY, CTX)
        assert b"user.lazyfs.verified" in await ops.listxattr(ino, CTX)
        assert await ops.getxattr(ino, b"user.lazyfs.state", CTX) == b"downloading"
        gate.release()
        obj = ops.catalog.tree.find("m/w.bin")
        assert obj is not None and not isinstance(obj, DirNode)
        await wait_for(lambda: fetcher.active(obj) is None, "publication")
        assert await ops.getxattr(ino, b"user.lazyfs.verified", CTX) == b"", "the same moment as the state"
        await ops.release(info.fh)
        await ops.listxattr(ino, CTX)  # the next getfattr -d
        assert await ops.getxattr(ino, b"user.lazyfs.state", CTX) == b"cached"
        assert await ops.getxattr(ino, b"user.lazyfs.verified", CTX) not in (b"", b"unverified")


@trio_test
async def test_a_read_only_mount_refuses_writes_with_erofs(remote: FakeRemote, stores) -> None:
    remote.put(BUCKET, "m/a.txt", b"a")
    fetcher = Fetcher(remote, stores(), fetch_config())
    async with running(fetcher):
        ops = await ops_for(remote, fetcher)
        attrs = await walk(ops, "m", "a.txt")
        for call in (ops.open(attrs.st_ino, os.O_RDWR, CTX), ops.unlink(ROOT_INODE, b"m", CTX),
                     ops.mkdir(ROOT_INODE, b"x", 0o755, CTX), ops.setxattr(attrs.st_ino, b"user.x", b"1", CTX)):
            with pytest.raises(pyfuse3.FUSEError) as failed:
                await call
            assert failed.value.errno == errno.EROFS
        with pytest.raises(pyfuse3.FUSEError) as failed:
            await ops.open(ROOT_INODE, os.O_RDONLY, CTX)
        assert failed.value.errno == errno.EISDIR


@trio_test
async def test_a_failing_store_read_is_an_errno_never_an_exception(remote: FakeRemote, stores,
                                                                   tmp_path: Path) -> None:
    from lazyfs.errors import AccessDenied

    remote.put(BUCKET, "m/a.bin", b"x" * 1000)
    remote.fail_gets["m/a.bin"] = [AccessDenied("access denied to s3://bkt/m/a.bin", bucket=BUCKET, key="m/a.bin")]
    fetcher = Fetcher(remote, stores(), fetch_config())
    async with running(fetcher):
        ops = await ops_for(remote, fetcher)
        attrs = await walk(ops, "m", "a.bin")
        info = await ops.open(attrs.st_ino, os.O_RDONLY, CTX)
        with pytest.raises(pyfuse3.FUSEError) as failed:
            await ops.read(info.fh, 0, 1000)
        assert failed.value.errno == errno.EACCES
        await ops.release(info.fh)
        await trio.sleep(0)


@trio_test
async def test_a_get_that_found_no_descriptor_is_emfile_to_its_reader(remote: FakeRemote, stores,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    """As the README's failure table says of a mount out of descriptors: EMFILE,
    and one line naming the limit (remote.translate's, test_descriptor_limit.py)."""
    from lazyfs.errors import OutOfDescriptors

    said = ('"s3://bkt/m/a.bin": cannot open a connection to the object store: too many open files: '
            "the daemon's descriptor limit (ulimit -n / RLIMIT_NOFILE) is 64")
    remote.put(BUCKET, "m/a.bin", b"x" * 1000)
    remote.fail_gets["m/a.bin"] = [OutOfDescriptors(said, bucket=BUCKET, key="m/a.bin")]
    fetcher = Fetcher(remote, stores(), fetch_config())
    async with running(fetcher):
        ops = await ops_for(remote, fetcher)
        info = await ops.open((await walk(ops, "m", "a.bin")).st_ino, os.O_RDONLY, CTX)
        with pytest.raises(pyfuse3.FUSEError) as failed:
            await ops.read(info.fh, 0, 1000)
        assert failed.value.errno == errno.EMFILE
        await ops.release(info.fh)
        await trio.sleep(0)
    [line] = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "descriptor limit (ulimit -n / RLIMIT_NOFILE) is 64" in line and "cannot reach" not in line, line


@trio_test
async def test_a_handle_whose_open_never_reached_the_kernel_is_released_when_the_inode_is_forgotten(
        remote: FakeRemote, stores) -> None:
    """An opener interrupted while its open was answered leaves a handle the
    kernel will never release; the kernel's forget of the inode proves it."""
    remote.put(BUCKET, "m/a.bin", os.urandom(2 * 1024 * 1024))
    fetcher = Fetcher(remote, stores(), fetch_config())
    async with running(fetcher):
        ops = await ops_for(remote, fetcher)
        attrs = await walk(ops, "m", "a.bin")
        await ops.open(attrs.st_ino, os.O_RDONLY, CTX)  # the reply is lost: no release will come
        assert len(ops.handles) == 1
        dl = fetcher.downloads()[0]
        assert dl.readers == 1
        await ops.forget([(attrs.st_ino, 1)])
        assert len(ops.handles) == 0 and dl.readers == 0


@pytest.mark.parametrize("flag, granted, expected", [(True, True, "big"), (False, True, ""), (True, False, "")])
@trio_test
async def test_which_opens_skip_the_page_cache(remote: FakeRemote, stores, monkeypatch, caplog, flag: bool,
                                               granted: bool, expected: str) -> None:
    """direct_io for a handle reading a big file as it downloads, when the
    kernel maps such handles (the pyfuse3 of scripts/native/build-pyfuse3
    says so) and --no-direct-io was not given; never for a small file or a
    complete local copy."""
    from lazyfs import fuse_ops
    from lazyfs.stats import STATS

    monkeypatch.setattr(fuse_ops, "DIRECT_IO_FROM", 1024 * 1024)
    monkeypatch.setattr(pyfuse3, "direct_io_allows_mmap", lambda: granted, raising=False)
    monkeypatch.setattr(STATS, "opens_direct_io", 0)
    remote.put(BUCKET, "m/big.bin", os.urandom(1024 * 1024))
    remote.put(BUCKET, "m/small.bin", os.urandom(1024 * 1024 - 1))
    fetcher = Fetcher(remote, stores(), fetch_config())
    async with running(fetcher):
        catalog = Catalog(remote, [Source(BUCKET, "m/")])
        await catalog.refresh()
        ops = Operations(catalog, Handles(fetcher), StoreSpace(fetcher.store.fsinfo), passthrough=False,
                         direct_io=flag)
        assert ops.direct_io_allow_mmap is flag  # what pyfuse3 asks the kernel for at INIT
        with caplog.at_level(logging.INFO, logger="lazyfs.fuse_ops"):
            ops.init()
        assert ("read through the page cache" in caplog.text) is (flag and not granted)
        direct = set()
        for name in ("big", "small"):
            attrs = await walk(ops, "m", f"{name}.bin")
            info = await ops.open(attrs.st_ino, os.O_RDONLY, CTX)
            if info.direct_io:
                direct.add(name)
            assert len(await ops.read(info.fh, 0, 1 << 20)) == attrs.st_size
            await ops.release(info.fh)
        assert direct == ({expected} if expected else set())
        assert STATS.opens_direct_io == len(direct)
        big = ops.catalog.tree.find("m/big.bin")
        assert big is not None and not isinstance(big, DirNode)
        await wait_for(lambda: fetcher.active(big) is None, "publication")
        info = await ops.open((await walk(ops, "m", "big.bin")).st_ino, os.O_RDONLY, CTX)
        assert not info.direct_io, "a complete local copy is read through the page cache"
        await ops.release(info.fh)


@trio_test
async def test_an_open_racing_the_shutdown_is_logged_once_at_info_not_as_an_error(remote: FakeRemote, stores,
                                                                                    caplog) -> None:
    """A request that fails because the mount is stopping is expected: EIO for the reader, one INFO line."""
    remote.put(BUCKET, "m/w.bin", os.urandom(300_000))
    fetcher = Fetcher(remote, stores(), fetch_config())
    async with running(fetcher):
        ops = await ops_for(remote, fetcher)
        attrs = await walk(ops, "m", "w.bin")
        await fetcher.close(grace=0.2)  # SIGTERM: the mount is stopping
        with caplog.at_level(logging.INFO, logger="lazyfs.fuse_ops"), pytest.raises(pyfuse3.FUSEError) as info:
            await ops.open(attrs.st_ino, os.O_RDONLY, CTX)
    assert info.value.errno == errno.EIO
    said = [r for r in caplog.records if "shutting down" in r.getMessage()]
    assert [(r.levelno, r.getMessage()) for r in said] == [
        (logging.INFO, f'open: "s3://{BUCKET}/m/w.bin": lazyfs is shutting down (errno EIO)')]


@trio_test
async def test_reads_of_a_failed_download_do_not_grow_its_stored_error(remote: FakeRemote, stores,
                                                                        monkeypatch) -> None:
    """Every read of a handle whose download failed raises the download's one
    stored error again; each raise once appended its frames to that error's
    traceback, so a loop of reads (the kernel retrying a MAP_POPULATE fault)
    grew the daemon by ~2 KB per read, for good."""
    import gc
    import traceback

    from lazyfs.errors import AccessDenied

    remote.put(BUCKET, "m/a.bin", b"x" * 1000)
    remote.fail_gets["m/a.bin"] = [AccessDenied("access denied to s3://bkt/m/a.bin", bucket=BUCKET, key="m/a.bin")]
    fetcher = Fetcher(remote, stores(), fetch_config())
    async with running(fetcher):
        ops = await ops_for(remote, fetcher)
        attrs = await walk(ops, "m", "a.bin")
        info = await ops.open(attrs.st_ino, os.O_RDONLY, CTX)
        monkeypatch.setattr("lazyfs.repeats.FREE_FAILURES", 1000)  # no pauses: this is about the error object
        for _ in range(200):
            with pytest.raises(pyfuse3.FUSEError) as failed:
                await ops.read(info.fh, 0, 1000)
            assert failed.value.errno == errno.EACCES
        stored = [o for o in gc.get_objects() if isinstance(o, AccessDenied)]
        assert stored, "the download's error is gone: nothing to check"
        depth = max(len(traceback.extract_tb(e.__traceback__)) for e in stored)
        assert depth < 40, f"a stored error's traceback holds {depth} frames after 200 reads"
        await ops.release(info.fh)
        await trio.sleep(0)


@trio_test
async def test_opens_after_bytes_failed_verification_keep_no_page_until_one_opens_the_whole_copy(
        remote: FakeRemote, stores) -> None:
    """The kernel caches a version's pages for its inode, whatever the bytes:
    those of a download that then failed its check stay until the kernel is
    told to drop them, on a thread not waited for.  An open that kept the
    cache meanwhile read them again: a pinned mount served unapproved bytes
    (e2e test_last_bytes, once in about 20 runs).  Every open drops them
    (keep_cache off) until one opens the whole, verified copy."""
    data = os.urandom(700_000)
    remote.put(BUCKET, "m/w.bin", data)
    remote.corrupt(BUCKET, "m/w.bin", at=1000)  # bad bytes in transit, once
    fetcher = Fetcher(remote, stores(), fetch_config())
    async with running(fetcher):
        ops = await ops_for(remote, fetcher)
        bad: list[object] = []

        def bytes_were_bad(obj: Any) -> None:  # as mount.py wires it, less the kernel's own notification
            bad.append(obj)
            remote.corrupt(BUCKET, "m/w.bin", at=1000)  # flipped back: the download again gets them right
            ops.handles.bytes_were_bad(obj)

        fetcher.hooks.on_bad_data = bytes_were_bad
        ino = (await walk(ops, "m", "w.bin")).st_ino
        first = await ops.open(ino, os.O_RDONLY, CTX)
        assert first.keep_cache
        obj = ops.catalog.tree.find("m/w.bin")
        assert obj is not None and not isinstance(obj, DirNode)
        await wait_for(lambda: bad, "the failed check")
        arriving = await ops.open(ino, os.O_RDONLY, CTX)
        assert not arriving.keep_cache, "an open after the failed check kept the pages of its bytes"
        await wait_for(lambda: fetcher.active(obj) is None, "publication")
        whole = await ops.open(ino, os.O_RDONLY, CTX)
        assert not whole.keep_cache, "the first open of the whole copy kept the pages of the bad bytes"
        again = await ops.open(ino, os.O_RDONLY, CTX)
        assert again.keep_cache, "the verified copy's pages are its own"
        assert bytes(await ops.read(again.fh, 0, 4096)) == data[:4096]
        for info in (first, arriving, whole, again):
            await ops.release(info.fh)
