"""This machine's cache of fetched inputs (``~/.cache/cairn/inputs`` or ``$CAIRN_INPUT_CACHE``):
an input that lives in an object store is fetched once per machine and content, then linked into
each step that reads it.

Entries are read-only folders named by the digest of their content and layout, filled in a
temporary folder and renamed into place (a half-fetched input is never used). The cache holds at
most ``$CAIRN_INPUT_CACHE_MAX_GB`` (default 20): after each fill the least recently used entries
are removed, except those a running step holds (a shared ``flock`` for as long as the step runs).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from cairn.storage.tree import make_read_only

DEFAULT_LIMIT_GB = 20.0


def cache_root() -> Path:
    return Path(os.environ.get("CAIRN_INPUT_CACHE") or Path.home() / ".cache" / "cairn" / "inputs")


def limit_bytes() -> int:
    raw = os.environ.get("CAIRN_INPUT_CACHE_MAX_GB", "")
    try:
        gb = float(raw) if raw else DEFAULT_LIMIT_GB
    except ValueError:
        gb = -1.0
    if not 0 <= gb < float("inf"):
        raise ValueError(f"CAIRN_INPUT_CACHE_MAX_GB={raw!r} is not a number of gigabytes (e.g. 20 or 0.5; "
                         f"0 keeps only what running steps use)")
    return int(gb * 1024 ** 3)


def cached_input(key: str, sizes: dict[str, int], fill: Callable[[Path], None],
                 holds: list[int] | None) -> Path | None:
    """The folder holding the input keyed ``key``, fetched by ``fill`` the first time. A cached
    folder whose files are not the expected ones (changed by a step: root ignores read-only bits)
    is fetched again — or, while other steps use it, not touched: then None, and the caller fetches
    a private copy. The entry's lock is added to ``holds`` (the caller closes it when its step has
    ended); without ``holds`` it is released at once."""
    limit = limit_bytes()  # a bad setting fails before anything is fetched
    root = cache_root()
    name = key.replace(":", "-")
    folder = root / name
    for sub in (root, root / ".locks", root / ".sizes", root / ".stamps"):
        sub.mkdir(parents=True, exist_ok=True)
    lock = os.open(root / ".locks" / name, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_SH)  # waits while an eviction removes this entry
        if folder.is_dir():
            if _intact(folder, sizes, root / ".stamps" / name):
                os.utime(folder)  # last used
                _keep(lock, holds)
                return folder
            try:  # replaced only when no other step holds it
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(lock)
                return None
            _remove(folder)
            fcntl.flock(lock, fcntl.LOCK_SH)
        _fill(root, folder, fill)
        (root / ".sizes" / name).write_text(str(sum(sizes.values())))
        (root / ".stamps" / name).write_text(_stamp(_listing(folder)))
        _keep(lock, holds)
    except BaseException:
        os.close(lock)
        raise
    try:
        evict(root, limit)
    except OSError:
        pass  # best effort: another step may be filling or evicting at the same time
    return folder


def evict(root: Path, limit: int) -> list[str]:
    """Remove the least recently used entries until the cache holds at most ``limit`` bytes;
    entries held by a running step stay. Returns the names removed."""
    entries = []
    for entry in root.iterdir() if root.is_dir() else ():
        if entry.name.startswith("."):
            continue
        try:
            if entry.is_dir():
                entries.append((entry.stat().st_mtime, entry.name, _size(root, entry)))
        except OSError:
            continue  # removed meanwhile by another step's eviction
    total = sum(size for _, _, size in entries)
    removed = []
    for _, name, size in sorted(entries):
        if total <= limit:
            break
        lock = os.open(root / ".locks" / name, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock)  # a running step uses it
            continue
        try:
            if (root / name).is_dir():  # not already removed by another step's eviction
                _remove(root / name)
                (root / ".sizes" / name).unlink(missing_ok=True)
                (root / ".stamps" / name).unlink(missing_ok=True)
                removed.append(name)
            total -= size
        finally:
            os.close(lock)
    return removed


def _keep(lock: int, holds: list[int] | None) -> None:
    if holds is None:
        os.close(lock)
    else:
        holds.append(lock)


def _fill(root: Path, folder: Path, fill: Callable[[Path], None]) -> None:
    staging = root / f".fetching-{uuid.uuid4().hex}"
    try:
        staging.mkdir()
        fill(staging)
        make_read_only(staging)
        for dirpath, _, _ in os.walk(staging):
            os.chmod(dirpath, 0o555)  # folders too: a step given a link cannot add or remove files
        try:
            os.rename(staging, folder)
        except OSError:  # another step fetched the same input meanwhile: use that one
            if not folder.is_dir():
                raise
    finally:
        if staging.exists():
            _remove(staging)


def _size(root: Path, entry: Path) -> int:
    try:
        return int((root / ".sizes" / entry.name).read_text())
    except (OSError, ValueError):  # filled by an older Cairn: measured
        return sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(entry) for n in names)


def _listing(folder: Path) -> dict[str, tuple[int, int]]:
    """Each file (and link) under ``folder``: (size, modification time); a link's size is the length
    of its target's name."""
    found = {}
    for dirpath, dirnames, names in os.walk(folder):
        for n in [*names, *(d for d in dirnames if os.path.islink(os.path.join(dirpath, d)))]:
            full = os.path.join(dirpath, n)
            st = os.lstat(full)
            found[os.path.relpath(full, folder).replace(os.sep, "/")] = (st.st_size, st.st_mtime_ns)
    return found


def _stamp(listing: dict[str, tuple[int, int]]) -> str:
    from cairn.core.digests import digest_json

    return digest_json(sorted([rel, size, mtime] for rel, (size, mtime) in listing.items()))


def _intact(folder: Path, sizes: dict[str, int], stamp_file: Path) -> bool:
    """Every file is there with its size, and nothing else; and none was written since the entry
    was filled (its stamp: sizes and modification times; a step running as root, or one that made
    a file writable, can change a cached file in place)."""
    listing = _listing(folder)
    if {rel: size for rel, (size, _) in listing.items()} != sizes:
        return False
    try:
        stamp = stamp_file.read_text()
    except OSError:  # filled by an older Cairn: its sizes are all it can be checked by
        return True
    return stamp == _stamp(listing)


def _remove(folder: Path) -> None:
    for dirpath, dirnames, _ in os.walk(folder):
        for d in (dirpath, *(os.path.join(dirpath, n) for n in dirnames)):
            try:
                os.chmod(d, 0o755)
            except OSError:
                pass  # gone already: rmtree does not mind
    shutil.rmtree(folder, ignore_errors=True)
