"""Working folders of completed steps, kept for the next step of the same snapshot.

A step runs in a fresh copy of its snapshot, removed once it completed. On some file systems
(ext4 without a journal, as on many VMs) making inodes costs far more right after others were
freed nearby, and a step's folder and script copy are two made and two freed per step. A
completed step's folder that is still exactly its snapshot (the step changed, added and removed
nothing in it, and no process it left behind still works in it) is instead renamed for the next
step of that snapshot: no copy, no inode made or freed.

"Exactly": every entry has the inode, type, mode, owner, size and change time it had once
materialised, each file the modification time set then (a sentinel in the past, a different one
per file: any write moves it to now, whatever the clock's granularity, and a copy with its times
kept brings another file's), and every folder the same names."""

from __future__ import annotations

import itertools
import os
import re
import shutil
import socket
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

from cairn.runner.processes import PidMark, pid_mark, process_start_time, processes_in, this_process

KEPT_PREFIX = ".kept-"  # kept folders in the work folder: .kept-<host>-<pid>-<start>-<n>
KEPT_BYTES = 1 << 30  # what kept folders may hold at most, together (a folder over it is not kept)
SENTINEL_AGE_S = 2  # a kept file's modification time is set this far into the past, or further

# one folder's entries, by name: (name, inode, mode, uid, gid, size, mtime ns, ctime ns)
Entry = tuple[str, int, int, int, int, int, int, int]
# folder (relative) -> its entries, sorted; "." -> the top folder's own (mode, uid, gid) as an entry
Stamp = dict[str, tuple[Entry, ...]]

_names = itertools.count()  # one sequence for every target of the process: names never collide
_TAG = re.compile(r"(\d+)-(\d+)-\d+")  # what follows the host in a kept folder's name: pid, start, number


def _entry(name: str, st: os.stat_result) -> Entry:
    return (name, st.st_ino, st.st_mode, st.st_uid, st.st_gid, st.st_size,
            0 if stat.S_ISDIR(st.st_mode) else st.st_mtime_ns, st.st_ctime_ns)


def _folder(root: str, rel: str) -> tuple[Entry, ...]:
    with os.scandir(os.path.join(root, rel) if rel else root) as it:
        return tuple(sorted(_entry(e.name, e.stat(follow_symlinks=False)) for e in it))


def _top(root: str) -> tuple[Entry, ...]:
    """The top folder's own mode and owner (its change time moves as it is renamed: not compared)."""
    st = os.lstat(root)
    return (("", 0, st.st_mode, st.st_uid, st.st_gid, 0, 0, 0),)


def _stamp(root: str) -> Stamp | None:
    """Every folder's entries under ``root``; None if it cannot be read."""
    stamp: Stamp = {}
    stack = [""]
    try:
        stamp["."] = _top(root)
        while stack:
            rel = stack.pop()
            entries = stamp[rel] = _folder(root, rel)
            stack.extend(f"{rel}/{e[0]}" if rel else e[0] for e in entries if stat.S_ISDIR(e[2]))
    except OSError:
        return None
    return stamp


def _unchanged(root: str, stamp: Stamp) -> bool:
    """Whether ``root`` is still as stamped; stops at the first folder that is not (a step that
    added many files is not walked through)."""
    try:
        return all((_top(root) if rel == "." else _folder(root, rel)) == entries for rel, entries in stamp.items())
    except OSError:
        return False


def _size(stamp: Stamp) -> int:
    return sum(e[5] for entries in stamp.values() for e in entries if not stat.S_ISDIR(e[2]))


def _owner_tag() -> str:
    """This agent, as kept folders name it."""
    return "-".join(str(part) for part in this_process())


class WorkFolders:
    """The kept folders of one compute target, at most ``limit`` of them holding at most
    ``max_bytes`` (the least recently kept go first)."""

    def __init__(self, work_root: str | os.PathLike[str], limit: Callable[[], int] = lambda: 8,
                 max_bytes: int = KEPT_BYTES) -> None:
        self._root = os.fspath(work_root)
        self._limit = limit  # read at each release: the target's concurrency may change
        self._max_bytes = max_bytes
        self._lock = threading.Lock()
        # work folder -> (snapshot, stamp, the pids before its step began: the step's leftovers are made after)
        self._stamps: dict[str, tuple[str, Stamp, PidMark | None]] = {}
        self._kept: OrderedDict[str, tuple[str, Stamp, int]] = OrderedDict()  # kept path -> (snapshot, stamp, size)
        self._kept_bytes = 0
        self._closed = False  # cleared: nothing is kept any more
        self._owner = _owner_tag()

    def stamp(self, folder: str, snapshot: str) -> None:
        """``folder`` now holds exactly ``snapshot``, fresh: remember it as such (before its step
        starts)."""
        mark = pid_mark()
        first = _stamp(folder)
        if first is None:
            return
        sentinel = (int(time.time()) - SENTINEL_AGE_S) * 1_000_000_000
        try:
            for rel, entries in first.items():
                for e in entries:
                    if stat.S_ISREG(e[2]):
                        sentinel -= 1  # each file its own
                        os.utime(os.path.join(folder, rel, e[0]), ns=(sentinel, sentinel))
        except OSError:
            return
        stamped = _stamp(folder)  # (the new times, and the change times they made)
        if stamped is not None:
            with self._lock:
                self._stamps[folder] = (snapshot, stamped, mark)

    def take(self, snapshot: str, dest: str) -> bool:
        """Rename a kept folder of ``snapshot`` to ``dest`` (which must not exist; before its step
        starts): True when done."""
        if os.path.lexists(dest):  # what an earlier attempt left: the caller clears it
            return False
        while True:
            with self._lock:
                found = next((path for path, (snap, _, _) in reversed(self._kept.items()) if snap == snapshot), None)
                if found is None:
                    return False
                _, stamp, size = self._kept.pop(found)
                self._kept_bytes -= size
            if _unchanged(found, stamp):  # nothing touched it while it was kept
                try:
                    os.rename(found, dest)
                except OSError:
                    shutil.rmtree(found, ignore_errors=True)
                    return False
                mark = pid_mark()  # (before its step starts; earlier steps' leftovers were looked for as they ended)
                with self._lock:
                    self._stamps[dest] = (snapshot, stamp, mark)
                return True
            shutil.rmtree(found, ignore_errors=True)

    def release(self, folder: str, completed: bool) -> tuple[bool, list[str]]:
        """The step that ran in ``folder`` ended. True: it completed and left the folder exactly its
        snapshot, which is now kept (renamed) for the next step of that snapshot. False: the caller
        removes the folder (completed) or leaves it to be looked at (failed). With the kept folders
        this pushed out, for the caller to remove (``remove_folders``) once the engine was told."""
        with self._lock:
            stamped = self._stamps.pop(folder, None)
        size = _size(stamped[1]) if stamped is not None else 0
        if not completed or stamped is None or size > self._max_bytes or self._closed:
            return False, []
        if not _unchanged(folder, stamped[1]) or processes_in(folder, since=stamped[2]):
            return False, []  # (a process the step left, working there, would write into the next step's)
        kept = os.path.join(self._root, f"{KEPT_PREFIX}{self._owner}-{next(_names)}")
        try:
            os.rename(folder, kept)
        except OSError:
            return False, []
        evicted = []
        with self._lock:
            if self._closed:  # cleared while this was renamed
                evicted.append(kept)
            else:
                self._kept[kept] = (stamped[0], stamped[1], size)
                self._kept_bytes += size
            while self._kept and (len(self._kept) > self._limit() or self._kept_bytes > self._max_bytes):
                path, (_, _, gone) = self._kept.popitem(last=False)
                self._kept_bytes -= gone
                evicted.append(path)
        return True, evicted

    def clear(self) -> None:
        """Remove every kept folder (the target is shut down)."""
        with self._lock:
            kept = list(self._kept)
            self._kept.clear()
            self._kept_bytes = 0
            self._stamps.clear()
            self._closed = True
        remove_folders(kept)


def remove_folders(paths: Iterable[str]) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


def remove_leftovers(work_root: str | os.PathLike[str]) -> None:
    """Kept folders of agents of this machine that ended without clearing them (killed): not those
    of an agent still running, nor another machine's."""
    host = f"{KEPT_PREFIX}{socket.gethostname()}-"
    try:
        names = [n for n in os.listdir(work_root) if n.startswith(host)]
    except OSError:
        return
    for name in names:
        tag = _TAG.fullmatch(name[len(host):])  # (not "node-2-..." of machine "node-2", seen from "node")
        if tag is None:
            continue
        pid, started = tag.groups()
        if process_start_time(int(pid)) == started:
            continue  # its agent still runs
        shutil.rmtree(os.path.join(work_root, name), ignore_errors=True)
