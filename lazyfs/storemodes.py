"""Who may read a store (`--store-mode`), as the store itself records it:
the mode of `.lazyfs/layout`, which lazyfs writes with its files' mode
(0400 private, 0440 group, 0444 public).

A `mount` or `bake` told no `--store-mode` keeps the mode the store has (a new
store is private), so what it adds is reachable by whoever may read the rest.
One told another mode than the store's makes the store follow it (the walk is
storewalk.py's), so that no folder it made before keeps the files it makes
now from the readers the new mode names (a bake follows its mode, or the
store's, even where the store says it has it: what an older lazyfs or a hand
left mixed is set right).

A layout of any other mode records none: lazyfs before the layout followed
--store-mode wrote it 0600, whatever the store's mode.  Such a store's mode
is what it lets read now (`reach_found`): the widest reach of what lazyfs put
there (storewalk.Look), so it is never narrowed on a guess.  It follows that
mode (its own folder aside: that is not opened further on a guess) and
records it.

A change is marked under way before anything is changed: `.lazyfs/mode-change`
names the mode it gives; the record (the layout) is changed last, and the
mark removed after it.  An open that finds the mark makes the store follow
the mode it names (or the one it is told: that wins), so a change cut short
(a file that could not be changed, a kill) is finished by the next mount or
bake, whatever its flags.

All functions block: call them before the mount, or from worker threads.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import dataclass

from lazyfs.config import DEFAULT_STORE_MODE
from lazyfs.errors import StoreError
from lazyfs.identity import IdentityRecords
from lazyfs.layer import FILE_FLAGS, STORE_MODES, Layer, Permissions, remove, write_small
from lazyfs.namespace import RESERVED_NAME
from lazyfs.storemeta import LAYOUT
from lazyfs.storewalk import RANKS, Look, Walk
from lazyfs.wording import quoted

log = logging.getLogger(__name__)

# .lazyfs/mode-change: the mode a change under way gives the store (its only line).
UNDER_WAY = "mode-change"
# The layout's modes that record a store's mode: the three lazyfs writes (its files').
RECORDS = {STORE_MODES[name].file: name for name in RANKS}


def mode_of(bits: int) -> str:
    """The --store-mode whose files have these read bits."""
    return "public" if bits & 0o004 else "group" if bits & 0o040 else "private"


def recorded_as(bits: int) -> str | None:
    """The mode a layout of these permission bits records; None for any other
    (0600: an older lazyfs's, whatever the store's mode; one set by hand)."""
    return RECORDS.get(stat.S_IMODE(bits))


def chosen(asked: str | None, recorded: str | None) -> str:
    """The mode a command gives the store: the one it was told, else the one
    the store records, else a new store's (private)."""
    return asked or recorded or DEFAULT_STORE_MODE


def new_store(asked: str | None) -> Permissions:
    """The modes a store made now gets (it records none yet)."""
    return STORE_MODES[chosen(asked, None)]


def must_follow(asked: str | None, recorded: str, always: bool = False) -> bool:
    """Must a store that records its mode (a new one is made with its mode)
    follow the mode chosen?  One of another mode, when told; any, `always` (a bake)."""
    return always or asked not in (None, recorded)


@dataclass(frozen=True)
class Found:
    """What a store says of its mode before it is opened."""

    layout: int | None = None  # the layout's permission bits; None: no layout (lazyfs has not laid it out)
    under_way: str | None = None  # the mark of a change cut short: the mode it names ("" unreadable); None: none

    @property
    def recorded(self) -> str | None:
        return None if self.layout is None else recorded_as(self.layout)

    @property
    def marked(self) -> str | None:
        """The mode a change cut short was giving the store, where its mark names one."""
        return self.under_way if self.under_way in RANKS else None


@dataclass(frozen=True)
class Plan:
    """The mode a command gives a store, and whether the store must follow it now."""

    mode: str
    walk: bool
    found: Found
    seen: tuple[str, str] | None = None  # a store that records no mode: the mode found, and what showed it

    def said(self, folders: int, files: int) -> str | None:
        """What changed, for the one INFO line (None: nothing)."""
        was, named, mode = self.found.recorded, self.found.marked, self.mode
        if was == mode and self.found.under_way is None and not folders + files:
            return None
        why = [f"it was {was}" if was else f"{RESERVED_NAME}/{LAYOUT} was {self.found.layout or 0:04o}, which "
               "records no mode" + (": an older lazyfs wrote it so" if self.found.layout == 0o600 else "")]
        if self.seen is not None:
            reach, where = self.seen
            why.append(f"found {reach}: " + (f"{quoted(where)} was open to {_WHOM[reach]}" if where else
                                             "nothing lazyfs put there was open to other users"))
        if self.found.under_way is not None:
            why.append(f"a change to {named} was cut short: "
                       f"{'finished' if named == mode else 'undone' if mode == was else 'replaced by this one'} now"
                       if named else "a change of mode was cut short: made whole now")
        if self.seen is not None:
            head = f"{mode}, recorded now"
        elif mode != was:
            head = f"now {mode}"
        else:
            head = f"{mode} again" if named not in (None, mode) else mode
        return f"{head} ({'; '.join(why)}): {folders} folders and {files} files given its modes"


_WHOM = {"public": "anyone", "group": "its group"}


def decide(asked: str | None, found: Found, always: bool = False, seen: tuple[str, str] | None = None) -> Plan:
    """The mode a command told `asked` (a bake: `always`) gives a store that
    says `found` (`seen`: the mode it was found to have, where it records none)."""
    if found.layout is None:  # a new store: made with the mode, nothing to follow
        return Plan(chosen(asked, None), False, found)
    mode = asked or found.marked or found.recorded or (seen[0] if seen else DEFAULT_STORE_MODE)
    walk = found.under_way is not None or found.recorded is None or must_follow(asked, found.recorded, always)
    return Plan(mode, walk, found, None if asked or found.marked else seen)


def plan(root: Layer, asked: str | None, always: bool = False) -> Plan:
    """What `decide` says of the store at `root`, after looking at it."""
    found = look(root)
    seen = None
    if found.layout is not None and not asked and not found.marked and found.recorded is None:
        seen = reach_found(root)
    return decide(asked, found, always, seen)


def look(root: Layer) -> Found:
    """The layout's mode and the mark of a change under way; Found() where
    lazyfs has not laid the store out (or cannot look: opening it for
    writing then says why)."""
    try:
        meta = root.open_dir([RESERVED_NAME])
    except OSError:
        return Found()
    try:
        layout = stat.S_IMODE(os.stat(LAYOUT, dir_fd=meta, follow_symlinks=False).st_mode)
    except OSError:
        layout = None
    try:
        return Found(layout, _mark(meta))
    finally:
        os.close(meta)


def _mark(meta: int) -> str | None:
    try:
        fd = os.open(UNDER_WAY, FILE_FLAGS, dir_fd=meta)
    except FileNotFoundError:
        return None
    except OSError:
        return ""  # there, but naming no mode we may read: the store is walked all the same
    try:
        with os.fdopen(fd, "rb") as f:
            return f.read(64).decode(errors="replace").strip()
    except OSError:
        return ""


def reach_found(root: Layer) -> tuple[str, str]:
    """The mode a store that records none has: who may reach what lazyfs put
    there (storewalk.Look), and the first thing that showed it."""
    identities = IdentityRecords(root)
    try:
        identities.open_to_read((), {})
        seen = Look(root, identities, STORE_MODES[DEFAULT_STORE_MODE])
        seen.run()
    finally:
        identities.close()
    return RANKS[seen.widest], seen.where


def follow(root: Layer, identities: IdentityRecords, modes: Permissions, how: Plan) -> None:
    """Make the store follow `modes` where `how` says it must (the module's
    note): marked under way first, the mark removed last; one line says
    what changed."""
    if not how.walk:
        return
    meta = root.open_dir([RESERVED_NAME])
    try:
        try:
            write_small(meta, UNDER_WAY, f"{how.mode}\n".encode())
            os.fsync(meta)
        except OSError as e:
            raise StoreError(f"cannot give store {root.path} mode {how.mode}: cannot mark the change under way "
                             f"in {RESERVED_NAME}/{UNDER_WAY} ({e.strerror})", e.errno or errno.EIO) from None
        walk = Walk(root, identities, modes)
        walk.run(open_root=how.seen is None)
        remove(meta, UNDER_WAY)
    finally:
        os.close(meta)
    line = how.said(walk.folders, walk.files)
    if line:
        log.info("store %s: %s", root.path, line)
