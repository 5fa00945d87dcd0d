"""Working folders of completed steps, kept for the next step of the same snapshot.

A step runs in a fresh copy of its snapshot, removed once it completed. On some file systems
(ext4 without a journal, as on many VMs) making inodes costs far more right after others were
freed nearby, and a step's folder and script copy are two made and two freed per step. A
completed step's folder that is still exactly its snapshot (the step changed, added and removed
nothing in it) is instead renamed for the next step of that snapshot: no copy, no inode made or
freed.

"Exactly": every entry has the inode, type, mode and size it had once materialised, its files the
modification time set then (a sentinel in the past: any write moves it to now, whatever the
clock's granularity), and every folder the same names. Anything else, and the folder is removed
as before."""

from __future__ import annotations

import itertools
import os
import shutil
import stat
import threading
import time
from collections import OrderedDict

KEPT_PREFIX = ".kept-"  # kept folders in the work folder (removed by an agent that starts)
KEPT_BYTES = 1 << 30  # what kept folders may hold at most, together (a folder over it is not kept)
SENTINEL_AGE_S = 2  # a kept file's modification time is set this far into the past

Entry = tuple[str, int, int, int, int]  # relative path, inode, mode, size, mtime (ns; 0 for folders)


def _walk(root: str) -> list[Entry] | None:
    """Every entry under ``root`` (itself first), sorted by path; None if it cannot be read."""
    entries: list[Entry] = []
    try:
        st = os.lstat(root)
        entries.append(("", st.st_ino, st.st_mode, 0, 0))
        stack = [""]
        while stack:
            rel = stack.pop()
            with os.scandir(os.path.join(root, rel) if rel else root) as it:
                for e in it:
                    st = e.stat(follow_symlinks=False)
                    path = f"{rel}/{e.name}" if rel else e.name
                    if stat.S_ISDIR(st.st_mode):
                        entries.append((path, st.st_ino, st.st_mode, 0, 0))
                        stack.append(path)
                    else:
                        entries.append((path, st.st_ino, st.st_mode, st.st_size, st.st_mtime_ns))
    except OSError:
        return None
    entries.sort()
    return entries


def _size(entries: list[Entry]) -> int:
    return sum(size for _rel, _ino, _mode, size, _mtime in entries)


class WorkFolders:
    """The kept folders of one compute target, at most ``limit`` of them holding at most
    ``max_bytes`` (the least recently kept go first)."""

    def __init__(self, work_root: str | os.PathLike[str], limit: int = 8, max_bytes: int = KEPT_BYTES) -> None:
        self._root = os.fspath(work_root)
        self._limit = limit
        self._max_bytes = max_bytes
        self._lock = threading.Lock()
        self._stamps: dict[str, tuple[str, list[Entry]]] = {}  # work folder -> (snapshot, entries)
        self._kept: OrderedDict[str, tuple[str, list[Entry]]] = OrderedDict()  # kept path -> same
        self._names = itertools.count()

    def stamp(self, folder: str, snapshot: str) -> None:
        """``folder`` now holds exactly ``snapshot``, fresh: remember it as such."""
        sentinel = (int(time.time()) - SENTINEL_AGE_S) * 1_000_000_000
        entries = _walk(folder)
        if entries is None:
            return
        try:
            for rel, _ino, mode, _size, _mtime in entries:
                if rel and stat.S_ISREG(mode):
                    os.utime(os.path.join(folder, rel), ns=(sentinel, sentinel))
        except OSError:
            return
        entries = [(rel, ino, mode, size, sentinel if stat.S_ISREG(mode) else mtime)
                   for rel, ino, mode, size, mtime in entries]
        with self._lock:
            self._stamps[folder] = (snapshot, entries)

    def take(self, snapshot: str, dest: str) -> bool:
        """Rename a kept folder of ``snapshot`` to ``dest`` (which must not exist): True when done."""
        if os.path.lexists(dest):  # what an earlier attempt left: the caller clears it
            return False
        while True:
            with self._lock:
                found = next((path for path, (snap, _) in reversed(self._kept.items()) if snap == snapshot), None)
                if found is None:
                    return False
                _, entries = self._kept.pop(found)
            if _walk(found) == entries:  # nothing touched it while it was kept
                try:
                    os.rename(found, dest)
                except OSError:
                    shutil.rmtree(found, ignore_errors=True)
                    return False
                with self._lock:
                    self._stamps[dest] = (snapshot, entries)
                return True
            shutil.rmtree(found, ignore_errors=True)

    def release(self, folder: str, completed: bool) -> bool:
        """The step that ran in ``folder`` ended. True: it completed and left the folder exactly its
        snapshot, which is now kept (renamed) for the next step of that snapshot. False: the caller
        removes the folder (completed) or leaves it to be looked at (failed)."""
        with self._lock:
            stamped = self._stamps.pop(folder, None)
        if not completed or stamped is None or _size(stamped[1]) > self._max_bytes or _walk(folder) != stamped[1]:
            return False
        kept = os.path.join(self._root, f"{KEPT_PREFIX}{os.getpid()}-{next(self._names)}")
        try:
            os.rename(folder, kept)
        except OSError:
            return False
        with self._lock:
            self._kept[kept] = stamped
            evicted = []
            while len(self._kept) > self._limit or sum(_size(e) for _, e in self._kept.values()) > self._max_bytes:
                evicted.append(self._kept.popitem(last=False)[0])
        for path in evicted:
            shutil.rmtree(path, ignore_errors=True)
        return True

    def clear(self) -> None:
        """Remove every kept folder (the target is shut down)."""
        with self._lock:
            kept = list(self._kept)
            self._kept.clear()
            self._stamps.clear()
        for path in kept:
            shutil.rmtree(path, ignore_errors=True)


def remove_leftovers(work_root: str | os.PathLike[str]) -> None:
    """Kept folders an agent that ended without clearing them left (it was killed); not this
    process's own."""
    own = f"{KEPT_PREFIX}{os.getpid()}-"
    try:
        names = [n for n in os.listdir(work_root) if n.startswith(KEPT_PREFIX) and not n.startswith(own)]
    except OSError:
        return
    for name in names:
        shutil.rmtree(os.path.join(work_root, name), ignore_errors=True)
