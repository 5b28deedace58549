"""The on-disk store: published files and how they are judged, published and
evicted.  The pieces it is made of each own one folder:

    <root>/<key path>          published files, exactly where the mount shows them,
                               each with its identity record (identity.py)
    <root>/.lazyfs/layout      "1": the layout version of everything below
    <root>/.lazyfs/identities/ identity records as files, where the filesystem
                               refuses user xattrs (identity.py)
    <root>/.lazyfs/tmp/        downloads in progress and their locks (partials.py)
    <root>/.lazyfs/objects/    the content index (content_index.py)
    <root>/.lazyfs/listings/   saved listings for offline starts (listings.py)

Paths are resolved under the layers' descriptors (layer.py), never followed
through symlinks.  A file is judged through a descriptor, and a name is acted
on (renamed over, unlinked) only under the store's publish lock and after
checking that it still holds the inode that was judged.  All methods block:
call them from worker threads.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
from typing import Iterable

from lazyfs import storeevict, storemeta, storemodes
from lazyfs.content_index import ContentIndex
from lazyfs.errors import StoreError
from lazyfs.filestate import REJECTED, SIZE, UNRECORDED, ContentChecks, FileState, LocalCopy, LocalState, PrebakedAccept
from lazyfs.identity import Identity, IdentityRecords
from lazyfs.layer import STORE_MODES, Layer, Permissions, inode_at, open_if_there, removed, still_there
from lazyfs.listings import SavedListings
from lazyfs.namespace import RemoteObject
from lazyfs.partials import Partial, PartialFiles
from lazyfs.stalefolder import StaleFolders
from lazyfs.storeheal import Healer
from lazyfs.storemeta import LAYOUT_VERSION
from lazyfs.wording import quoted

# LocalCopy and LocalState (filestate.py) are the store's answers, imported from here too.
__all__ = ["LAYOUT_VERSION", "LocalCopy", "LocalState", "Store"]

log = logging.getLogger(__name__)


class Store:
    """The store layer (writable) and the prebaked layers searched after it."""

    def __init__(self, root: Layer, prebaked: Iterable[Layer] = (),
                 permissions: Permissions = STORE_MODES["private"]) -> None:
        self.root = root
        self.prebaked = tuple(prebaked)
        self.permissions = permissions
        self.identities = IdentityRecords(root, permissions)
        self.listings = SavedListings(root)
        self._fds: list[int] = []
        # Parts of the store this user may not read (a look only, open_to_read):
        # path in the store -> why.
        self.unreadable: dict[str, str] = {}
        self.partials: PartialFiles
        # The downloads in progress local_state sees: the store's, or None where
        # a look only finds no tmp/ it may read.
        self._partials_seen: PartialFiles | None = None
        self.index: ContentIndex
        self.stale_folders: StaleFolders
        self.healer: Healer  # its folders removed under a mount, made again (storeheal.py)

    @classmethod
    def open(cls, store_path: str, prebaked: Iterable[str] = (), root_fd: int | None = None,
             mode: str | None = None, create: bool = False, file_mode: int = 0, follow: bool = False) -> Store:
        """Open (and lay out) a store; `mode` (--store-mode) names the permissions
        of what it creates (layer.STORE_MODES), the store's own folder too with
        `create`; None: the mode the store has.  A store of another mode, one
        that records none, or one a change cut short left mixed, follows it first.
        It owns `root_fd` from here on, and closes it, and everything else it
        opened, if it fails.  Published files are executable where
        `file_mode` (--file-mode) says so."""
        root = Layer(root_fd, store_path, True, "store") if root_fd is not None \
            else Layer.open(store_path, True, "store", storemodes.new_store(mode).folder if create else None)
        try:
            how = storemodes.plan(root, mode, follow)
        except BaseException:
            root.close()
            raise
        store = cls(root, (), STORE_MODES[how.mode].with_exec(file_mode))
        try:
            store.prebaked = tuple(store._open_layer(p) for p in prebaked)
            store._prepare()
            storemodes.follow(root, store.identities, store.permissions, how)
        except BaseException as e:
            store.close()
            if getattr(e, "errno", None) == errno.EROFS:  # whichever write found it first: one line, with the remedy
                raise StoreError(f"cannot use store {store_path}: its filesystem is mounted read-only (serve a "
                                 f"read-only store's files with --prebaked {store_path}, beside a writable --store)",
                                 errno.EROFS) from None
            raise
        return store

    def _open_layer(self, path: str) -> Layer:
        layer = Layer.open(path, False, "prebaked layer")
        self.prebaked += (layer,)  # closed with the store if a later one fails
        return layer

    def _prepare(self) -> None:
        meta_fd, tmp_fd, objects_fd = storemeta.open_to_write(self.root, self.permissions, self._keep)
        self.partials = self._partials_seen = PartialFiles(tmp_fd, self.root.path)
        self.index = ContentIndex(objects_fd)
        self.stale_folders = StaleFolders(self.identities, self.index)
        self.identities.open(tmp_fd, self.prebaked)
        self.healer = Healer(self.root, self.permissions, self._keep, meta_fd, self.partials, self.index,
                             self.identities)

    @classmethod
    def open_to_read(cls, store_path: str, prebaked: Iterable[str] = ()) -> Store:
        """Open a store only to judge it (`status`): nothing is made or written
        in it, so a store on a read-only filesystem, or one this user may read
        but not write, is judged as a writable one.  Only the lookups
        (local_state, find_current, listings) may be used.  What of the store
        this user may not read is in `unreadable`."""
        store = cls(Layer.open(store_path, False, "store"))
        try:
            store.prebaked = tuple(store._open_layer(p) for p in prebaked)
            tmp_fd = storemeta.open_to_read(store.root, store._keep, store.unreadable)
            store._partials_seen = None if tmp_fd is None else PartialFiles(tmp_fd, store.root.path)
            store.identities.open_to_read(store.prebaked, store.unreadable)
        except BaseException:
            store.close()
            raise
        return store

    def _keep(self, fd: int) -> int:
        self._fds.append(fd)
        return fd

    def close(self) -> None:
        self.identities.close()
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
        for layer in self.prebaked:
            layer.close()
        self.prebaked = ()
        self.root.close()

    def layers(self) -> tuple[Layer, ...]:
        return (self.root,) + self.prebaked

    def fsinfo(self) -> os.statvfs_result:
        return os.statvfs(self.root.fd)

    # -- lookups -------------------------------------------------------------

    def find_current(self, obj: RemoteObject, accept: PrebakedAccept | None = None) -> LocalCopy | None:
        """An open local copy that is current for `obj`, searching the store, then
        each prebaked layer.  A copy with an identity record is current when the
        record names this version; one without (copied in by an admin, or whose
        record no longer describes it: Identity.describes) when its size
        matches: PREBAKED, which a pinned mount or --verify etag checks by
        content before serving it (`accept`: probe.PrebakedCheck).  A copy
        that is not current, or that `accept` rejects, is passed over as if it
        were absent: the search goes on to the next layer, never an error:
        the cache can make reads faster but never makes them fail."""
        for layer in self.layers():
            fd = layer.open_file(obj.key)
            if fd is None:
                continue
            try:
                st = os.fstat(fd)
                state = self._judge(fd, obj, layer, st)
                copy = LocalCopy(fd, layer, state, st.st_dev) if state is not None else None
                if copy is not None and (state is not FileState.PREBAKED or accept is None or accept(obj, copy)):
                    return copy
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        return None

    def local_state(self, obj: RemoteObject, checked: ContentChecks | None = None) -> LocalState:
        """What is on disk for `obj`, without fetching anything (OSError: a descriptor refused)."""
        stale = None
        for layer in self.layers():
            fd = layer.open_file(obj.key, strict=True)  # (not "missing" for want of a descriptor)
            if fd is None:
                continue
            try:
                st = os.fstat(fd)
                state = self._judge(fd, obj, layer, st)
                if state is not None:
                    ident = self.identities.read(fd, layer, st) if state is FileState.CACHED else None
                    verified = (ident.verified or UNRECORDED) if ident is not None else \
                        (checked(obj, layer, st) if checked is not None else "") or SIZE
                    if verified != REJECTED:  # (checked this run, and not served)
                        return LocalState(state, layer.label, obj.size, verified)
                stale = stale or layer.label
            finally:
                os.close(fd)
        seen = self._partials_seen
        nbytes = seen.resumable_bytes(obj) if seen is not None else 0
        if seen is not None and seen.downloading(obj):  # (a mount's, or a bake's: its bytes as last recorded)
            return LocalState(FileState.DOWNLOADING, "store", nbytes)
        if nbytes:
            return LocalState(FileState.PARTIAL, "store", nbytes)
        if stale:
            return LocalState(FileState.STALE, stale, 0)
        return LocalState(FileState.MISSING, "", 0)

    def _judge(self, fd: int, obj: RemoteObject, layer: Layer, st: os.stat_result) -> FileState | None:
        if st.st_size != obj.size:
            return None
        ident = self.identities.read(fd, layer, st)
        if ident is None:
            return FileState.PREBAKED
        return FileState.CACHED if ident.matches(obj) else None

    # -- publishing ---------------------------------------------------------------

    def publish(self, partial: Partial, origin: str = "fetch", *, keep_newer: bool = True,
                verified: str = "", listed: bool = False) -> bool:
        """Make a complete, verified download the current copy at its key path:
        fsync, date it with the object's Last-Modified, record its identity,
        then rename it into place (and fsync the folder, so the rename sticks).

        False when the key path holds a newer version by now (a later
        Last-Modified: an old handle's download finished after the new
        version's): nothing is placed, the sparse file leaves tmp/, and the
        caller's descriptor still serves this version's readers.  A caller
        that knows this version is the one the listing shows now passes
        keep_newer=False: an older version made current again (the latest
        one deleted in a versioned bucket) must still be placed.  `listed`:
        the caller's listing shows this version now, so a folder of fetched
        files standing at the path may go (stalefolder.py); else False too."""
        obj, fd = partial.obj, partial.fd
        if os.fstat(fd).st_size != obj.size:
            raise StoreError(f"{quoted(obj.uri)}: download has the wrong size, not published")
        try:
            self.healer.check()
        except StoreError as e:  # the store's folder gone: its readers have the file open
            log.warning("%s: served to the readers that have it open, not kept: %s", quoted(obj.uri), e)
            partial.not_kept = "the store's folder was removed under the mount"
            self.partials.discard(partial)
            return False
        self._seal(fd, obj, origin, verified)
        try:
            placed = self._place(partial.name + ".part", obj, keep_newer, listed)
        except FileNotFoundError:
            if inode_at(self.partials.tmp_fd, partial.name + ".part") == partial.ino:
                raise
            # Its folder was removed under the mount (storeheal.py): its readers have it open.
            log.warning("%s: its download file was removed from the store before it was complete: served to the "
                        "readers that have it open, not kept", quoted(obj.uri))
            partial.not_kept, placed = "its download file was removed from the store before it was complete", False
        except BaseException:
            self.identities.forget(fd, only_if_unlinked=False)  # not published: a retry records it again
            raise
        if not placed:
            partial.not_kept = partial.not_kept or "a newer version, or a folder, holds its path in the store"
            self.partials.discard(partial)
            self.identities.forget(fd)
        self.partials.forget_record(partial)
        return placed

    def _seal(self, fd: int, obj: RemoteObject, origin: str, verified: str = "") -> None:
        os.fsync(fd)
        os.utime(fd, ns=(obj.mtime_ns, obj.mtime_ns))
        # The record first: a user.* attribute needs write permission, which
        # only CAP_DAC_OVERRIDE would grant once the file is read-only.
        self.identities.write(fd, Identity.of(obj, origin, verified))
        os.fchmod(fd, self.permissions.file | self.permissions.executable)

    def _place(self, tmp_name: str, obj: RemoteObject, keep_newer: bool = True, listed: bool = False) -> bool:
        """Rename a finished file from tmp/ to its key path and index its
        content, unless the path holds a newer version or a folder that stays
        (False).  Under the publish lock, so the file judged is the file
        replaced; the index entry and the record of the version replaced go
        if nothing else uses them."""
        *dirs, name = obj.key.split("/")
        dfd = self.root.open_dir(dirs, create=True, mode=self.permissions.folder)
        old = None
        try:
            with self.partials.publish_lock():
                if removed(dfd):  # the folder was removed meanwhile (stalefolder.py)
                    dfd, gone = self.root.open_dir(dirs, create=True, mode=self.permissions.folder), dfd
                    os.close(gone)
                old = open_if_there(dfd, name)
                replaced = None if old is None else self.identities.read(old)
                if keep_newer and replaced is not None and replaced.mtime_ns > obj.mtime_ns \
                        and not replaced.matches(obj):
                    log.info("%s: not replacing the newer version already in the store", quoted(obj.uri))
                    return False
                if not self.stale_folders.place(functools.partial(
                        os.rename, tmp_name, name, src_dir_fd=self.partials.tmp_fd, dst_dir_fd=dfd),
                        dfd, name, obj, listed):
                    return False
                self.index.add(dfd, name, obj)
                if replaced is not None and not replaced.matches(obj):
                    self.index.drop_if_unused(replaced.etag, replaced.size)
            os.fsync(dfd)
            if old is not None:
                self.identities.forget(old)
        finally:
            if old is not None:
                os.close(old)
            os.close(dfd)
        return True

    def materialise(self, obj: RemoteObject) -> LocalCopy | None:
        """Make `obj` current from a file with the same (ETag, size) that the
        store already holds under another path (a new model version sharing
        files with the old one): a hard link, or a copy where links fail.
        None when there is no such file (or a newer version holds the path)."""
        src = self.index.open(obj)
        if src is None:
            return None
        try:
            ident = self.identities.read(src)
            if ident is None or not ident.matches(obj) or os.fstat(src).st_size != obj.size:
                return None
            tmp = f"{self.partials.name(obj)}.link"
            if not self._link_checked(src, tmp, obj):
                self._copy_into_tmp(src, tmp, obj, ident.origin, ident.verified)
            if not self._place(tmp, obj):
                self._drop_tmp(tmp)
                return None
        finally:
            os.close(src)
        copy = self.find_current(obj)
        if copy is not None:
            copy.linked = True
            copy.fetched = ident.origin == "fetch"  # a link shares its record; a copy was given its origin
        return copy

    def _link_checked(self, src: int, tmp: str, obj: RemoteObject) -> bool:
        """Hard-link the index entry of `obj` to tmp/`tmp`, if the entry is still
        the file `src` (whose identity was checked); False where links fail."""
        try:
            self.partials.remove(tmp)
            self.index.link_to(obj, self.partials.tmp_fd, tmp)
        except OSError:
            return False
        if still_there(self.partials.tmp_fd, tmp, os.fstat(src)):
            return True
        self.partials.remove(tmp)  # the entry was replaced between the check and the link
        return False

    def _drop_tmp(self, tmp: str) -> None:
        """Remove a link or copy made in tmp/ that was not placed (and the
        sidecar of a copy)."""
        fd = open_if_there(self.partials.tmp_fd, tmp)
        try:
            self.partials.remove(tmp)
            if fd is not None:
                self.identities.forget(fd)
        finally:
            if fd is not None:
                os.close(fd)

    def _copy_into_tmp(self, src: int, tmp: str, obj: RemoteObject, origin: str, verified: str = "") -> None:
        fd = self.partials.create_sibling(tmp)
        try:
            left, off = obj.size, 0
            while left:
                n = os.copy_file_range(src, fd, left, off, off)  # reflinks where the filesystem can
                if n == 0:
                    raise StoreError(f"{quoted(obj.uri)}: source copy ended early")
                left, off = left - n, off + n
            self._seal(fd, obj, origin, verified)
        except BaseException:
            os.close(fd)
            self.partials.remove(tmp)
            raise
        os.close(fd)

    # -- leftovers --------------------------------------------------------------------

    def sweep(self, keep: Iterable[RemoteObject]) -> int:
        """Free what nothing will use again: downloads of versions not in
        `keep` (a whole current listing) left in tmp/ (PartialFiles.sweep), and
        content index entries whose published paths are all gone (an admin
        deleted them: the entry alone kept the bytes on disk; not those of a
        store copied without its hard links, ContentIndex.sweep).  Bytes freed."""
        return self.partials.sweep(keep) + self.index.sweep(self.partials.publish_lock, self.identities, self.root)

    # -- cache budget ---------------------------------------------------------------

    def fetched_files(self) -> list[tuple[str, int, int]]:
        """(key, size, atime) of every file lazyfs fetched: what the budget may evict (storeevict.py)."""
        return storeevict.fetched_files(self.root, self.identities)

    def evict(self, keys: Iterable[str]) -> int:
        """Remove fetched files (never anything else) from the store; bytes freed."""
        return self.evict_counted(keys).bytes

    def evict_counted(self, keys: Iterable[str]) -> storeevict.Evicted:
        """As `evict`: the files removed too (one already gone is not counted)."""
        try:
            self.healer.check()  # (its publish lock is in tmp/)
        except StoreError:
            pass  # the store's folder gone, and its files with it: nothing to evict
        return storeevict.evict(storeevict.Evictor(self.root, self.identities, self.partials, self.index), keys)
