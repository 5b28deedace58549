"""`lazyfs status`'s answer and how it is said: a row per file, then one
summary line (or, with --json, one JSON document).  What it says leaves the
process with any URL's password masked (redact.urls): a note quotes the
object store's error, which may name the endpoint.  Pure: no I/O but `out`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TextIO

from lazyfs import redact, wording
from lazyfs.filestate import FileState


@dataclass(frozen=True)
class FileStatus:
    path: str
    size: int
    state: FileState
    verified: str = ""  # how a cached copy's content was checked, "unverified", or "size" (prebaked)
    # --verify content: "match", "differs", or "no checksum" (the lock names none); "" when not hashed.
    content: str = ""


@dataclass(frozen=True)
class Answer:
    files: list[FileStatus]
    note: str  # where the states come from
    # Why it cannot be ready whatever the files' states ("" when it can be):
    # not every file is known.
    unknown: str = ""
    lock: str = ""  # the digest of the lock the files were judged against
    pinned: str = ""  # the digest of the lock a running mount serves ("" when it is not pinned)

    @property
    def ready(self) -> bool:
        return not self.unknown and all(f.state.ready for f in self.files)


def report(answer: Answer, as_json: bool, out: TextIO) -> None:
    files, ready = answer.files, answer.ready
    counts = {s.value: sum(1 for f in files if f.state is s) for s in FileState}
    total = sum(f.size for f in files)
    if as_json:
        rows = [{"path": f.path, "size": f.size, "state": f.state.value, "verified": f.verified or None,
                 "content": f.content or None} for f in files]
        json.dump({"files": rows, "totals": {"files": len(files), "bytes": total, **counts}, "ready": ready,
                   "unknown": redact.urls(answer.unknown) or None, "lock": answer.lock or None,
                   "pinned": answer.pinned or None, "source": redact.urls(answer.note)},
                  out, indent=2)
        out.write("\n")
        return
    width = max([len(f"{f.size:,}") for f in files] + [4])
    print(f"{'STATE':<11} {'SIZE':>{width}}  PATH", file=out)
    for f in files:
        print(f"{f.state.value:<11} {f.size:>{width},}  {wording.one_line(f.path)}", file=out)  # a row per file
    summary = ", ".join(f"{n} {state}" for state, n in counts.items())
    unverified = sum(1 for f in files if f.verified == "unverified")
    if unverified:
        summary += (f" ({unverified} unverified: only their size was checked, not their content: the object store "
                    f"offered nothing lazyfs can check it against, or a multipart ETag of part sizes it cannot say)")
    checked = sum(1 for f in files if f.content == "no checksum")
    if checked:
        summary += f" ({checked} with no checksum in the lock: judged by identity record)"
    verdict = "ready" if ready else f"not ready: {answer.unknown}" if answer.unknown else "not ready"
    if ready and answer.lock:
        verdict = f"ready: matches lock {answer.lock}"
    print(redact.urls(f"{wording.count(len(files), 'file')}, {total / 2**20:.1f} MiB: {summary} ({verdict}; "
                      f"{answer.note})"), file=out)
