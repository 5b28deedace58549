"""errors.errno_of: what a reader is told for each failure."""

from __future__ import annotations

import errno

from lazyfs.errors import AccessDenied, NoThread, StoreError, errno_of


def test_local_failures_keep_their_errno() -> None:
    assert errno_of(StoreError("disk full", errno.ENOSPC)) == errno.ENOSPC
    assert errno_of(OSError(errno.EMFILE, "Too many open files")) == errno.EMFILE
    assert errno_of(AccessDenied("denied")) == errno.EACCES


def test_a_store_turned_read_only_is_an_io_error_to_a_reader() -> None:
    # (a `mount -o remount,ro` of the store's filesystem under a running mount:
    # the reader only opened a file to read it, and EROFS would say it wrote)
    assert errno_of(StoreError('"s3://b/k": cannot lock the download in the store: Read-only file system',
                               errno.EROFS)) == errno.EIO
    assert errno_of(OSError(errno.EROFS, "Read-only file system")) == errno.EIO


def test_anything_else_is_an_io_error() -> None:
    assert errno_of(RuntimeError("bug")) == errno.EIO
    assert errno_of(OSError("no errno")) == errno.EIO


def test_no_thread_is_eagain_but_to_a_read_an_io_error() -> None:
    # Python's f.read() takes EAGAIN for a non-blocking file with no data yet:
    # it returns what it read so far (or None), and the file looks cut short.
    assert errno_of(NoThread("cannot start a thread")) == errno.EAGAIN
    assert errno_of(NoThread("cannot start a thread"), reading=True) == errno.EIO
